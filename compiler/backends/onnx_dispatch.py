"""Sparse expert dispatch in export-friendly form: each expert computes only its routed tokens.

The ``dispatch`` MoE form of the ONNX back end (``--onnx-moe dispatch``). It has the same
parameters, names and expert functions as :class:`~hetmap.compiler.backends.onnx_experts.
StaticExperts` (one ``[out, in]`` initializer per expert matrix); only the dispatch differs.
``torch.export`` with dynamic shapes turns it into standard ONNX operators: ``Equal`` +
``NonZero`` (which tokens chose the expert, a data-dependent count), ``Gather`` (those
tokens' hidden states), the expert's ``MatMul``/``Gemm`` nodes on them, ``GatherND`` (their
routing weights), ``Mul`` and ``ScatterND(reduction="add")`` into the output.

Rules:

1. ``routed`` stores: for expert ``e``, ``token, slot = where(top_k_index == e)``; the expert
   runs on ``hidden[token]`` only and ``output.index_add(0, token, expert(...) *
   top_k_weights[token, slot])``. A token picks an expert at most once, so the scatter has no
   duplicate indices. An expert no token chose runs on zero rows.
2. Router slots ``num_experts .. num_experts + identity_experts`` pass the token through,
   weighted (computed densely: no matrices); the sentinel slot beyond them routes nowhere.
3. ``dense-input`` stores (Llama 4: rows ``e*T .. (e+1)*T`` are expert ``e``'s input, already
   scaled by its routing score, all-zero when unrouted) run the expert on the nonzero rows
   only; the other rows are zero when the expert maps zero to zero (a gate, no biases, no
   post-expert norm: ``down(act(0) * 0) = 0``), else the expert's output on a zero row.
4. Hand-written ``ModuleList`` containers called as ``(hidden, top_k_index,
   top_k_weights)`` are dispatched by rule 1 over their own children
   (:class:`SparseDispatchExperts`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hetmap.compiler.backends.onnx_experts import StaticExperts

Expert = Callable[[torch.Tensor], torch.Tensor]


def sparse_dispatch(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    experts: Sequence[Expert],
    identity_experts: int = 0,
) -> torch.Tensor:
    """Rules 1 and 2 on ``hidden [T, H]``, ``top_k_index``/``top_k_weights [T, k]``."""
    output = torch.zeros_like(hidden)
    for index, expert in enumerate(experts):
        token, slot = torch.where(top_k_index == index)
        routed = expert(hidden.index_select(0, token))
        weighted = routed * top_k_weights[token, slot].unsqueeze(-1)
        output = output.index_add(0, token, weighted.to(hidden.dtype))
    if identity_experts:
        first = len(experts)
        passes = (top_k_index >= first) & (top_k_index < first + identity_experts)
        passed = torch.where(passes, top_k_weights, 0.0).sum(dim=-1, keepdim=True)
        output = output + (hidden * passed).to(hidden.dtype)
    return output


def dense_input_dispatch(blocks: torch.Tensor, experts: Sequence[Expert],
                         zero_to_zero: bool = False) -> torch.Tensor:
    """Rule 3 on ``blocks [E, T, H]``: each expert on its nonzero rows; returns ``[E*T, H']``."""
    outputs = []
    for block, expert in zip(blocks.unbind(0), experts, strict=True):
        (rows,) = torch.where((block != 0).any(dim=-1))
        if zero_to_zero:
            output = torch.zeros_like(block)
        else:
            at_zero = expert(torch.zeros_like(block[:1]))
            output = at_zero.expand(block.shape[0], -1).contiguous()
        outputs.append(output.index_copy(0, rows, expert(block.index_select(0, rows))))
    return torch.cat(outputs, dim=0)


class DispatchExperts(StaticExperts):
    """:class:`StaticExperts` with sparse dispatch (module rules 1-3); same parameters."""

    form = "dispatch"

    def dispatch(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        return sparse_dispatch(hidden, top_k_index, top_k_weights, self.expert_functions(),
                               self.identity_experts)

    def dispatch_dense_input(self, blocks: torch.Tensor) -> torch.Tensor:
        return dense_input_dispatch(blocks, self.expert_functions(), self.zero_to_zero)


class SparseDispatchExperts(nn.Module):
    """Rule 4: a hand-written experts container, dispatched sparsely over its children.

    The original expert modules are re-registered under their own names, so parameter names
    do not change.
    """

    def __init__(self, container: nn.Module) -> None:
        super().__init__()
        for name, expert in container.named_children():
            self.add_module(name, expert)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return sparse_dispatch(hidden_states, top_k_index, top_k_weights, list(self.children()))
