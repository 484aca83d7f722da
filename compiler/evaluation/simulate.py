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
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hetmap.common.errors import SimulationError
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.ir.annotations import Placement
from hetmap.compiler.ir.graph import Graph, NodeKind
from hetmap.runtime.settings import settings_for

if TYPE_CHECKING:
    from hetmap.compiler.api import Plan


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
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return (f"{what} gives a non-finite perplexity: its tensor {name!r} holds NaN or "
                        "Inf (a damaged checkpoint or a diverged training run)")
    return (f"{what} gives a non-finite perplexity although its weights are finite: the "
            "arithmetic overflowed; try --device cpu or a smaller noise scale")


def perplexity(model: nn.Module, windows: list[torch.Tensor], device: str = "cpu") -> float:
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
                  digital_ppl: float | None = None) -> SimulationResult:
    """Perplexity of ``plan``'s model all-digital and mapped (``seeds`` programming seeds)."""

    if seeds < 1:
        raise SimulationError(f"--seeds must be at least 1, got {seeds}")
    if eval_tokens < 2:
        raise SimulationError(f"--eval-tokens must be at least 2 (one prediction), got {eval_tokens}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SimulationError("--device cuda asked for, but no CUDA device is available here")
    model = plan.model.runnable()
    tokens = load_tokens(plan.model, eval_file, "eval", eval_tokens)
    windows = batches(tokens, seq_len, batch)
    part = analog_part(plan.graph, model)
    settings = settings_for(plan.target, noise_scale=noise_scale, drift_time=drift_time, ideal=ideal)
    advance = (progress or (lambda _d, _t: (lambda _n: None)))("simulating", seeds + 1)
    model = model.to(device)
    if digital_ppl is None:
        digital_ppl = perplexity(model, windows, device)
    if not math.isfinite(digital_ppl):
        raise SimulationError(non_finite_cause(model, "the all-digital model"))
    advance(1)
    mapped: list[float] = []
    for index in range(seeds):
        simulated = part.build(model, settings, seed + index, backend).to(device)
        value = perplexity(simulated, windows, device)
        if not math.isfinite(value):
            raise SimulationError(non_finite_cause(simulated, f"the mapped model (seed {seed + index})"))
        mapped.append(value)
        del simulated
        advance(1)
    return SimulationResult(
        digital_ppl=digital_ppl, mapped_ppl=mapped, seeds=list(range(seed, seed + seeds)),
        settings=settings.to_dict(), eval_tokens=int(sum(w.numel() for w in windows)),
        eval_source=eval_file or "corpus:eval", backend=backend, device=device,
        analog_linears=len(part.linears), analog_experts=sum(len(v) for v in part.experts.values()),
        simulated_digital=list(part.simulated_digital))
