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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from hetmap.compiler.algorithms.place import check_scores
from hetmap.compiler.ir.annotations import AIMC, DIGITAL, Density, Placement
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
        groups = list(layers.values()) if self.budget_scope == "layer" else [graph.experts()]
        for experts in groups:
            self._place_experts(experts, scores, getattr(policy, "fixed", None), ctx)
        return PassResult(graph, True)

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
