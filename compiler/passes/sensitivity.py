"""``sensitivity``: the measured calibration-loss increase of every routed expert on AIMC tiles.

Reads: the model's weights, the graph's MoE layers and experts, the target's analog settings.
Writes: :class:`Sensitivity` on every expert of the measured layers.

Rules:

1. Baseline: the mean next-token NLL (nats) of the all-digital model on ``tokens`` tokens of
   ``calib`` (a file) or the default corpus' calibration split, in windows of ``seq_len``,
   ``batch`` windows per forward.
2. For each expert of the chosen ``layers`` and each seed ``ctx.seed .. ctx.seed + seeds - 1``,
   the expert's NLL is the model's with only that expert on simulated AIMC tiles, programmed
   as :func:`hetmap.runtime.build_simulated_model` programs it (the fused experts module with
   ``(e,)`` analog, or the expert's ``nn.Linear`` paths as analog linears for per-expert
   (ModuleList) experts), with the target's settings (crossbar size, DAC/ADC, noise model and
   ``prog_noise_scale``; ``noise_scale`` overrides the latter). The expert's sensitivity is
   the mean over seeds of (its NLL - the baseline); ``seed_std`` their spread.
3. Fast path (routed experts stores inside a decoder layer of an ``nn.ModuleList``): the
   baseline forward records each MoE layer's experts call and every decoder layer's output
   once; a perturbed run replays them and runs only the layers after the expert's own
   (:mod:`hetmap.runtime.perturbed`), ``replicas`` perturbed runs of one layer per forward
   (0: 1 on CPU, up to 16,384 tokens per forward on a GPU). Equal to the full rerun up to
   float rounding. Other layers (ModuleList experts, identity experts, dense-input calls)
   rerun a simulated copy of the whole model per run.
4. Cost: before starting, the pass times the baseline forward per decoder layer and the
   programming of the first runs, estimates the total and reports it through ``ctx.log``
   (and its notes); ``ctx.progress`` advances once per run. Cheaper runs: fewer ``tokens``,
   a subset of ``layers`` (``0+2``, ``1-3``), one seed.
5. A model without weights gets nothing (a note says so); the ``measured`` policy then
   refuses it. The model must fit in memory (it is run whole, not streamed).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from hetmap.common.errors import PipelineError
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.ir.annotations import Sensitivity
from hetmap.compiler.ir.graph import Graph, MoeLayer, Node
from hetmap.compiler.passes.base import CompileContext, PassResult

#: A full-rerun run's time over a digital forward's (model copy, programming one expert).
_RUN_OVERHEAD = 1.1
#: Tokens per forward the automatic ``replicas`` aims at on a GPU.
_GPU_TOKENS_PER_FORWARD = 16384
#: Names of the experts call's arguments, in order.
_CALL_NAMES = ("hidden_states", "top_k_index", "top_k_weights")


def parse_layers(text: str | None) -> set[int] | None:
    """``"0+2+5"`` or ``"1-3"`` (or a mix, ``"0+4-6"``) -> layer numbers; None or ``all`` ->
    every layer. (Commas separate pipeline options, hence ``+``.)"""
    if text is None or str(text).strip().lower() in ("", "all"):
        return None
    layers: set[int] = set()
    for item in str(text).replace(" ", "+").split("+"):
        if not item:
            continue
        first, dash, last = item.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"layers={text!r}: expected numbers joined by '+' or ranges 'a-b'")
        layers.update(range(int(first), int(last if dash else first) + 1))
    return layers


def _analog_part(moe: MoeLayer, node: Node) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    """Rule 2: what of the model runs analog when ``node`` alone is perturbed."""
    assert node.expert is not None
    if moe.layout != "modulelist":  # an experts store, simulated vectorised
        return (), {moe.experts_module: (node.expert,)}
    return tuple(m.key for m in node.matrices), {}


def full_rerun_increase(model: nn.Module, moe: MoeLayer, node: Node, settings: Any, seed: int,
                        windows: list[torch.Tensor], baseline: float) -> float:
    """Rule 2 by brute force: NLL of a simulated copy of the whole model minus ``baseline``."""
    from hetmap.runtime import build_simulated_model

    linears, fused = _analog_part(moe, node)
    simulated = build_simulated_model(model, linears, fused, settings, seed)
    return _mean_nll(simulated, windows) - baseline


def _mean_nll(model: nn.Module, windows: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for batch in windows:
        total += float(_nll_sums(model, batch, 1, {}).sum())
        count += batch[:, 1:].numel()
    return total / count


def _nll_sums(model: nn.Module, batch: torch.Tensor, replicas: int,
              extra: dict[str, Any]) -> torch.Tensor:
    """Summed next-token NLL of each of ``replicas`` copies of ``batch`` (float64 ``[K]``)."""
    inputs = batch.repeat(replicas, 1) if replicas > 1 else batch
    with torch.no_grad():
        output = model(inputs, **extra)
    logits = output.logits if hasattr(output, "logits") else output
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), inputs[:, 1:].reshape(-1),
        reduction="none")
    return losses.view(replicas, -1).double().sum(dim=1)


@dataclass
class _FastLayer:
    """An MoE layer measured by replaying the recorded baseline (rule 3)."""

    moe: MoeLayer
    layout: Any
    position: int  # of its decoder layer in the stack
    additive: bool = False
    calls: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  # per window batch


def _decoder_position(model: nn.Module, path: str) -> tuple[str, int] | None:
    """(path of the ``nn.ModuleList`` of decoder layers, index) of the layer holding ``path``."""
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:end - 1])
        if parts[end - 1].isdigit() and isinstance(model.get_submodule(parent), nn.ModuleList):
            return parent, int(parts[end - 1])
    return None


def _call_triple(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
    values = list(args[:3]) + [kwargs.get(name) for name in _CALL_NAMES[len(args[:3]):]]
    if all(isinstance(value, torch.Tensor) for value in values):
        return tuple(values)
    return None


@dataclass(frozen=True)
class SensitivityPass:
    name: ClassVar[str] = "sensitivity"
    description: ClassVar[str] = "measured calibration-loss increase of each expert alone on AIMC"

    tokens: int = 2048
    layers: str | None = None
    seeds: int = 1
    noise_scale: float | None = None
    calib: str | None = None
    seq_len: int = 256
    batch: int = 8
    replicas: int = 0

    def validate(self) -> str | None:
        if self.tokens < 2 or self.seq_len < 2 or self.batch < 1 or self.seeds < 1:
            return "tokens and seq_len must be at least 2, batch and seeds at least 1"
        if self.replicas < 0:
            return f"replicas must be >= 0 (0: automatic), got {self.replicas}"
        if self.noise_scale is not None and self.noise_scale < 0:
            return f"noise_scale must be >= 0, got {self.noise_scale}"
        try:
            parse_layers(self.layers)
        except ValueError as exc:
            return str(exc)
        return None

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        from hetmap.runtime.settings import settings_for

        if not graph.moe_layers:
            return PassResult(graph, False)
        if not ctx.model.has_weights:
            return PassResult(graph, False, ["no weights: sensitivities not measured"])
        experts = self._experts(graph)
        model = ctx.model.runnable()
        windows = batches(load_tokens(ctx.model, self.calib, "calib", self.tokens),
                          self.seq_len, self.batch)
        settings = settings_for(ctx.target, noise_scale=self.noise_scale)
        start = time.perf_counter()
        measure = _Measurement(self, graph, model, windows, settings, ctx.seed)
        measure.record({node.layer for node in experts if node.layer is not None})
        estimate_s = measure.estimate(experts)
        runs = len(experts) * self.seeds
        estimate = (f"{runs} runs ({len(experts)} experts x {self.seeds} seed(s)) on "
                    f"{measure.token_count} tokens, one forward {measure.forward_s:.2f} s, "
                    f"{len(measure.fast)} of {len({n.layer for n in experts})} layer(s) "
                    f"replayed: estimated {estimate_s:.1f} s")
        ctx.log(f"sensitivity: {estimate}")
        advance = ctx.progress("measuring sensitivity", runs)
        for node, increases in measure.increases(experts, advance):
            spread = statistics.stdev(increases) if len(increases) > 1 else 0.0
            node.annotate(Sensitivity(statistics.fmean(increases), self.seeds,
                                      measure.token_count, spread))
        took = time.perf_counter() - start
        return PassResult(graph, True, [f"{estimate}; took {took:.1f} s",
                                        f"baseline NLL {measure.baseline:.4f} nats/token"])

    def _experts(self, graph: Graph) -> list[Node]:
        chosen = parse_layers(self.layers)
        if chosen is None:
            return graph.experts()
        unknown = sorted(chosen - set(graph.moe_layers))
        if unknown:
            raise PipelineError(f"layers {unknown} are not MoE layers (MoE layers: "
                                f"{sorted(graph.moe_layers)})")
        return [n for n in graph.experts() if n.layer in chosen]


class _Measurement:
    """Baseline recording, estimate and perturbed runs of one :class:`SensitivityPass` run."""

    def __init__(self, options: SensitivityPass, graph: Graph, model: nn.Module,
                 windows: list[torch.Tensor], settings: Any, seed: int) -> None:
        self.options, self.graph, self.model = options, graph, model
        self.windows, self.settings, self.seed = windows, settings, seed
        self.token_count = int(sum(w.numel() for w in windows))
        self.fast: dict[int, _FastLayer] = {}
        self.stack: nn.ModuleList | None = None
        self.recorded_layers: list[list[Any]] = []
        self.recorded_experts: list[dict[str, Any]] = []
        self.layer_seconds: list[float] = []
        self.baseline = 0.0
        self.forward_s = 0.0
        self.build_s_per_run = 0.0
        #: perturbed runs of the fast layers, ``replicas`` per chunk; results of chunks run early
        self.chunks: list[tuple[_FastLayer, list[tuple[Node, int]]]] = []
        self.done: dict[int, list[float]] = {}
        parameters = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in parameters else {}
        device = next(model.parameters()).device
        per_forward = max(1, int(windows[0].numel()))
        automatic = max(1, _GPU_TOKENS_PER_FORWARD // per_forward) if device.type == "cuda" else 1
        self.replicas = options.replicas or automatic

    def _fast_candidates(self, layers: set[int]) -> dict[int, _FastLayer]:
        from hetmap.runtime.experts import routed_layout

        modules = dict(self.model.named_modules())
        found: dict[int, _FastLayer] = {}
        stacks: set[str] = set()
        for number in sorted(layers):
            moe = self.graph.moe_layers[number]
            if moe.layout == "modulelist" or moe.identity_experts:
                continue
            layout = routed_layout(modules[moe.experts_module], moe.experts_module,
                                   modules.get(moe.router))
            where = _decoder_position(self.model, moe.experts_module)
            if layout.call != "routed" or layout.identity_experts or where is None:
                continue
            stacks.add(where[0])
            found[number] = _FastLayer(moe, layout, where[1])
        if len(stacks) != 1:
            return {}
        stack = self.model.get_submodule(stacks.pop())
        assert isinstance(stack, nn.ModuleList)
        self.stack = stack
        return found

    def record(self, layers: set[int]) -> None:
        """Rule 1 and the recording of rule 3, timing every decoder layer."""
        from hetmap.runtime.perturbed import LayerRecorder, output_is_additive

        candidates = self._fast_candidates(layers)
        modules = dict(self.model.named_modules())
        total, count = 0.0, 0
        start = time.perf_counter()
        if self.stack is None:
            for batch in self.windows:
                total += float(_nll_sums(self.model, batch, 1, self.extra).sum())
                count += batch[:, 1:].numel()
        else:
            paths = {fast.moe.experts_module: modules[fast.moe.experts_module]
                     for fast in candidates.values()}
            with LayerRecorder(self.stack, paths) as recorder:
                for batch in self.windows:
                    total += float(_nll_sums(self.model, batch, 1, self.extra).sum())
                    count += batch[:, 1:].numel()
            self.forward_s = time.perf_counter() - start
            self.recorded_layers = recorder.layer_outputs
            self.layer_seconds = recorder.layer_seconds
            for number, fast in candidates.items():
                if not recorder.in_order:  # a layer ran twice or not at all: no replay
                    break
                calls = [_call_triple(*entry[fast.moe.experts_module][:2])
                         for entry in recorder.expert_calls]
                if any(call is None for call in calls):
                    continue
                fast.calls = [call for call in calls if call is not None]
                fast.additive = output_is_additive(
                    self.stack[fast.position], modules[fast.moe.experts_module],
                    recorder.layer_calls[fast.position], self.recorded_layers[0][fast.position])
                self.fast[number] = fast
            self.recorded_experts = [
                {path: output for path, (_args, _kwargs, output) in entry.items()}
                for entry in recorder.expert_calls]
        self.forward_s = self.forward_s or time.perf_counter() - start
        self.baseline = total / count

    def estimate(self, experts: list[Node]) -> float:
        """Rule 4: seconds all runs take. The per-layer times of the baseline, the programming
        of one run and the run time of the first replayed chunk (run now, kept) give it."""
        seeds = range(self.seed, self.seed + self.options.seeds)
        for number, fast in sorted(self.fast.items(), key=lambda item: item[1].position):
            runs = [(node, seed) for node in experts if node.layer == number for seed in seeds]
            self.chunks += [(fast, runs[first:first + self.replicas])
                            for first in range(0, len(runs), self.replicas)]
        seconds = self.forward_s * _RUN_OVERHEAD * self.options.seeds * sum(
            node.layer not in self.fast for node in experts)
        if not self.chunks:
            return seconds
        fast, chunk = self.chunks[0]
        start = time.perf_counter()
        deltas_of = self._deltas(fast, chunk[:1])
        with torch.no_grad():
            deltas_of(*fast.calls[0])  # one window batch's share of a run's deltas
        self.build_s_per_run = (time.perf_counter() - start) * len(self.windows)
        start = time.perf_counter()
        self.done[0] = self._replayed(fast, chunk)
        first_s = time.perf_counter() - start
        rest = max(0.0, self.forward_s - sum(self.layer_seconds))

        def predicted(fast: _FastLayer, size: int) -> float:
            after = fast.position + 1 if fast.additive else fast.position
            return size * (self.build_s_per_run + rest + sum(self.layer_seconds[after:]))

        correction = first_s / max(predicted(fast, len(chunk)), 1e-9)
        later = sum(predicted(fast, len(chunk)) for fast, chunk in self.chunks[1:])
        return seconds + first_s + correction * later

    def _deltas(self, fast: _FastLayer, runs: list[tuple[Node, int]]) -> nn.Module:
        from hetmap.runtime import module_seed
        from hetmap.runtime.perturbed import ExpertDeltas

        path = fast.moe.experts_module
        experts = self.model.get_submodule(path)
        pairs = [(int(node.expert or 0), module_seed(seed, path)) for node, seed in runs]
        return ExpertDeltas(experts, path, fast.layout, pairs, self.settings)

    def increases(self, experts: list[Node], advance: Callable[[int], None]
                  ) -> Iterator[tuple[Node, list[float]]]:
        """Rule 2 for every expert: its NLL increase per seed."""
        seeds = range(self.seed, self.seed + self.options.seeds)
        for node in experts:
            if node.layer not in self.fast:
                moe = self.graph.moe_layers[node.layer or 0]
                values = []
                for seed in seeds:
                    values.append(full_rerun_increase(self.model, moe, node, self.settings,
                                                      seed, self.windows, self.baseline))
                    advance(1)
                yield node, values
        found: dict[str, list[float]] = {}
        for index, (fast, chunk) in enumerate(self.chunks):
            values = self.done.pop(index) if index in self.done else self._replayed(fast, chunk)
            for (node, _seed), value in zip(chunk, values, strict=True):
                found.setdefault(node.name, []).append(value)
            advance(len(chunk))
        for node in experts:
            if node.name in found:
                yield node, found[node.name]

    def _replayed(self, fast: _FastLayer, chunk: list[tuple[Node, int]]) -> list[float]:
        """Rule 3: the NLL increases of ``chunk``'s runs, one replica each."""
        from hetmap.runtime.perturbed import replayed_tail

        assert self.stack is not None
        deltas_of = self._deltas(fast, chunk)
        totals = torch.zeros(len(chunk), dtype=torch.float64)
        count = 0
        path = fast.moe.experts_module
        for index, batch in enumerate(self.windows):
            with torch.no_grad():
                deltas = deltas_of(*fast.calls[index])
            with replayed_tail(self.model, self.stack, fast.position, path,
                               self.recorded_layers[index], self.recorded_experts[index][path],
                               deltas, fast.additive):
                totals += _nll_sums(self.model, batch, len(chunk), self.extra).cpu()
            count += batch[:, 1:].numel()
        return [float(total) / count - self.baseline for total in totals]
