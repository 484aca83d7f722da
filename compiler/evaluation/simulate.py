"""Simulate a compiled plan: perplexity of the all-digital model and of the mapped model with
analog non-idealities, over several programming seeds.

Rules:

1. The analog part of a plan is read from its placements: experts of every MoE layer whose
   experts are stored as stacks (any layout but ``modulelist``) become ``analog_experts``
   (vectorized per layer; the layout is read with the router's size), every other analog
   matrix whose key is an ``nn.Linear`` path (e.g. ``modulelist`` experts) becomes an analog
   linear. An analog matrix that is not an ``nn.Linear``
   (e.g. a custom top-k router's weight under ``--dense analog``) stays digital in the
   simulation and is listed in ``simulated_digital`` -- never silently.
2. Settings come from the target (crossbar size, DAC/ADC bits, output noise, noise model and
   its programming-noise scale c); ``noise_scale``, ``drift_time`` and ``ideal`` override.
3. Perplexity is ``exp(mean next-token NLL)`` over non-overlapping windows of ``seq_len``
   evaluation tokens (``--eval FILE`` or the default corpus' held-out ``eval`` split, never the
   calibration split). Seeds ``seed .. seed+seeds-1`` program the weights; mean and sample
   standard deviation are reported.
4. Memory. ``programming`` (settings rule 12): ``resident`` tiles are programmed once per
   seed and kept (float32, beside the model's weights); ``per-batch`` tiles are programmed at
   every forward a few experts at a time and dropped (no tile memory; the programming is paid
   per batch); ``auto`` keeps them resident when they take at most half of the free memory of
   the device, else per batch. Both give the same programming noise for a seed.
5. Streaming (``stream``, as calibration's rule): a checkpoint larger than half of the
   machine's memory (or any checkpoint with ``on``) is never loaded whole. The traced graph
   runs leaf by leaf (:mod:`hetmap.compiler.data.streaming`); each leaf's weights are read
   from the checkpoint, its analog matrices programmed (per batch, with the seed of their path
   in the whole model: the same noise on every batch, and as in a loaded run), run, dropped.
   Cost: every weight is read from disk once per batch and seed (and once per batch for the
   digital perplexity), so streamed runs batch up to :data:`STREAM_TOKENS` tokens at once.
6. ``device_map`` (``auto`` or a JSON file): the model placed across GPUs, CPU and disk by
   accelerate (:mod:`hetmap.compiler.data.devices`); the tiles follow their weights, offloaded
   modules are simulated from their weights at every call, and ``auto`` programming is then
   per batch.
7. ``attention``: transformers' attention implementation the runs use (digital and mapped
   alike): ``eager`` (the default; what tracing and ONNX export use, and what hetmap's
   recorded figures were measured with) or ``sdpa`` (PyTorch's fused attention: less memory
   and time at long sequences; the same arithmetic up to float rounding, which the ADC's
   rounding can carry into the mapped perplexity's fourth digit). Restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hetmap.common.errors import SimulationError
from hetmap.compiler.data.devices import dispatched, read_device_map
from hetmap.compiler.data.streaming import streams
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.ir.annotations import Placement, Traced
from hetmap.compiler.ir.graph import Graph, NodeKind
from hetmap.runtime.settings import settings_for

if TYPE_CHECKING:
    from hetmap.compiler.api import Plan

PROGRAMMING_CHOICES = ("auto", "resident", "per-batch")
KERNEL_CHOICES = ("eager", "compiled")
ATTENTION_CHOICES = ("eager", "sdpa")
STREAM_CHOICES = ("auto", "on", "off")
#: tokens per forward of a streamed run (rule 5): each batch reads every weight once
STREAM_TOKENS = 16384


@dataclass(frozen=True)
class AnalogPart:
    """What of a model runs on simulated tiles."""

    linears: tuple[str, ...]
    experts: dict[str, tuple[int, ...]]
    simulated_digital: tuple[str, ...] = ()
    #: experts module path -> its ExpertLayout (hetmap.runtime.layouts)
    layouts: dict[str, Any] = field(default_factory=dict)
    #: experts module path -> split analog expert -> its digital neurons
    split: dict[str, dict[int, tuple[int, ...]]] = field(default_factory=dict)

    def build(self, model: nn.Module, settings: Any, seed: int, backend: str = "hetmap"
              ) -> nn.Module:
        """``model`` with this part on simulated tiles programmed with ``seed``."""
        from hetmap.runtime import build_simulated_model

        return build_simulated_model(model, self.linears, self.experts, settings, seed=seed,
                                     backend=backend, layouts=self.layouts,
                                     digital_neurons=self.split)

    def build_within(self, module: nn.Module, path: str, settings: Any, seed: int,
                     backend: str = "hetmap") -> nn.Module:
        """The module at ``path`` of the model with the part of this inside it on tiles
        (seeded as in the whole model), or ``module`` itself when none is (rule 5)."""
        from hetmap.runtime import build_simulated_model

        def inside(key: str) -> bool:
            return not path or key == path or key.startswith(path + ".")

        def rel(key: str) -> str:
            return key[len(path) + 1:] if path and key != path else ("" if key == path else key)

        linears = [rel(k) for k in self.linears if inside(k)]
        experts = {rel(k): v for k, v in self.experts.items() if inside(k)}
        if not linears and not experts:
            return module
        return build_simulated_model(
            module, linears, experts, settings, seed=seed, backend=backend,
            layouts={rel(k): v for k, v in self.layouts.items() if inside(k)},
            digital_neurons={rel(k): v for k, v in self.split.items() if inside(k)},
            prefix=path)

    def tile_bytes(self, model: nn.Module) -> int:
        """Memory of this part's resident tiles (float32), from the model's stores."""
        modules = dict(model.named_modules())
        total = sum(modules[key].weight.numel() for key in self.linears if key in modules)
        for key, chosen in self.experts.items():
            stores = [p for p in modules[key].parameters() if p.dim() >= 2]
            experts = max((int(p.shape[0]) for p in stores if p.dim() == 3), default=1)
            total += sum(p.numel() for p in stores) * len(chosen) // max(experts, 1)
        return 4 * total


def _layouts(graph: Graph, modules: dict[str, nn.Module], paths: set[str]) -> dict[str, Any]:
    """Experts module path -> layout, for the MoE layers whose experts are at ``paths``."""
    from hetmap.runtime.experts import routed_layout

    return {moe.experts_module: routed_layout(modules[moe.experts_module], moe.experts_module,
                                              modules.get(moe.router))
            for moe in graph.moe_layers.values() if moe.experts_module in paths}


def analog_part(graph: Graph, model: nn.Module) -> AnalogPart:
    modules = dict(model.named_modules())
    linears: list[str] = []
    experts: dict[str, list[int]] = {}
    split: dict[str, dict[int, tuple[int, ...]]] = {}
    kept: list[str] = []
    stacked = {m.experts_module for m in graph.moe_layers.values() if m.layout != "modulelist"}
    for node in graph.matrix_nodes():
        placement = node.get(Placement)
        if placement is None or not placement.analog:
            continue
        if node.kind is NodeKind.EXPERT and node.module in stacked:
            assert node.module is not None and node.expert is not None
            experts.setdefault(node.module, []).append(node.expert)
            if placement.split:
                split.setdefault(node.module, {})[node.expert] = placement.digital_neurons
            continue
        if placement.split:
            raise SimulationError(f"{node.name} is split by neuron, but its experts are separate "
                                  "nn.Linear modules, which the simulator does not split yet; "
                                  "compile it with --granularity expert")
        for matrix in node.matrices:
            if isinstance(modules.get(matrix.key), nn.Linear):
                linears.append(matrix.key)
            else:
                kept.append(matrix.key)
    return AnalogPart(tuple(linears), {k: tuple(sorted(v)) for k, v in experts.items()},
                      tuple(kept), _layouts(graph, modules, set(experts)), split)


def non_finite_cause(model: nn.Module, what: str) -> str:
    """Why ``model``'s perplexity is not finite: the first parameter holding NaN/Inf, or the
    first module whose output is not finite on a probe batch."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not tensor.is_meta and \
                    not bool(torch.isfinite(tensor).all()):  # (meta: streamed or offloaded)
                return (f"{what} gives a non-finite perplexity: its tensor {name!r} holds NaN or "
                        "Inf (a damaged checkpoint or a diverged training run)")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return (f"{what} gives a non-finite perplexity; its weights were streamed or offloaded, "
                "so they could not all be checked for NaN or Inf: run it with --stream off and "
                "without --device-map to find the tensor, or use a smaller noise scale")
    return (f"{what} gives a non-finite perplexity although its weights are finite: the "
            "arithmetic overflowed; try --device cpu or a smaller noise scale")


def perplexity(model: Callable[[torch.Tensor], Any], windows: list[torch.Tensor],
               device: str = "cpu") -> float:
    """``exp(mean next-token NLL)`` of ``model`` (a module, or any callable from token ids to
    logits or an output with ``.logits``) over ``windows``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows:
            batch = batch.to(device)
            output = model(batch)
            logits = output.logits if hasattr(output, "logits") else output
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    return math.exp(total / count)


@dataclass
class SimulationResult:
    digital_ppl: float
    mapped_ppl: list[float]
    seeds: list[int]
    settings: dict[str, Any]
    eval_tokens: int
    eval_source: str
    backend: str
    device: str
    analog_linears: int
    analog_experts: int
    simulated_digital: list[str] = field(default_factory=list)
    #: rule 4: "resident" or "per-batch", and why
    programming: str = "resident"
    programming_reason: str = ""
    #: rule 5: run leaf by leaf from the checkpoint; weights read per seed (= batches)
    streamed: bool = False
    weight_reads: int = 0
    #: module -> device when placed by --device-map (accelerate's map)
    device_map: dict[str, str] | None = None
    #: rule 7: the attention implementation the runs used
    attention: str = "eager"

    @property
    def mapped_ppl_mean(self) -> float:
        return statistics.fmean(self.mapped_ppl)

    @property
    def mapped_ppl_std(self) -> float:
        return statistics.stdev(self.mapped_ppl) if len(self.mapped_ppl) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mapped_ppl_mean"] = self.mapped_ppl_mean
        data["mapped_ppl_std"] = self.mapped_ppl_std
        return data


def simulate_plan(plan: Plan, *, seeds: int = 1, seed: int = 0, noise_scale: float | None = None,
                  drift_time: float | None = None, ideal: bool = False, eval_file: str | None = None,
                  eval_tokens: int = 8192, seq_len: int = 256, batch: int = 8,
                  backend: str = "hetmap", device: str = "cpu",
                  progress: Callable[[str, int], Callable[[int], None]] | None = None,
                  digital_ppl: float | None = None, programming: str = "auto",
                  stream: str = "auto", device_map: str | None = None,
                  kernels: str = "eager", attention: str = "eager") -> SimulationResult:
    """Perplexity of ``plan``'s model all-digital and mapped (``seeds`` programming seeds)."""
    with tempfile.TemporaryDirectory(prefix="hetmap-offload-") as offload:
        return _simulate(plan, seeds=seeds, seed=seed, noise_scale=noise_scale,
                         drift_time=drift_time, ideal=ideal, eval_file=eval_file,
                         eval_tokens=eval_tokens, seq_len=seq_len, batch=batch, backend=backend,
                         device=device, progress=progress, digital_ppl=digital_ppl,
                         programming=programming, stream=stream, device_map=device_map,
                         kernels=kernels, attention=attention, offload=Path(offload))


def _simulate(plan: Plan, *, seeds: int, seed: int, noise_scale: float | None,
              drift_time: float | None, ideal: bool, eval_file: str | None, eval_tokens: int,
              seq_len: int, batch: int, backend: str, device: str,
              progress: Callable[[str, int], Callable[[int], None]] | None,
              digital_ppl: float | None, programming: str, stream: str, device_map: str | None,
              kernels: str, attention: str, offload: Path) -> SimulationResult:

    if seeds < 1:
        raise SimulationError(f"--seeds must be at least 1, got {seeds}")
    if eval_tokens < 2:
        raise SimulationError(f"--eval-tokens must be at least 2 (one prediction), got {eval_tokens}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SimulationError("--device cuda asked for, but no CUDA device is available here")
    for name, given, choices in (("--programming", programming, PROGRAMMING_CHOICES),
                                 ("--stream", stream, STREAM_CHOICES)):
        if given not in choices:
            raise SimulationError(f"{name} must be one of {', '.join(choices)}, got {given!r}")
    check_kernels(kernels, backend)
    check_attention(attention)
    placed = None if device_map is None else read_device_map(device_map)
    if placed is not None and stream == "on":
        raise SimulationError("--device-map and --stream on are two ways to run a model that "
                              "does not fit: choose one")
    streamed = placed is None and streams(plan.model, stream)
    if streamed and backend != "hetmap":
        raise SimulationError(f"streamed simulation runs the hetmap backend only, not {backend}; "
                              "use --backend hetmap, or --stream off to load the model whole")
    if placed is not None:
        model = dispatched(plan.model, placed, offload)
        device = "cpu"  # the inputs: accelerate's hooks move them to each module's device
    else:
        model = plan.model.module if streamed else plan.model.runnable()
    tokens = load_tokens(plan.model, eval_file, "eval", eval_tokens)
    windows = batches(tokens, seq_len, max(batch, STREAM_TOKENS // seq_len) if streamed else batch)
    part = analog_part(plan.graph, model)
    mode, reason = programming_mode(programming, part, model, device, streamed, placed is not None,
                                    backend)
    settings = settings_for(plan.target, noise_scale=noise_scale, drift_time=drift_time,
                            ideal=ideal, programming=mode, kernels=kernels)
    advance = (progress or (lambda _d, _t: (lambda _n: None)))(
        "simulating" + (" (streamed)" if streamed else ""), seeds + 1)
    if streamed:
        def run(settings_: Any, seed_: int) -> Callable[[torch.Tensor], Any]:
            return _streamed(plan, part, settings_, seed_, backend, device)
    elif placed is not None:  # tiles go where their weights are (devices rule 4)
        def run(settings_: Any, seed_: int) -> Callable[[torch.Tensor], Any]:
            return model if settings_ is None else part.build(model, settings_, seed_, backend)
    else:
        model = model.to(device)

        def run(settings_: Any, seed_: int) -> Callable[[torch.Tensor], Any]:
            return model if settings_ is None else part.build(model, settings_, seed_, backend
                                                              ).to(device)
    with attention_implementation(model, attention):
        if digital_ppl is None:
            digital_ppl = perplexity(run(None, 0), windows, device)
        if not math.isfinite(digital_ppl):
            raise SimulationError(non_finite_cause(model, "the all-digital model"))
        advance(1)
        mapped: list[float] = []
        for index in range(seeds):
            simulated = run(settings, seed + index)
            value = perplexity(simulated, windows, device)
            if not math.isfinite(value):
                raise SimulationError(non_finite_cause(
                    simulated if isinstance(simulated, nn.Module) else model,
                    f"the mapped model (seed {seed + index})"))
            mapped.append(value)
            del simulated
            advance(1)
    return SimulationResult(
        digital_ppl=digital_ppl, mapped_ppl=mapped, seeds=list(range(seed, seed + seeds)),
        settings=settings.to_dict(), eval_tokens=int(sum(w.numel() for w in windows)),
        eval_source=eval_file or "corpus:eval", backend=backend, device=device,
        analog_linears=len(part.linears), analog_experts=sum(len(v) for v in part.experts.values()),
        simulated_digital=list(part.simulated_digital), programming=mode,
        programming_reason=reason, streamed=streamed,
        weight_reads=len(windows) if streamed else 0,
        device_map=None if placed is None else _placement(model), attention=attention)


def check_programming(programming: str) -> None:
    """One line for a ``--programming`` that is not one of :data:`PROGRAMMING_CHOICES`."""
    if programming not in PROGRAMMING_CHOICES:
        raise SimulationError(f"--programming must be one of {', '.join(PROGRAMMING_CHOICES)}, "
                              f"got {programming!r}")


def check_kernels(kernels: str, backend: str = "hetmap") -> None:
    """One line for a ``--kernels`` that is not one of :data:`KERNEL_CHOICES`, or that the
    backend does not run (settings rule 11 is about hetmap's tiles)."""
    if kernels not in KERNEL_CHOICES:
        raise SimulationError(f"--kernels must be one of {', '.join(KERNEL_CHOICES)}, "
                              f"got {kernels!r}")
    if kernels != "eager" and backend != "hetmap":
        raise SimulationError(f"--kernels {kernels} is a mode of hetmap's tiles; the {backend} "
                              "backend runs its own: use --backend hetmap, or --kernels eager")


def check_attention(attention: str) -> None:
    """One line for an ``--attention`` that is not one of :data:`ATTENTION_CHOICES`."""
    if attention not in ATTENTION_CHOICES:
        raise SimulationError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, "
                              f"got {attention!r}")


@contextlib.contextmanager
def attention_implementation(model: nn.Module, attention: str) -> Iterator[None]:
    """Rule 7: ``model`` runs with transformers' ``attention`` implementation within the
    block (set on its config, which every module of a simulated copy shares), and with its own
    afterwards. A model that has none to choose, or whose family lacks it, is one line."""
    check_attention(attention)
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == attention or (current is None and attention == "eager"):
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    if current is None or setter is None:
        raise SimulationError(f"--attention {attention} needs a transformers model with a "
                              f"choice of attention implementation; {type(model).__name__} has "
                              "none: use --attention eager")
    try:
        setter(attention)
    except (ValueError, ImportError, NotImplementedError) as error:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SimulationError(f"--attention {attention} is not available for "
                              f"{type(model).__name__}: {cause}; use --attention eager") from None
    try:
        yield
    finally:
        setter(current)


def programming_mode(asked: str, part: AnalogPart, model: nn.Module, device: str, streamed: bool,
                     placed: bool = False, backend: str = "hetmap") -> tuple[str, str]:
    """Rule 4: the programming mode and why (the aihwkit backend programs its own tiles once)."""
    if backend != "hetmap":
        if asked == "per-batch":
            raise SimulationError(f"--programming per-batch is a mode of hetmap's tiles; the "
                                  f"{backend} backend programs its own once per seed: use "
                                  "--backend hetmap, or --programming auto")
        return "resident", f"the {backend} backend"
    if asked != "auto":
        return asked, "asked for"
    if streamed:
        return "per-batch", "streamed from the checkpoint"
    if placed:
        return "per-batch", "placed by a device map"
    need = part.tile_bytes(model)
    free = _free_memory(device)
    tiles = f"{need / 1e9:.2f} GB" if need >= 1e8 else f"{need / 1e6:.1f} MB"
    sizes = f"{tiles} of tiles, {free / 1e9:.1f} GB free on {device}"
    return ("resident" if 2 * need <= free else "per-batch"), sizes


def _placement(model: nn.Module) -> dict[str, str]:
    """Module -> device of a model placed by accelerate (its ``hf_device_map``)."""
    found = getattr(model, "hf_device_map", None) or {}
    return {str(name): str(device) for name, device in found.items()}


def _free_memory(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _streamed(plan: Plan, part: AnalogPart, settings: Any, seed: int, backend: str,
              device: str) -> Callable[[torch.Tensor], Any]:
    """Rule 5: the model run leaf by leaf from its checkpoint (``settings`` None: digital)."""
    from hetmap.compiler.data.streaming import StreamingInterpreter
    from hetmap.compiler.data.weights import CheckpointWeights

    traced = plan.graph.get(Traced)
    if traced is None or plan.model.checkpoint is None:
        raise SimulationError("streamed simulation needs the traced model of a checkpoint; "
                              "load the plan again, or use --stream off")

    def wrap(live: nn.Module, path: str) -> nn.Module:
        return part.build_within(live, path, settings, seed, backend)

    interpreter = StreamingInterpreter(
        traced.module, CheckpointWeights(plan.model.checkpoint), wrapped=traced.wrapped,
        config=plan.model.config, wrap=None if settings is None else wrap, device=device)
    return interpreter.run
