"""Assign the tiles of analog matrices to physical crossbar arrays (chip, array, tier).

Reads: the shapes of the analog matrices (``[out, in]``), the target, a chip count or
``"auto"``; optionally which matrices read the same input vector (``input_group``) and which
should run side by side (``spread_group``). Writes: an :class:`Allocation`.

Rules:

1. A full tile (``rows x cols`` weights) takes an array of its own.
2. With packing (the target's ``packing`` unless overridden), partial tiles share arrays as
   disjoint rectangles, never two weights in one cell:
   a. tiles reading the same input slice (same ``input_group``, same row tile) sit side by side
      on the same rows (a *shelf*, first-fit decreasing by width): one MVM computes all;
   b. shelves and lone partial tiles are then stacked diagonally: blocks in one array use
      disjoint rows *and* disjoint columns, so each block still runs with its own input in the
      same MVM. Identical block shapes are packed ``min(rows // h, cols // w)`` to an array,
      the leftovers first-fit decreasing. Vertical stacking (shared columns) is not used: it
      would force the blocks to run one after another.
3. Arrays are numbered by *slot* in matrix order (a packed array goes with its first matrix);
   slots are laid out tier-major: ``site = slot % n_sites``, ``tier = slot // n_sites``,
   ``chip = site // arrays_per_chip``, ``array = site % arrays_per_chip``, where
   ``n_sites = chips * arrays_per_chip``. So any run of at most ``n_sites`` consecutive slots
   lies on distinct sites and never serializes on tiers.
4. With ``spread_group``, matrices of one group (experts often routed together, see
   :func:`coactivation_groups`) are moved next to the group's first matrix, so a group of at
   most ``n_sites`` arrays lands on distinct sites and its members run in parallel.
5. If the arrays needed exceed ``chips * arrays_per_chip * tiers``, :class:`CapacityError`;
   ``chips="auto"`` takes the smallest chip count that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hetmap.common.errors import CapacityError
from hetmap.common.grid import TileTable, edge_tiles, tile_table, tiles_per_matrix
from hetmap.targets.model import Target

Chips = int | Literal["auto"]
_FFD_WINDOW = 32  # open bins searched by first-fit (bounds the cost on pathological inputs)


@dataclass(frozen=True, eq=False)
class Allocation:
    """Where every tile lives. Tile ``t`` of matrix ``m`` is ``tile_start[m] + t`` (row-tile
    major, as :class:`~hetmap.common.grid.TileGrid` numbers them)."""

    out_features: NDArray[np.int64]
    in_features: NDArray[np.int64]
    tile_start: NDArray[np.int64]
    slot: NDArray[np.int32]
    row_offset: NDArray[np.int32]
    col_offset: NDArray[np.int32]
    arrays_used: int
    chips: int
    rows: int
    cols: int
    arrays_per_chip: int
    tiers: int
    packing: bool

    @property
    def n_sites(self) -> int:
        return self.chips * self.arrays_per_chip

    @property
    def arrays_available(self) -> int:
        return self.n_sites * self.tiers

    @property
    def tiles_used(self) -> int:
        return int(self.slot.size)

    @property
    def site(self) -> NDArray[np.int32]:
        return self.slot % max(self.n_sites, 1)

    @property
    def chip(self) -> NDArray[np.int32]:
        return self.site // self.arrays_per_chip

    @property
    def array(self) -> NDArray[np.int32]:
        """Index of the tile's array (crossbar site) within its chip."""
        return self.site % self.arrays_per_chip

    @property
    def tier(self) -> NDArray[np.int32]:
        return self.slot // max(self.n_sites, 1)

    @property
    def matrix_of_tile(self) -> NDArray[np.int32]:
        counts = np.diff(self.tile_start)
        return np.repeat(np.arange(counts.size, dtype=np.int32), counts)

    @property
    def stored_weights(self) -> int:
        return int(np.dot(self.out_features, self.in_features))

    @property
    def tile_utilization(self) -> float:
        """Stored weights / cells of the arrays used."""
        cells = self.arrays_used * self.rows * self.cols
        return self.stored_weights / cells if cells else 0.0

    @property
    def unpacked_utilization(self) -> float:
        """The same with one array per tile (no packing)."""
        cells = self.tiles_used * self.rows * self.cols
        return self.stored_weights / cells if cells else 0.0

    def tiles(self) -> TileTable:
        """Tile coordinates and shapes (recomputed from the matrix shapes)."""
        return tile_table(self.out_features, self.in_features, self.rows, self.cols)

    def serial_steps(self) -> NDArray[np.int64]:
        """Per matrix: MVM steps its tiles need, the most of its tiles on any one site (tiers
        of a site are active one at a time, sites run in parallel). A matrix never has two
        tiles in one array, so its tiles on one site are on distinct tiers."""
        counts = np.diff(self.tile_start)
        if self.tiers == 1 or self.tiles_used == 0:
            return np.minimum(counts, 1)
        # A run of n consecutive slots visits the sites cyclically: ceil(n / n_sites) steps.
        steps = -(-counts // self.n_sites)
        breaks = np.concatenate([[0], np.cumsum(np.diff(self.slot.astype(np.int64)) != 1)])
        last = np.maximum(self.tile_start[1:] - 1, self.tile_start[:-1])
        scattered = np.flatnonzero(breaks[np.minimum(last, breaks.size - 1)]
                                   - breaks[np.minimum(self.tile_start[:-1], breaks.size - 1)])
        if scattered.size:  # count tiles per (matrix, site) for the others
            owner = np.repeat(np.arange(scattered.size), counts[scattered])
            tiles = np.arange(owner.size) - np.repeat(np.cumsum(counts[scattered])
                                                      - counts[scattered], counts[scattered])
            tiles += self.tile_start[scattered][owner]
            keys, per_site = np.unique(owner * self.n_sites + self.site[tiles].astype(np.int64),
                                       return_counts=True)
            most = np.zeros(scattered.size, dtype=np.int64)
            np.maximum.at(most, keys // self.n_sites, per_site)
            steps[scattered] = most
        return steps

    def summary(self) -> dict[str, Any]:
        return {
            "chips": self.chips,
            "arrays_available": self.arrays_available,
            "arrays_used": self.arrays_used,
            "tiles_used": self.tiles_used,
            "stored_weights": self.stored_weights,
            "tile_utilization": self.tile_utilization,
            "unpacked_arrays": self.tiles_used,
            "unpacked_utilization": self.unpacked_utilization,
            "packing": self.packing,
        }

    def compact(self, ids: list[str] | None = None) -> dict[str, Any]:
        """JSON-ready per-matrix view: consecutive-slot runs of tiles, not one entry per tile.

        Matrix entry: ``slot_runs`` = ``[[first_slot, n_tiles], ...]`` covering its tiles in
        order, and ``offsets`` = ``[[tile, row_offset, col_offset], ...]`` for packed tiles
        not at the array's corner. Decode slots with the ``layout`` rule (module rule 3).
        """
        n_matrices = self.out_features.size
        names = ids if ids is not None else [str(m) for m in range(n_matrices)]
        if len(names) != n_matrices:
            raise ValueError(f"{len(names)} ids for {n_matrices} matrices")
        slot = self.slot.astype(np.int64)
        breaks = np.ones(slot.size, dtype=bool)
        breaks[1:] = slot[1:] != slot[:-1] + 1
        breaks[self.tile_start[:-1][np.diff(self.tile_start) > 0]] = True
        run_start = np.flatnonzero(breaks)
        runs = np.stack([slot[run_start], np.diff(np.append(run_start, slot.size))], 1).tolist()
        runs_from = np.searchsorted(run_start, self.tile_start).tolist()
        shifted = np.flatnonzero((self.row_offset != 0) | (self.col_offset != 0))
        shifted_matrix = np.searchsorted(self.tile_start, shifted, "right") - 1
        offsets = np.stack([shifted - self.tile_start[shifted_matrix], self.row_offset[shifted],
                            self.col_offset[shifted]], 1).tolist()
        offsets_from = np.searchsorted(shifted, self.tile_start).tolist()
        shapes = np.stack([self.out_features, self.in_features], 1).tolist()
        matrices = [
            {"id": names[m], "shape": shapes[m], "slot_runs": runs[runs_from[m]:runs_from[m + 1]],
             "offsets": offsets[offsets_from[m]:offsets_from[m + 1]]}
            for m in range(n_matrices)
        ]
        layout = {
            "rows": self.rows, "cols": self.cols, "chips": self.chips,
            "arrays_per_chip": self.arrays_per_chip, "tiers": self.tiers,
            "slot_order": "tier-major: site = slot % (chips*arrays_per_chip), "
                          "tier = slot // (chips*arrays_per_chip)",
        }
        return {"layout": layout, "summary": self.summary(), "matrices": matrices}


def allocate(
    out_features: ArrayLike,
    in_features: ArrayLike,
    target: Target,
    *,
    chips: Chips | None = None,
    packing: bool | None = None,
    input_group: ArrayLike | None = None,
    spread_group: ArrayLike | None = None,
) -> Allocation:
    """Place the tiles of the analog matrices ``[out_features[m], in_features[m]]``.

    ``chips``: a count, ``"auto"`` (fewest that fit) or None (the target's). ``input_group``:
    per matrix, matrices with the same id read the same input (e.g. an expert's gate and up);
    ``spread_group``: per matrix, -1 or a group id (module rule 4).
    """
    aimc = target.aimc
    out_arr = np.asarray(out_features, dtype=np.int64).reshape(-1)
    in_arr = np.asarray(in_features, dtype=np.int64).reshape(-1)
    tile_start = np.concatenate([[0], np.cumsum(tiles_per_matrix(out_arr, in_arr, aimc.rows,
                                                                 aimc.cols))])
    n_tiles = int(tile_start[-1])
    use_packing = aimc.packing if packing is None else packing
    row_offset = np.zeros(n_tiles, dtype=np.int32)
    col_offset = np.zeros(n_tiles, dtype=np.int32)
    if use_packing:
        groups = _per_matrix("input_group", input_group, out_arr.size)
        if groups is not None:
            _, first, groups = np.unique(groups, return_index=True, return_inverse=True)
            if np.any(in_arr != in_arr[first][groups]):
                raise ValueError("matrices of one input_group must have the same in_features")
        unit, n_units = _pack(edge_tiles(out_arr, in_arr, aimc.rows, aimc.cols), groups,
                              n_tiles, aimc.rows, aimc.cols, row_offset, col_offset)
    else:
        unit, n_units = np.arange(n_tiles, dtype=np.int32), n_tiles
    n_chips = _chip_count(chips, n_units, target)
    spread = _per_matrix("spread_group", spread_group, out_arr.size)
    return Allocation(
        out_features=out_arr,
        in_features=in_arr,
        tile_start=tile_start,
        slot=unit if spread is None else _spread_slots(unit, n_units, spread, tile_start),
        row_offset=row_offset,
        col_offset=col_offset,
        arrays_used=n_units,
        chips=n_chips,
        rows=aimc.rows,
        cols=aimc.cols,
        arrays_per_chip=aimc.arrays_per_chip,
        tiers=aimc.tiers,
        packing=use_packing,
    )


def _per_matrix(name: str, values: ArrayLike | None, n_matrices: int) -> NDArray[np.int64] | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.int64)
    if array.shape != (n_matrices,):
        raise ValueError(f"{name} has shape {array.shape}, expected ({n_matrices},)")
    return array


def _chip_count(chips: Chips | None, arrays_needed: int, target: Target) -> int:
    per_chip = target.aimc.arrays_per_chip_total
    if chips == "auto":
        return int(-(-arrays_needed // per_chip))
    n_chips = target.aimc.chips if chips is None else chips
    if isinstance(n_chips, bool) or not isinstance(n_chips, int) or n_chips <= 0:
        raise CapacityError(f"chips must be a positive integer or 'auto', got {chips!r}")
    if arrays_needed > n_chips * per_chip:
        raise CapacityError(
            f"target {target.name}: the analog matrices need {arrays_needed} crossbar arrays but "
            f"{n_chips} chips hold {n_chips * per_chip} ({n_chips} x {target.aimc.arrays_per_chip}"
            f" arrays x {target.aimc.tiers} tiers); use --chips auto to size the chip count"
        )
    return n_chips


def _spread_slots(unit: NDArray[np.int32], n_units: int, group: NDArray[np.int64],
                  tile_start: NDArray[np.int64]) -> NDArray[np.int32]:
    """Per tile, its slot when each spread group is gathered at its first matrix (rule 4)."""
    n_matrices = group.size
    key = np.arange(n_matrices, dtype=np.int64)
    grouped = np.flatnonzero(group >= 0)
    names, first = np.unique(group[grouped], return_index=True)
    key[grouped] = grouped[first][np.searchsorted(names, group[grouped])]
    position = np.empty(n_matrices, dtype=np.int32)
    position[np.argsort(key, kind="stable")] = np.arange(n_matrices, dtype=np.int32)
    unit_key = np.full(n_units, np.iinfo(np.int32).max, dtype=np.int32)
    np.minimum.at(unit_key, unit, np.repeat(position, np.diff(tile_start)))
    slot_of_unit = np.empty(n_units, dtype=np.int32)
    slot_of_unit[np.argsort(unit_key, kind="stable")] = np.arange(n_units, dtype=np.int32)
    return slot_of_unit[unit]


def _pack(edges: TileTable, groups: NDArray[np.int64] | None, n_tiles: int, rows: int,
          cols: int, row_offset: NDArray[np.int32], col_offset: NDArray[np.int32]
          ) -> tuple[NDArray[np.int32], int]:
    """Per tile, its array unit; fills the offsets of the packed (edge) tiles.

    Full tiles are units of their own; units are numbered by their first tile, so they follow
    matrix order. Only the edge tiles (``edges.index``) go through the packing.
    """
    index = edges.index
    assert index is not None
    block, x_in_block, height, width = _shelves(edges, groups, cols)
    del edges
    unit_of_block, block_row, block_col, n_edge_units = _place_blocks(height, width, rows, cols)
    del height, width
    edge_unit = unit_of_block[block]
    row_offset[index] = block_row[block]
    col_offset[index] = block_col[block] + x_in_block
    del block, x_in_block, unit_of_block, block_row, block_col
    first_tile = np.full(n_edge_units, n_tiles, dtype=np.int64)
    np.minimum.at(first_tile, edge_unit, index)
    unit_firsts = np.sort(first_tile)
    # Unit number = its first tile's index - edge tiles before it + edge units before it.
    edge_unit_number = (first_tile - np.searchsorted(index, first_tile)
                        + np.searchsorted(unit_firsts, first_tile)).astype(np.int32)[edge_unit]
    del first_tile, edge_unit
    shift = np.arange(index.size + 1, dtype=np.int32)
    shift -= np.searchsorted(unit_firsts, np.append(index, n_tiles)).astype(np.int32)
    unit = np.arange(n_tiles, dtype=np.int32)
    unit -= np.repeat(shift, np.diff(index, prepend=-1, append=n_tiles - 1))
    unit[index] = edge_unit_number
    return unit, n_tiles - index.size + n_edge_units


def _shelves(table: TileTable, groups: NDArray[np.int64] | None, cols: int
             ) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.int32], NDArray[np.int32]]:
    """Blocks of tiles: one per tile, except that narrow tiles reading the same input slice
    share a shelf (first-fit decreasing by width). Returns per tile (block, x offset in
    block), and per block (height, width); blocks emptied by merging have width 0."""
    block = np.arange(table.count, dtype=np.int64)
    x_in_block = np.zeros(table.count, dtype=np.int32)
    height, width = table.n_rows.copy(), table.n_cols.copy()
    if groups is None:
        return block, x_in_block, height, width
    narrow = np.flatnonzero(table.n_cols < cols)
    slice_key = groups[table.matrix[narrow]] * (int(table.row_tile.max(initial=0)) + 1)
    slice_key += table.row_tile[narrow]
    order = np.argsort(slice_key, kind="stable")
    narrow, slice_key = narrow[order], slice_key[order]
    starts = np.flatnonzero(np.diff(slice_key, prepend=-1) != 0)
    sizes = np.diff(np.append(starts, narrow.size))
    first = np.repeat(narrow[starts], sizes)
    # A slice whose tiles fit side by side in one array is one shelf, in input order.
    widths = table.n_cols[narrow].astype(np.int64)
    slice_width = np.add.reduceat(widths, starts) if narrow.size else widths
    fits = np.repeat(slice_width <= cols, sizes)
    before = np.cumsum(widths) - widths  # width of the slice's earlier tiles, plus earlier slices
    x_in_block[narrow[fits]] = (before - np.repeat(before[starts], sizes))[fits]
    block[narrow[fits]] = first[fits]
    width[narrow[fits]] = 0
    width[narrow[starts][slice_width <= cols]] = slice_width[slice_width <= cols]
    for start, size in zip(starts[slice_width > cols], sizes[slice_width > cols], strict=True):
        members = narrow[start:start + size]
        for shelf in _first_fit_1d(table.n_cols[members], cols):
            tiles = members[shelf]
            offsets = np.cumsum(table.n_cols[tiles]) - table.n_cols[tiles]
            block[tiles] = tiles[0]
            x_in_block[tiles] = offsets
            width[tiles] = 0
            width[tiles[0]] = offsets[-1] + table.n_cols[tiles[-1]]
    return block, x_in_block, height, width


def _first_fit_1d(widths: NDArray[np.int32], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) by first-fit decreasing."""
    bins: list[list[int]] = []
    room: list[int] = []
    for item in np.argsort(-widths, kind="stable").tolist():
        w = int(widths[item])
        for b, left in enumerate(room):
            if w <= left:
                bins[b].append(item)
                room[b] -= w
                break
        else:
            bins.append([item])
            room.append(capacity - w)
    return bins


def _place_blocks(height: NDArray[np.int32], width: NDArray[np.int32], rows: int, cols: int
                  ) -> tuple[NDArray[np.int32], NDArray[np.int32], NDArray[np.int32], int]:
    """Units and (row, col) offsets for blocks, packed diagonally (module rule 2b)."""
    n_blocks = height.size
    unit = np.full(n_blocks, -1, dtype=np.int32)
    row_offset = np.zeros(n_blocks, dtype=np.int32)
    col_offset = np.zeros(n_blocks, dtype=np.int32)
    used = width > 0
    alone = np.flatnonzero(used & ((height == rows) | (width == cols)))
    unit[alone] = np.arange(alone.size, dtype=np.int32)
    n_units = alone.size
    # The rest: blocks of one shape fit k = min(rows // h, cols // w) to an array along the
    # diagonal; whole groups of k fill arrays, the remainders go to first-fit.
    small = np.flatnonzero(used & (height < rows) & (width < cols))
    small = small[np.argsort(height[small].astype(np.int64) * (cols + 1) + width[small],
                             kind="stable")]
    _, first, counts = np.unique(np.stack([height[small], width[small]], 1), axis=0,
                                 return_index=True, return_counts=True)
    per_array = np.minimum(rows // height[small[first]], cols // width[small[first]])
    full_arrays = counts // per_array
    rank = np.arange(small.size) - np.repeat(first, counts)  # rank within its shape
    k = np.repeat(per_array, counts)
    in_full = rank < np.repeat(full_arrays * per_array, counts)
    chosen, rank, k = small[in_full], rank[in_full], k[in_full]
    arrays_before = np.repeat(np.cumsum(full_arrays) - full_arrays, counts)[in_full]
    unit[chosen] = n_units + arrays_before + rank // k
    row_offset[chosen] = rank % k * height[chosen]
    col_offset[chosen] = rank % k * width[chosen]
    n_units += int(full_arrays.sum())
    n_units = _first_fit_2d(small[~in_full], height, width, rows, cols, unit, row_offset,
                            col_offset, n_units)
    return unit, row_offset, col_offset, n_units


def _first_fit_2d(blocks: NDArray[np.int64], height: NDArray[np.int32],
                  width: NDArray[np.int32], rows: int, cols: int, unit: NDArray[np.int32],
                  row_offset: NDArray[np.int32], col_offset: NDArray[np.int32],
                  n_units: int) -> int:
    """Diagonal first-fit decreasing over the last few open units; fills the outputs."""
    fill = np.maximum(height[blocks] / rows, width[blocks] / cols)
    next_row: list[int] = []
    next_col: list[int] = []
    for b in blocks[np.argsort(-fill, kind="stable")].tolist():
        h, w = int(height[b]), int(width[b])
        window = range(max(0, len(next_row) - _FFD_WINDOW), len(next_row))
        target = next((i for i in window if next_row[i] + h <= rows and next_col[i] + w <= cols),
                      None)
        if target is None:
            target = len(next_row)
            next_row.append(0)
            next_col.append(0)
        unit[b] = n_units + target
        row_offset[b], col_offset[b] = next_row[target], next_col[target]
        next_row[target] += h
        next_col[target] += w
    return n_units + len(next_row)


def coactivation_groups(coactivation: ArrayLike, group_size: int) -> NDArray[np.int64]:
    """Partition a layer's experts into groups of at most ``group_size`` so that experts often
    routed together share a group (greedy: seed with the most co-activated expert left, add
    the one most co-activated with the group so far). Pass the result, made unique across
    layers, as ``spread_group``; pick ``group_size`` = sites / arrays per expert."""
    counts = np.asarray(coactivation, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or group_size < 1:
        raise ValueError("coactivation must be a square [E, E] matrix and group_size >= 1")
    affinity = counts + counts.T
    np.fill_diagonal(affinity, 0.0)
    free = np.ones(counts.shape[0], dtype=bool)
    group = np.full(counts.shape[0], -1, dtype=np.int64)
    next_group = 0
    while free.any():
        seed = int(np.argmax(np.where(free, affinity.sum(axis=1), -np.inf)))
        pull = affinity[seed].copy()
        group[seed], free[seed] = next_group, False
        for _ in range(group_size - 1):
            if not free.any():
                break
            member = int(np.argmax(np.where(free, pull, -np.inf)))
            group[member], free[member] = next_group, False
            pull += affinity[member]
        next_group += 1
    return group
