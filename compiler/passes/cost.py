"""``cost``: energy and latency per token of the mapping and of all-digital execution.

Reads: :class:`Placement`, :class:`Density`, :class:`Tiling`, the allocation (serial steps
of tiered targets). Writes: :class:`CostSummary` on the graph. The model and its assumptions
are in :mod:`hetmap.compiler.costmodel`; expert up/gate and down matrices are costed as
dependent stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hetmap.compiler.annotations import Density, Placement
from hetmap.compiler.costmodel import estimate_cost
from hetmap.compiler.hwannotations import CostSummary, Tiling
from hetmap.compiler.ir import Graph
from hetmap.compiler.passes.base import CompileContext, PassResult


@dataclass(frozen=True)
class CostPass:
    name: ClassVar[str] = "cost"
    description: ClassVar[str] = "energy and latency per token versus all-digital"

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        kinds, outs, ins, density, placement, layer, tiles, stage = [], [], [], [], [], [], [], []
        steps = []
        allocation = ctx.cache.get("allocation")
        serial = allocation.serial_steps() if allocation is not None else None
        analog_index = 0
        for node in graph.matrix_nodes():
            where = node.get(Placement)
            if where is None:
                continue
            d = node.get(Density)
            tiling = node.get(Tiling)
            for m_index, matrix in enumerate(node.matrices):
                kinds.append(node.kind.value)
                outs.append(matrix.out_features)
                ins.append(matrix.in_features)
                density.append(d.value if d is not None else 1.0)
                placement.append(where.target)
                layer.append(-1 if node.layer is None else node.layer)
                tiles.append(tiling.grids[m_index].count if tiling is not None else 0)
                stage.append(1 if matrix.role in ("down", "o_proj") else 0)
                if tiling is not None and serial is not None and analog_index < serial.size:
                    steps.append(int(serial[analog_index]))
                    analog_index += 1
                else:
                    steps.append(1)
        if not kinds:
            return PassResult(graph, False, ["no matrices to cost"])
        estimate = estimate_cost(ctx.target, kind=kinds, out_features=np.asarray(outs),
                                 in_features=np.asarray(ins), density=np.asarray(density),
                                 placement=placement, layer=np.asarray(layer),
                                 tiles=np.asarray(tiles), serial_steps=np.asarray(steps),
                                 stage=np.asarray(stage))
        graph.annotate(CostSummary(estimate.to_json()))
        return PassResult(graph, True, [f"energy {estimate.energy_ratio:.2f}x, latency "
                                        f"{estimate.latency_ratio:.2f}x all-digital"])
