"""Example passes: one analysis (``layer-report``), one transformation (``pin-digital``)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

from hetmap.compiler.ir.annotations import DIGITAL, Density, ExpertScore, Placement
from hetmap.compiler.passes.base import PassResult


@dataclass(frozen=True)
class LayerStats:
    """Graph-level annotation: per MoE layer, density spread and score range."""

    scope: ClassVar[str] = "graph"  # checked: the pass must write it on the graph
    layers: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {"layer_report": list(self.layers)}


@dataclass(frozen=True)
class LayerReport:
    name: ClassVar[str] = "layer-report"
    description: ClassVar[str] = "per-layer density spread and score range (example plugin)"
    # the contract the pass manager checks: run after density and expert-score
    requires: ClassVar[tuple[type, ...]] = (Density, ExpertScore)
    provides: ClassVar[tuple[type, ...]] = (LayerStats,)

    def run(self, graph, ctx):
        rows = []
        for layer, experts in sorted(graph.experts_by_layer().items()):
            densities = [d.value for n in experts if (d := n.get(Density)) is not None]
            scores = [s.max_norm for n in experts
                      if (s := n.get(ExpertScore)) is not None and s.max_norm is not None]
            rows.append({"layer": layer, "experts": len(experts),
                         "density_min": min(densities, default=None),
                         "density_max": max(densities, default=None),
                         "score_min": min(scores, default=None),
                         "score_max": max(scores, default=None)})
        graph.annotate(LayerStats(tuple(rows)))
        return PassResult(graph, modified=False, notes=[f"{len(rows)} MoE layers reported"])


@dataclass(frozen=True)
class PinDigital:
    name: ClassVar[str] = "pin-digital"
    description: ClassVar[str] = "force nodes matching a glob onto digital (example plugin)"
    requires: ClassVar[tuple[type, ...]] = (Placement,)
    provides: ClassVar[tuple[type, ...]] = (Placement,)  # tiles made before it become stale
    pattern: str = "*"

    def run(self, graph, ctx):
        pinned = 0
        for node in graph.matrix_nodes():
            placement = node.get(Placement)
            if placement is not None and placement.analog and fnmatch.fnmatch(node.name, self.pattern):
                node.annotate(Placement(DIGITAL, f"pinned by pin-digital{{pattern={self.pattern}}}"))
                pinned += 1
        return PassResult(graph, modified=pinned > 0, notes=[f"{pinned} nodes pinned digital"])
