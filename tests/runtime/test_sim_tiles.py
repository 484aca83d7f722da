"""The hetmap tile model: tiling exactness, grouped products, seeds, device handling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmap.runtime import AnalogSettings, AnalogTileStack, SimulatedLinear
from hetmap.runtime.grouped import RowGroups, grouped_product


def _rows_for(num_matrices: int, rows: int, seed: int) -> RowGroups:
    generator = torch.Generator().manual_seed(seed)
    row_matrix = torch.randint(0, num_matrices, (rows,), generator=generator).sort().values
    return RowGroups.from_sorted(row_matrix, num_matrices)


@settings(max_examples=25, deadline=None)
@given(
    num_matrices=st.integers(1, 3),
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 40),
    tile_rows=st.integers(1, 17),
    tile_cols=st.integers(1, 17),
    num_rows=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_ideal_tiled_product_equals_untiled(
    num_matrices: int,
    out_features: int,
    in_features: int,
    tile_rows: int,
    tile_cols: int,
    num_rows: int,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_matrices, out_features, in_features, generator=generator)
    inputs = torch.randn(num_rows, in_features, generator=generator)
    groups = _rows_for(num_matrices, num_rows, seed)
    stack = AnalogTileStack(weights, AnalogSettings(rows=tile_rows, cols=tile_cols, ideal=True), 0)
    expected = torch.einsum("si,soi->so", inputs, weights[groups.row_matrix])
    assert torch.allclose(stack(inputs, groups), expected, rtol=1e-5, atol=1e-5)


def test_grouped_mm_and_padded_fallback_agree() -> None:
    torch.manual_seed(0)
    weights = torch.randn(4, 24, 32)
    inputs = torch.randn(30, 32)
    groups = _rows_for(4, 30, 1)
    fast = grouped_product(inputs, weights, groups)  # float32, aligned: grouped_mm
    fallback = grouped_product(inputs.double(), weights.double(), groups)  # padded bmm
    assert torch.allclose(fast.double(), fallback, rtol=1e-5, atol=1e-5)


def test_matrix_split_across_tiles_sums_partials_digitally() -> None:
    """Quantization on, noise off: splitting the input dimension changes the result (each tile
    has its own DAC/ADC) but stays close to the exact product."""
    torch.manual_seed(0)
    weights = torch.randn(1, 48, 96)
    inputs = torch.randn(16, 96)
    exact = inputs @ weights[0].T
    errors = {}
    for rows in (96, 32):
        settings = AnalogSettings(rows=rows, cols=48, noise_scale=0.0, out_bound=8.0)
        outputs = AnalogTileStack(weights, settings, 0)(inputs)
        errors[rows] = ((outputs - exact).norm() / exact.norm()).item()
    assert 0 < errors[96] < 0.1 and 0 < errors[32] < 0.1 and errors[96] != errors[32]


def _noisy_linear(seed: int) -> SimulatedLinear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    settings = AnalogSettings(rows=32, cols=32, noise_scale=1.0, out_noise=0.05, drift_time=60.0)
    return SimulatedLinear(linear, settings, seed)


def test_same_seed_same_outputs_other_seed_other_outputs() -> None:
    inputs = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    first, again, other = _noisy_linear(7), _noisy_linear(7), _noisy_linear(8)
    assert torch.equal(first.tiles.weight, again.tiles.weight)
    assert torch.equal(first(inputs), again(inputs))
    assert not torch.equal(first.tiles.weight, other.tiles.weight)
    assert not torch.allclose(first(inputs), other(inputs))


def test_seeding_leaves_the_global_generator_alone() -> None:
    linear = torch.nn.Linear(64, 48)
    settings = AnalogSettings(rows=32, cols=32, noise_scale=1.0, out_noise=0.05, drift_time=60.0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    SimulatedLinear(linear, settings, 5)(torch.ones(2, 64))
    assert torch.equal(torch.rand(3), expected)


def test_simulated_linear_keeps_shape_bias_and_dtype() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(20, 12).to(torch.float64)
    layer = SimulatedLinear(linear, AnalogSettings(rows=8, cols=8, ideal=True), 0)
    inputs = torch.randn(3, 4, 20, dtype=torch.float64)
    outputs = layer(inputs)
    assert outputs.shape == (3, 4, 12) and outputs.dtype == torch.float64
    assert torch.allclose(outputs, linear(inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_like_on_cpu() -> None:
    torch.manual_seed(0)
    weights = torch.randn(3, 64, 128)
    inputs = torch.randn(40, 128)
    groups = _rows_for(3, 40, 2)
    ideal = AnalogSettings(rows=64, cols=32, ideal=True)
    quantized = AnalogSettings(rows=64, cols=32, noise_scale=0.0)
    noisy = AnalogSettings(rows=64, cols=32, noise_scale=2.0, out_noise=0.05, drift_time=100.0)
    device = torch.device("cuda")
    cuda_groups = RowGroups(
        *(t.to(device) for t in (groups.row_matrix, groups.counts, groups.ends))
    )
    for settings_, tolerance in ((ideal, 1e-5), (quantized, 1e-3)):
        cpu = AnalogTileStack(weights, settings_, 0)(inputs, groups)
        gpu = AnalogTileStack(weights.to(device), settings_, 0)(inputs.to(device), cuda_groups)
        assert gpu.device.type == "cuda"
        assert ((gpu.cpu() - cpu).norm() / cpu.norm()).item() < tolerance
    first = AnalogTileStack(weights.to(device), noisy, 4)
    again = AnalogTileStack(weights.to(device), noisy, 4)
    assert first.weight.device.type == "cuda"
    assert torch.equal(first(inputs.to(device), cuda_groups), again(inputs.to(device), cuda_groups))


def test_per_tile_scaling_shortcut_equals_per_column_scaling() -> None:
    """Step 6 scales [rows, column tiles] views when column tiles are uniform; the general
    path gathers a scale per output column. Both must give the same result."""
    torch.manual_seed(0)
    weights = torch.randn(3, 64, 80, dtype=torch.float64)
    inputs = torch.randn(30, 80, dtype=torch.float64)
    groups = _rows_for(3, 30, 5)
    settings = AnalogSettings(rows=32, cols=16, noise_scale=1.0, drift_time=10.0, out_noise=0.1)
    shortcut = AnalogTileStack(weights, settings, 3, out_splits=(32, 32))
    general = AnalogTileStack(weights, settings, 3, out_splits=(32, 32))
    assert shortcut._tile_width == 16
    general._tile_width = 0
    assert torch.allclose(shortcut(inputs, groups), general(inputs, groups), rtol=1e-12, atol=1e-12)
