"""Fixed-size crossbar tiling of a weight matrix.

A matrix ``W [out, in]`` (``nn.Linear`` convention) is cut into ``ceil(in / rows)`` tiles along the
input dimension times ``ceil(out / cols)`` tiles along the output dimension; the last tile of
each dimension may be partial. Each tile has its own DAC/ADC periphery; the partial sums of the
input-dimension tiles are added digitally.

A stack may hold several logical matrices side by side along the output dimension (e.g. an
expert's gate and up projections, which read the same input); ``out_splits`` gives their output
sizes and every matrix starts on a fresh column tile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def tiles_per_matrix(out_features: int, in_features: int, rows: int, cols: int) -> int:
    """Number of ``rows x cols`` crossbar tiles a ``[out, in]`` matrix occupies."""
    return math.ceil(in_features / rows) * math.ceil(out_features / cols)


@dataclass(frozen=True)
class TileGrid:
    """How the matrices of one stack (all the same shape per expert) map onto tiles."""

    out_splits: tuple[int, ...]
    in_features: int
    rows: int
    cols: int

    @classmethod
    def build(cls, in_features: int, out_splits: Sequence[int], rows: int, cols: int) -> TileGrid:
        return cls(tuple(int(size) for size in out_splits), int(in_features), rows, cols)

    @property
    def out_features(self) -> int:
        return sum(self.out_splits)

    @property
    def in_tiles(self) -> int:
        """Tiles along the input dimension (partial sums added digitally)."""
        return math.ceil(self.in_features / self.rows)

    @property
    def column_tiles(self) -> int:
        """Tiles along the output dimension, over all matrices of the stack."""
        return sum(math.ceil(size / self.cols) for size in self.out_splits)

    @property
    def tiles(self) -> int:
        """Crossbar tiles of one expert's matrices."""
        return self.in_tiles * self.column_tiles

    def in_slices(self) -> list[slice]:
        """Input-dimension slice of each input tile."""
        return [
            slice(start, min(start + self.rows, self.in_features))
            for start in range(0, self.in_features, self.rows)
        ]

    def out_offsets(self) -> list[tuple[int, int]]:
        """``(start, size)`` of each logical matrix along the output dimension."""
        offsets, start = [], 0
        for size in self.out_splits:
            offsets.append((start, size))
            start += size
        return offsets

    def column_tile_index(self, device: torch.device | None = None) -> torch.Tensor:
        """For every output column, the index of the column tile that computes it."""
        parts, first = [], 0
        for size in self.out_splits:
            parts.append(first + torch.arange(size, device=device) // self.cols)
            first += math.ceil(size / self.cols)
        return torch.cat(parts)
