"""Per-batch programming (settings rule 12): the tiles are programmed at every forward, a
group of matrices at a time, from the model's own weights. Same programming noise as resident
tiles for a seed; no tile memory kept."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from hetmap.common.errors import SimulationError
from hetmap.runtime import AnalogSettings, AnalogTileStack, build_simulated_model, fused
from hetmap.runtime import analog as analog_module
from hetmap.runtime.analog import DigitalStack, StackView
from hetmap.runtime.grouped import RowGroups

NOISY = AnalogSettings(rows=16, cols=8, noise_scale=3.0, out_bound=4.0)


def _rows_for(num_matrices: int, rows: int, seed: int, skip: int | None = None) -> RowGroups:
    generator = torch.Generator().manual_seed(seed)
    row_matrix = torch.randint(0, num_matrices, (rows,), generator=generator)
    if skip is not None:  # a matrix no row goes to: its group is still programmed
        row_matrix = row_matrix[row_matrix != skip]
    return RowGroups.from_sorted(row_matrix.sort().values, num_matrices)


def _per_batch(settings: AnalogSettings) -> AnalogSettings:
    return dataclasses.replace(settings, programming="per-batch")


@pytest.mark.parametrize("settings", [
    NOISY,
    dataclasses.replace(NOISY, drift_time=3600.0),
    dataclasses.replace(NOISY, noise_model="reram", noise_scale=1.0),
    dataclasses.replace(NOISY, ideal=True),
    dataclasses.replace(NOISY, drift_time=3600.0, kernels="compiled"),
], ids=["pcm", "pcm-drift", "reram", "ideal", "pcm-drift-counter"])
@pytest.mark.parametrize(("group_elements", "chunk", "groups_of"), [
    (1 << 24, 1 << 18, 7),  # the defaults: one group
    (960, 480, 2),  # a chunk per matrix: groups of 2 matrices
    (960, 1000, 2),  # two matrices per chunk
    (960, 100, 2),  # chunks of a few tiles of one matrix
    (2000, 1000, 4),
], ids=["one-group", "chunk-1", "chunk-2", "chunk-tiles", "groups-of-4"])
def test_per_batch_stack_equals_resident(settings: AnalogSettings, group_elements: int,
                                         chunk: int, groups_of: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks (gate, up) of 7 matrices, a subset view of a store, one matrix without rows;
    one group for all matrices, or groups cut in several ways. With bound management
    clipping (out_bound 4) the merge order may differ: 1e-6 relative. kernels=compiled (its
    counter-based programming noise keyed from the generator) runs uncompiled here: the keys
    must stay in step, and the compiled kernels equal these functions (test_sim_fused)."""
    monkeypatch.setattr(fused, "compiled", lambda function: function)
    monkeypatch.setattr(analog_module, "_PER_BATCH_GROUP_ELEMENTS", {"cpu": group_elements})
    monkeypatch.setattr(analog_module, "_PROGRAM_CHUNK_ELEMENTS", {"cpu": chunk})
    grid = analog_module.TileGrid.build(24, (20, 20), settings.rows, settings.cols)
    assert min(7, analog_module._group_size(grid, settings, chunk, group_elements)) == groups_of
    torch.manual_seed(0)
    store = torch.randn(9, 40, 24)
    chosen = torch.tensor([0, 2, 3, 4, 5, 7, 8])
    gate, up = StackView(store[:, :20], chosen), StackView(store[:, 20:], chosen)
    inputs = torch.randn(50, 24) * 3
    groups = _rows_for(7, 50, 1, skip=3)
    inputs = inputs[: groups.row_matrix.numel()]
    resident = AnalogTileStack([gate, up], settings, 5, out_splits=(20, 20))
    lazy = AnalogTileStack([gate, up], _per_batch(settings), 5, out_splits=(20, 20))
    assert not any(True for _ in lazy.buffers())  # no tile memory kept
    expected = resident(inputs, groups)
    got = lazy(inputs, groups)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert torch.equal(lazy(inputs, groups), got)  # the same noise at every forward


def test_per_batch_draws_the_resident_noise_not_a_fresh_one() -> None:
    """Per-batch tiles of seed 5 are those of resident seed 5, not of seed 6."""
    torch.manual_seed(1)
    weights = torch.randn(3, 16, 16)
    inputs, groups = torch.randn(12, 16), _rows_for(3, 12, 2)
    lazy = AnalogTileStack(weights, _per_batch(NOISY), 5)(inputs, groups)
    same = AnalogTileStack(weights, NOISY, 5)(inputs, groups)
    other = AnalogTileStack(weights, NOISY, 6)(inputs, groups)
    assert torch.allclose(lazy, same, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(lazy, other, rtol=1e-3, atol=1e-3)


def test_per_batch_digital_stack_reads_the_store() -> None:
    torch.manual_seed(2)
    store = torch.randn(6, 10, 12, dtype=torch.float64)
    chosen = torch.tensor([1, 4, 5])
    inputs, groups = torch.randn(9, 12, dtype=torch.float64), _rows_for(3, 9, 3)
    resident = DigitalStack([StackView(store[:, :4], chosen), StackView(store[:, 4:], chosen)])
    lazy = DigitalStack([StackView(store[:, :4], chosen), StackView(store[:, 4:], chosen)],
                        resident=False)
    assert not any(True for _ in lazy.buffers())
    exact = torch.cat([inputs[i:i + 1] @ store[chosen[m]].T for i, m in
                       enumerate(groups.row_matrix.tolist())])
    assert torch.allclose(resident(inputs, groups), exact)
    assert torch.allclose(lazy(inputs, groups), exact)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split-neurons"])
def test_per_batch_model_equals_resident(tiny_olmoe: Callable[..., torch.nn.Module],
                                         attention_linears: Callable[..., set[str]],
                                         split: bool) -> None:
    """A tiny OLMoE, attention and experts 0, 1, 3 of every layer analog (2 digital), with and
    without neurons of expert 1 split off: logits of both modes within 1e-5."""
    model = tiny_olmoe(seed=3)
    experts = {name: [0, 1, 3] for name, _ in model.named_modules() if name.endswith("experts")}
    neurons = {name: {1: (0, 5, 7)} for name in experts} if split else None
    settings = dataclasses.replace(NOISY, rows=16, cols=16, noise_scale=2.0)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    logits = {}
    for mode in ("resident", "per-batch"):
        simulated = build_simulated_model(
            model, attention_linears(model), experts,
            dataclasses.replace(settings, programming=mode), seed=9, digital_neurons=neurons)
        with torch.no_grad():
            logits[mode] = simulated(tokens).logits
    digital = model(tokens).logits.detach()
    assert not torch.allclose(logits["resident"], digital, atol=1e-3)
    assert torch.allclose(logits["per-batch"], logits["resident"], rtol=1e-5, atol=1e-5)


def test_unknown_programming_mode_is_one_line() -> None:
    with pytest.raises(SimulationError, match="programming.*resident, per-batch"):
        AnalogSettings(programming="lazy")
