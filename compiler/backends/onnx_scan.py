"""Mamba's selective scan as one ``scan`` op, so the sequence length stays dynamic in export.

transformers' PyTorch fallback of Mamba's selective scan (``mamba_selective_scan`` in the
modeling files of Mamba, FalconMamba, Jamba and Zamba) loops ``for index in range(seq_len)``;
``torch.export`` unrolls that loop and so fixes the sequence length that the exported graph
declares dynamic.

Rules:

1. While the exporter traces, every modeling module (Python module) of the model's classes
   that defines ``mamba_selective_scan`` with the reference parameters
   (``hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state``) has
   that function replaced by :func:`selective_scan`; the originals are put back afterwards,
   also on errors. Nothing else in those modules changes.
2. :func:`selective_scan` computes the recurrence of the reference fallback
   (``h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t``, then the ``D`` skip and the
   ``silu(z)`` gate) with torch's ``scan`` higher-order op, which the ONNX translator writes as
   one ``Scan`` node over the sequence. ``use_mambapy`` and ``use_associative_scan`` select
   other algorithms for the same result and are ignored. It computes no gradients (the
   scan's inputs are detached: its autograd form does not translate to ONNX).
3. The exported graph is checked against the unpatched PyTorch model afterwards (the
   exporter's onnxruntime comparison), so a wrong replacement cannot pass silently.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.scan import scan

FUNCTION_NAME = "mamba_selective_scan"
_PARAMETERS = ("hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
               "return_last_state")


def selective_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,  # noqa: N803 - the reference's names
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    D: torch.Tensor | None = None,  # noqa: N803
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **_: object,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rule 2. Shapes as in the reference: ``hidden_states``, ``dt``, ``z`` ``[b, d, L]``,
    ``A`` ``[d, n]``, ``B``, ``C`` ``[b, n, L]``; returns ``[b, d, L]`` (and the last state)."""
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B, C = B.transpose(1, 2), C.transpose(1, 2)  # noqa: N806 - [b, L, n]
    decay = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    delta_b = dt[:, :, :, None] * B[:, None, :, :].float()
    delta_bu = delta_b * hidden_states[:, :, :, None].float()
    initial = torch.zeros_like(delta_bu[:, :, 0])

    def step(state: torch.Tensor, inputs: tuple[torch.Tensor, ...]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        decay_t, input_t, c_t = inputs
        state = decay_t * state + input_t
        return state, torch.matmul(state.to(input_dtype), c_t.unsqueeze(-1))[..., 0]

    # detached: inference only, and scan's autograd form does not translate to ONNX
    sequences = (decay.movedim(2, 0), delta_bu.movedim(2, 0), C.movedim(1, 0))
    last_state, outputs = scan(step, initial.detach(), tuple(t.detach() for t in sequences))
    scan_output = outputs.movedim(0, -1)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    if return_last_state:
        return scan_output, last_state
    return scan_output


@contextmanager
def scans_as_ops(model: nn.Module) -> Iterator[list[str]]:
    """Rule 1 for the classes of ``model``; yields the names of the patched modules."""
    patched: list[tuple[ModuleType, object]] = []
    try:
        for name in sorted({type(module).__module__ for module in model.modules()}):
            modeling = sys.modules.get(name)
            original = getattr(modeling, FUNCTION_NAME, None)
            if modeling is not None and _is_reference(original):
                patched.append((modeling, original))
                setattr(modeling, FUNCTION_NAME, selective_scan)
        yield [modeling.__name__ for modeling, _ in patched]
    finally:
        for modeling, original in patched:
            setattr(modeling, FUNCTION_NAME, original)


def _is_reference(function: object) -> bool:
    if not callable(function) or function is selective_scan:
        return False
    try:
        parameters = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return parameters[: len(_PARAMETERS)] == _PARAMETERS
