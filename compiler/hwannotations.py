"""Annotations written by the hardware passes (tile, allocate, cost)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hetmap.compiler.errors import VerificationError
from hetmap.compiler.ir import Node
from hetmap.compiler.tiling import TileGrid


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
        for grid, matrix in zip(self.grids, node.matrices, strict=True):
            if (grid.out_features, grid.in_features) != matrix.shape:
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
    ``[first_slot, n_tiles]`` and in-array offsets of packed tiles ``[tile, row, col]``."""

    slot_runs: tuple[tuple[tuple[int, int], ...], ...]
    offsets: tuple[tuple[tuple[int, int, int], ...], ...]

    def matrix_json(self, index: int) -> dict[str, Any]:
        """``slots``: runs ``[first array slot, tiles]`` in tile order; ``offsets``:
        ``[tile, row, col]`` of packed tiles not at their array's corner."""
        entry: dict[str, Any] = {"slots": [list(r) for r in self.slot_runs[index]]}
        if self.offsets[index]:
            entry["offsets"] = [list(o) for o in self.offsets[index]]
        return entry

    def slots(self, matrix_index: int) -> list[int]:
        """Array slot of every tile of one matrix, in tile order."""
        return [s for first, n in self.slot_runs[matrix_index] for s in range(first, first + n)]


@dataclass(frozen=True)
class AllocationSummary:
    summary: dict[str, Any]
    layout: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {**{k: self.summary[k] for k in ("tiles_used", "arrays_used", "tile_utilization")},
                "allocation": {**self.summary, "layout": self.layout}}


@dataclass(frozen=True)
class CostSummary:
    estimate: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        mapped, digital = self.estimate["mapped"], self.estimate["all_digital"]
        by_kind = {k: {"energy_j": v, "latency_s": mapped["latency_by_kind"].get(k, 0.0),
                       "all_digital_energy_j": digital["energy_by_kind"].get(k, 0.0)}
                   for k, v in mapped["energy_by_kind"].items()}
        return {"energy_per_token_j": mapped["energy_j"], "latency_per_token_s": mapped["latency_s"],
                "digital_energy_per_token_j": digital["energy_j"],
                "digital_latency_per_token_s": digital["latency_s"],
                "cost_by_kind": by_kind, "cost": self.estimate}
