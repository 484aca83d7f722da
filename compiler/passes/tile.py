"""``tile``: cut every analog matrix into fixed-size crossbar tiles.

Requires: :class:`Placement`; reads the target's crossbar ``rows`` x ``cols``. Provides:
:class:`Tiling` on every node placed on ``aimc-tile``. Algorithm: :mod:`hetmap.common.grid`.

Rules: (1) W ``[out, in]`` becomes ``ceil(in / rows) x ceil(out / cols)`` tiles; rows index
input features, columns output features; the last tiles of each side are partial. (2) Digital
nodes get no tiling (a stale one is removed). (3) A split expert (neuron-granular placement)
tiles only its analog part: gate/up without their digital rows, down without its digital
columns (:func:`~hetmap.compiler.ir.annotations.analog_shape`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hetmap.common.grid import TileGrid
from hetmap.compiler.ir.annotations import Placement, analog_shape
from hetmap.compiler.ir.graph import Graph
from hetmap.compiler.ir.hwannotations import Tiling
from hetmap.compiler.passes.base import CompileContext, PassResult


@dataclass(frozen=True)
class TilePass:
    name: ClassVar[str] = "tile"
    description: ClassVar[str] = "cut analog matrices into crossbar-sized tiles"
    requires: ClassVar[tuple[type, ...]] = (Placement,)
    provides: ClassVar[tuple[type, ...]] = (Tiling,)

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        rows, cols = ctx.target.aimc.rows, ctx.target.aimc.cols
        tiles = 0
        for node in graph.matrix_nodes():
            placement = node.get(Placement)
            if placement is None or not placement.analog:
                node.annotations.pop(Tiling, None)
                continue
            digital = len(placement.digital_neurons)
            tiling = Tiling(tuple(TileGrid(*analog_shape(m.role, m.shape, digital), rows, cols)
                                  for m in node.matrices))
            node.annotate(tiling)
            tiles += tiling.count
        return PassResult(graph, True, [f"{tiles} tiles of {rows}x{cols}"])
