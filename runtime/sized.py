"""Simulated expert stacks of the ``sizes`` layout (JetMoE's ``ParallelExperts``).

Such a stack holds ``weight [E, out, in]`` and is called with ``(rows sorted by expert, rows
per expert)`` (:func:`hetmap.runtime.layouts.read_layout` rule 5). Its MoE block routes,
gathers, gates and combines by itself, so the simulator replaces only the two stacks:

1. the rows of analog experts go through one :class:`AnalogTileStack` of those experts'
   matrices (grouped by expert, the rows are already sorted); a concatenated gate|up stack
   is tiled as two matrices (``out_splits``), as the tile pass plans them;
2. the rows of digital experts are multiplied exactly by their own matrices;
3. outputs keep the input's dtype; the tiles compute in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hetmap.common.errors import SimulationError

from .analog import AnalogTileStack, DigitalStack, StackView
from .grouped import RowGroups
from .settings import AnalogSettings


class SimulatedSizedStack(nn.Module):
    """Drop-in for one expert stack called as ``stack(rows, rows_per_expert)``."""

    slot: torch.Tensor
    is_analog: torch.Tensor

    def __init__(self, stack: nn.Module, analog: Sequence[int], settings: AnalogSettings,
                 seed: int, path: str, out_splits: Sequence[int] | None = None) -> None:
        super().__init__()
        weight = stack.get_parameter("weight").detach()
        if weight.dim() != 3:
            raise SimulationError(f"expert stack {path!r} has no 3-D weight [E, out, in]")
        experts, self.out_features, self.in_features = (int(d) for d in weight.shape)
        chosen = sorted({int(e) for e in analog})
        if any(not 0 <= e < experts for e in chosen):
            raise SimulationError(f"expert stack {path!r} has {experts} experts; analog "
                                  f"experts {chosen} are out of range")
        digital = [e for e in range(experts) if e not in chosen]
        self.num_experts = experts
        slot = torch.full((experts,), -1, dtype=torch.long)
        slot[chosen] = torch.arange(len(chosen))
        slot[digital] = torch.arange(len(digital))
        self.register_buffer("slot", slot, persistent=False)  # index in its own stack
        self.register_buffer("is_analog", torch.zeros(experts, dtype=torch.bool).index_fill_(
            0, torch.tensor(chosen, dtype=torch.long), True), persistent=False)
        analog_weights = StackView(weight, None if len(chosen) == experts
                                   else torch.tensor(chosen, dtype=torch.long))
        self.tiles = AnalogTileStack(analog_weights, settings, seed, out_splits) \
            if chosen else None
        self.digital = DigitalStack(StackView(weight, torch.tensor(digital, dtype=torch.long)),
                                    settings.programming == "resident")
        self.num_digital = len(digital)

    def forward(self, inputs: torch.Tensor, expert_size: Sequence[int] | torch.Tensor
                ) -> torch.Tensor:
        sizes = torch.as_tensor(expert_size, dtype=torch.long, device=inputs.device)
        if sizes.numel() != self.num_experts or int(sizes.sum()) != inputs.shape[0]:
            raise SimulationError(f"expert stack called with {inputs.shape[0]} rows and sizes "
                                  f"for {sizes.numel()} experts summing to {int(sizes.sum())}")
        expert = torch.repeat_interleave(torch.arange(self.num_experts, device=inputs.device),
                                         sizes)
        output = inputs.new_empty(inputs.shape[0], self.out_features)
        analog = self.is_analog[expert]
        for wanted in (True, False):
            rows = analog if wanted else ~analog
            if not bool(rows.any()):
                continue
            groups = RowGroups.from_sorted(self.slot[expert[rows]],
                                           int(self.is_analog.sum()) if wanted
                                           else self.num_digital)
            if wanted:
                assert self.tiles is not None
                output[rows] = self.tiles(inputs[rows].float(), groups).to(output.dtype)
            else:
                output[rows] = self.digital(inputs[rows].contiguous(), groups)
        return output
