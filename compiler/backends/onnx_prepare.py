"""Put a model into the form the ONNX back end exports, and put it back afterwards.

:func:`prepared_for_export` is a context manager over the caller's model. It reads the
model's modules and writes nothing that outlives the ``with`` block.

Rules, in the order they are applied:

1. All module hooks (forward, forward-pre, backward) are set aside and every module is put
   in eval mode; both are restored on exit, so neither leaks into the export.
2. One forward pass on the example input records the calls (inputs and output) of every
   experts store, experts container and the parent module (MoE block) of every store.
3. Every *experts store* (:mod:`~hetmap.compiler.backends.onnx_stores`: 3-D
   ``gate_up_proj``/``up_proj``/``down_proj`` stacks, or flat 2-D stacks such as DBRX's) has
   its layout read by :func:`hetmap.runtime.layouts.read_layout`, its width being the last
   dimension of its recorded input, and is swapped for :class:`StaticExperts` (MoE form
   ``static``) or :class:`DispatchExperts` (``dispatch``, ``ort``), with the experts listed
   in ``split_experts`` split by neuron (that module's rule 6), whose output on the
   recorded call must match the original's. Split experts of any other store are an
   EmitError; a block with split experts stays in the dispatch form under ``ort``. A store
   with 3-D stacks that cannot be read or exported is an EmitError, as is any other 3-D
   ``*proj`` parameter left afterwards; flat stacks that read as no layout stay. Stores
   inside a swapped store are not visited. A store read as ``routed`` but called without
   integer top-k indices as its second input (Inkling's shared experts, called as
   ``(hidden, gammas)``: every expert on every token) is no routed store: it is exported as
   written, its stacks multiplied whole.
3b. An MoE block that stores its experts in two stacks called with rows per expert (the
   ``sizes`` layout, JetMoE; not inside an attention module) gets each expert's matrices as
   modules ``<block>.<e>.<role>`` (the IR's matrix keys) and its two stacks swapped for
   :class:`SizedStackExport`, which runs each expert's rows through them; the block's output
   on the recorded call must not change. The block dispatches by itself, so every MoE form
   exports it so (under ``ort`` with a note in ``fallbacks``).
4. Every ModuleList/ModuleDict experts container with its own ``forward`` that was called
   as ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` is swapped for
   :class:`DenseDispatchExperts` (``static``) or :class:`SparseDispatchExperts` (the other
   forms) if that reproduces the recorded output; one called as Switch Transformers' are,
   ``(hidden [T, H], one-hot selected [T, 1, E], weights [T, 1])``, for their one-hot
   versions (the one-hot read as top-1 indices, weight 0 for a token dropped over capacity);
   otherwise it is left as written (its dispatch must then be exportable by
   ``torch.export`` as is).
5. MoE form ``ort``: every block holding a swapped routed store is swapped for
   :class:`~hetmap.compiler.backends.onnx_ort_moe.OrtMoeBlock` if it fits (that module's
   rule 1, checked against the block's recorded call); otherwise its store stays in the
   dispatch form and the reason is kept in ``fallbacks``.
6. Every matrix key in ``tile_ranges`` must name an ``nn.Linear`` or an expert matrix; it is
   swapped for a :class:`TiledLinear` after its ranges are checked, except the expert
   matrices of a block swapped by rule 5 (their tiles stay in its metadata).
7. ``weight_sources`` maps each parameter name (tied aliases included) to the matrix key of
   the module that multiplies by it: any module with a 2-D ``weight`` (``nn.Linear``, expert
   matrices, routers such as ``mlp.gate``) except ``nn.Embedding``; for a tile, also the
   tile's range.
8. On exit every swapped module is put back, in reverse order.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hetmap.common.errors import EmitError
from hetmap.compiler.backends.onnx_dispatch import DispatchExperts, SparseDispatchExperts
from hetmap.compiler.backends.onnx_experts import (
    DenseDispatchExperts,
    ExpertLinear,
    StaticExperts,
    in_signature_order,
    top_1_of_one_hot,
)
from hetmap.compiler.backends.onnx_modules import TiledLinear, TileRange, check_tile_ranges
from hetmap.compiler.backends.onnx_ort_moe import FusedExperts, OrtMoeBlock, router_of
from hetmap.compiler.backends.onnx_ort_moe import misfit as ort_misfit
from hetmap.compiler.backends.onnx_stores import may_store_experts, store_layout
from hetmap.compiler.frontend.moe import in_attention
from hetmap.runtime.layouts import ExpertLayout, canonical, sized_pair, sized_stacks

_HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@dataclass(frozen=True)
class WeightSource:
    """The matrix a parameter holds: its key and, for a tile, the tile's range."""

    key: str
    tile: TileRange | None = None


@dataclass(frozen=True)
class PreparedModel:
    module: nn.Module
    weight_sources: Mapping[str, WeightSource]
    parameter_names: frozenset[str]
    swapped_experts: tuple[str, ...]
    tiled_keys: tuple[str, ...]
    ort_stores: Mapping[str, int]
    """Experts store path -> number of experts, for the stores inside an OrtMoeBlock."""
    fallbacks: tuple[tuple[str, str], ...]
    """(block path, reason) for the blocks rule 5 left in the dispatch form."""


@dataclass(frozen=True)
class _RecordedCall:
    args: tuple[object, ...]
    kwargs: dict[str, object]
    output: object

    @property
    def inputs(self) -> tuple[object, ...]:
        return (*self.args, *self.kwargs.values())


@contextmanager
def prepared_for_export(
    model: nn.Module,
    run_forward: Callable[[], object],
    tile_ranges: Mapping[str, Sequence[TileRange]],
    moe_form: str = "static",
    split_experts: Mapping[str, Mapping[int, Sequence[int]]] | None = None,
) -> Iterator[PreparedModel]:
    """Yield ``model`` rewritten for export (rules 1-6); undo everything on exit (rule 7)."""
    with ExitStack() as undo:
        undo.enter_context(_hooks_set_aside(model))
        undo.enter_context(_eval_mode(model))
        swap = _Swapper(model)
        undo.callback(swap.restore)
        candidates = [p for p, m in model.named_modules() if p and may_store_experts(m)]
        containers = [p for p, m in model.named_modules() if _is_experts_container(m)]
        blocks = [p.rpartition(".")[0] for p in candidates if "." in p]
        sized = [p for p, m in model.named_modules() if _sized_layout(p, m) is not None]
        calls = _record_calls(model, candidates + containers + blocks + sized, run_forward)
        stores: dict[str, ExpertLayout] = {}
        kept: list[str] = []
        for path in candidates:
            if not any(path.startswith(f"{store}.") for store in stores):
                layout = store_layout(model, path, _input_width(calls.get(path)))
                if layout is not None and _called_unrouted(model.get_submodule(path), layout,
                                                             calls.get(path)):
                    kept.append(path)
                elif layout is not None:
                    stores[path] = layout
        sparse = moe_form != "static"
        fallbacks: list[tuple[str, str]] = []
        split = dict(split_experts or {})
        unknown = sorted(set(split) - set(stores))
        if unknown:
            raise EmitError(f"{unknown[0]!r} has experts split by neuron, but is not an experts "
                            "store the ONNX back end splits (stacked gate/up/down); compile it "
                            "with --granularity expert")
        for path, layout in stores.items():
            _swap_experts_store(swap, path, layout, calls.get(path), sparse, split.get(path))
        swapped = list(stores)
        for path, module in model.named_modules():
            layout = _sized_layout(path, module)
            if layout is not None:
                _swap_sized_block(swap, path, layout, calls.get(path))
                swapped.append(path)
                if moe_form == "ort":
                    fallbacks.append((path, "its experts are two stacks called with rows per "
                                            "expert (JetMoE): exported in its own dispatch form"))
        for path in containers:
            if _try_dense_dispatch(swap, path, calls.get(path), sparse):
                swapped.append(path)
        _check_no_fused_left(model, kept)
        ort_stores: dict[str, int] = {}
        if moe_form == "ort":
            for path, layout in stores.items():
                reason = ("some of its experts are split by neuron, which the operator cannot "
                          "express" if path in split else _try_ort_block(swap, path, layout, calls))
                if reason is None:
                    ort_stores[path] = layout.num_experts
                else:
                    fallbacks.append((path.rpartition(".")[0] or path, reason))
        for key, tiles in tile_ranges.items():
            if not any(key.startswith(f"{store}.") for store in ort_stores):
                _swap_tiled(swap, key, tiles)
        yield PreparedModel(
            module=model,
            weight_sources=_weight_sources(model),
            parameter_names=frozenset(n for n, _ in model.named_parameters(remove_duplicate=False)),
            swapped_experts=tuple(swapped),
            tiled_keys=tuple(k for k in tile_ranges
                             if not any(k.startswith(f"{s}.") for s in ort_stores)),
            ort_stores=ort_stores,
            fallbacks=tuple(fallbacks),
        )


class _Swapper:
    """Replaces submodules by path and remembers the originals."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.replaced: list[tuple[nn.Module, str, nn.Module | None]] = []

    def get(self, path: str) -> nn.Module:
        return self.root.get_submodule(path)

    def put(self, path: str, module: nn.Module) -> None:
        parent_path, _, name = path.rpartition(".")
        parent = self.root.get_submodule(parent_path)
        self.replaced.append((parent, name, parent.get_submodule(name)))
        parent._modules[name] = module

    def add(self, path: str, module: nn.Module) -> None:
        """A new child at ``path`` (removed again by :meth:`restore`)."""
        parent_path, _, name = path.rpartition(".")
        parent = self.root.get_submodule(parent_path)
        if name in parent._modules:
            raise EmitError(f"cannot add module {path!r}: the name is taken")
        self.replaced.append((parent, name, None))
        parent._modules[name] = module

    def restore(self) -> None:
        while self.replaced:
            parent, name, original = self.replaced.pop()
            if original is None:
                del parent._modules[name]
            else:
                parent._modules[name] = original


@contextmanager
def _hooks_set_aside(model: nn.Module) -> Iterator[None]:
    saved = [
        (m, a, getattr(m, a)) for m in model.modules() for a in _HOOK_ATTRIBUTES if hasattr(m, a)
    ]
    for module, attribute, _ in saved:
        setattr(module, attribute, OrderedDict())
    try:
        yield
    finally:
        for module, attribute, hooks in saved:
            setattr(module, attribute, hooks)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _is_experts_container(module: nn.Module) -> bool:
    is_container = isinstance(module, (nn.ModuleList, nn.ModuleDict))
    return (is_container and type(module).forward is not nn.Module.forward
            and len(list(module.children())) > 0)


def _record_calls(
    model: nn.Module, paths: list[str], run_forward: Callable[[], object]
) -> dict[str, _RecordedCall]:
    """Run one forward pass and keep the first call (inputs, output) of each module."""
    calls: dict[str, _RecordedCall] = {}

    def recorder(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            calls.setdefault(path, _RecordedCall(args, dict(kwargs), output))

        return hook

    handles = [
        model.get_submodule(p).register_forward_hook(recorder(p), with_kwargs=True) for p in paths
    ]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _called_unrouted(store: nn.Module, layout: ExpertLayout, call: _RecordedCall | None) -> bool:
    """Rule 3: a ``routed`` store whose recorded call has no integer top-k indices second
    (in the order of its ``forward``'s parameters)."""
    if layout.call != "routed" or call is None:
        return False
    inputs = in_signature_order(inspect.signature(store.forward), call.args, call.kwargs)
    index = inputs[1] if len(inputs) >= 2 else None
    return not (isinstance(index, torch.Tensor) and not index.is_floating_point())


def _check_no_fused_left(model: nn.Module, kept: Sequence[str] = ()) -> None:
    """Stacked 3-D expert projections that rule 3 does not know (or keep as written: ``kept``
    store paths) must not reach the graph."""
    for name, parameter in model.named_parameters():
        if any(name.startswith(f"{path}.") for path in kept):
            continue
        if parameter.dim() == 3 and name.rpartition(".")[2].endswith("proj"):
            raise EmitError(
                f"{name!r} stacks expert matrices in a module the ONNX back end did not "
                "recognise as an experts store (see hetmap.runtime.layouts for the layouts read)"
            )


def _input_width(call: _RecordedCall | None) -> int | None:
    """The last dimension of a recorded call's first input (the hidden states)."""
    first = next(iter(call.inputs), None) if call is not None else None
    if isinstance(first, torch.Tensor) and first.dim() >= 1:
        return int(first.shape[-1])
    return None


def _swap_experts_store(swap: _Swapper, path: str, layout: ExpertLayout,
                        call: _RecordedCall | None, sparse: bool,
                        split: Mapping[int, Sequence[int]] | None = None) -> None:
    store = swap.get(path)
    static = (DispatchExperts if sparse else StaticExperts)(store, layout, split)
    if call is not None and not _reproduces(static, call):
        raise EmitError(
            f"experts module {path!r} ({type(store).__name__}, layout {layout.name}) does not "
            "compute the expert sum its layout implies; its per-expert form would change the "
            "outputs"
        )
    swap.put(path, static)


def _sized_layout(path: str, module: nn.Module) -> ExpertLayout | None:
    """Rule 3b: the ``sizes`` layout of an MoE block that stores its experts in two stacks
    (JetMoE), outside attention modules (their mixture of attention heads stays as written)."""
    stacks = [w for c in module.children()
              if isinstance(w := getattr(c, "weight", None), torch.Tensor) and w.dim() == 3]
    if len(stacks) != 2 or in_attention(path):
        return None
    return sized_pair(module, int(stacks[0].shape[0]), int(stacks[0].shape[2]))


def _swap_sized_block(swap: _Swapper, path: str, layout: ExpertLayout,
                      call: _RecordedCall | None) -> None:
    """Rule 3b: each expert's matrices become modules ``<block>.<e>.<role>`` (the IR's keys),
    and the block's two stacks compute with them on each expert's rows."""
    block = swap.get(path)
    weights: dict[str, torch.Tensor] = canonical(block, layout).weights
    inner_roles = ("gate", "up") if layout.has_gate else ("up",)
    experts = []
    for e in range(layout.num_experts):
        expert = nn.Module()
        for role in (*inner_roles, "down"):
            expert.add_module(role, ExpertLinear(weights[role][e]))
        swap.add(f"{path}.{e}", expert)
        experts.append(expert)
    inner, outer = sized_stacks(layout)
    swap.put(f"{path}.{inner}", SizedStackExport(experts, inner_roles))
    swap.put(f"{path}.{outer}", SizedStackExport(experts, ("down",)))
    if call is not None and not _reproduces(block, call):
        raise EmitError(f"MoE block {path!r} ({type(block).__name__}) does not compute what its "
                        "two expert stacks imply; its per-expert form would change the outputs")


class SizedStackExport(nn.Module):
    """A stack of a ``sizes`` layout for export: each expert's rows through its own matrices
    (``roles`` concatenated along the output, as the stack stores them)."""

    experts: list[nn.Module]

    def __init__(self, experts: Sequence[nn.Module], roles: tuple[str, ...]) -> None:
        super().__init__()
        # the experts are registered on the block (their IR keys); not again here
        object.__setattr__(self, "experts", list(experts))
        self.roles = roles

    def forward(self, inputs: torch.Tensor, expert_size: Sequence[int]) -> torch.Tensor:
        parts = inputs.split(list(expert_size), dim=0)
        outputs = [torch.cat([getattr(expert, role)(part) for role in self.roles], dim=-1)
                   if len(self.roles) > 1 else getattr(expert, self.roles[0])(part)
                   for expert, part in zip(self.experts, parts, strict=True)]
        return torch.cat(outputs, dim=0)


def _try_ort_block(swap: _Swapper, store_path: str, layout: ExpertLayout,
                   calls: Mapping[str, _RecordedCall]) -> str | None:
    """Rule 5: swap the store's block for an OrtMoeBlock; the reason it does not fit, or None."""
    block_path, _, experts_name = store_path.rpartition(".")
    call = calls.get(block_path)
    if not block_path or call is None or not isinstance(call.output, torch.Tensor):
        return "its block was not called or does not return one tensor"
    store = swap.get(store_path)
    if isinstance(store, DispatchExperts):  # read the original store, not its stand-in
        store = next(original for parent, name, original in reversed(swap.replaced)
                     if parent is swap.get(block_path) and name == experts_name
                     and original is not None)
    reason = ort_misfit(store, layout)
    if reason is not None:
        return reason
    block = swap.get(block_path)
    router = router_of(block, experts_name, layout.num_experts, layout.hidden)
    top_k = call_top_k(calls.get(store_path))
    if router is None or top_k is None:
        return "no router [experts, hidden] beside its experts, or no top-k indices recorded"
    fused = FusedExperts(store, layout)
    for normalize in (False, True):
        candidate = OrtMoeBlock(router[0], router[1], experts_name, fused, top_k, normalize)
        if _reproduces(candidate, call):
            swap.put(block_path, candidate)
            return None
    return ("its output is not softmax top-k routed SwiGLU experts alone (other routing or "
            "activation, or shared experts or other terms added in the block)")


def call_top_k(call: _RecordedCall | None) -> int | None:
    """k from a routed experts call's ``top_k_index`` (its second input)."""
    inputs = call.inputs if call is not None else ()
    if len(inputs) >= 2 and isinstance(inputs[1], torch.Tensor) and inputs[1].dim() >= 1:
        return int(inputs[1].shape[-1])
    return None


def _try_dense_dispatch(swap: _Swapper, path: str, call: _RecordedCall | None,
                        sparse: bool) -> bool:
    if call is None:
        return False
    container = swap.get(path)
    dense: nn.Module
    if _is_routed_call(call.inputs):
        dense = SparseDispatchExperts(container) if sparse else DenseDispatchExperts(container)
    elif _is_one_hot_call(call.inputs):
        dense = (OneHotSparseDispatch(container) if sparse
                 else OneHotDenseDispatch(container))
    else:
        return False
    if not _reproduces(dense, call):
        return False
    swap.put(path, dense)
    return True


def _is_one_hot_call(args: tuple[object, ...]) -> bool:
    """``(hidden [T, H] float, selected [T, 1, E] integer one-hot, weights [T, 1] float)``:
    Switch Transformers' top-1 call (a token over capacity selects no expert)."""
    if len(args) != 3 or not all(isinstance(a, torch.Tensor) for a in args):
        return False
    hidden, selected, weights = args
    assert isinstance(hidden, torch.Tensor) and isinstance(selected, torch.Tensor)
    assert isinstance(weights, torch.Tensor)
    return (
        hidden.dim() == 2 and hidden.is_floating_point()
        and selected.dim() == 3 and selected.shape[:2] == (hidden.shape[0], 1)
        and not selected.is_floating_point() and bool(((selected == 0) | (selected == 1)).all())
        and bool((selected.sum(dim=-1) <= 1).all())
        and weights.is_floating_point() and tuple(weights.shape) == (hidden.shape[0], 1)
    )


class OneHotDenseDispatch(DenseDispatchExperts):
    """Rule 4 for a container called Switch Transformers' way (see :func:`top_1_of_one_hot`)."""

    def forward(self, hidden_states: torch.Tensor, selected: torch.Tensor,  # type: ignore[override]
                weights: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states, *top_1_of_one_hot(selected, weights))


class OneHotSparseDispatch(SparseDispatchExperts):
    """:class:`OneHotDenseDispatch` in the sparse dispatch form."""

    def forward(self, hidden_states: torch.Tensor, selected: torch.Tensor,  # type: ignore[override]
                weights: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states, *top_1_of_one_hot(selected, weights))


def _is_routed_call(args: tuple[object, ...]) -> bool:
    """``(hidden [T, H] float, top_k_index [T, k] int, top_k_weights [T, k] float)``."""
    matrices = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
    if len(args) != 3 or len(matrices) != 3:
        return False
    hidden, index, weights = matrices
    return (
        hidden.is_floating_point()
        and not index.is_floating_point()
        and weights.is_floating_point()
        and hidden.shape[0] == index.shape[0]
        and index.shape == weights.shape
    )


def _reproduces(module: nn.Module, call: _RecordedCall) -> bool:
    expected = call.output
    if not isinstance(expected, torch.Tensor):
        return False
    with torch.no_grad():
        actual = module(*call.args, **call.kwargs)
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    actual = actual.to(expected.dtype)
    tolerance = max(1e-4, 16 * torch.finfo(expected.dtype).eps)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


def _swap_tiled(swap: _Swapper, key: str, tiles: Sequence[TileRange]) -> None:
    try:
        module = swap.get(key)
    except AttributeError:
        module = None
    linear_like = isinstance(module, ExpertLinear) or (
        isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    )
    if module is None or not linear_like:
        raise EmitError(
            f"tile_ranges names {key!r}, which is not a linear matrix of the model "
            "(expected an nn.Linear path or '<experts path>.<e>.<gate|up|down>')"
        )
    out_features, in_features = module.get_parameter("weight").shape
    check_tile_ranges(key, tiles, in_features, out_features)
    swap.put(key, TiledLinear(module.weight, getattr(module, "bias", None), tiles))


def _weight_sources(model: nn.Module) -> dict[str, WeightSource]:
    """Rule 6: parameter name (every alias of a tied tensor) -> matrix it holds."""
    by_tensor: dict[int, WeightSource] = {}
    for path, module in model.named_modules():
        if isinstance(module, TiledLinear):
            for index, tile in enumerate(module.tiles):
                by_tensor.setdefault(id(tile), WeightSource(path, module.tile_ranges[index]))
        elif _holds_matrix(module):
            by_tensor.setdefault(id(module._parameters["weight"]), WeightSource(path))
    return {
        name: by_tensor[id(parameter)]
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if id(parameter) in by_tensor
    }


def _holds_matrix(module: nn.Module) -> bool:
    """A module whose own 2-D ``weight`` is a matrix it multiplies by (not a lookup table)."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2 and not isinstance(module, nn.Embedding)
