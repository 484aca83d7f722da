"""The hetmap tile model against aihwkit's TorchInferenceTile on the same settings.

Programming and output noise off, DAC/ADC quantization on, float64 (so that no rounding
decision of a quantizer can differ): every layer must agree within 1e-5 relative. Shapes are
multiples of the tile size, where aihwkit's near-equal split equals hetmap's fixed tiles.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hetmap.runtime import (
    AnalogSettings,
    ReferenceExperts,
    SimulatedExperts,
    SimulatedLinear,
    reference_linear,
)

TOLERANCE = 1e-5
QUANTIZED = AnalogSettings(rows=32, cols=16, noise_scale=0.0, out_noise=0.0)


def _relative_error(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    return ((outputs - reference).norm() / reference.norm()).item()


def _layer_and_inputs(seed: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(96, 48).to(torch.float64)  # 3 x 3 tiles of 32 x 16
    scales = torch.logspace(-1, 1, 24, dtype=torch.float64).unsqueeze(1)
    return linear, torch.randn(24, 96, dtype=torch.float64) * scales


@pytest.mark.parametrize(
    "settings",
    [
        QUANTIZED,
        dataclasses.replace(QUANTIZED, out_bound=1.5),  # bound management kicks in
        dataclasses.replace(QUANTIZED, weight_scaling_columnwise=True, dac_bits=6, adc_bits=10),
        dataclasses.replace(QUANTIZED, noise_management="none", bound_management="none"),
        dataclasses.replace(QUANTIZED, dac_bits=None, weight_scaling_omega=0.8),
    ],
    ids=["default", "bound-management", "columnwise-6-10-bits", "no-management", "no-dac"],
)
def test_linear_matches_aihwkit(settings: AnalogSettings) -> None:
    linear, inputs = _layer_and_inputs(0)
    ours = SimulatedLinear(linear, settings, seed=0)(inputs)
    theirs = reference_linear(linear.weight, linear.bias, settings, seed=0)(inputs)
    assert _relative_error(ours, theirs) < TOLERANCE
    assert _relative_error(ours, linear(inputs)) > 1e-4  # the periphery did something


def test_bound_management_case_really_clips() -> None:
    linear, inputs = _layer_and_inputs(0)
    settings = dataclasses.replace(QUANTIZED, out_bound=1.5)
    tiles = SimulatedLinear(linear, settings, seed=0).tiles
    normalized = inputs[:, :32] / inputs[:, :32].abs().amax(dim=1, keepdim=True)
    assert (normalized @ tiles.weight[0, :, :32].T).abs().max() > settings.out_bound


def test_experts_match_aihwkit(tiny_olmoe) -> None:
    model = tiny_olmoe(seed=1).double()
    model.set_experts_implementation("eager")  # transformers' grouped_mm has no float64
    experts = model.model.layers[0].mlp.experts
    torch.manual_seed(2)
    hidden = torch.randn(20, 32, dtype=torch.float64)
    top_k_index = torch.stack([torch.randperm(4)[:2] for _ in range(20)])
    top_k_weights = torch.rand(20, 2, dtype=torch.float64)
    analog = [0, 2, 3]
    ours = SimulatedExperts(experts, analog, QUANTIZED, seed=5)
    theirs = ReferenceExperts(experts, analog, QUANTIZED, seed=5)
    outputs = ours(hidden, top_k_index, top_k_weights)
    reference = theirs(hidden, top_k_index, top_k_weights)
    assert _relative_error(outputs, reference) < TOLERANCE
    # expert 1 stays digital: tokens routed only to it are exact
    only_digital = torch.ones(3, 2, dtype=torch.long)
    weights = torch.full((3, 2), 0.5, dtype=torch.float64)
    exact = experts(hidden[:3], only_digital, weights)
    assert torch.allclose(ours(hidden[:3], only_digital, weights), exact, rtol=1e-12, atol=1e-12)
