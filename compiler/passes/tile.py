"""``tile``: cut every analog matrix into fixed-size crossbar tiles.

Requires: :class:`Placement`; reads the target's crossbar ``rows`` x ``cols``. Provides:
:class:`Tiling` on every node placed on ``aimc-tile``. Algorithm: :mod:`hetmap.common.grid`.

Rules: (1) W ``[out, in]`` becomes ``ceil(in / rows) x ceil(out / cols)`` tiles; rows index
input features, columns output features; the last tiles of each side are partial. (2) Digital
nodes get no tiling (a stale one is removed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hetmap.common.grid import TileGrid
from hetmap.compiler.ir.annotations import Placement
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
            tiling = Tiling(tuple(TileGrid(m.out_features, m.in_features, rows, cols)
                                  for m in node.matrices))
            node.annotate(tiling)
            tiles += tiling.count
        return PassResult(graph, True, [f"{tiles} tiles of {rows}x{cols}"])
