"""The one crossbar tile grid: how weight matrices are cut into fixed-size tiles.

A weight ``W`` of shape ``[out, in]`` (nn.Linear convention) on ``rows x cols`` crossbars:

1. Crossbar rows carry inputs, columns produce outputs: a tile holds ``W[c0:c1, r0:r1]``, an
   input slice ``[r0, r1)`` of at most ``rows`` features and an output slice ``[c0, c1)`` of at
   most ``cols`` features. Partial sums of the row tiles are added digitally.
2. The grid has ``ceil(in / rows)`` row tiles and ``ceil(out / cols)`` column tiles; all tiles
   are ``rows x cols`` except the last row tile (fewer rows) and the last column tile (fewer
   columns). Tiles are fixed-size, not the near-equal split aihwkit makes.
3. Tiles are numbered row-tile major: tile ``t = r * n_col_tiles + c``.

:class:`TileGrid` describes one matrix, or a stack of matrices that read the same input and sit
side by side along the output dimension (an expert's gate and up projections: ``out_splits``
gives their output sizes, and every matrix starts on a fresh column tile). The compiler's tile
pass, the allocator and the runtime's tile model all use this class. :func:`tile_counts`, :func:`tile_table` (every tile)
and :func:`edge_tiles` (only the partial ones) work on arrays of shapes at once, for models
with tens of thousands of matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _ceil_div(a: NDArray[np.int64], b: int) -> NDArray[np.int64]:
    return -(-a // b)


@dataclass(frozen=True)
class TileGrid:
    """The tiling of one ``[out_features, in_features]`` matrix (or a stack of matrices with
    output sizes ``out_splits``, summing to ``out_features``) on ``rows x cols`` arrays."""

    out_features: int
    in_features: int
    rows: int
    cols: int
    out_splits: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        sizes = (self.out_features, self.in_features, self.rows, self.cols)
        if min(sizes) <= 0:
            raise ValueError(f"TileGrid sizes must be positive, got {sizes}")
        if not self.out_splits:
            object.__setattr__(self, "out_splits", (self.out_features,))
        if sum(self.out_splits) != self.out_features or min(self.out_splits) <= 0:
            raise ValueError(f"TileGrid out_splits {self.out_splits} do not add up to "
                             f"{self.out_features} positive output features")

    @classmethod
    def build(cls, in_features: int, out_splits: Sequence[int], rows: int, cols: int) -> TileGrid:
        """A stack of matrices of output sizes ``out_splits`` reading ``in_features`` inputs."""
        splits = tuple(int(size) for size in out_splits)
        return cls(sum(splits), int(in_features), rows, cols, splits)

    @property
    def n_row_tiles(self) -> int:
        """Tiles along the input dimension (their partial sums are added digitally)."""
        return -(-self.in_features // self.rows)

    @property
    def n_col_tiles(self) -> int:
        """Tiles along the output dimension, over all matrices of the stack."""
        return sum(-(-size // self.cols) for size in self.out_splits)

    @property
    def count(self) -> int:
        return self.n_row_tiles * self.n_col_tiles

    @property
    def used_cells(self) -> int:
        """Weights stored: every tile cell that holds a weight."""
        return self.out_features * self.in_features

    @property
    def cells(self) -> int:
        """Cells of the arrays the tiles take when each tile has an array of its own."""
        return self.count * self.rows * self.cols

    def row_bounds(self) -> NDArray[np.int64]:
        """Input-feature boundaries ``[0, rows, 2*rows, ..., in_features]``."""
        return np.minimum(np.arange(self.n_row_tiles + 1) * self.rows, self.in_features)

    def col_bounds(self) -> NDArray[np.int64]:
        """Output-feature boundaries of the column tiles, ``[0, cols, ..., out_features]`` for
        one matrix; each matrix of a stack starts a fresh column tile."""
        bounds, start = [0], 0
        for size in self.out_splits:
            edges = np.minimum(np.arange(1, -(-size // self.cols) + 1) * self.cols, size)
            bounds.extend((start + edges).tolist())
            start += size
        return np.asarray(bounds, dtype=np.int64)

    def ranges(self) -> NDArray[np.int64]:
        """``[count, 4]``: (row_start, row_stop, col_start, col_stop) of each tile."""
        row_bounds, col_bounds = self.row_bounds(), self.col_bounds()
        row_tile = np.repeat(np.arange(self.n_row_tiles), self.n_col_tiles)
        col_tile = np.tile(np.arange(self.n_col_tiles), self.n_row_tiles)
        return np.stack(
            [
                row_bounds[row_tile],
                row_bounds[row_tile + 1],
                col_bounds[col_tile],
                col_bounds[col_tile + 1],
            ],
            axis=1,
        )

    def tile_shapes(self) -> NDArray[np.int64]:
        """``[count, 2]``: (rows used, cols used) of each tile."""
        ranges = self.ranges()
        return np.stack([ranges[:, 1] - ranges[:, 0], ranges[:, 3] - ranges[:, 2]], axis=1)

    def compact_ranges(self) -> dict[str, Any]:
        """JSON-ready description: tile ``(r, c)`` spans inputs ``row_bounds[r:r+2]`` and
        outputs ``col_bounds[c:c+2]``. Size grows with the grid's sides, not its area."""
        return {
            "rows": self.rows,
            "cols": self.cols,
            "row_bounds": self.row_bounds().tolist(),
            "col_bounds": self.col_bounds().tolist(),
        }

    def in_slices(self) -> list[slice]:
        """Input-dimension slice of each row tile."""
        bounds = self.row_bounds().tolist()
        return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]

    def out_offsets(self) -> list[tuple[int, int]]:
        """``(start, size)`` of each matrix of the stack along the output dimension."""
        starts = np.concatenate([[0], np.cumsum(self.out_splits)[:-1]])
        return [(int(start), size) for start, size in zip(starts, self.out_splits, strict=True)]

    def column_tile_index(self) -> NDArray[np.int64]:
        """For every output feature, the index of the column tile that computes it."""
        parts, first = [], 0
        for size in self.out_splits:
            parts.append(first + np.arange(size, dtype=np.int64) // self.cols)
            first += -(-size // self.cols)
        return np.concatenate(parts)


def tile_counts(
    out_features: ArrayLike, in_features: ArrayLike, rows: int, cols: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Row tiles and column tiles of each matrix (arrays of shapes in, arrays out)."""
    out_arr = np.asarray(out_features, dtype=np.int64)
    in_arr = np.asarray(in_features, dtype=np.int64)
    if out_arr.shape != in_arr.shape:
        raise ValueError(f"shape arrays differ: {out_arr.shape} vs {in_arr.shape}")
    if out_arr.size and min(out_arr.min(), in_arr.min()) <= 0:
        raise ValueError("matrix sizes must be positive")
    return _ceil_div(in_arr, rows), _ceil_div(out_arr, cols)


def tiles_per_matrix(
    out_features: ArrayLike, in_features: ArrayLike, rows: int, cols: int
) -> NDArray[np.int64]:
    """Number of tiles of each matrix."""
    n_row_tiles, n_col_tiles = tile_counts(out_features, in_features, rows, cols)
    return n_row_tiles * n_col_tiles


@dataclass(frozen=True)
class TileTable:
    """Every tile of many matrices, one entry per tile, matrix-major then row-tile major.

    ``tile_start[m]:tile_start[m+1]`` are matrix ``m``'s tile indices. ``index`` holds the
    index of each entry when the table lists only some tiles (None: all, in order). Sizes are
    int32 to keep millions of tiles in tens of megabytes.
    """

    matrix: NDArray[np.int32]
    row_tile: NDArray[np.int32]
    col_tile: NDArray[np.int32]
    n_rows: NDArray[np.int32]
    n_cols: NDArray[np.int32]
    tile_start: NDArray[np.int64]
    index: NDArray[np.int64] | None = None

    @property
    def count(self) -> int:
        return int(self.matrix.size)


def _shapes(out_features: ArrayLike, in_features: ArrayLike
            ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    out_arr = np.asarray(out_features, dtype=np.int64).reshape(-1)
    in_arr = np.asarray(in_features, dtype=np.int64).reshape(-1)
    if max(int(in_arr.max(initial=0)), int(out_arr.max(initial=0))) >= 2**31:
        raise ValueError("matrix sides of 2**31 features or more are not supported")
    return out_arr, in_arr


def _expand(counts: NDArray[np.int64]) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """For counts ``[2, 3]``: owners ``[0, 0, 1, 1, 1]`` and ranks ``[0, 1, 0, 1, 2]``."""
    total = int(counts.sum())
    if total >= 2**31:
        raise ValueError("more than 2**31 tiles are not supported")
    owner = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
    rank = np.arange(total, dtype=np.int32)
    rank -= np.repeat((np.cumsum(counts) - counts).astype(np.int32), counts)
    return owner, rank


def _table(matrix: NDArray[np.int32], row_tile: NDArray[np.int32], col_tile: NDArray[np.int32],
           out_arr: NDArray[np.int64], in_arr: NDArray[np.int64], rows: int, cols: int,
           tile_start: NDArray[np.int64], index: NDArray[np.int64] | None) -> TileTable:
    n_rows = in_arr.astype(np.int32)[matrix]
    n_rows -= row_tile * np.int32(rows)
    np.minimum(n_rows, rows, out=n_rows)
    n_cols = out_arr.astype(np.int32)[matrix]
    n_cols -= col_tile * np.int32(cols)
    np.minimum(n_cols, cols, out=n_cols)
    return TileTable(matrix=matrix, row_tile=row_tile, col_tile=col_tile, n_rows=n_rows,
                     n_cols=n_cols, tile_start=tile_start, index=index)


def tile_table(out_features: ArrayLike, in_features: ArrayLike, rows: int, cols: int) -> TileTable:
    """Expand arrays of matrix shapes into one entry per tile, vectorized (int32 throughout)."""
    out_arr, in_arr = _shapes(out_features, in_features)
    n_row_tiles, n_col_tiles = tile_counts(out_arr, in_arr, rows, cols)
    counts = n_row_tiles * n_col_tiles
    matrix, row_tile = _expand(counts)  # row_tile holds the index within the matrix for now
    per_row = n_col_tiles.astype(np.int32)[matrix]
    col_tile = row_tile % per_row
    row_tile //= per_row
    del per_row
    tile_start = np.concatenate([[0], np.cumsum(counts)])
    return _table(matrix, row_tile, col_tile, out_arr, in_arr, rows, cols, tile_start, None)


def edge_tiles(out_features: ArrayLike, in_features: ArrayLike, rows: int, cols: int) -> TileTable:
    """Only the partial tiles (the last row tile and the last column tile of each matrix when
    the sizes do not divide), in tile order, with their tile ``index``. Their number grows
    with the grids' sides, not their areas."""
    out_arr, in_arr = _shapes(out_features, in_features)
    n_row_tiles, n_col_tiles = tile_counts(out_arr, in_arr, rows, cols)
    tile_start = np.concatenate([[0], np.cumsum(n_row_tiles * n_col_tiles)])
    short_rows = (in_arr % rows != 0).astype(np.int64)
    short_cols = (out_arr % cols != 0).astype(np.int64)
    bottom_matrix, bottom_col = _expand(short_rows * n_col_tiles)  # last row tile, every column
    right_matrix, right_row = _expand(short_cols * (n_row_tiles - short_rows))  # last column
    matrix = np.concatenate([bottom_matrix, right_matrix])
    row_tile = np.concatenate([(n_row_tiles[bottom_matrix] - 1).astype(np.int32), right_row])
    col_tile = np.concatenate([bottom_col, (n_col_tiles[right_matrix] - 1).astype(np.int32)])
    index = tile_start[matrix] + row_tile.astype(np.int64) * n_col_tiles[matrix] + col_tile
    order = np.argsort(index, kind="stable")
    return _table(matrix[order], row_tile[order], col_tile[order], out_arr, in_arr, rows, cols,
                  tile_start, index[order])


def tiled_matvec(weight: NDArray[Any], x: NDArray[Any], grid: TileGrid) -> NDArray[Any]:
    """``weight @ x`` computed tile by tile, partial sums of row tiles added (reference)."""
    if weight.shape != (grid.out_features, grid.in_features):
        raise ValueError(f"weight shape {weight.shape} does not match {grid}")
    result = np.zeros(grid.out_features, dtype=np.result_type(weight, x))
    for row_start, row_stop, col_start, col_stop in grid.ranges():
        block = weight[col_start:col_stop, row_start:row_stop]
        result[col_start:col_stop] += block @ x[row_start:row_stop]
    return result
