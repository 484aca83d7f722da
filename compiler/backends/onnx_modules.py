"""Export-friendly stand-ins for modules whose eager form does not export as hetmap needs.

The ONNX back end (see :mod:`hetmap.compiler.backends.onnx_export`) swaps these in before
``torch.onnx.export`` and swaps the originals back afterwards. Each stand-in computes the
same function as the module it replaces and gives every matrix a parameter of its own, so
that the exporter writes one named initializer per matrix.

Rules:

1. Every stand-in matrix is stored in ``nn.Linear`` layout ``[out, in]`` and applied with
   ``F.linear``; the exporter turns that into ``Gemm(transB=1)`` or ``MatMul(x, Transpose(W))``.
2. Routed experts run densely: every expert computes all tokens and its output is kept only
   where the router picked it (weighted by the routing weight). The graph is static and
   exact; compute scales with the number of experts, memory with the weights only (no
   per-token gathers of expert weights).
3. Top-k indices equal to the number of experts (the sentinel Hugging Face uses for tokens
   masked out by expert parallelism) route nowhere, as in the eager loop.
4. A tiled matrix keeps one parameter per tile (``tiles.<i>``, in the order given); tiles
   sharing a column range add their partial sums, column blocks are concatenated, the bias
   is added last.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hetmap.compiler.errors import EmitError

TileRange = tuple[int, int, int, int]
"""(row_start, row_stop, col_start, col_stop): rows index inputs, cols index outputs."""

EXPERT_ROLES = ("gate", "up", "down")


class ExpertLinear(nn.Module):
    """One bias-free expert matrix in ``nn.Linear`` layout (a view of the fused tensor)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


class ExpertMLP(nn.Module):
    """A gated expert, ``down(act(gate(x)) * up(x))``, as three separate matrices."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act_fn: Callable) -> None:
        super().__init__()
        self.gate = gate
        self.up = up
        self.down = down
        self.act_fn = act_fn

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(self.act_fn(self.gate(hidden)) * self.up(hidden))


def routing_matrix(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Dense ``[T, num_experts]`` routing weights from top-k indices and weights (rule 3)."""
    one_hot = F.one_hot(top_k_index, num_classes=num_experts + 1).to(top_k_weights.dtype)
    return (one_hot * top_k_weights.unsqueeze(-1)).sum(dim=1)[:, :num_experts]


def dense_dispatch(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    experts: Sequence[nn.Module],
) -> torch.Tensor:
    """Sum over experts of each expert's output on all tokens times its routing weight."""
    routing = routing_matrix(top_k_index, top_k_weights, len(experts))
    output = torch.zeros_like(hidden)
    for index, expert in enumerate(experts):
        weight = routing[:, index : index + 1]
        contribution = torch.where(weight != 0, expert(hidden) * weight, 0.0)
        output = output + contribution.to(hidden.dtype)
    return output


class StaticExperts(nn.Module):
    """Stand-in for a fused Hugging Face experts module (``gate_up_proj``/``down_proj``).

    Children are named ``<e>`` with grandchildren ``gate``/``up``/``down``, so parameter
    names are ``<experts path>.<e>.<role>.weight``: hetmap's matrix key plus ``.weight``.
    """

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        gate_up = fused.get_parameter("gate_up_proj").detach()
        down = fused.get_parameter("down_proj").detach()
        intermediate = gate_up.shape[1] // 2
        self.num_experts = gate_up.shape[0]
        for index in range(self.num_experts):
            expert = ExpertMLP(
                ExpertLinear(gate_up[index, :intermediate]),
                ExpertLinear(gate_up[index, intermediate:]),
                ExpertLinear(down[index]),
                getattr(fused, "act_fn"),  # noqa: B009 - an attribute of HF experts modules
            )
            self.add_module(str(index), expert)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return dense_dispatch(hidden_states, top_k_index, top_k_weights, list(self.children()))


class DenseDispatchExperts(nn.Module):
    """Stand-in for a hand-written ModuleList/ModuleDict experts container called as
    ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.

    The original expert modules are re-registered under their own names, so parameter names
    do not change; only the (data-dependent) dispatch is replaced.
    """

    def __init__(self, container: nn.Module) -> None:
        super().__init__()
        for name, expert in container.named_children():
            self.add_module(name, expert)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return dense_dispatch(hidden_states, top_k_index, top_k_weights, list(self.children()))


def fused_experts_problem(module: nn.Module) -> str | None:
    """Why a fused experts module cannot be split into per-expert matrices (None if it can)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return "expects 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I]"
    unsupported = {
        "is_transposed": getattr(module, "is_transposed", False),
        "has_bias": getattr(module, "has_bias", False),
        "has_post_expert_norm": getattr(module, "has_post_expert_norm", False),
        "is_concatenated=False": not getattr(module, "is_concatenated", True),
        "has_gate=False": not getattr(module, "has_gate", True),
    }
    flags = [flag for flag, present in unsupported.items() if present]
    if flags:
        return f"layout not supported ({', '.join(flags)})"
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return "custom _apply_gate not supported"
    experts, double_intermediate, hidden = gate_up.shape
    if tuple(down.shape) != (experts, hidden, double_intermediate // 2) or double_intermediate % 2:
        return f"shapes {tuple(gate_up.shape)} and {tuple(down.shape)} do not match"
    if not callable(getattr(module, "act_fn", None)):
        return "has no act_fn"
    return None


class TiledLinear(nn.Module):
    """A linear map split into crossbar tiles (rule 4). Parameters: ``tiles.<i>``, ``bias``."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, tile_ranges: Sequence[TileRange]
    ) -> None:
        super().__init__()
        self.tile_ranges: list[TileRange] = [
            (int(r0), int(r1), int(c0), int(c1)) for r0, r1, c0, c1 in tile_ranges
        ]
        self.column_blocks = _column_blocks(self.tile_ranges)
        weight = weight.detach()
        self.tiles = nn.ParameterList(
            nn.Parameter(weight[c0:c1, r0:r1].clone(), requires_grad=False)
            for r0, r1, c0, c1 in self.tile_ranges
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        blocks: list[torch.Tensor] = []
        for members in self.column_blocks:
            partial_sum: torch.Tensor | None = None
            for index in members:
                r0, r1 = self.tile_ranges[index][:2]
                partial = F.linear(hidden[..., r0:r1], self.tiles[index])
                partial_sum = partial if partial_sum is None else partial_sum + partial
            assert partial_sum is not None
            blocks.append(partial_sum)
        output = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
        return output if self.bias is None else output + self.bias


def check_tile_ranges(
    key: str, tiles: Sequence[TileRange], in_features: int, out_features: int
) -> None:
    """Raise EmitError unless ``tiles`` form a grid that covers [in x out] exactly once."""
    if not tiles:
        raise EmitError(f"tile_ranges[{key!r}] is empty; give at least one tile or omit the key")
    for tile in tiles:
        if len(tile) != 4 or not all(isinstance(bound, numbers.Integral) for bound in tile):
            raise EmitError(f"tile_ranges[{key!r}]: {tile!r} is not 4 ints (r0, r1, c0, c1)")
        r0, r1, c0, c1 = tile
        if not (0 <= r0 < r1 <= in_features and 0 <= c0 < c1 <= out_features):
            raise EmitError(
                f"tile_ranges[{key!r}]: {tuple(tile)} lies outside the matrix "
                f"(rows = {in_features} inputs, cols = {out_features} outputs)"
            )
    columns = sorted({(tile[2], tile[3]) for tile in tiles})
    _check_partition(key, "column ranges", columns, out_features)
    for c0, c1 in columns:
        rows = sorted((tile[0], tile[1]) for tile in tiles if (tile[2], tile[3]) == (c0, c1))
        _check_partition(key, f"row ranges of columns {c0}:{c1}", rows, in_features)


def _check_partition(key: str, what: str, spans: list[tuple[int, int]], size: int) -> None:
    position = 0
    for start, stop in spans:
        if start != position:
            raise EmitError(
                f"tile_ranges[{key!r}]: {what} must cover 0..{size} without gaps or overlaps "
                f"(found {start}:{stop} where {position} was expected)"
            )
        position = stop
    if position != size:
        raise EmitError(f"tile_ranges[{key!r}]: {what} stop at {position}, not at {size}")


def _column_blocks(tiles: Sequence[TileRange]) -> list[list[int]]:
    """Tile indices grouped by column range, blocks in column order, members in row order."""
    columns = sorted({(tile[2], tile[3]) for tile in tiles})
    return [
        sorted((i for i, t in enumerate(tiles) if (t[2], t[3]) == span), key=lambda i: tiles[i][0])
        for span in columns
    ]
