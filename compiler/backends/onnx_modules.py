"""Crossbar tiles as an export-friendly stand-in for one linear matrix.

The ONNX back end (see :mod:`hetmap.compiler.backends.onnx_prepare`) swaps a
:class:`TiledLinear` in for every matrix it lowers to tiles and puts the original back
afterwards. Expert stand-ins live in :mod:`hetmap.compiler.backends.onnx_experts`.

Rules:

1. Tiles are stored in ``nn.Linear`` layout ``[out, in]`` and applied with ``F.linear``; the
   exporter turns that into ``Gemm(transB=1)`` or ``MatMul(x, Transpose(W))``.
2. A tiled matrix keeps one parameter per tile (``tiles.<i>``, in the order given); tiles
   sharing a column range add their partial sums, column blocks are concatenated, the bias
   is added last.
3. Tile ranges must cover the matrix exactly once, as a grid (:func:`check_tile_ranges`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hetmap.common.errors import EmitError

TileRange = tuple[int, int, int, int]
"""(row_start, row_stop, col_start, col_stop): rows index inputs, cols index outputs."""


class TiledLinear(nn.Module):
    """A linear map split into crossbar tiles (rule 2). Parameters: ``tiles.<i>``, ``bias``."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, tile_ranges: Sequence[TileRange]
    ) -> None:
        super().__init__()
        self.tile_ranges: list[TileRange] = [
            (int(r0), int(r1), int(c0), int(c1)) for r0, r1, c0, c1 in tile_ranges
        ]
        self.column_blocks = _column_blocks(self.tile_ranges)
        weight = weight.detach()
        self.tiles = nn.ParameterList(
            nn.Parameter(weight[c0:c1, r0:r1].clone(), requires_grad=False)
            for r0, r1, c0, c1 in self.tile_ranges
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        blocks: list[torch.Tensor] = []
        for members in self.column_blocks:
            partial_sum: torch.Tensor | None = None
            for index in members:
                r0, r1 = self.tile_ranges[index][:2]
                partial = F.linear(hidden[..., r0:r1], self.tiles[index])
                partial_sum = partial if partial_sum is None else partial_sum + partial
            assert partial_sum is not None
            blocks.append(partial_sum)
        output = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
        return output if self.bias is None else output + self.bias


def check_tile_ranges(
    key: str, tiles: Sequence[TileRange], in_features: int, out_features: int
) -> None:
    """Raise EmitError unless ``tiles`` form a grid that covers [in x out] exactly once."""
    if not tiles:
        raise EmitError(f"tile_ranges[{key!r}] is empty; give at least one tile or omit the key")
    for tile in tiles:
        if len(tile) != 4 or not all(isinstance(bound, numbers.Integral) for bound in tile):
            raise EmitError(f"tile_ranges[{key!r}]: {tile!r} is not 4 ints (r0, r1, c0, c1)")
        r0, r1, c0, c1 = tile
        if not (0 <= r0 < r1 <= in_features and 0 <= c0 < c1 <= out_features):
            raise EmitError(
                f"tile_ranges[{key!r}]: {tuple(tile)} lies outside the matrix "
                f"(rows = {in_features} inputs, cols = {out_features} outputs)"
            )
    columns = sorted({(tile[2], tile[3]) for tile in tiles})
    _check_partition(key, "column ranges", columns, out_features)
    for c0, c1 in columns:
        rows = sorted((tile[0], tile[1]) for tile in tiles if (tile[2], tile[3]) == (c0, c1))
        _check_partition(key, f"row ranges of columns {c0}:{c1}", rows, in_features)


def _check_partition(key: str, what: str, spans: list[tuple[int, int]], size: int) -> None:
    position = 0
    for start, stop in spans:
        if start != position:
            raise EmitError(
                f"tile_ranges[{key!r}]: {what} must cover 0..{size} without gaps or overlaps "
                f"(found {start}:{stop} where {position} was expected)"
            )
        position = stop
    if position != size:
        raise EmitError(f"tile_ranges[{key!r}]: {what} stop at {position}, not at {size}")


def _column_blocks(tiles: Sequence[TileRange]) -> list[list[int]]:
    """Tile indices grouped by column range, blocks in column order, members in row order."""
    columns = sorted({(tile[2], tile[3]) for tile in tiles})
    return [
        sorted((i for i, t in enumerate(tiles) if (t[2], t[3]) == span), key=lambda i: tiles[i][0])
        for span in columns
    ]
