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


def _tiles_with_padding() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized tiles ``[E, out tiles, cols, in tiles, rows]`` (abs-max 1 per tile) and
    the mask of the cells that hold weights (part of the last column and row tiles empty)."""
    torch.manual_seed(0)
    tiles = torch.randn(3, 2, 64, 2, 64)
    inside = torch.ones_like(tiles)
    inside[:, 1, 40:] = 0.0
    inside[:, :, :, 1, 50:] = 0.0
    tiles = tiles * inside
    return tiles / tiles.abs().amax(dim=(2, 4), keepdim=True), inside


@pytest.mark.parametrize(("drift_time", "read_noise"),
                         [(3600.0, True), (0.0, True), (86400.0, False)])
def test_pcm_drift_with_aihwkits_draws_equals_aihwkit(drift_time: float, read_noise: bool
                                                      ) -> None:
    """hetmap's in-place PCM programming and drift step, given the six normal tensors
    aihwkit's noise model draws (in its order), against aihwkit's own
    apply_programming_noise / apply_drift_noise on the same seed: equal within 1e-6 (float
    rounding; the weights are at most 1)."""
    from unittest import mock

    from hetmap.runtime import programming

    tiles, inside = _tiles_with_padding()
    settings = AnalogSettings(noise_scale=1.5, drift_time=drift_time, read_noise=read_noise)
    model = programming.make_noise_model(settings)
    torch.manual_seed(5)
    with mock.patch.object(programming, "_is_plain_pcm", lambda _model: False):
        reference = programming._noise_all_tiles(tiles, inside, model, settings)
    torch.manual_seed(5)
    draws = [torch.randn(tiles.shape) for _ in range(6)]
    ours = programming._pcm_drift(tiles, inside, model, drift_time, draws)
    assert reference[1] is not None
    assert (ours[0] - reference[0]).abs().max().item() < 1e-6
    assert (ours[1] - reference[1]).abs().max().item() < 1e-6
    assert (ours[1] != tiles).float().mean().item() > 0.5  # the noise is there


def test_pcm_drift_with_shared_draws_matches_aihwkit_statistics() -> None:
    """hetmap's own draws (four normal samples per weight: each weight's idle device shares
    its drift and read-noise samples) against aihwkit's six, on 1.6 M weights: per weight
    bin, the drifted weight's error std within 5% and its mean within 4 standard errors."""
    from unittest import mock

    from hetmap.runtime import programming

    settings = AnalogSettings(noise_scale=1.5, drift_time=3600.0)
    model = programming.make_noise_model(settings)
    weights = torch.linspace(-1.0, 1.0, 201).repeat(8000, 1).view(1, 1, 8000, 1, 201)
    torch.manual_seed(0)
    ours = programming._pcm_drift(weights, None, model, 3600.0)[1] - weights
    with mock.patch.object(programming, "_is_plain_pcm", lambda _model: False):
        theirs = programming._noise_all_tiles(weights, None, model, settings)[1]
    assert theirs is not None
    theirs = theirs - weights
    for low, high in ((0, 20), (60, 100), (100, 101), (150, 201)):
        mine, reference = ours[..., low:high], theirs[..., low:high]
        assert mine.std().item() == pytest.approx(reference.std().item(), rel=0.05)
        standard_error = math.sqrt(2.0 / mine.numel()) * reference.std().item()
        assert abs(mine.mean().item() - reference.mean().item()) < 4 * standard_error
