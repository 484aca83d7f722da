"""Tests for hetmap.common.grid: exact coverage, vectorized tables, tiled products."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmap.common.grid import (
    TileGrid,
    edge_tiles,
    tile_counts,
    tile_table,
    tiled_matvec,
    tiles_per_matrix,
)

sizes = st.integers(min_value=1, max_value=200)
crossbar = st.integers(min_value=1, max_value=64)


@settings(max_examples=80, deadline=None)
@given(out=sizes, inp=sizes, rows=crossbar, cols=crossbar)
def test_tiles_cover_each_weight_exactly_once(out: int, inp: int, rows: int, cols: int) -> None:
    grid = TileGrid(out, inp, rows, cols)
    cover = np.zeros((out, inp), dtype=np.int64)  # [out, in], like the weight
    for row_start, row_stop, col_start, col_stop in grid.ranges():
        assert 0 < row_stop - row_start <= rows and 0 < col_stop - col_start <= cols
        cover[col_start:col_stop, row_start:row_stop] += 1
    assert np.all(cover == 1)
    assert grid.count == math.ceil(inp / rows) * math.ceil(out / cols) == len(grid.ranges())
    assert grid.tile_shapes().prod(axis=1).sum() == grid.used_cells == out * inp
    compact = grid.compact_ranges()
    assert compact["row_bounds"][0] == 0 and compact["row_bounds"][-1] == inp
    assert len(compact["col_bounds"]) == grid.n_col_tiles + 1


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(sizes, sizes), min_size=0, max_size=6), rows=crossbar,
       cols=crossbar)
def test_tile_table_matches_the_grids(shapes: list[tuple[int, int]], rows: int, cols: int) -> None:
    out = np.array([s[0] for s in shapes], dtype=np.int64)
    inp = np.array([s[1] for s in shapes], dtype=np.int64)
    table = tile_table(out, inp, rows, cols)
    assert table.count == int(tiles_per_matrix(out, inp, rows, cols).sum())
    for m, (o, i) in enumerate(shapes):
        grid = TileGrid(o, i, rows, cols)
        mine = slice(table.tile_start[m], table.tile_start[m + 1])
        assert np.all(table.matrix[mine] == m)
        starts = np.stack([table.row_tile[mine] * rows, table.col_tile[mine] * cols], axis=1)
        assert np.array_equal(starts, grid.ranges()[:, [0, 2]])
        assert np.array_equal(np.stack([table.n_rows[mine], table.n_cols[mine]], 1),
                              grid.tile_shapes())
    edges = edge_tiles(out, inp, rows, cols)
    partial = np.flatnonzero((table.n_rows < rows) | (table.n_cols < cols))
    assert edges.index is not None and np.array_equal(edges.index, partial)
    assert np.array_equal(edges.n_rows, table.n_rows[partial])
    assert np.array_equal(edges.n_cols, table.n_cols[partial])
    assert np.array_equal(edges.matrix, table.matrix[partial])


@pytest.mark.parametrize(("out", "inp", "rows", "cols"),
                         [(37, 53, 8, 16), (64, 64, 64, 64), (5, 300, 128, 4), (1, 1, 512, 512)])
def test_tiled_matvec_equals_the_untiled_product(out: int, inp: int, rows: int, cols: int) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out, inp))
    x = rng.standard_normal(inp)
    np.testing.assert_allclose(tiled_matvec(weight, x, TileGrid(out, inp, rows, cols)),
                               weight @ x, rtol=1e-12, atol=1e-12)


def test_olmoe_on_aimc_512_by_hand() -> None:
    """OLMoE-1B-7B: hidden 2048, expert intermediate 1024, 64 experts x 16 layers, attention
    q/k/v/o 2048x2048, router 64x2048, LM head 50304x2048; tiles are 512x512."""
    # gate/up [1024, 2048]: 2048 inputs / 512 = 4 row tiles, 1024 outputs / 512 = 2 col tiles.
    assert (TileGrid(1024, 2048, 512, 512).n_row_tiles, TileGrid(1024, 2048, 512, 512).n_col_tiles
            ) == (4, 2)
    # down [2048, 1024]: 2 row tiles x 4 col tiles.
    assert (TileGrid(2048, 1024, 512, 512).n_row_tiles, TileGrid(2048, 1024, 512, 512).n_col_tiles
            ) == (2, 4)
    out = np.array([1024, 1024, 2048, 2048, 64, 50304])
    inp = np.array([2048, 2048, 1024, 2048, 2048, 2048])
    assert tiles_per_matrix(out, inp, 512, 512).tolist() == [8, 8, 8, 16, 4, 4 * 99]
    expert_tiles = 16 * 64 * (8 + 8 + 8)
    olmoe = (np.tile([1024, 1024, 2048], 16 * 64), np.tile([2048, 2048, 1024], 16 * 64))
    assert tiles_per_matrix(*olmoe, 512, 512).sum() == expert_tiles == 24576
    # The LM head's last column tile holds 50304 - 98 * 512 = 128 outputs.
    assert TileGrid(50304, 2048, 512, 512).tile_shapes()[-1].tolist() == [512, 128]


@pytest.mark.timing
def test_fifty_thousand_matrices_are_cheap() -> None:
    out = np.tile([2048, 2048, 7168], 17000)
    inp = np.tile([7168, 7168, 2048], 17000)
    start = time.perf_counter()
    n_row_tiles, n_col_tiles = tile_counts(out, inp, 512, 512)
    edges = edge_tiles(out, inp, 512, 512)
    assert time.perf_counter() - start < 0.5
    assert int((n_row_tiles * n_col_tiles).sum()) == 51000 * 56 and edges.count == 0


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        TileGrid(0, 4, 2, 2)
    with pytest.raises(ValueError):
        tile_counts([4, 4], [4], 2, 2)
    with pytest.raises(ValueError):
        tiled_matvec(np.zeros((3, 3)), np.zeros(3), TileGrid(3, 4, 2, 2))
