"""Check an exported graph against PyTorch, and find top-k ties that make them disagree.

Rules:

1. :class:`PyTorchReference` keeps PyTorch's logits on the example input (computed once,
   before any module is swapped for export) and checks the written file against them with
   :func:`compare_with_onnxruntime`, which runs the written file with onnxruntime (CPU) on the
   example input and returns the largest absolute difference from PyTorch's logits; NaN where
   exactly one side is NaN counts as infinite. The export fails when it exceeds
   ``tolerance * max(1, max |PyTorch logits|)``: a one-line :class:`EmitError` naming the
   difference and the modules of rule 2, if any.
2. :class:`TopkTies` watches one PyTorch forward pass and records every module whose
   ``topk`` had a tie at the boundary (the k-th and (k+1)-th largest values equal and
   finite, not a masking value near the dtype's limit). ``torch.topk`` on CPU picks among tied
   values in an unspecified order (``std::nth_element``), ONNX ``TopK`` picks the lowest
   indices, so such ties can make onnxruntime and PyTorch choose different elements
   (DeepSeek-V3.2's sparse-attention indexer over ReLU scores has them). The export's
   error message names these modules as the likely cause of a difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hetmap.common.errors import EmitError

_TOPK = (torch.topk, torch.Tensor.topk)


class PyTorchReference:
    """Rule 1: PyTorch's logits on the example input and the check of a file against them."""

    def __init__(self, model: nn.Module, logits_module: nn.Module, input_ids: torch.Tensor,
                 tolerance: float) -> None:
        self.model, self.logits_module, self.input_ids = model, logits_module, input_ids
        self.tolerance = tolerance
        self.ties = TopkTies()
        self.logits: torch.Tensor | None = None
        self.max_difference: float | None = None

    def run(self) -> torch.Tensor:
        """One forward pass of ``logits_module`` on the example input, watching top-k ties."""
        with self.ties.watching(self.model):
            self.logits = self.logits_module(self.input_ids)
        return self.logits

    def verify(self, path: Path) -> None:
        """Raise EmitError unless onnxruntime on ``path`` reproduces :attr:`logits`."""
        if self.logits is None:
            raise RuntimeError("PyTorchReference.verify before run")
        self.max_difference = compare_with_onnxruntime(path, self.input_ids, self.logits)
        allowed = allowed_difference(self.logits, self.tolerance)
        if self.max_difference <= allowed:
            return
        cause = ""
        if self.ties.rows_by_module:
            modules = ", ".join(list(self.ties.rows_by_module)[:3])
            cause = (f"; likely cause: top-k ties in {modules} (torch.topk and ONNX TopK pick "
                     "different tied elements)")
        raise EmitError(
            f"onnxruntime's logits differ from PyTorch's by {self.max_difference:.3g} (allowed "
            f"{allowed:.3g}) on the example input {list(self.input_ids.shape)}{cause}"
        )


def compare_with_onnxruntime(path: Path, input_ids: torch.Tensor, expected: torch.Tensor) -> float:
    """Rule 1: max |onnxruntime - PyTorch| over the logits of ``input_ids``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"input_ids": input_ids.cpu().numpy()})
    reference = expected.detach().float().cpu().numpy()
    if actual.shape != reference.shape:
        return float("inf")
    actual = actual.astype(np.float32)
    both_nan = np.isnan(actual) & np.isnan(reference)
    difference = np.abs(actual - reference)
    difference = np.where(both_nan, 0.0, np.where(np.isnan(difference), np.inf, difference))
    return float(difference.max()) if difference.size else 0.0


def allowed_difference(expected: torch.Tensor, tolerance: float) -> float:
    """Rule 1's bound for ``expected`` logits."""
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    return tolerance * max(1.0, scale)


class TopkTies:
    """Rule 2: module path -> number of top-k rows with a boundary tie, for one forward pass."""

    def __init__(self) -> None:
        self.rows_by_module: dict[str, int] = {}

    @contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        stack: list[str] = []
        handles = []
        for path, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(_push(stack, path or "<model>")))
            handles.append(module.register_forward_hook(_pop(stack), always_call=True))
        try:
            with _TopkMode(self._record, stack):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _record(self, path: str, rows: int) -> None:
        self.rows_by_module[path] = self.rows_by_module.get(path, 0) + rows


def _push(stack: list[str], path: str) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        stack.append(path)

    return hook


def _pop(stack: list[str]) -> Callable:
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if stack:
            stack.pop()

    return hook


class _TopkMode(TorchFunctionMode):
    def __init__(self, record: Callable[[str, int], None], stack: list[str]) -> None:
        super().__init__()
        self.record = record
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _TOPK:
            rows = _boundary_ties(*args, **kwargs)
            if rows:
                self.record(self.stack[-1] if self.stack else "<model>", rows)
        return func(*args, **kwargs)


def _boundary_ties(values: torch.Tensor, k: int, dim: int = -1, largest: bool = True,
                   sorted: bool = True, **_: object) -> int:  # noqa: A002 - torch's name
    """Rows of ``values.topk(k, dim)`` whose k-th and (k+1)-th values are equal (rule 2)."""
    if not isinstance(values, torch.Tensor) or values.dim() == 0:
        return 0
    size = values.shape[dim]
    k = int(k)
    if k <= 0 or k >= size:
        return 0
    ordered = torch.sort(values.detach(), dim=dim, descending=largest).values
    kth, following = ordered.narrow(dim, k - 1, 1), ordered.narrow(dim, k, 1)
    tied = kth == following
    if kth.is_floating_point():
        tied &= kth.abs() < torch.finfo(kth.dtype).max / 2
    return int(tied.sum())
