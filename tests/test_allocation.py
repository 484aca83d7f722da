"""Tests for hetmap.compiler.algorithms.allocate: no shared cells, sharing rules, capacity, spreading."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmap.common.errors import CapacityError
from hetmap.common.grid import tiles_per_matrix
from hetmap.compiler.algorithms.allocate import Allocation, allocate, coactivation_groups
from hetmap.targets import Target, load_target


def _target(rows: int = 512, cols: int = 512, arrays_per_chip: int = 256, chips: int = 128,
            tiers: int = 1, packing: bool = True) -> Target:
    base = load_target("aimc-512")
    aimc = replace(base.aimc, rows=rows, cols=cols, arrays_per_chip=arrays_per_chip, chips=chips,
                   tiers=tiers, packing=packing)
    return replace(base, aimc=aimc)


def _check_cells(alloc: Allocation, groups: np.ndarray | None) -> None:
    """Occupancy grid: no cell holds two weights; sharing follows module rule 2."""
    tiles = alloc.tiles()
    rows, cols = alloc.rows, alloc.cols
    cells = np.zeros((alloc.arrays_used, rows, cols), dtype=np.int64)
    row_stop = alloc.row_offset + tiles.n_rows
    col_stop = alloc.col_offset + tiles.n_cols
    assert np.all(row_stop <= rows) and np.all(col_stop <= cols)
    assert np.all(alloc.row_offset >= 0) and np.all(alloc.col_offset >= 0)
    for t in range(tiles.count):
        s = alloc.slot[t]
        cells[s, alloc.row_offset[t]:row_stop[t], alloc.col_offset[t]:col_stop[t]] += 1
    assert cells.max(initial=0) <= 1
    assert cells.sum() == alloc.stored_weights
    assert np.all(cells.reshape(alloc.arrays_used, -1).any(axis=1))  # no empty array counted
    group = np.arange(alloc.out_features.size) if groups is None else groups
    for s in np.unique(alloc.slot):
        members = np.flatnonzero(alloc.slot == s)
        for a in members:
            for b in members[members > a]:
                rows_overlap = (alloc.row_offset[a] < row_stop[b]
                                and alloc.row_offset[b] < row_stop[a])
                cols_overlap = (alloc.col_offset[a] < col_stop[b]
                                and alloc.col_offset[b] < col_stop[a])
                assert not cols_overlap or not rows_overlap
                if rows_overlap:  # side by side only on the same input slice, same rows
                    assert group[tiles.matrix[a]] == group[tiles.matrix[b]]
                    assert tiles.row_tile[a] == tiles.row_tile[b]
                    assert alloc.row_offset[a] == alloc.row_offset[b]
                    assert tiles.n_rows[a] == tiles.n_rows[b]
                else:
                    assert not cols_overlap or rows_overlap  # diagonal: disjoint both ways


shapes = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, rows=st.integers(2, 16), cols=st.integers(2, 16), tiers=st.integers(1, 3),
       per_chip=st.integers(1, 4), packing=st.booleans(), grouped=st.booleans(),
       data=st.data())
def test_allocation_invariants(shapes: list[tuple[int, int]], rows: int, cols: int, tiers: int,
                               per_chip: int, packing: bool, grouped: bool,
                               data: st.DataObject) -> None:
    out = np.array([s[0] for s in shapes])
    inp = np.array([s[1] for s in shapes])
    groups = None
    if grouped:  # matrices of one input group share in_features
        groups = np.array(data.draw(st.lists(st.integers(0, 2), min_size=len(shapes),
                                             max_size=len(shapes))))
        inp = np.array([10 + 7 * g for g in groups])
    target = _target(rows, cols, per_chip, 1, tiers, packing)
    alloc = allocate(out, inp, target, chips="auto", input_group=groups)
    n_tiles = int(tiles_per_matrix(out, inp, rows, cols).sum())
    assert alloc.tiles_used == n_tiles
    assert alloc.arrays_used <= n_tiles and (packing or alloc.arrays_used == n_tiles)
    assert alloc.slot.min() == 0 and alloc.slot.max() == alloc.arrays_used - 1
    # capacity and the minimal chip count
    per_chip_arrays = per_chip * tiers
    assert alloc.chips * per_chip_arrays >= alloc.arrays_used
    assert (alloc.chips - 1) * per_chip_arrays < alloc.arrays_used
    assert np.all(alloc.chip < alloc.chips) and np.all(alloc.array < per_chip)
    assert np.all(alloc.tier < tiers)
    locations = alloc.chip.astype(np.int64) * per_chip_arrays + alloc.array * tiers + alloc.tier
    assert np.array_equal(np.unique(locations).size, alloc.arrays_used)
    if alloc.chips > 1:
        with pytest.raises(CapacityError, match="--chips auto"):
            allocate(out, inp, target, chips=alloc.chips - 1, input_group=groups)
    _check_cells(alloc, groups)
    _check_compact(alloc)
    _check_serial_steps(alloc)


def _check_compact(alloc: Allocation) -> None:
    plan = alloc.compact()
    slots, offsets = [], []
    for m, entry in enumerate(plan["matrices"]):
        mine = [first + k for first, length in entry["slot_runs"] for k in range(length)]
        assert len(mine) == alloc.tile_start[m + 1] - alloc.tile_start[m]
        slots += mine
        shifted = {tile: (r, c) for tile, r, c in entry["offsets"]}
        offsets += [shifted.get(t, (0, 0)) for t in range(len(mine))]
    assert slots == alloc.slot.tolist()
    assert offsets == list(zip(alloc.row_offset.tolist(), alloc.col_offset.tolist(), strict=True))


def _check_serial_steps(alloc: Allocation) -> None:
    matrix = alloc.matrix_of_tile
    expected = [max(np.bincount(alloc.site[matrix == m]).max(initial=0), 0)
                for m in range(alloc.out_features.size)]
    if alloc.tiers == 1:
        expected = [min(e, 1) for e in expected]
    assert alloc.serial_steps().tolist() == expected


def test_olmoe_experts_fill_whole_arrays() -> None:
    out = np.tile([1024, 1024, 2048], 16 * 64)
    inp = np.tile([2048, 2048, 1024], 16 * 64)
    alloc = allocate(out, inp, load_target("aimc-512"))
    assert alloc.arrays_used == alloc.tiles_used == 24576
    assert alloc.tile_utilization == alloc.unpacked_utilization == 1.0
    assert alloc.chips == 128 and alloc.chip.max() == 24575 // 256


def test_same_input_slices_share_rows() -> None:
    # gate and up with 256 outputs each, one input slice: side by side in one array
    target = _target()
    alloc = allocate([256, 256], [512, 512], target, input_group=[0, 0])
    assert alloc.arrays_used == 1
    assert sorted(alloc.col_offset.tolist()) == [0, 256] and alloc.row_offset.tolist() == [0, 0]
    assert alloc.tile_utilization == 1.0 and alloc.unpacked_utilization == 0.5
    # different inputs on full-height tiles cannot share (they would need the same rows)
    assert allocate([256, 256], [512, 512], target).arrays_used == 2
    assert allocate([256, 256], [512, 512], target, packing=False).arrays_used == 2


def test_small_blocks_pack_diagonally() -> None:
    alloc = allocate([100] * 6, [100] * 6, _target())
    assert alloc.arrays_used == 2  # 512 // 100 = 5 blocks per array
    first = alloc.slot == alloc.slot[0]
    assert sorted(alloc.row_offset[first].tolist()) == [0, 100, 200, 300, 400]
    assert np.array_equal(alloc.row_offset[first], alloc.col_offset[first])


def test_capacity_error_is_one_line_with_the_numbers() -> None:
    target = _target(arrays_per_chip=4, chips=2)
    assert allocate([1024], [2048], target).arrays_used == 8  # exactly the 8 arrays there are
    with pytest.raises(CapacityError) as raised:
        allocate([1024, 512], [2048, 512], target)
    message = str(raised.value)
    assert "\n" not in message and "need 9 crossbar arrays" in message and "hold 8" in message
    assert "--chips auto" in message
    assert allocate([1024, 512], [2048, 512], target, chips="auto").chips == 3
    with pytest.raises(CapacityError, match="positive integer or 'auto'"):
        allocate([8], [8], target, chips=0)


def test_wide_shelves_are_split_first_fit_decreasing() -> None:
    # one input slice, narrow tiles 200, 300, 200 wide: [300 + 200] and [200]
    alloc = allocate([200, 300, 200], [512] * 3, _target(), input_group=[7, 7, 7])
    assert alloc.arrays_used == 2
    assert alloc.slot[0] != alloc.slot[2]
    _check_cells(alloc, np.array([7, 7, 7]))
    with pytest.raises(ValueError, match="same in_features"):
        allocate([200, 300], [512, 500], _target(), input_group=[1, 1])


def test_spread_groups_keep_coactivated_experts_on_distinct_sites() -> None:
    # 4 sites x 4 tiers; 8 experts of one 512x512 tile each; experts 0, 4, 5, 7 often
    # routed together. Input order stacks 0 and 4 on one site; spreading must not.
    target = _target(arrays_per_chip=4, chips=1, tiers=4)
    out, inp = [512] * 8, [512] * 8
    plain = allocate(out, inp, target)
    assert plain.site[0] == plain.site[4]
    coactivation = np.zeros((8, 8))
    for a in (0, 4, 5, 7):
        for b in (0, 4, 5, 7):
            coactivation[a, b] = 10.0 if a != b else 0.0
    coactivation[1, 2] = coactivation[3, 6] = 1.0
    groups = coactivation_groups(coactivation, group_size=4)
    assert len({groups[e] for e in (0, 4, 5, 7)}) == 1
    spread = allocate(out, inp, target, spread_group=groups)
    hot = [spread.site[e] for e in (0, 4, 5, 7)]
    assert len(set(hot)) == 4
    assert sorted(spread.slot.tolist()) == list(range(8))


def test_coactivation_groups_partition() -> None:
    rng = np.random.default_rng(1)
    groups = coactivation_groups(rng.random((10, 10)), group_size=3)
    assert np.bincount(groups).tolist() == [3, 3, 3, 1]


@pytest.mark.timing
def test_deepseek_v3_scale_is_fast() -> None:
    # 58 MoE layers x 256 experts x (gate, up, down) of 56 tiles each: ~2.5M tiles.
    out = np.tile([2048, 2048, 7168], 58 * 256)
    inp = np.tile([7168, 7168, 2048], 58 * 256)
    start = time.perf_counter()
    alloc = allocate(out, inp, load_target("aimc-512"), chips="auto")
    assert alloc.tiles_used == 2_494_464 == alloc.arrays_used
    steps = allocate(out, inp, load_target("3d-aimc"), chips="auto").serial_steps()
    assert time.perf_counter() - start < 5.0
    assert alloc.chips == -(-2_494_464 // 256) and steps.max() == 1
