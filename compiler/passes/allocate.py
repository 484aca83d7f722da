"""``allocate``: place every tile on a physical crossbar array (chip, array, tier).

Reads: :class:`Tiling`, the target. Writes: :class:`ArrayAssignment` per analog node and an
:class:`AllocationSummary` on the graph (``tiles_used``, ``arrays_used``,
``tile_utilization``, with and without packing).

Rules: see :mod:`hetmap.compiler.algorithms.allocate`. Input-side matrices of one node with the same
input width (gate and up of an expert; q, k and v) read the same input: they form an input
group and may share arrays side by side.
``spread_experts`` keeps experts that are routed together on distinct array sites so that
they run in parallel: with calibration co-activation counts (:class:`Coactivation`), each
layer's experts are grouped by :func:`~hetmap.compiler.algorithms.allocate.coactivation_groups`
(groups of as many experts as the system's sites hold); without them a layer is one group. ``chips`` is the target's count, a number, or
``auto`` (the fewest chips that fit); too few arrays is a :class:`CapacityError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hetmap.common.errors import PipelineError
from hetmap.compiler.algorithms.allocate import allocate, coactivation_groups
from hetmap.compiler.ir.annotations import Coactivation
from hetmap.compiler.ir.graph import Graph, Node, NodeKind
from hetmap.compiler.ir.hwannotations import (
    AllocationSummary,
    ArrayAssignment,
    ArrayLayout,
    Tiling,
)
from hetmap.compiler.passes.base import CompileContext, PassResult

_OUTPUT_SIDE = {"down", "o_proj", "down_proj", "fc2", "wo"}


@dataclass(frozen=True)
class AllocatePass:
    name: ClassVar[str] = "allocate"
    description: ClassVar[str] = "assign tiles to physical crossbar arrays, packing partial tiles"
    requires: ClassVar[tuple[type, ...]] = (Tiling,)
    provides: ClassVar[tuple[type, ...]] = (ArrayAssignment, AllocationSummary)

    chips: str = "target"
    packing: bool = True
    spread_experts: bool = False

    def validate(self) -> str | None:
        if self.chips not in ("target", "auto") and not (self.chips.isdigit() and int(self.chips) > 0):
            return f"chips must be a positive number, 'auto' or 'target', got {self.chips!r}"
        return None

    @staticmethod
    def _spread_group(node: Node, graph: Graph, ctx: CompileContext,
                      layer_groups: dict[int, Any]) -> int:
        if node.kind is not NodeKind.EXPERT or node.layer is None or node.expert is None:
            return -1
        groups = layer_groups.get(node.layer)
        if groups is None:
            coactivation = graph.get(Coactivation)
            counts = coactivation.layers.get(node.layer) if coactivation is not None else None
            if counts is None:
                groups = np.zeros(graph.moe_layers[node.layer].num_experts, dtype=np.int64)
            else:
                tiling = node.get(Tiling)
                per_expert = tiling.count if tiling is not None else 1
                sites = ctx.target.aimc.chips * ctx.target.aimc.arrays_per_chip
                group_size = max(1, sites // max(per_expert, 1))
                groups = coactivation_groups(counts, group_size)
            layer_groups[node.layer] = groups
        return node.layer * 1_000_000 + int(groups[node.expert])

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        layer_groups: dict[int, Any] = {}
        nodes = [n for n in graph.matrix_nodes() if n.has(Tiling)]
        outs, ins, groups, spread, owners = [], [], [], [], []
        group_of: dict[tuple[int, int], int] = {}
        for index, node in enumerate(nodes):
            for m_index, matrix in enumerate(node.matrices):
                outs.append(matrix.out_features)
                ins.append(matrix.in_features)
                # input-side matrices of one node with the same width read the same input
                shared_input = matrix.role not in _OUTPUT_SIDE
                key = (index, matrix.in_features)
                groups.append(group_of.setdefault(key, len(group_of)) if shared_input else -1)
                spread.append(self._spread_group(node, graph, ctx, layer_groups))
                owners.append((node, m_index))
        chips: int | str | None = None if self.chips == "target" else (
            "auto" if self.chips == "auto" else int(self.chips))
        if self.chips not in ("target", "auto") and not self.chips.isdigit():
            raise PipelineError(f"allocate: chips={self.chips!r}")
        group_ids = np.asarray(groups, dtype=np.int64)
        unique_single = np.flatnonzero(group_ids < 0)
        group_ids[unique_single] = -1 - unique_single  # distinct ids for matrices with no group
        allocation = allocate(np.asarray(outs, dtype=np.int64), np.asarray(ins, dtype=np.int64),
                              ctx.target, chips=chips, packing=self.packing and ctx.target.aimc.packing,
                              input_group=group_ids - group_ids.min(initial=0),
                              spread_group=np.asarray(spread) if self.spread_experts else None)
        compact = allocation.compact()
        steps = allocation.serial_steps().tolist()
        per_node: dict[str, tuple[list[tuple[tuple[int, int], ...]],
                                  list[tuple[tuple[int, int, int], ...]], list[int]]] = {}
        for (node, _m), entry, step in zip(owners, compact["matrices"], steps, strict=True):
            runs, offs, node_steps = per_node.setdefault(node.name, ([], [], []))
            runs.append(tuple(tuple(r) for r in entry["slot_runs"]))
            offs.append(tuple(tuple(o) for o in entry["offsets"]))
            node_steps.append(int(step))
        for node in nodes:
            runs, offs, node_steps = per_node[node.name]
            node.annotate(ArrayAssignment(tuple(runs), tuple(offs), tuple(node_steps)))
        s = allocation.summary()
        layout = compact["layout"]
        graph.annotate(AllocationSummary(
            chips=int(s["chips"]), arrays_available=int(s["arrays_available"]),
            arrays_used=int(s["arrays_used"]), tiles_used=int(s["tiles_used"]),
            stored_weights=int(s["stored_weights"]), tile_utilization=float(s["tile_utilization"]),
            unpacked_arrays=int(s["unpacked_arrays"]),
            unpacked_utilization=float(s["unpacked_utilization"]), packing=bool(s["packing"]),
            layout=ArrayLayout(int(layout["rows"]), int(layout["cols"]), int(layout["chips"]),
                               int(layout["arrays_per_chip"]), int(layout["tiers"]))))
        return PassResult(graph, True, [f"{s['tiles_used']} tiles on {s['arrays_used']} arrays "
                                        f"({s['tile_utilization']:.1%} used), {s['chips']} chip(s)"])
