"""Device noise: programming statistics against aihwkit's PCM model, drift and GDC, and the
growth of the output error with the noise scale."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hetmap.common.errors import SimulationError
from hetmap.runtime import AnalogSettings, AnalogTileStack, SimulatedExperts, reference_linear
from hetmap.runtime.settings import NOISE_MODELS

PCM_COEFFS = (0.26348, 1.9650, -1.1731)  # aihwkit PCMLikeNoiseModel, uS at g_max = 25 uS
G_MAX = 25.0


def _pcm_sigma(conductance: torch.Tensor) -> torch.Tensor:
    relative = conductance / G_MAX
    return PCM_COEFFS[0] + PCM_COEFFS[1] * relative + PCM_COEFFS[2] * relative**2


@pytest.mark.parametrize("noise_scale", [1.0, 2.5])
def test_pcm_programming_spread_matches_the_polynomial(noise_scale: float) -> None:
    """Single device pair: a weight's error is the programmed device's N(0, c sigma(g)) minus
    the idle device's noise, N(0, c sigma(0)) clamped at 0 (conductances cannot be negative).
    Per conductance bin the error std must match within 5% (about 3 standard errors)."""
    torch.manual_seed(0)
    weights = torch.randn(1, 256, 256)
    settings = AnalogSettings(rows=256, cols=256, noise_scale=noise_scale)
    stack = AnalogTileStack(weights, settings, seed=11)
    target = weights[0] / weights[0].abs().max()  # one tile, omega = 1
    conductance = target.abs() * G_MAX
    error = (stack.weight[0] - target) * G_MAX * target.sign()  # uS, towards larger |w|
    idle_sigma = noise_scale * PCM_COEFFS[0]
    idle_variance = idle_sigma**2 * (0.5 - 1 / (2 * math.pi))
    for low, high in ((3.0, 6.0), (6.0, 12.0), (12.0, 25.0)):
        in_bin = (conductance >= low) & (conductance < high)
        assert in_bin.sum() > 500
        expected_var = (noise_scale * _pcm_sigma(conductance[in_bin])) ** 2 + idle_variance
        measured = error[in_bin].std().item()
        assert measured == pytest.approx(expected_var.mean().sqrt().item(), rel=0.05)
        mean_shift = -idle_sigma / math.sqrt(2 * math.pi)  # the idle device only adds
        assert error[in_bin].mean().item() == pytest.approx(mean_shift, abs=0.05 * noise_scale)


@pytest.mark.parametrize("noise_model", NOISE_MODELS)
def test_programming_spread_per_tile_matches_aihwkit(noise_model: str) -> None:
    """Same weights programmed by hetmap (all tiles at once) and by aihwkit (tile by tile):
    the std of the weight error of every tile agrees within 15%."""
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * torch.linspace(0.2, 2.0, 128)  # tiles differ in range
    settings = AnalogSettings(rows=64, cols=32, noise_scale=1.5, noise_model=noise_model)
    stack = AnalogTileStack(weight.unsqueeze(0), settings, seed=3)
    ours = stack.weight[0] * stack.out_scales[0].repeat_interleave(64, dim=0).T
    theirs = reference_linear(weight, None, settings, seed=3).get_weights()[0]
    for rows in (slice(0, 32), slice(32, 64)):
        for cols in (slice(0, 64), slice(64, 128)):
            ours_std = (ours[rows, cols] - weight[rows, cols]).std()
            theirs_std = (theirs[rows, cols] - weight[rows, cols]).std()
            assert ours_std.item() == pytest.approx(theirs_std.item(), rel=0.15)


def _expert_error(noise_scale: float, seed: int, experts, inputs) -> float:
    hidden, index, weights = inputs
    exact = experts(hidden, index, weights)
    settings = AnalogSettings(rows=32, cols=32, noise_scale=noise_scale)
    outputs = SimulatedExperts(experts, range(4), settings, seed)(hidden, index, weights)
    return ((outputs - exact).norm() / exact.norm()).item()


def test_output_error_grows_with_noise_scale(tiny_olmoe) -> None:
    experts = tiny_olmoe(seed=0).model.layers[1].mlp.experts
    torch.manual_seed(1)
    inputs = (torch.randn(48, 32), torch.randint(0, 4, (48, 2)), torch.rand(48, 2))
    scales = [0.0, 0.5, 1.0, 2.0, 4.0]
    mean_errors = [
        sum(_expert_error(scale, seed, experts, inputs) for seed in range(4)) / 4
        for scale in scales
    ]
    assert all(a < b for a, b in itertools.pairwise(mean_errors)), mean_errors


def test_drift_shrinks_outputs_and_gdc_restores_them() -> None:
    torch.manual_seed(0)
    weights = torch.randn(1, 64, 64)
    inputs = torch.randn(32, 64)
    exact = inputs @ weights[0].T
    base = dict(rows=64, cols=64, noise_scale=0.0, adc_bits=None, dac_bits=None)
    norms = {}
    for name, gdc in (("raw", False), ("gdc", True)):
        settings = AnalogSettings(drift_time=86400.0, gdc=gdc, read_noise=False, **base)
        norms[name] = (AnalogTileStack(weights, settings, 0)(inputs).norm() / exact.norm()).item()
    assert norms["raw"] < 0.8  # PCM drift, nu ~ 0.05-0.1, over one day
    assert norms["gdc"] == pytest.approx(1.0, abs=0.05)


def test_read_noise_adds_error() -> None:
    torch.manual_seed(0)
    weights = torch.randn(1, 64, 64)
    errors = {}
    for read_noise in (False, True):
        settings = AnalogSettings(
            rows=64, cols=64, noise_scale=0.0, drift_time=3600.0, read_noise=read_noise
        )
        drifted = AnalogTileStack(weights, settings, 0)
        scaled = drifted.weight[0] * drifted.out_scales[0, 0]
        errors[read_noise] = ((scaled - weights[0]).norm() / weights[0].norm()).item()
    assert errors[True] > 1.5 * errors[False]


def test_reram_needs_a_fitted_drift_time() -> None:
    with pytest.raises(SimulationError, match="drift_time"):
        AnalogTileStack(
            torch.randn(1, 8, 8), AnalogSettings(noise_model="reram", drift_time=10.0), 0
        )
    AnalogTileStack(torch.randn(1, 8, 8), AnalogSettings(noise_model="reram", drift_time=1.0), 0)
