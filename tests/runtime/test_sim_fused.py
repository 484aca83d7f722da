"""Fast paths of the tile model: counter-based output noise and the compiled periphery,
programming a few tiles at a time, and the in-place PCM programming noise."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmap.runtime import AnalogSettings, AnalogTileStack, fused
from hetmap.runtime.fused import (
    OutputNoise,
    call_keys,
    fused_add_round,
    normal_pair,
    normal_table,
)
from hetmap.runtime.grouped import RowGroups
from hetmap.runtime.programming import (
    make_noise_model,
    program_in_chunks,
    program_matrices,
    seeded,
)


def _samples(seed: int, call: int, count: int) -> torch.Tensor:
    """Rule 1's samples, read off the fused function with zero outputs and scale 1."""
    first, second = call_keys(seed, call)
    return fused_add_round(torch.zeros(count), normal_table(), torch.tensor(first),
                           torch.tensor(second), 1.0, rounds=False)


def test_counter_samples_are_standard_normal() -> None:
    """2**20 samples: mean and std within 4 standard errors of 0 and 1, tail shares and the
    CDF (Kolmogorov-Smirnov distance) as a normal's, no lag-1 correlation."""
    samples = _samples(seed=7, call=0, count=1 << 20).double()
    count = samples.numel()
    assert abs(samples.mean().item()) < 4 / math.sqrt(count)
    assert abs(samples.std().item() - 1.0) < 4 / math.sqrt(2 * count)
    assert (samples.abs() > 2.0).double().mean().item() == pytest.approx(0.0455, rel=0.03)
    grid = torch.linspace(-3, 3, 61, dtype=torch.float64)
    empirical = (samples.unsqueeze(0) <= grid.unsqueeze(1)).double().mean(dim=1)
    normal_cdf = 0.5 * (1 + torch.special.erf(grid / math.sqrt(2)))
    assert (empirical - normal_cdf).abs().max().item() < 1.63 / math.sqrt(count) * 1.5
    lag = torch.corrcoef(torch.stack([samples[:-1], samples[1:]]))[0, 1].item()
    assert abs(lag) < 4 / math.sqrt(count)


def test_normal_pairs_are_independent_standard_normals() -> None:
    """Rule 6 (programming noise with kernels=compiled), 2**20 pairs: each of the two as a
    standard normal (moments within 4 standard errors, tail shares, kurtosis, the CDF within
    1.5x the Kolmogorov-Smirnov 1% bound), uncorrelated with each other and with the next
    sample, tails out to 5.9 but not beyond; other keys give other samples."""
    count = 1 << 20
    keys = torch.tensor([11, 22, 33, 44], dtype=torch.int64)
    first, second = (values.double() for values in normal_pair((count,), keys, torch.float32))
    grid = torch.linspace(-3, 3, 61, dtype=torch.float64)
    normal_cdf = 0.5 * (1 + torch.special.erf(grid / math.sqrt(2)))
    for samples in (first, second):
        assert abs(samples.mean().item()) < 4 / math.sqrt(count)
        assert abs(samples.std().item() - 1.0) < 4 / math.sqrt(2 * count)
        assert (samples.abs() > 2.0).double().mean().item() == pytest.approx(0.0455, rel=0.03)
        assert (samples.abs() > 3.5).double().mean().item() == pytest.approx(4.65e-4, rel=0.15)
        assert (samples**4).mean().item() == pytest.approx(3.0, abs=0.03)
        empirical = (samples.unsqueeze(0) <= grid.unsqueeze(1)).double().mean(dim=1)
        assert (empirical - normal_cdf).abs().max().item() < 1.63 / math.sqrt(count) * 1.5
        lag = torch.corrcoef(torch.stack([samples[:-1], samples[1:]]))[0, 1].item()
        assert abs(lag) < 4 / math.sqrt(count)
        assert 4.5 < samples.abs().max().item() <= 5.9
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 4 / math.sqrt(count)
    other = normal_pair((count,), keys + 1, torch.float32)[0].double()
    assert abs(torch.corrcoef(torch.stack([first, other]))[0, 1].item()) < 4 / math.sqrt(count)


def test_counter_samples_differ_by_call_and_seed_and_repeat_by_seed() -> None:
    first = _samples(seed=1, call=0, count=4096)
    assert torch.equal(first, _samples(seed=1, call=0, count=4096))
    for other in (_samples(seed=1, call=1, count=4096), _samples(seed=2, call=0, count=4096)):
        assert abs(torch.corrcoef(torch.stack([first, other]))[0, 1].item()) < 0.07
        assert (first == other).double().mean().item() < 0.01


def test_eager_output_noise_is_the_seeded_randn_stream() -> None:
    """kernels=eager draws exactly torch.randn of a generator seeded with the seed."""
    outputs = torch.zeros(6, 5)
    OutputNoise(11, torch.device("cpu")).add_round_(outputs, 0.5, rounds=False)
    expected = torch.randn(6, 5, generator=torch.Generator().manual_seed(11)) * 0.5
    assert torch.allclose(outputs, expected)


@pytest.mark.slow
def test_compiled_periphery_equals_the_same_functions_uncompiled(monkeypatch) -> None:
    """kernels=compiled through torch.compile (C++ on the CPU) against the very same code
    path with compilation switched off; float64 so that no rounding decision can flip.
    Compiling takes tens of seconds."""
    from hetmap.runtime import analog, fused

    torch.manual_seed(0)
    weights = torch.randn(3, 40, 48, dtype=torch.float64)
    inputs = torch.randn(30, 48, dtype=torch.float64) * torch.rand(30, 1, dtype=torch.float64)
    groups = RowGroups.from_sorted(torch.randint(0, 3, (30,)).sort().values, 3)
    settings_ = AnalogSettings(rows=32, cols=16, noise_scale=1.0, out_noise=0.1, out_bound=4.0,
                               kernels="compiled")
    outputs = [AnalogTileStack(weights, settings_, 3)(inputs, groups) for _ in range(2)]
    with monkeypatch.context() as patch:
        for module in (analog, fused):
            patch.setattr(module, "compiled", lambda function: function)
        expected = AnalogTileStack(weights, settings_, 3)(inputs, groups)
    assert torch.equal(outputs[0], outputs[1])  # seeded
    assert torch.allclose(outputs[0], expected, rtol=1e-9, atol=1e-9)
    exact = torch.einsum("si,soi->so", inputs, weights[groups.row_matrix])
    assert ((outputs[0] - exact).norm() / exact.norm()).item() > 1e-3  # noise did something


@settings(max_examples=20, deadline=None)
@given(
    num=st.integers(1, 3), out_features=st.integers(1, 70), in_features=st.integers(1, 70),
    rows=st.integers(3, 20), cols=st.integers(3, 20), chunk=st.integers(1, 2000),
    columnwise=st.booleans(),
)
def test_programming_in_chunks_equals_one_call(num: int, out_features: int, in_features: int,
                                               rows: int, cols: int, chunk: int,
                                               columnwise: bool) -> None:
    """Noise off, so programming is deterministic: the chunked tile bookkeeping (partial
    tiles, per-tile scales) must give exactly the one-call result."""
    weights = torch.randn(num, out_features, in_features,
                          generator=torch.Generator().manual_seed(chunk))
    analog = AnalogSettings(rows=rows, cols=cols, noise_scale=0.0,
                            weight_scaling_columnwise=columnwise)
    whole = program_matrices(weights, rows, cols, analog, make_noise_model(analog))
    chunked = program_in_chunks(weights, analog, make_noise_model(analog), chunk)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


def test_in_place_pcm_noise_matches_aihwkit_statistics() -> None:
    """hetmap's PCM programming against aihwkit's own apply_programming_noise on the same
    normalized weights: per weight bin, the error's std agrees within 5% and its mean within
    4 standard errors."""
    from hetmap.runtime.programming import _pcm_programming

    torch.manual_seed(0)
    weights = torch.linspace(-1.0, 1.0, 201).repeat(2000, 1)
    model = make_noise_model(AnalogSettings(noise_scale=1.5))
    ours = _pcm_programming(weights, model) - weights
    theirs = model.apply_programming_noise(weights)[0] - weights
    for low, high in ((0, 20), (60, 100), (100, 101), (150, 201)):
        mine, reference = ours[:, low:high], theirs[:, low:high]
        assert mine.std().item() == pytest.approx(reference.std().item(), rel=0.05)
        standard_error = math.sqrt(2.0 / mine.numel()) * reference.std().item()
        assert abs(mine.mean().item() - reference.mean().item()) < 4 * standard_error


def _uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    from hetmap.runtime import analog

    for module in (analog, fused):
        monkeypatch.setattr(module, "compiled", lambda function: function)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("drift_time", [None, 3600.0], ids=["programming", "drift"])
def test_compiled_programming_equals_the_same_functions_uncompiled(
        drift_time: float | None, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels=compiled programming (PCM; with drift, read noise and GDC) through
    torch.compile against the very same functions uncompiled, on matrices that leave tiles
    partly empty, programmed a few tiles per call: equal within 2e-6 of the weights' scale
    (float32; the compiled kernels use vectorised log/sin/cos). A seed repeats its tiles,
    another seed gives others. On a GPU the kernels are Triton's."""
    torch.manual_seed(0)
    weights = torch.randn(3, 70, 90).to(device)
    analog = AnalogSettings(rows=32, cols=32, noise_scale=1.5, drift_time=drift_time,
                            kernels="compiled")
    model = make_noise_model(analog)

    def programmed(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with seeded(seed, weights.device):
            return program_in_chunks(weights, analog, model, 2000)

    compiled = programmed(1)
    assert all(torch.equal(a, b) for a, b in zip(compiled, programmed(1), strict=True))
    assert not torch.equal(compiled[0], programmed(2)[0])
    with monkeypatch.context() as patch:
        _uncompiled(patch)
        reference = programmed(1)
    scale = weights.abs().max().item()
    assert (compiled[0] - reference[0]).abs().max().item() < 2e-6 * scale
    assert torch.allclose(compiled[1], reference[1], rtol=2e-6)
    tiles, scales = compiled  # [E, out, in], [E, in tiles, out]
    effective = tiles * scales.repeat_interleave(32, dim=1)[:, :90].transpose(1, 2)
    error = (effective - weights).norm() / weights.norm()
    assert 0.01 < error.item() < 0.5  # the noise is there, at a sane size


@pytest.mark.parametrize(("drift_time", "columnwise"),
                         [(None, False), (3600.0, False), (3600.0, True)],
                         ids=["programming", "drift", "drift-columnwise"])
def test_compiled_programming_with_eagers_draws_equals_eager(
        drift_time: float | None, columnwise: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels=compiled's one function per chunk (scaling, programming, drift, GDC), handed the
    normal samples kernels=eager draws for the same seed in place of its own, gives eager's
    tiles and output scales within float rounding (its ratio is a float32 tensor, eager's a
    double): on matrices that leave tiles partly empty, programmed a few tiles per call."""
    from hetmap.runtime import programming

    _uncompiled(monkeypatch)
    torch.manual_seed(0)
    weights = torch.randn(3, 70, 90)
    base = AnalogSettings(rows=32, cols=32, noise_scale=1.5, drift_time=drift_time,
                          weight_scaling_columnwise=columnwise)
    model = make_noise_model(base)
    torch.manual_seed(1)
    eager = program_in_chunks(weights, base, model, 2000)
    draws: list[torch.Tensor] = []

    def eager_draws(shape: torch.Size, _keys: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not draws:  # one chunk's draws, in eager's order (programming, then drift)
            noise = torch.empty((2 if drift_time is None else 4, *shape), dtype=dtype)
            draws.extend(noise.normal_().unbind(0))
        return draws.pop(0), draws.pop(0)

    monkeypatch.setattr(fused, "normal_pair", eager_draws)
    monkeypatch.setattr(fused, "program_keys", lambda count, device: torch.zeros(count))
    torch.manual_seed(1)
    compiled = program_in_chunks(weights, dataclasses.replace(base, kernels="compiled"),
                                 model, 2000)
    assert not draws
    assert programming._is_plain_pcm(model)
    for ours, reference in zip(compiled, eager, strict=True):
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("drift_time", [None, 3600.0], ids=["programming", "drift"])
def test_counter_programming_matches_aihwkit_statistics(
        drift_time: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels=compiled draws its own samples (rule 6) for PCM programming, and drift: per
    weight bin the programmed (drifted) weight's error std within 5% of aihwkit's own noise
    model on the same weights, its mean within 4 standard errors (1.6 M weights)."""
    from unittest import mock

    from hetmap.runtime import programming

    _uncompiled(monkeypatch)
    analog = AnalogSettings(rows=201, cols=8000, noise_scale=1.5, drift_time=drift_time,
                            gdc=False, kernels="compiled")
    model = make_noise_model(analog)
    weights = torch.linspace(-1.0, 1.0, 201).repeat(8000, 1).view(1, 1, 8000, 1, 201)
    torch.manual_seed(0)  # one 8000 x 201 tile whose abs-max is 1 (no rescaling)
    ours = program_matrices(weights.view(1, 8000, 201), 201, 8000, analog, model)
    assert torch.equal(ours[1], torch.ones_like(ours[1]))  # no rescaling, no GDC
    with mock.patch.object(programming, "_is_plain_pcm", lambda _model: False):
        theirs = programming._noise_all_tiles(weights, None, model, analog)
    index = 0 if drift_time is None else 1
    mine_all = ours[0].view(weights.shape) - weights
    reference_all = theirs[index] - weights  # type: ignore[operator]
    for low, high in ((0, 20), (60, 100), (100, 101), (150, 201)):
        mine, reference = mine_all[..., low:high], reference_all[..., low:high]
        assert mine.std().item() == pytest.approx(reference.std().item(), rel=0.05)
        standard_error = math.sqrt(2.0 / mine.numel()) * reference.std().item()
        assert abs(mine.mean().item() - reference.mean().item()) < 4 * standard_error


def test_a_machine_where_torch_compile_fails_gets_one_line(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """No working C++ compiler (torch's own error, raised at the first compiled call): one
    SimulationError naming the cause and the way out, and through the CLI one line, exit 2."""
    from torch._inductor.exc import InvalidCxxCompiler

    from hetmap.common.errors import SimulationError
    from hetmap.compiler.cli import main

    def broken(function, **_options):
        def run(*_args):
            raise InvalidCxxCompiler()
        return run

    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused.torch, "compile", broken)
    with pytest.raises(SimulationError, match=r"kernels=compiled: torch.compile cannot build "
                       r"its kernels here \(No working C\+\+ compiler.*--kernels eager"):
        AnalogTileStack(torch.randn(2, 8, 8), AnalogSettings(rows=8, cols=8, kernels="compiled"), 0)
    code = main(["simulate", "olmoe-tiny", "--kernels", "compiled", "--eval-tokens", "256",
                 "--calib-tokens", "256"])
    err = capsys.readouterr().err
    assert code == 2 and "torch.compile cannot build its kernels" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_periphery_on_cuda_equals_eager(dtype: torch.dtype) -> None:
    """On a GPU, kernels=compiled (Triton) against eager, output noise and programming noise
    off: the same arithmetic, so equal up to float rounding of the dtype. (With programming
    noise the two draw different samples: rule 6.)"""
    torch.manual_seed(0)
    device = torch.device("cuda")
    weights = torch.randn(4, 256, 512, device=device, dtype=dtype)
    inputs = torch.randn(300, 512, device=device, dtype=dtype)
    groups = RowGroups.from_sorted(torch.randint(0, 4, (300,), device=device).sort().values, 4)
    base = AnalogSettings(rows=256, cols=128, noise_scale=0.0)
    eager = AnalogTileStack(weights, base, 1)(inputs, groups)
    compiled = AnalogTileStack(weights, dataclasses.replace(base, kernels="compiled"), 1)
    outputs = compiled(inputs, groups)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((outputs.float() - eager.float()).norm() / eager.float().norm()).item() < tolerance
