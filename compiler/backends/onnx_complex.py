"""Rewrite the few complex-valued ATen ops the ONNX translator has no complex form for.

The ONNX translator (onnxscript's torchlib) carries a complex tensor as a real tensor with a
trailing dimension of 2 and implements most complex ops (``view_as_complex``, complex
``mul``, ``polar``...), but not ``unsqueeze`` nor ``mul`` by a real scalar. DeepSeek-V2's
rotary embedding (``torch.polar`` frequencies, ``freqs_cis.unsqueeze(1)``) needs both.

Rules (applied as decompositions to a ``torch.export.ExportedProgram``, real ops untouched):

1. ``unsqueeze(z, d)`` on a complex ``z`` becomes
   ``view_as_complex(unsqueeze(view_as_real(z), d'))``, with ``d' = d - 1`` for negative ``d``.
2. ``mul(z, r)`` with complex ``z`` and a real scalar or real tensor ``r`` becomes
   ``view_as_complex(view_as_real(z) * r[..., None])``.
3. Programs without complex values are returned unchanged (no extra decomposition pass).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _complex_unsqueeze(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    if not tensor.is_complex():
        return NotImplemented
    real_dim = dim if dim >= 0 else dim - 1
    return torch.view_as_complex(torch.view_as_real(tensor).unsqueeze(real_dim))


def _complex_times_real(tensor: object, other: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_complex():
        return NotImplemented
    if isinstance(other, torch.Tensor):
        if other.is_complex():
            return NotImplemented
        other = other.unsqueeze(-1)
    elif isinstance(other, complex):
        return NotImplemented
    return torch.view_as_complex(torch.view_as_real(tensor) * other)  # type: ignore[operator]


COMPLEX_DECOMPOSITIONS = {
    aten.unsqueeze.default: _complex_unsqueeze,
    aten.mul.Tensor: _complex_times_real,
}


def with_real_complex_ops(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Rules 1-3."""
    if not any(_is_complex(node.meta.get("val")) for node in program.graph.nodes):
        return program
    return program.run_decompositions(COMPLEX_DECOMPOSITIONS)


def _is_complex(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_complex()
