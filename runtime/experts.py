"""Simulated fused Mixture-of-Experts experts: some experts analog, the rest exact digital.

Replaces a transformers 5.x fused experts module (``gate_up_proj [E, 2I, H]``, ``down_proj
[E, H, I]``, ``act_fn``; forward ``(hidden_states [T, H], top_k_index [T, k], top_k_weights
[T, k]) -> [T, H]``, as in ``OlmoeExperts``, ``MixtralExperts``, ``Qwen2MoeExperts``,
``DeepseekV3NaiveMoe``) with a module of the same forward signature:

1. The listed experts' gate (``gate_up_proj[e, :I]``), up (``gate_up_proj[e, I:]``) and down
   (``down_proj[e]``) matrices are programmed onto AIMC tiles as two :class:`AnalogTileStack`s
   (gate and up side by side, each on its own column tiles; down); the other experts stay
   exact digital (:class:`DigitalStack`).
2. Per group (analog, digital) the routed (token, expert) pairs are sorted by expert; each
   matrix of the group is one grouped product over all its experts (:mod:`.grouped`).
3. ``act_fn(gate) * up``, then down; outputs are weighted by ``top_k_weights`` and summed per
   token. Sentinel expert indices (``>= E``, expert parallelism) are skipped.

Only the default layout is supported (``has_gate``, no bias, not transposed, gate/up
concatenated, no post-expert norm, default gating); others are refused with a
:class:`SimulationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hetmap.compiler.errors import SimulationError

from .analog import AnalogTileStack, DigitalStack
from .grouped import RowGroups
from .programming import derive_seed
from .settings import AnalogSettings

# transformers' use_experts_implementation flags and the values hetmap supports.
_SUPPORTED_FLAGS = {
    "has_gate": True,
    "has_bias": False,
    "is_transposed": False,
    "is_concatenated": True,
    "has_post_expert_norm": False,
}


@dataclass(frozen=True)
class FusedExperts:
    """The weights and activation of a supported fused experts module."""

    gate_up: torch.Tensor  # [E, 2I, H]
    down: torch.Tensor  # [E, H, I]
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    @property
    def num_experts(self) -> int:
        return int(self.gate_up.shape[0])

    @property
    def intermediate(self) -> int:
        return int(self.down.shape[2])


def fused_experts(module: nn.Module, path: str) -> FusedExperts:
    """The weights of a supported fused experts module at ``path``; else raise."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    act_fn = getattr(module, "act_fn", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise SimulationError(
            f"module {path!r} ({type(module).__name__}) is not a fused experts module "
            "(needs gate_up_proj [E, 2I, H] and down_proj [E, H, I] parameters)"
        )
    for flag, expected in _SUPPORTED_FLAGS.items():
        if getattr(module, flag, expected) != expected:
            raise SimulationError(
                f"experts module {path!r} ({type(module).__name__}) has {flag}="
                f"{getattr(module, flag)}; hetmap simulates only {flag}={expected}"
            )
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
        raise SimulationError(
            f"experts module {path!r} ({type(module).__name__}) has a custom _apply_gate; "
            "hetmap simulates only act_fn(gate) * up"
        )
    if not callable(act_fn):
        raise SimulationError(f"experts module {path!r} has no act_fn")
    if gate_up.ndim != 3 or down.ndim != 3:
        raise SimulationError(f"experts module {path!r}: gate_up_proj and down_proj must be 3-D")
    experts, double_inter, hidden = gate_up.shape
    if double_inter % 2 or tuple(down.shape) != (experts, hidden, double_inter // 2):
        raise SimulationError(
            f"experts module {path!r}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
            f"{tuple(down.shape)} are not [E, 2I, H] and [E, H, I]"
        )
    return FusedExperts(gate_up.detach(), down.detach(), act_fn)


def checked_expert_indices(indices: Iterable[int], num_experts: int, path: str) -> list[int]:
    """Sorted distinct expert indices; raise if one is out of range."""
    chosen = sorted({int(index) for index in indices})
    bad = [index for index in chosen if not 0 <= index < num_experts]
    if bad:
        raise SimulationError(
            f"experts module {path!r} has experts 0..{num_experts - 1}; got analog experts {bad}"
        )
    return chosen


class SimulatedExperts(nn.Module):
    """Fused experts with ``analog_experts`` on simulated AIMC tiles, the rest exact."""

    is_analog: torch.Tensor
    local_index: torch.Tensor

    def __init__(
        self,
        experts: nn.Module,
        analog_experts: Iterable[int],
        settings: AnalogSettings,
        seed: int,
        path: str = "experts",
    ) -> None:
        super().__init__()
        fused = fused_experts(experts, path)
        num_experts, intermediate = fused.num_experts, fused.intermediate
        analog = checked_expert_indices(analog_experts, num_experts, path)
        digital = [index for index in range(num_experts) if index not in set(analog)]
        self.num_experts = num_experts
        self.analog_experts = tuple(analog)
        self.act_fn = fused.act_fn
        gate_up, down = fused.gate_up, fused.down
        self.analog_gate_up: AnalogTileStack | None = None
        self.analog_down: AnalogTileStack | None = None
        self.digital_gate_up: DigitalStack | None = None
        self.digital_down: DigitalStack | None = None
        if analog:
            self.analog_gate_up = AnalogTileStack(
                gate_up[analog],
                settings,
                derive_seed(seed, "gate_up"),
                out_splits=(intermediate, intermediate),
            )
            self.analog_down = AnalogTileStack(down[analog], settings, derive_seed(seed, "down"))
        if digital:
            self.digital_gate_up = DigitalStack(gate_up[digital])
            self.digital_down = DigitalStack(down[digital])
        is_analog = torch.zeros(num_experts, dtype=torch.bool)
        is_analog[analog] = True
        local_index = torch.zeros(num_experts, dtype=torch.long)
        local_index[analog] = torch.arange(len(analog))
        local_index[digital] = torch.arange(len(digital))
        self.register_buffer("is_analog", is_analog.to(gate_up.device), persistent=False)
        self.register_buffer("local_index", local_index.to(gate_up.device), persistent=False)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, analog={list(self.analog_experts)}"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        top_k = top_k_index.shape[-1]
        token = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        token = token.repeat_interleave(top_k)
        expert = top_k_index.reshape(-1)
        weight = top_k_weights.reshape(-1)
        routed = (expert >= 0) & (expert < self.num_experts)  # drop sentinel indices
        safe_expert = expert.clamp(0, self.num_experts - 1)
        groups = (
            (True, self.analog_gate_up, self.analog_down),
            (False, self.digital_gate_up, self.digital_down),
        )
        for analog, gate_up, down in groups:
            if gate_up is None or down is None:
                continue
            chosen = (routed & (self.is_analog[safe_expert] == analog)).nonzero().squeeze(1)
            if chosen.numel() == 0:
                continue
            local, order = torch.sort(self.local_index[safe_expert[chosen]], stable=True)
            chosen = chosen[order]
            rows = RowGroups.from_sorted(local, gate_up.num_matrices)
            pair_token = token[chosen]
            gate, up = gate_up(hidden_states[pair_token], rows).chunk(2, dim=-1)
            outputs = down(self.act_fn(gate) * up, rows)
            outputs = outputs * weight[chosen].unsqueeze(-1).to(outputs.dtype)
            final.index_add_(0, pair_token, outputs.to(final.dtype))
        return final
