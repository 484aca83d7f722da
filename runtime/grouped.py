"""Grouped matrix products: rows sorted by matrix, one batched product for all matrices.

A stack of ``E`` matrices computes rows ``inputs [S, in]`` that are sorted by the matrix they
go to (:class:`RowGroups`). :func:`grouped_product` computes ``rows @ W[group].T`` in one call:
``torch.nn.functional.grouped_mm`` where the kernel takes the dtype, device and memory layout
(float32/bfloat16/float16 on CPU and CUDA sm80+, 16-byte aligned), otherwise a padded ``bmm``
over ``[E, max rows per matrix, in]``. No padding on the fast path: unbalanced routing costs
nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class RowGroups:
    """Rows sorted by matrix: ``row_matrix [S]`` (non-decreasing), ``counts [E]``, ``ends [E]``
    (cumulative row counts, int32, as ``grouped_mm``'s ``offs``)."""

    row_matrix: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor

    @classmethod
    def from_sorted(cls, row_matrix: torch.Tensor, num_matrices: int) -> RowGroups:
        counts = torch.bincount(row_matrix, minlength=num_matrices)
        return cls(row_matrix, counts, torch.cumsum(counts, 0).to(torch.int32))

    @classmethod
    def single(cls, rows: int, device: torch.device) -> RowGroups:
        """All rows go to the one matrix of a stack of one."""
        row_matrix = torch.zeros(rows, dtype=torch.long, device=device)
        counts = torch.full((1,), rows, dtype=torch.long, device=device)
        return cls(row_matrix, counts, counts.to(torch.int32))

    @property
    def num_matrices(self) -> int:
        return int(self.counts.shape[0])

    def subset(self, first: int, last: int) -> RowGroups:
        """The groups of matrices ``first .. last - 1`` (renumbered from 0) over their rows
        (the rows ``ends[first - 1] .. ends[last - 1]`` of this grouping)."""
        low = int(self.ends[first - 1]) if first else 0
        high = int(self.ends[last - 1]) if last else 0
        counts = self.counts[first:last]
        return RowGroups(self.row_matrix[low:high] - first, counts,
                         (self.ends[first:last] - low).to(torch.int32))

    def slots(self) -> torch.Tensor:
        """Position of every row within its matrix's rows."""
        starts = self.ends.to(torch.long) - self.counts
        return (
            torch.arange(self.row_matrix.numel(), device=self.row_matrix.device)
            - starts[self.row_matrix]
        )


def grouped_product(inputs: torch.Tensor, weight: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """``inputs [S, k]`` times ``weight [E, out, k]`` of each row's matrix -> ``[S, out]``."""
    if weight.shape[0] == 1:
        return inputs @ weight[0].transpose(0, 1)
    right = weight.transpose(1, 2)
    if _grouped_mm_supported(inputs, right):
        return F.grouped_mm(inputs, right, offs=groups.ends)
    slots = groups.slots()
    longest = int(groups.counts.max()) if inputs.shape[0] else 0
    padded = inputs.new_zeros(weight.shape[0], longest, inputs.shape[1])
    padded[groups.row_matrix, slots] = inputs
    return torch.bmm(padded, right)[groups.row_matrix, slots]


def _grouped_mm_supported(left: torch.Tensor, right: torch.Tensor) -> bool:
    if left.dtype not in _GROUPED_MM_DTYPES or right.dtype != left.dtype:
        return False
    if left.device.type == "cuda":
        if torch.cuda.get_device_capability(left.device) < (8, 0):
            return False
    elif left.device.type != "cpu":
        return False
    return _aligned(left) and _aligned(right)


def _aligned(matrix: torch.Tensor) -> bool:
    """16-byte aligned start and strides, unit stride in one of the last two dims."""
    size = matrix.element_size()
    rows_stride, cols_stride = matrix.stride()[-2:]
    if cols_stride == 1:
        leading = rows_stride
    elif rows_stride == 1:
        leading = cols_stride
    else:
        return False
    strides = [leading, *matrix.stride()[:-2]]
    return matrix.data_ptr() % 16 == 0 and all((stride * size) % 16 == 0 for stride in strides)
