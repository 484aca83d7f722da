"""Export a causal LM to ONNX with hetmap's per-matrix placement tags.

Reads a PyTorch model (a Hugging Face causal LM, or any module mapping ``input_ids`` to a
logits tensor) and plain placement data keyed by matrix key; writes one ONNX file (plus
``<file>.data`` when the weights pass 2 GB). It does not depend on hetmap's IR.

Matrix keys: an ``nn.Linear`` is keyed by its module path (``model.layers.0.self_attn.q_proj``);
a matrix of a fused experts module by ``<experts path>.<e>.<gate|up|down>``, in ``nn.Linear``
``[out, in]`` layout.

Rules:

1. Exporter: ``torch.export.export`` (non-strict, with Mamba's sequence loop as one scan op:
   :mod:`~hetmap.compiler.backends.onnx_scan`, and Mamba-2's chunked scan and MiniMax's
   lightning attention in forms that keep the sequence length dynamic:
   :mod:`~hetmap.compiler.backends.onnx_sequence`), the complex-op shims of
   :mod:`~hetmap.compiler.backends.onnx_complex`, then ``torch.onnx.export(dynamo=True,
   optimize=False)`` on that program. hetmap then runs the onnxscript optimizer itself with
   ``Transpose(weight)`` kept unfolded, so every weight initializer keeps its parameter name,
   and tags the nodes after it. The TorchScript exporter is not used: the dynamo path exports
   every supported model form here (all tested families), while the TorchScript path is
   deprecated and cannot express the data-dependent dispatch of sparse MoE loops.
2. Graph interface: input ``input_ids`` int64 ``[batch, sequence]``, output ``logits``
   ``[batch, sequence, vocab]``; both input dims are dynamic.
3. Model form: see :mod:`~hetmap.compiler.backends.onnx_prepare`. Experts stores of every
   layout :mod:`hetmap.runtime.layouts` reads get one initializer per expert matrix (and
   per bias) and the dispatch of rule 8's ``moe_form``; hand-written
   ModuleList/ModuleDict experts keep their ``nn.Linear`` initializers and are exported as
   written unless their container is called as ``experts(hidden, top_k_index,
   top_k_weights)`` (then dispatched by ``moe_form`` too). A hand-written dispatch must be traceable by
   ``torch.export`` (dense ``torch.where`` dispatch, or sparse ``torch.where`` +
   ``index_add_`` loops; Python branches on data such as ``if idx.numel() == 0`` are not).
4. Tags: see :mod:`~hetmap.compiler.backends.onnx_tagging`; ``model_props`` become the
   model's ``metadata_props``.
5. ``tile_ranges`` lower a matrix to one MatMul per tile (before export, via
   :class:`~hetmap.compiler.backends.onnx_modules.TiledLinear`); tile initializers are named
   ``<key>.tiles.<i>`` and hold ``W[c0:c1, r0:r1]`` in ``[out, in]`` layout.
6. The file is written to a staging folder next to ``path``, checked with
   ``onnx.checker.check_model(full_check=True)`` and, with ``verify`` (the default), run by
   onnxruntime on the example input: logits further than ``VERIFY_TOLERANCE * max(1,
   max |logits|)`` from PyTorch's are an EmitError naming the difference (and the modules
   whose top-k had ties, see :mod:`~hetmap.compiler.backends.onnx_verify`). Then it is moved
   into place (data file first), so a failure leaves no partial file. The caller's model is
   left as it was (hooks, modes and modules restored).
7. Two initializers with identical bytes can be merged by the optimizer; if that removes a
   weight matrix from the graph, export fails rather than losing a placement.
8. ``moe_form`` (:data:`MOE_FORMS`): ``static`` (every expert on every token, rule 3),
   ``dispatch`` (each expert on its routed tokens only, standard operators:
   :mod:`~hetmap.compiler.backends.onnx_dispatch`) or ``ort`` (onnxruntime's
   ``com.microsoft.MoE`` where a block's routing and activation fit, else ``dispatch``:
   :mod:`~hetmap.compiler.backends.onnx_ort_moe`). The model carries it as
   ``hetmap.moe_form``. ``external_data`` writes the weights to ``<file>.data`` (the ONNX
   external-data format) whatever their size; above 2 GB (the protobuf limit) they always go
   there.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from onnxscript.optimizer import optimize_ir
from torch import nn

from hetmap.common.errors import EmitError, first_line
from hetmap.compiler.backends.onnx_complex import with_real_complex_ops
from hetmap.compiler.backends.onnx_ort_moe import TRANSLATIONS, tag_moe_nodes
from hetmap.compiler.backends.onnx_prepare import prepared_for_export
from hetmap.compiler.backends.onnx_scan import scans_as_ops
from hetmap.compiler.backends.onnx_sequence import dynamic_sequence_forms
from hetmap.compiler.backends.onnx_tagging import (
    UntaggedNode,
    keeps_weight_transposes,
    strip_prefix,
    tag_weight_nodes,
    weight_uses,
)
from hetmap.compiler.backends.onnx_verify import PyTorchReference

EXPORTER = "torch.onnx.export(dynamo=True)"
MOE_FORMS = ("static", "dispatch", "ort")
MOE_FORM_PROP = "hetmap.moe_form"
EXTERNAL_DATA_THRESHOLD_BYTES = 2_000_000_000
DEFAULT_INPUT_SHAPE = (2, 8)
VERIFY_TOLERANCE = 1e-3
_WRAPPED = "wrapped"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and which nodes it tagged."""

    path: Path
    exporter: str
    nodes_by_key: Mapping[str, tuple[str, ...]]
    """Matrix key -> names of the tagged ONNX nodes that multiply by it (tiles included)."""
    missing_keys: tuple[str, ...]
    """Keys of ``matrix_tags`` that no weight-consuming node multiplies by."""
    untagged_nodes: tuple[UntaggedNode, ...]
    """Weight-consuming nodes whose matrix has no entry in ``matrix_tags``."""
    swapped_experts: tuple[str, ...]
    """Experts module paths exported in the per-expert form (static or dispatch)."""
    tiled_keys: tuple[str, ...]
    """Matrix keys lowered to one MatMul/Gemm per tile."""
    tile_nodes: int
    """Number of tagged tile nodes (each also carries ``hetmap.tile``)."""
    external_data: Path | None
    """The weights file beside ``path`` (weights over 2 GB, or asked for), else None."""
    moe_form: str = "static"
    """The MoE form exported (rule 8)."""
    fallbacks: tuple[tuple[str, str], ...] = ()
    """(MoE block path, reason) of each block ``ort`` exported in the dispatch form instead."""
    max_difference: float | None = None
    """Max |onnxruntime - PyTorch| over the example input's logits (None: not verified)."""
    topk_ties: tuple[str, ...] = ()
    """Modules whose top-k had ties at the k-th value on the example input (rule 6)."""

    @property
    def tagged_keys(self) -> tuple[str, ...]:
        return tuple(self.nodes_by_key)


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    matrix_tags: dict[str, dict[str, str]],
    model_props: dict[str, str],
    tile_ranges: dict[str, list[tuple[int, int, int, int]]] | None = None,
    example_input: torch.Tensor | None = None,
    verify: bool = True,
    moe_form: str = "static",
    external_data: bool = False,
    split_experts: Mapping[str, Mapping[int, Sequence[int]]] | None = None,
    parameter_tags: Mapping[str, Mapping[str, str]] | None = None,
) -> ExportReport:
    """Write ``model`` as ONNX to ``path`` with placement tags (module docstring, rules 1-8)."""
    path = Path(path)
    _check_arguments(model, path, matrix_tags, model_props)
    if moe_form not in MOE_FORMS:
        raise EmitError(f"unknown MoE form {moe_form!r}; choose one of {', '.join(MOE_FORMS)}")
    input_ids = _example_input_ids(model, example_input)
    tiles = {key: [tuple(t) for t in ranges] for key, ranges in (tile_ranges or {}).items()}
    exportable = _LogitsModule(model)
    reference = PyTorchReference(model, exportable, input_ids, VERIFY_TOLERANCE)
    with prepared_for_export(model, reference.run, tiles, moe_form, split_experts) as prepared:
        onnx_model = _run_exporter(exportable, input_ids, type(model).__name__)
        strip_prefix(onnx_model, f"{_WRAPPED}.")
        _optimize(onnx_model, prepared.parameter_names)
        tagging = tag_weight_nodes(
            onnx_model, prepared.weight_sources, prepared.parameter_names, matrix_tags,
            parameter_tags
        )
        nodes_by_key = {**tagging.nodes_by_key,
                        **tag_moe_nodes(onnx_model, prepared.ort_stores, matrix_tags)}
        onnx_model.metadata_props.update(model_props)
        onnx_model.metadata_props[MOE_FORM_PROP] = moe_form
        external = _write_checked(onnx_model, path, reference.verify if verify else None,
                                  external_data)
    return ExportReport(
        path=path,
        exporter=EXPORTER,
        nodes_by_key=nodes_by_key,
        missing_keys=tuple(key for key in matrix_tags if key not in nodes_by_key),
        untagged_nodes=tagging.untagged,
        swapped_experts=prepared.swapped_experts,
        tiled_keys=prepared.tiled_keys,
        tile_nodes=tagging.tile_nodes,
        external_data=external,
        moe_form=moe_form,
        fallbacks=prepared.fallbacks,
        max_difference=reference.max_difference,
        topk_ties=tuple(reference.ties.rows_by_module),
    )


class _LogitsModule(nn.Module):
    """``forward(input_ids) -> logits`` around a causal LM or a plain module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.add_module(_WRAPPED, model)
        self.training = False  # the wrapped model's own modes are set (and restored) elsewhere
        self.takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.get_submodule(_WRAPPED)
        if self.takes_use_cache:
            output = model(input_ids=input_ids, use_cache=False)
        else:
            output = model(input_ids)
        return _logits_of(output)


def _logits_of(output: object) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if logits is None:
        logits = output
    if not isinstance(logits, torch.Tensor):
        raise EmitError(
            f"the model returned {type(output).__name__}, not logits; ONNX export needs a "
            "causal LM (output.logits) or a module returning a logits tensor"
        )
    return logits


def _check_arguments(
    model: nn.Module, path: Path, matrix_tags: Mapping, model_props: Mapping
) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise EmitError("the model's weights are on the meta device; load real weights first")
    if not path.parent.is_dir():
        raise EmitError(f"cannot write {path}: folder {path.parent} does not exist")
    tag_sets: dict[str, Mapping] = {"model_props": model_props}
    tag_sets.update({f"matrix_tags[{key!r}]": tags for key, tags in matrix_tags.items()})
    for where, tags in tag_sets.items():
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise EmitError(f"{where} must map strings to strings")


def _example_input_ids(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if example_input is None:
        vocab_size = _vocab_size(model)
        generator = torch.Generator().manual_seed(0)
        example_input = torch.randint(0, vocab_size, DEFAULT_INPUT_SHAPE, generator=generator)
    if (
        example_input.dim() != 2
        or example_input.is_floating_point()
        or min(example_input.shape) < 2
    ):
        raise EmitError(
            f"example_input must be integer token ids [batch, sequence] with both sizes >= 2 "
            f"(sizes 1 would be fixed in the graph), got {example_input.dtype} "
            f"{tuple(example_input.shape)}"
        )
    return example_input.to(device=device, dtype=torch.int64)


def _vocab_size(model: nn.Module) -> int:
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab_size, int):
        return vocab_size
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise EmitError("cannot tell the model's vocabulary size; pass example_input")
    return embedding.num_embeddings


def _run_exporter(module: nn.Module, input_ids: torch.Tensor, model_name: str) -> ir.Model:
    """torch.export (non-strict; both dims dynamic: an error if the model fixes either one,
    while ranges the model implies, such as ``sequence <= max positions``, are accepted),
    complex shims, then ONNX translation (which names the dims ``batch`` and ``sequence``)."""
    dynamic = torch.export.Dim.DYNAMIC
    dims = {"input_ids": {0: dynamic, 1: dynamic}}
    try:
        with scans_as_ops(module), dynamic_sequence_forms(module), _unchanging_to_is_identity():
            program = torch.export.export(module, (input_ids,), dynamic_shapes=dims, strict=False)
    except Exception as error:  # torch.export raises many unrelated types for one cause
        raise EmitError(
            f"torch.export could not trace {model_name}: {first_line(error)}; {_hint(error)}"
        ) from error
    try:
        onnx_program = torch.onnx.export(
            with_real_complex_ops(program),
            (input_ids,),
            dynamo=True,
            optimize=False,
            verbose=False,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}},
            custom_translation_table=TRANSLATIONS,
        )
    except torch.onnx.errors.OnnxExporterError as error:
        raise EmitError(
            f"{EXPORTER} could not translate {model_name}: {first_line(error.__cause__ or error)}"
        ) from error
    if onnx_program is None:
        raise EmitError(f"{EXPORTER} returned no program for {model_name}")
    return onnx_program.model


def _hint(error: BaseException) -> str:
    """What usually causes a torch.export failure of this kind (and where, if in the model)."""
    text = str(error)
    if "specialized it to be a constant" in text or "Constraints violated" in text:
        return ("a Python loop or branch over the batch or sequence size (e.g. a recurrent "
                "scan written as a for loop) fixed a dimension the graph must keep dynamic")
    where = _model_frame(error)
    if "data-dependent" in text and where is not None:
        return (f"the model's {where} branches in Python on tensor values, which an exported "
                "graph cannot express")
    return ("a hand-written MoE must dispatch without Python branches on tensor values "
            "(dense torch.where dispatch, or torch.where + index_add_ loops)")


def _model_frame(error: BaseException) -> str | None:
    """``function (file:line)`` of the innermost traceback frame in the model's own code
    (outside torch and hetmap), or None."""
    outside = (Path(torch.__file__).parent, Path(__file__).resolve().parents[1])
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename).resolve()
        if not any(root in path.parents for root in outside):
            return f"{frame.name} ({path.name}:{frame.lineno})"
    return None


def _optimize(model: ir.Model, parameters: Collection[str]) -> None:
    """Run the onnxscript optimizer, keeping weight transposes and without its no-op
    arithmetic rules (:func:`_without_no_op_arithmetic`); enforce rule 7."""
    before = {use.initializer for use in weight_uses(model.graph, parameters)}
    with _without_no_op_arithmetic():
        optimize_ir(model, should_fold=keeps_weight_transposes)
    lost = before - {use.initializer for use in weight_uses(model.graph, parameters)}
    if lost:
        raise EmitError(
            f"weight matrices {sorted(lost)[:4]} are byte-identical to others and were merged "
            "by the ONNX optimizer; their placement cannot be expressed per matrix"
        )


@contextmanager
def _unchanging_to_is_identity() -> Iterator[None]:
    """While tracing, ``module.to(...)`` that changes no tensor of the module (each already
    has the dtype and device asked for) returns the module untouched. Switch Transformers'
    router runs ``self.classifier = self.classifier.to(self.dtype)`` in its forward, and
    torch.export's tracer cannot swap parameters that carry weak references."""
    original = nn.Module.to

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        unchanged = memory_format is None and all(
            (dtype is None or tensor.dtype == dtype or not tensor.is_floating_point())
            and (device is None or tensor.device == device)
            for tensor in (*self.parameters(), *self.buffers()))
        return self if unchanged else original(self, *args, **kwargs)

    nn.Module.to = to  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        nn.Module.to = original  # type: ignore[method-assign]


@contextmanager
def _without_no_op_arithmetic() -> Iterator[None]:
    """onnxscript's default rewrite rules without ``x * 1 -> x``, ``x + 0 -> x``, ``x - 0 -> x``
    and ``x / 1 -> x`` while the optimizer runs. Those rules match constants within an absolute
    tolerance of 1e-8 of 0 or 1, so they drop an epsilon of 1e-8 (MuseSpark's post-expert
    norm: ``rsqrt(mean + 1e-8)`` became ``rsqrt(mean)`` and its logits moved by 0.02).
    (``optimize_ir`` reads the rule list from its module at each call.)"""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _no_op

    arithmetic = {id(rule) for rule in _no_op.rules
                  if rule not in (_no_op.dropout_zero_rule, _no_op.dropout_inference_rule)}
    default = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in default if id(r) not in arithmetic)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = default


def _write_checked(
    model: ir.Model, path: Path, verify: Callable[[Path], None] | None, external: bool
) -> Path | None:
    """Rule 6: stage, check, verify, move into place. Returns the external data path, if any."""
    weights = [value.const_value for value in model.graph.initializers.values()]
    weight_bytes = sum(tensor.nbytes for tensor in weights if tensor is not None)
    large = weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = f"{path.name}.data" if external or large else None
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        ir.save(model, staged, external_data=data_name)
        onnx.checker.check_model(str(staged), full_check=True)
        if verify is not None:
            verify(staged)
        if data_name is not None:
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return None if data_name is None else path.parent / data_name
