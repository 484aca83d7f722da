"""The aihwkit reference backend: the same analog layers built from aihwkit ``AnalogLinear``.

One aihwkit ``AnalogLinear`` (``TorchInferenceRPUConfig``, the pure-PyTorch tile) per matrix,
configured from the same :class:`AnalogSettings` as the hetmap tile model:

1. ``mapping.max_input_size / max_output_size`` = ``rows / cols``. aihwkit splits a dimension
   into near-equal parts, so it tiles like hetmap only where the dimension is a multiple of
   the tile size (or fits in one tile).
2. ``forward``: ``inp_res``/``out_res`` from the DAC/ADC bits, ``inp_bound``, ``out_bound``,
   ``out_noise``, noise and bound management; ``is_perfect`` when ``ideal``.
3. ``mapping.weight_scaling_omega`` / ``weight_scaling_columnwise``; digital bias.
4. ``noise_model`` from :func:`make_noise_model`, ``GlobalDriftCompensation`` when ``gdc``;
   ``program_analog_weights`` (seeded) when there is programming noise or drift, then
   ``drift_analog_weights(drift_time)``.

Slow by design (a Python loop over experts, one module per matrix): it is the yardstick the
hetmap tile model is checked against, not a simulator to run large models with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import cast

import torch
from aihwkit.inference import GlobalDriftCompensation
from aihwkit.nn import AnalogLinear
from aihwkit.simulator.configs import TorchInferenceRPUConfig
from aihwkit.simulator.parameters.enums import (
    BoundManagementType,
    NoiseManagementType,
    RPUDataType,
)
from torch import nn

from hetmap.common.errors import SimulationError

from .experts import Activation, LayoutExperts, canonical_experts
from .layouts import ExpertLayout
from .programming import derive_seed, make_noise_model, seeded
from .settings import AnalogSettings

_DATA_TYPES = {
    torch.float32: RPUDataType.FLOAT,
    torch.float64: RPUDataType.DOUBLE,
    torch.float16: RPUDataType.HALF,
}


def reference_rpu_config(settings: AnalogSettings, dtype: torch.dtype) -> TorchInferenceRPUConfig:
    """aihwkit ``TorchInferenceRPUConfig`` equivalent to ``settings``."""
    if dtype not in _DATA_TYPES:
        raise SimulationError(f"the aihwkit backend has no {dtype} tiles (use float32 or float64)")
    config = TorchInferenceRPUConfig()
    config.runtime.data_type = _DATA_TYPES[dtype]
    config.mapping.max_input_size = settings.rows
    config.mapping.max_output_size = settings.cols
    config.mapping.digital_bias = True
    config.mapping.weight_scaling_omega = 0.0 if settings.ideal else settings.weight_scaling_omega
    config.mapping.weight_scaling_columnwise = settings.weight_scaling_columnwise
    forward = config.forward
    forward.is_perfect = settings.ideal
    forward.inp_res = settings.inp_res
    forward.out_res = settings.out_res
    forward.inp_bound = settings.inp_bound
    forward.out_bound = settings.out_bound
    forward.out_noise = settings.out_noise
    forward.noise_management = (
        NoiseManagementType.ABS_MAX
        if settings.noise_management == "abs-max"
        else NoiseManagementType.NONE
    )
    forward.bound_management = (
        BoundManagementType.ITERATIVE
        if settings.bound_management == "iterative"
        else BoundManagementType.NONE
    )
    config.noise_model = make_noise_model(settings)
    config.drift_compensation = GlobalDriftCompensation() if settings.gdc else None
    return config


def reference_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, settings: AnalogSettings, seed: int
) -> AnalogLinear:
    """An aihwkit ``AnalogLinear`` holding ``weight [out, in]`` (programmed, drifted), eval mode."""
    out_features, in_features = weight.shape
    config = reference_rpu_config(settings, weight.dtype)
    layer = AnalogLinear(in_features, out_features, bias=bias is not None, rpu_config=config)
    layer = layer.to(weight.device)
    layer.set_weights(weight.detach(), None if bias is None else bias.detach())
    layer.eval()
    if settings.programs_noise or settings.drifts:
        if weight.dtype == torch.float64 and settings.gdc:
            raise SimulationError(
                "aihwkit's drift compensation fails on float64 tiles; use float32 or gdc=false"
            )
        with seeded(seed, weight.device):
            layer.program_analog_weights()
            if settings.drifts:
                layer.drift_analog_weights(float(settings.drift_time or 0.0))
    return layer


class ReferenceLinear(nn.Module):
    """Drop-in for ``nn.Linear`` backed by one aihwkit ``AnalogLinear``."""

    def __init__(self, linear: nn.Linear, settings: AnalogSettings, seed: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.tile_dtype = linear.weight.dtype
        self.analog = reference_linear(linear.weight, linear.bias, settings, seed)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.analog(inputs.to(self.tile_dtype)).to(inputs.dtype)


class ReferenceExperts(LayoutExperts):
    """An experts module (any layout :class:`~.experts.LayoutExperts` takes) with
    ``analog_experts`` as aihwkit ``AnalogLinear`` gate/up/down modules (one per matrix per
    expert, digital biases), the others exact; loops over experts like transformers' eager
    implementation."""

    def __init__(
        self,
        experts: nn.Module,
        analog_experts: Iterable[int],
        settings: AnalogSettings,
        seed: int,
        path: str = "experts",
        layout: ExpertLayout | None = None,
    ) -> None:
        super().__init__(experts, analog_experts, path, layout)
        canon = canonical_experts(experts, path, self.layout)
        self.roles = self.layout.roles
        for role in self.roles:
            weight = canon.weights[role].clone(memory_format=torch.contiguous_format)
            self.register_buffer(f"{role}_weight", weight)
            bias = canon.biases.get(role)
            self.register_buffer(f"{role}_bias", None if bias is None else bias.clone())
        self.analog = nn.ModuleDict()
        for index in self.analog_experts:
            self.analog[str(index)] = nn.ModuleDict({
                role: reference_linear(
                    self._matrix(role, index), self._bias(role, index), settings,
                    derive_seed(seed, f"{index}.{role}"))
                for role in self.roles
            })

    def _matrix(self, role: str, index: int) -> torch.Tensor:
        return cast(torch.Tensor, getattr(self, f"{role}_weight"))[index]

    def _bias(self, role: str, index: int) -> torch.Tensor | None:
        bias = cast(torch.Tensor | None, getattr(self, f"{role}_bias"))
        return None if bias is None else bias[index]

    def expert_outputs(
        self, inputs: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor,
        activation: Activation,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dtype = self._matrix("down", 0).dtype
        for index in torch.unique(pair_expert).tolist():
            positions = (pair_expert == index).nonzero().squeeze(1)
            state = inputs[pair_row[positions]].to(dtype)
            apply: dict[str, Callable[[torch.Tensor], torch.Tensor]]
            if str(index) in self.analog:
                matrices = cast(nn.ModuleDict, self.analog[str(index)])
                apply = {role: matrices[role] for role in self.roles}
            else:
                apply = {role: partial(nn.functional.linear, weight=self._matrix(role, index),
                                       bias=self._bias(role, index)) for role in self.roles}
            gate = apply["gate"](state) if "gate" in apply else None
            yield positions, apply["down"](activation(gate, apply["up"](state)))
