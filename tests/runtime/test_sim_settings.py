"""AnalogSettings: defaults, dict round trip, validation messages."""

from __future__ import annotations

import pytest

from hetmap.common.errors import SimulationError
from hetmap.common.grid import TileGrid, tiles_per_matrix
from hetmap.runtime import AnalogSettings


def test_defaults_follow_the_paper_and_aihwkit() -> None:
    settings = AnalogSettings()
    assert (settings.rows, settings.cols) == (512, 512)
    assert settings.inp_res == pytest.approx(1 / 254)  # 8-bit DAC, aihwkit's convention
    assert settings.out_res == pytest.approx(1 / 254)
    assert settings.noise_management == "abs-max"
    assert settings.bound_management == "iterative"
    # aihwkit stops halving once the reduction exceeds max_bm_res / (inp_res * 2 * inp_bound).
    assert settings.max_bound_reduction == pytest.approx(0.25 * 254 / 2)


def test_from_dict_round_trip_and_dashes() -> None:
    settings = AnalogSettings.from_dict(
        {"rows": 256, "cols": 128, "noise-scale": 2.5, "drift_time": 3600.0, "adc_bits": None}
    )
    assert settings.noise_scale == 2.5 and settings.out_res == 0.0
    assert AnalogSettings.from_dict(settings.to_dict()) == settings


def test_ideal_turns_quantization_off() -> None:
    settings = AnalogSettings(ideal=True)
    assert settings.inp_res == 0.0 and settings.out_res == 0.0
    assert not settings.programs_noise and not settings.drifts


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"rows": 0}, "'rows'"),
        ({"dac_bits": 1}, "'dac_bits'"),
        ({"noise_model": "memristor"}, "'noise_model'"),
        ({"noise_scale": -1.0}, "'noise_scale'"),
        ({"drift_time": -5.0}, "'drift_time'"),
        ({"crossbar": 3}, "unknown analog setting 'crossbar'"),
    ],
)
def test_bad_settings_raise_one_line_errors(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(SimulationError, match=fragment) as caught:
        AnalogSettings.from_dict(values)
    assert "\n" not in str(caught.value)


def test_tile_counts() -> None:
    assert tiles_per_matrix(1024, 2048, 512, 512) == 8
    assert tiles_per_matrix(1000, 513, 512, 512) == 4
    grid = TileGrid.build(in_features=40, out_splits=(10, 10), rows=16, cols=8)
    assert grid.n_row_tiles == 3 and grid.n_col_tiles == 4 and grid.count == 12
    # gate and up each start on a fresh column tile
    assert grid.column_tile_index().tolist() == [0] * 8 + [1] * 2 + [2] * 8 + [3] * 2
    assert [(s.start, s.stop) for s in grid.in_slices()] == [(0, 16), (16, 32), (32, 40)]


@pytest.mark.parametrize(("model", "params", "attribute", "value"), [
    ("hermes", {"num_devices": 1, "t_0": 100.0}, "num_devices", 1),
    ("reram", {"g_max": 80.0}, "g_max", 80.0),
    ("reram-cmo", {"g_min": 1.0, "acceptance_range": 2.0}, "acceptance_range", 2.0),
    ("state-independent", {"prog_coeff": [0.3], "drift_nu_mean": 0.02}, "drift_nu_mean", 0.02),
])
def test_noise_params_build_every_noise_model(model: str, params: dict, attribute: str,
                                              value: object) -> None:
    """Rule 13 for every noise model: its parameters reach the aihwkit model; one it does not
    take is one error naming it."""
    from hetmap.common.errors import SimulationError
    from hetmap.runtime.programming import make_noise_model

    built = make_noise_model(AnalogSettings(noise_model=model, noise_params=params))
    assert getattr(built, attribute) == value
    with pytest.raises(SimulationError, match="cannot be built with the target's parameters"):
        make_noise_model(AnalogSettings(noise_model=model, noise_params={"colour": "red"}))


def test_reram_cmo_acceptance_range_must_be_a_fitted_one() -> None:
    """aihwkit replaces an acceptance range it has no coefficients for with its narrowest one,
    silently; hetmap says so instead."""
    from hetmap.common.errors import SimulationError
    from hetmap.runtime.programming import make_noise_model

    with pytest.raises(SimulationError, match="fitted at acceptance_range 0.2, 2 only; got 0.3"):
        make_noise_model(AnalogSettings(noise_model="reram-cmo",
                                        noise_params={"acceptance_range": 0.3}))


def test_hermes_g_max_beyond_its_characterization_is_one_error() -> None:
    from hetmap.common.errors import SimulationError
    from hetmap.runtime.programming import make_noise_model

    with pytest.raises(SimulationError, match="up to g_max 20.7 uS with 2 device"):
        make_noise_model(AnalogSettings(noise_model="hermes", noise_params={"g_max": 30.0}))
    with pytest.raises(SimulationError, match="up to g_max 10.35 uS with 1 device"):
        make_noise_model(AnalogSettings(noise_model="hermes",
                                        noise_params={"g_max": 15.0, "num_devices": 1}))
    assert make_noise_model(AnalogSettings(noise_model="hermes",
                                           noise_params={"g_max": 15.0})).g_max == 15.0
