"""``place``: put every node on ``digital`` or ``aimc-tile``, with a reason.

Requires: nothing (without :class:`Density` non-expert matrices count as dense); a policy
checks its own inputs (scores, densities) and names the pass that provides them. Provides:
:class:`Placement` on every node. Algorithm: :mod:`hetmap.compiler.algorithms.place`.

Rules, in order:

1. A node the target's ``aimc-tile`` cannot run (not a matrix multiply, weights not static)
   is digital; the reason is the capability's answer. Inputs/outputs are digital.
2. A non-expert matrix node with density >= ``dense_threshold`` is a dense module: digital
   ("dense: density 1.00"), unless ``dense=analog`` (the all-analog baseline).
3. Routed experts: the policy scores them; within each MoE layer (``budget_scope=layer``) or
   across all layers (``global``) the top ``round(budget * count)`` go digital, ties broken by
   expert index; the rest go to ``aimc-tile``. The reason gives the rank and the budget.
   Policies ``none`` and ``all`` put no / every expert on digital.
4. ``granularity=neuron``: the unit is one intermediate neuron of a routed expert (row j of
   gate/up, column j of down). Each group (layer or all layers) gets the digital parameters
   the per-expert budget would give it, ``round(budget * experts) * I`` neurons; the policy's
   ``neuron_scores`` rank the group's neurons (ties by layer, expert, neuron) and the top ones
   go digital. An expert with every neuron digital is placed digital, one with none analog,
   the others analog with ``digital_neurons`` (a split expert). Layers whose experts are not
   gate/up/down experts of one width stored as stacks (separate nn.Linear experts are not
   split by the simulator and the ONNX back end) keep whole-expert placement (a note says
   which).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from hetmap.common.errors import PassError
from hetmap.compiler.algorithms.place import check_neuron_scores, check_scores
from hetmap.compiler.ir.annotations import AIMC, DIGITAL, Density, Placement, intermediate_width
from hetmap.compiler.ir.graph import Graph, Node, NodeKind
from hetmap.compiler.passes.base import CompileContext, PassResult
from hetmap.targets import aimc_supports


def budget_count(budget: float, count: int) -> int:
    """Experts that fit a budget: ``round(budget * count)``, halves rounded up."""
    return min(count, int(math.floor(budget * count + 0.5)))


@dataclass(frozen=True)
class PlacePass:
    name: ClassVar[str] = "place"
    description: ClassVar[str] = "assign nodes to digital or aimc-tile under an expert budget"
    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = (Placement,)

    #: the default is chosen by evidence (benchmarks/policy_evidence.py, see the README):
    #: expected-impact recovers the most of the analog-to-digital gap on average over two
    #: trained MoEs, tied with activation-frequency and well ahead of the paper's max-norm
    policy: str = "expected-impact"
    budget: float = 0.125
    budget_scope: Literal["layer", "global"] = "layer"
    dense: Literal["digital", "analog"] = "digital"
    dense_threshold: float = 0.5
    #: the unit of placement: whole routed experts, or their intermediate neurons
    granularity: Literal["expert", "neuron"] = "expert"

    def validate(self) -> str | None:
        if not 0.0 <= self.budget <= 1.0:
            return f"budget must be a fraction in [0, 1], got {self.budget}"
        if not 0.0 <= self.dense_threshold <= 1.0:
            return f"dense_threshold must be in [0, 1], got {self.dense_threshold}"
        return None

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        entry = ctx.registries.policies.entries.get(self.policy)
        policy_cls = ctx.registries.policies.get(self.policy)
        policy = policy_cls()
        origin = entry.origin if entry else "built-in"
        for node in graph:
            if node.kind is not NodeKind.EXPERT:
                node.annotate(self._place_fixed(node, ctx))
        layers = graph.experts_by_layer()
        scores: dict[str, float] = {}
        for experts in layers.values():
            scores.update(check_scores(policy, origin, experts, policy.scores(graph, experts, ctx)))
        fixed = getattr(policy, "fixed", None)
        notes: list[str] = []
        if self.granularity == "neuron" and fixed is None:
            whole = [layer for layer, experts in layers.items()
                     if len({intermediate_width(n) for n in experts} - {None}) != 1
                     or any(intermediate_width(n) is None for n in experts)
                     or graph.moe_layers[layer].layout == "modulelist"]
            if whole:
                notes.append(f"layers {whole}: experts not stacked gate/up/down experts "
                             "(the simulator and ONNX split only those), placed whole")
            split_layers = {k: v for k, v in layers.items() if k not in whole}
            widths = {intermediate_width(v[0]) for v in split_layers.values()}
            if self.budget_scope == "global" and len(widths) > 1:
                raise PassError(f"granularity=neuron with budget_scope=global ranks neurons "
                                f"across layers, whose experts here differ in width "
                                f"({sorted(w for w in widths if w)}); use budget_scope=layer")
            neuron_scores = self._neuron_scores(policy, origin, graph, split_layers, ctx)
            groups = (list(split_layers.values()) if self.budget_scope == "layer"
                      else [[n for v in split_layers.values() for n in v]])
            for experts in groups:
                if experts:
                    self._place_neurons(experts, neuron_scores, ctx)
            layers = {k: v for k, v in layers.items() if k in whole}
        groups = (list(layers.values()) if self.budget_scope == "layer"
                  else [[n for v in layers.values() for n in v]])
        for experts in groups:
            if experts:
                self._place_experts(experts, scores, fixed, ctx)
        return PassResult(graph, True, notes)

    def _neuron_scores(self, policy: object, origin: str, graph: Graph,
                       layers: dict[int, list[Node]], ctx: CompileContext) -> dict[str, np.ndarray]:
        method = getattr(policy, "neuron_scores", None)
        if method is None:
            raise PassError(f"policy {self.policy} ranks whole experts only; with "
                            "granularity=neuron use one with neuron scores: "
                            "expected-impact, random")
        scores: dict[str, np.ndarray] = {}
        for experts in layers.values():
            scores.update(check_neuron_scores(policy, origin, experts,
                                              method(graph, experts, ctx)))
        return scores

    def _place_neurons(self, experts: list[Node], scores: dict[str, np.ndarray],
                       ctx: CompileContext) -> None:
        width = intermediate_width(experts[0])
        assert width is not None
        keep = budget_count(self.budget, len(experts)) * width
        stacked = np.stack([scores[n.name] for n in experts])  # [experts, neurons]
        # rank by score, ties by (layer, expert, neuron): a stable sort of the flat order
        order = sorted(range(len(experts)), key=lambda i: (experts[i].layer or 0,
                                                           experts[i].expert or 0))
        flat = stacked[order].reshape(-1)
        ranked = np.argsort(-flat, kind="stable")[:keep]
        chosen = np.zeros_like(flat, dtype=bool)
        chosen[ranked] = True
        chosen = chosen.reshape(len(experts), width)
        where = f"in layer {experts[0].layer}" if self.budget_scope == "layer" else "across layers"
        text = (f"{self.policy} neurons, top {keep} of {flat.size} {where} "
                f"(budget {self.budget:.1%} of experts' parameters)")
        for row, index in enumerate(order):
            node = experts[index]
            digital = np.flatnonzero(chosen[row])
            ok, why = aimc_supports(ctx.target, node.kind.value, node.matrices[0].shape, True)
            if not ok:
                node.annotate(Placement(DIGITAL, f"aimc-tile cannot run it: {why}"))
            elif digital.size == width:
                node.annotate(Placement(DIGITAL, f"{text}: every neuron inside"))
            elif digital.size == 0:
                node.annotate(Placement(AIMC, f"{text}: no neuron inside"))
            else:
                node.annotate(Placement(AIMC, f"{text}: {digital.size} of {width} neurons inside",
                                        tuple(int(j) for j in digital)))

    def _place_fixed(self, node: Node, ctx: CompileContext) -> Placement:
        if not node.matrices:
            return Placement(DIGITAL, "not a matrix multiply" if node.kind not in
                             (NodeKind.INPUT, NodeKind.OUTPUT) else f"graph {node.kind.value}")
        shape = node.matrices[0].shape
        ok, why = aimc_supports(ctx.target, node.kind.value, shape, True)
        if not ok:
            return Placement(DIGITAL, f"aimc-tile cannot run it: {why}")
        density = node.get(Density)
        value = density.value if density is not None else 1.0
        if value >= self.dense_threshold:
            if self.dense == "analog":
                return Placement(AIMC, f"dense (density {value:.2f}) on aimc-tile: dense=analog")
            return Placement(DIGITAL, f"dense: density {value:.2f}")
        return Placement(AIMC, f"sparse: density {value:.2f} below {self.dense_threshold:.2f}")

    def _place_experts(self, experts: list[Node], scores: dict[str, float], fixed: str | None,
                       ctx: CompileContext) -> None:
        if fixed is not None:
            target = DIGITAL if fixed == "all" else AIMC
            for node in experts:
                node.annotate(Placement(target, f"policy {self.policy}: every routed expert on {target}"))
            return
        ranked = sorted(experts, key=lambda n: (-scores[n.name], n.layer or 0, n.expert or 0))
        keep = budget_count(self.budget, len(ranked))
        where = f"in layer {experts[0].layer}" if self.budget_scope == "layer" else "across layers"
        for rank, node in enumerate(ranked, start=1):
            ok, why = aimc_supports(ctx.target, node.kind.value, node.matrices[0].shape, True)
            inside = rank <= keep
            text = (f"{self.policy} rank {rank} of {len(ranked)} {where}, "
                    f"{'inside' if inside else 'outside'} budget {self.budget:.1%}")
            if not ok:
                node.annotate(Placement(DIGITAL, f"aimc-tile cannot run it: {why}"))
            else:
                node.annotate(Placement(DIGITAL if inside else AIMC, text))
