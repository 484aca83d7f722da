"""``sensitivity``: the measured calibration-loss increase of every routed expert on AIMC tiles.

Reads: the model's weights, the graph's MoE layers and experts, the target's analog settings.
Writes: :class:`Sensitivity` on every expert of the measured layers.

Rules:

1. Baseline: the mean next-token NLL (nats) of the all-digital model on ``tokens`` tokens of
   ``calib`` (a file) or the default corpus' calibration split, in windows of ``seq_len``,
   ``batch`` windows per forward.
2. For each expert of the chosen ``layers`` and each seed ``ctx.seed .. ctx.seed + seeds - 1``,
   the runtime builds a copy of the model in which only that expert runs on simulated AIMC
   tiles (:func:`hetmap.runtime.build_simulated_model`: the fused experts module with
   ``(e,)`` analog, or the expert's ``nn.Linear`` paths as analog linears for per-expert
   (ModuleList) experts), with the target's settings (crossbar size, DAC/ADC, noise model and
   ``prog_noise_scale``; ``noise_scale`` overrides the latter). The expert's sensitivity is
   the mean over seeds of (its NLL - the baseline); ``seed_std`` their spread.
3. Cost: ``experts x seeds`` forward passes over ``tokens`` tokens, each with a copy of the
   model. Before starting, the pass times the baseline forward, multiplies, and reports the
   estimate through ``ctx.log`` (and its notes); ``ctx.progress`` advances once per run.
   Cheaper runs: fewer ``tokens``, a subset of ``layers`` (``0+2``, ``1-3``), one seed.
4. A model without weights gets nothing (a note says so); the ``measured`` policy then
   refuses it. The model must fit in memory (it is run whole, not streamed).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from hetmap.common.errors import PipelineError
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.ir.annotations import Sensitivity
from hetmap.compiler.ir.graph import Graph, MoeLayer, Node
from hetmap.compiler.passes.base import CompileContext, PassResult

#: A perturbed run's time over a digital forward's (model copy, programming one expert).
_RUN_OVERHEAD = 1.1


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


def _mean_nll(model: nn.Module, windows: list[torch.Tensor]) -> float:
    from hetmap.compiler.evaluation.simulate import perplexity

    return math.log(perplexity(model, windows))


@dataclass(frozen=True)
class SensitivityPass:
    name: ClassVar[str] = "sensitivity"
    description: ClassVar[str] = "measured calibration-loss increase of each expert alone on AIMC"
    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = (Sensitivity,)

    tokens: int = 2048
    layers: str | None = None
    seeds: int = 1
    noise_scale: float | None = None
    calib: str | None = None
    seq_len: int = 256
    batch: int = 8

    def validate(self) -> str | None:
        if self.tokens < 2 or self.seq_len < 2 or self.batch < 1 or self.seeds < 1:
            return "tokens and seq_len must be at least 2, batch and seeds at least 1"
        if self.noise_scale is not None and self.noise_scale < 0:
            return f"noise_scale must be >= 0, got {self.noise_scale}"
        try:
            parse_layers(self.layers)
        except ValueError as exc:
            return str(exc)
        return None

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        from hetmap.runtime import build_simulated_model
        from hetmap.runtime.settings import settings_for

        if not graph.moe_layers:
            return PassResult(graph, False)
        if not ctx.model.has_weights:
            return PassResult(graph, False, ["no weights: sensitivities not measured"])
        experts = self._experts(graph)
        model = ctx.model.runnable()
        windows = batches(load_tokens(ctx.model, self.calib, "calib", self.tokens),
                          self.seq_len, self.batch)
        token_count = int(sum(w.numel() for w in windows))
        settings = settings_for(ctx.target, noise_scale=self.noise_scale)
        start = time.perf_counter()
        baseline = _mean_nll(model, windows)
        forward_s = time.perf_counter() - start
        runs = len(experts) * self.seeds
        estimate = (f"{runs} runs ({len(experts)} experts x {self.seeds} seed(s)) on "
                    f"{token_count} tokens, one forward {forward_s:.2f} s: estimated "
                    f"{runs * forward_s * _RUN_OVERHEAD:.0f} s")
        ctx.log(f"sensitivity: {estimate}")
        advance = ctx.progress("measuring sensitivity", runs)
        for node in experts:
            assert node.layer is not None
            linears, fused = _analog_part(graph.moe_layers[node.layer], node)
            increases = []
            for seed in range(ctx.seed, ctx.seed + self.seeds):
                simulated = build_simulated_model(model, linears, fused, settings, seed)
                increases.append(_mean_nll(simulated, windows) - baseline)
                del simulated
                advance(1)
            spread = statistics.stdev(increases) if len(increases) > 1 else 0.0
            node.annotate(Sensitivity(statistics.fmean(increases), self.seeds, token_count, spread))
        took = time.perf_counter() - start
        return PassResult(graph, True, [f"{estimate}; took {took:.0f} s",
                                        f"baseline NLL {baseline:.4f} nats/token"])

    def _experts(self, graph: Graph) -> list[Node]:
        chosen = parse_layers(self.layers)
        if chosen is None:
            return graph.experts()
        unknown = sorted(chosen - set(graph.moe_layers))
        if unknown:
            raise PipelineError(f"layers {unknown} are not MoE layers (MoE layers: "
                                f"{sorted(graph.moe_layers)})")
        return [n for n in graph.experts() if n.layer in chosen]
