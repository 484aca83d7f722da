"""Annotations written by the hardware passes (tile, allocate, cost)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from hetmap.common.errors import VerificationError
from hetmap.common.grid import TileGrid
from hetmap.compiler.algorithms.cost import CostEstimate
from hetmap.compiler.ir.annotations import Placement, analog_shape
from hetmap.compiler.ir.graph import Node


@dataclass(frozen=True)
class Tiling:
    """Fixed-size crossbar tiles of each of a node's analog matrices (same order as matrices)."""

    grids: tuple[TileGrid, ...]

    @property
    def count(self) -> int:
        return sum(g.count for g in self.grids)

    def check(self, node: Node) -> None:
        if len(self.grids) != len(node.matrices):
            raise VerificationError(f"{node.name}: {len(self.grids)} tile grids for "
                                    f"{len(node.matrices)} matrices")
        placement = node.get(Placement)
        digital = len(placement.digital_neurons) if placement is not None else 0
        for grid, matrix in zip(self.grids, node.matrices, strict=True):
            if (grid.out_features, grid.in_features) != analog_shape(matrix.role, matrix.shape,
                                                                     digital):
                raise VerificationError(f"{node.name}: tile grid {grid.out_features}x"
                                        f"{grid.in_features} does not cover {matrix.role} {matrix.shape}")

    def to_json(self) -> dict[str, Any]:
        return {"tiles": self.count}

    def matrix_json(self, index: int) -> dict[str, Any]:
        """``tile_grid`` = [row tiles, column tiles]: tile (i, j) holds inputs
        ``[i*rows, min((i+1)*rows, in))`` and outputs ``[j*cols, min((j+1)*cols, out))``."""
        grid = self.grids[index]
        return {"tile_grid": [grid.n_row_tiles, grid.n_col_tiles]}

    def brief(self) -> str:
        return f"tiles={self.count}"


@dataclass(frozen=True)
class ArrayAssignment:
    """Physical arrays of a node's tiles: per matrix, runs of consecutive array slots
    ``[first_slot, n_tiles]``, in-array offsets of packed tiles ``[tile, row, col]`` and the
    serial MVM steps its tiles take (more than 1 only when tiers share a site)."""

    slot_runs: tuple[tuple[tuple[int, int], ...], ...]
    offsets: tuple[tuple[tuple[int, int, int], ...], ...]
    serial_steps: tuple[int, ...] = ()

    def check(self, node: Node) -> None:
        tiling = node.get(Tiling)
        if tiling is None:
            raise VerificationError(f"{node.name}: arrays assigned but no tiling")
        if len(self.slot_runs) != len(tiling.grids):
            raise VerificationError(f"{node.name}: array runs for {len(self.slot_runs)} "
                                    f"matrices, tiling of {len(tiling.grids)}")
        for grid, runs in zip(tiling.grids, self.slot_runs, strict=True):
            if sum(n for _first, n in runs) != grid.count:
                raise VerificationError(f"{node.name}: {sum(n for _f, n in runs)} tiles on "
                                        f"arrays for a grid of {grid.count}")

    def matrix_json(self, index: int) -> dict[str, Any]:
        """``slots``: runs ``[first array slot, tiles]`` in tile order; ``offsets``:
        ``[tile, row, col]`` of packed tiles not at their array's corner."""
        entry: dict[str, Any] = {"slots": [list(r) for r in self.slot_runs[index]]}
        if self.offsets[index]:
            entry["offsets"] = [list(o) for o in self.offsets[index]]
        if self.serial_steps and self.serial_steps[index] != 1:
            entry["serial_steps"] = self.serial_steps[index]
        return entry

    def slots(self, matrix_index: int) -> list[int]:
        """Array slot of every tile of one matrix, in tile order."""
        return [s for first, n in self.slot_runs[matrix_index] for s in range(first, first + n)]

    def steps(self, matrix_index: int) -> int:
        return self.serial_steps[matrix_index] if self.serial_steps else 1


@dataclass(frozen=True)
class ArrayLayout:
    """How array slots map to chips, sites and tiers (``slot_order``)."""

    rows: int
    cols: int
    chips: int
    arrays_per_chip: int
    tiers: int
    slot_order: str = ("tier-major: site = slot % (chips*arrays_per_chip), "
                       "tier = slot // (chips*arrays_per_chip)")


@dataclass(frozen=True)
class AllocationSummary:
    """Graph-level result of ``allocate``."""

    scope: ClassVar[str] = "graph"
    chips: int
    arrays_available: int
    arrays_used: int
    tiles_used: int
    stored_weights: int
    tile_utilization: float
    unpacked_arrays: int
    unpacked_utilization: float
    packing: bool
    layout: ArrayLayout

    def to_json(self) -> dict[str, Any]:
        fields = {k: getattr(self, k) for k in (
            "chips", "arrays_available", "arrays_used", "tiles_used", "stored_weights",
            "tile_utilization", "unpacked_arrays", "unpacked_utilization", "packing")}
        layout = {k: getattr(self.layout, k) for k in (
            "rows", "cols", "chips", "arrays_per_chip", "tiers", "slot_order")}
        return {"tiles_used": self.tiles_used, "arrays_used": self.arrays_used,
                "tile_utilization": self.tile_utilization,
                "allocation": {**fields, "layout": layout}}


@dataclass(frozen=True)
class CostSummary:
    """Graph-level result of ``cost``: the mapping's cost beside all-digital execution."""

    scope: ClassVar[str] = "graph"
    estimate: CostEstimate

    def to_json(self) -> dict[str, Any]:
        mapped, digital = self.estimate.mapped, self.estimate.all_digital
        by_kind = {k: {"energy_j": v, "latency_s": mapped.latency_by_kind.get(k, 0.0),
                       "all_digital_energy_j": digital.energy_by_kind.get(k, 0.0)}
                   for k, v in mapped.energy_by_kind.items()}
        return {"energy_per_token_j": mapped.energy_j, "latency_per_token_s": mapped.latency_s,
                "digital_energy_per_token_j": digital.energy_j,
                "digital_latency_per_token_s": digital.latency_s,
                "cost_by_kind": by_kind, "cost": self.estimate.to_json()}
