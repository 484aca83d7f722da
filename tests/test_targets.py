"""Tests for hetmap.targets: presets, TOML validation, loading and the capability predicate."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from hetmap.common.errors import TargetError
from hetmap.targets import (
    DEFAULT_TARGET,
    NOISE_MODELS,
    aimc_supports,
    builtin_targets,
    load_target,
    target_from_dict,
)

PRESETS = ["aimc-512", "hermes-256", "3d-aimc"]


def _valid() -> dict[str, Any]:
    return copy.deepcopy(load_target(DEFAULT_TARGET).to_json())


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(TargetError) as raised:
        target_from_dict(data, "x.toml")
    message = str(raised.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name: str) -> None:
    target = load_target(name)
    assert target.name == name
    assert target.aimc.noise.model in NOISE_MODELS
    assert target_from_dict(target.to_json()) == target


def test_builtin_targets_are_the_toml_files() -> None:
    found = builtin_targets()
    assert set(PRESETS) <= set(found)
    assert all(path.suffix == ".toml" and path.is_file() for path in found.values())


def test_default_target_is_the_papers_setup() -> None:
    aimc = load_target().aimc
    assert (aimc.rows, aimc.cols, aimc.dac_bits, aimc.adc_bits) == (512, 512, 8, 8)
    assert aimc.noise.model == "pcm"
    assert aimc.noise.kwargs()["prog_noise_scale"] == 1.5


def test_hermes_figures_follow_from_the_published_chip_numbers() -> None:
    aimc = load_target("hermes-256").aimc
    macs = 256 * 256
    assert aimc.arrays_per_chip == 64
    assert aimc.mvm_energy_j == pytest.approx(2 * macs / 9.76e12, rel=0.01)  # J = ops / (op/J)
    assert aimc.mvm_latency_s == pytest.approx(2 * macs / (63.1e12 / 64), rel=0.01)


def test_3d_preset_has_tiers_and_fits_olmoe() -> None:
    aimc = load_target("3d-aimc").aimc
    assert aimc.tiers > 1
    assert aimc.arrays_available() >= 26060
    assert aimc.arrays_available(chips=2) == 2 * aimc.arrays_per_chip * aimc.tiers


def test_load_target_from_path(tmp_path: Path) -> None:
    text = builtin_targets()["aimc-512"].read_text().replace("rows = 512", "rows = 256")
    path = tmp_path / "mine.toml"
    path.write_text(text)
    assert load_target(str(path)).aimc.rows == 256


def test_zero_size_in_a_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(builtin_targets()["aimc-512"].read_text().replace("rows = 512", "rows = 0"))
    with pytest.raises(TargetError, match=r"x\.toml: aimc\.rows must be a positive integer, got 0"):
        load_target(str(path))


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(TargetError, match="unknown target 'nope'.*aimc-512.*hermes-256"):
        load_target("nope")


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="no such target file"):
        load_target(str(tmp_path / "absent.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(TargetError, match="bad.toml: invalid TOML"):
        load_target(str(bad))


def test_missing_field() -> None:
    data = _valid()
    del data["aimc"]["rows"]
    assert _error(data) == "x.toml: aimc.rows is missing"


def test_missing_table() -> None:
    data = _valid()
    del data["digital"]
    assert "x.toml: digital is missing" in _error(data)


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("aimc", "rows", 0, "aimc.rows must be a positive integer, got 0"),
        ("aimc", "cols", -4, "aimc.cols must be a positive integer, got -4"),
        ("aimc", "chips", 2.5, "aimc.chips must be a positive integer, got 2.5"),
        ("aimc", "tiers", True, "aimc.tiers must be a positive integer, got True"),
        ("aimc", "dac_bits", 0, "aimc.dac_bits must be an integer from 1 to 32, got 0"),
        ("aimc", "packing", "yes", "aimc.packing must be true or false, got 'yes'"),
        ("aimc", "out_noise", -0.1, "aimc.out_noise must be a number >= 0, got -0.1"),
        ("aimc", "mvm_energy_j", 0, "aimc.mvm_energy_j must be a positive number, got 0"),
        ("digital", "mem_bandwidth", "fast", "digital.mem_bandwidth must be a positive number"),
    ],
)
def test_bad_values_name_the_field(section: str, field: str, value: Any, expected: str) -> None:
    data = _valid()
    data[section][field] = value
    assert _error(data).startswith(f"x.toml: {expected}")


def test_unknown_noise_model() -> None:
    data = _valid()
    data["aimc"]["noise"]["model"] = "memristor"
    message = _error(data)
    assert message.startswith("x.toml: aimc.noise.model must be one of pcm, hermes")
    assert message.endswith("got 'memristor'")


def test_noise_parameters_are_checked_against_the_model() -> None:
    data = _valid()
    data["aimc"]["noise"]["params"]["num_devices"] = 2  # a HermesNoiseModel argument
    assert "aimc.noise.params.num_devices is not a parameter of the 'pcm'" in _error(data)
    data = _valid()
    data["aimc"]["noise"]["params"]["prog_coeff"] = [0.26, "x"]
    assert "aimc.noise.params.prog_coeff must be a non-empty list of numbers" in _error(data)


def test_unknown_field_is_rejected() -> None:
    data = _valid()
    data["aimc"]["row"] = 512
    assert _error(data).startswith("x.toml: aimc.row is not a known field (known: rows, cols")


def test_optional_fields_take_defaults() -> None:
    data = _valid()
    del data["aimc"]["tiers"], data["description"], data["aimc"]["noise"]["params"]
    target = target_from_dict(data)
    assert target.aimc.tiers == 1 and target.description == ""
    assert target.aimc.noise.kwargs() == {}


@pytest.mark.parametrize("kind", ["attention", "router", "expert", "shared-expert",
                                  "dense-ffn", "linear", "lm-head"])
def test_matrix_kinds_are_supported(kind: str) -> None:
    ok, why = aimc_supports(load_target(), kind, (1024, 2048), weights_static=True)
    assert ok and why


@pytest.mark.parametrize("kind", ["embedding", "norm", "op"])
def test_non_matrix_kinds_are_not(kind: str) -> None:
    ok, why = aimc_supports(load_target(), kind, (50304, 2048), weights_static=True)
    assert not ok and why.startswith("not a matrix multiply")


def test_dynamic_weights_and_bad_shapes_are_not_supported() -> None:
    target = load_target()
    assert aimc_supports(target, "linear", (8, 8), weights_static=False) == (
        False, "weights not static")
    assert not aimc_supports(target, "linear", (8, 8, 8), weights_static=True)[0]
    assert aimc_supports(target, "mystery", (8, 8), True) == (False, "unknown node kind 'mystery'")


def test_one_list_of_noise_models_for_targets_and_the_simulator() -> None:
    """Every noise model the simulator accepts is a valid target noise model, and back."""
    from hetmap.common.noise import NOISE_MODELS as COMMON
    from hetmap.runtime.settings import NOISE_MODELS as RUNTIME
    from hetmap.targets import NOISE_MODELS as TARGETS
    from hetmap.targets import load_target

    assert RUNTIME is COMMON and TARGETS is COMMON and "reram-cmo" in COMMON
    data = load_target("aimc-512").to_json()
    data["aimc"]["noise"] = {"model": "reram-cmo", "params": {}}
    from hetmap.targets import target_from_dict

    assert target_from_dict(data).aimc.noise.model == "reram-cmo"


def _custom_target(tmp_path: Path, params: str) -> Path:
    """aimc-512 with its [aimc.noise.params] table replaced by ``params``."""
    text = builtin_targets()["aimc-512"].read_text()
    head, _, tail = text.partition("[aimc.noise.params]\n")
    path = tmp_path / "custom.toml"
    path.write_text(head + "[aimc.noise.params]\n" + params + "\n" + tail[tail.index("[digital]"):])
    return path


def test_noise_parameters_reach_the_noise_model(tmp_path: Path) -> None:
    """Every [aimc.noise.params] entry of a target is the simulated noise model's (settings
    rule 13), not only its programming-noise scale; the settings round-trip through JSON."""
    import dataclasses
    import json

    from hetmap.runtime import AnalogSettings
    from hetmap.runtime.programming import make_noise_model
    from hetmap.runtime.settings import settings_for

    path = _custom_target(tmp_path, "prog_noise_scale = 2.0\nprog_coeff = [0.1, 0.2, 0.3]\n"
                          "prog_coeff_g_max_reference = 30.0\ng_max = 20.0\nt_0 = 10.0\n"
                          "t_read = 1.0e-6\nread_noise_scale = 0.25\ndrift_scale = 0.5")
    settings = settings_for(load_target(str(path)))
    model: Any = make_noise_model(settings)
    assert model.prog_noise_scale == 2.0 and list(model.prog_coeff) == [0.1, 0.2, 0.3]
    assert model.prog_coeff_g_max_reference == 30.0 and model.g_max == 20.0
    assert (model.t_0, model.t_read, model.read_noise_scale, model.drift_scale) == (
        10.0, 1.0e-6, 0.25, 0.5)
    assert make_noise_model(dataclasses.replace(settings, read_noise=False)).read_noise_scale == 0
    assert AnalogSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


def test_a_target_without_programming_noise_simulates_as_noise_scale_zero(tmp_path: Path
                                                                           ) -> None:
    """A target whose PCM polynomial is zero has no programming noise: its simulation equals
    the default target's at --noise-scale 0 (before rule 13 its coefficients were ignored and
    the default polynomial's noise simulated)."""
    from hetmap.compiler.api import compile_model

    quiet = _custom_target(tmp_path, "prog_noise_scale = 1.5\nprog_coeff = [0.0, 0.0, 0.0]")
    # max-norm: a placement that does not depend on the noise model, so the plans are equal
    options = dict(pipeline="density,expert-score,place,tile,allocate,cost", calib_tokens=256,
                   policy="max-norm")
    mapped = compile_model("demo", target=str(quiet), **options).simulate(seeds=1, eval_tokens=512)
    default = compile_model("demo", **options).simulate(seeds=1, eval_tokens=512, noise_scale=0.0)
    noisy = compile_model("demo", **options).simulate(seeds=1, eval_tokens=512)
    assert mapped.mapped_ppl_mean == pytest.approx(default.mapped_ppl_mean, rel=1e-9)
    assert abs(noisy.mapped_ppl_mean - default.mapped_ppl_mean) > 1e-4


def test_targets_command_shows_the_noise_model_as_built(tmp_path: Path, capsys) -> None:
    """``hetmap targets TARGET``: the target's tables and every noise-model parameter as the
    simulator uses it (aihwkit's defaults filled in, the target's own values where it sets
    them); a target whose model cannot be built is one error and prints nothing else."""
    from hetmap.compiler.cli import main

    assert main(["targets", "aimc-512"]) == 0
    shown = capsys.readouterr().out
    assert "prog_noise_scale=1.5" in shown and "prog_coeff=[0.26348, 1.965, -1.1731]" in shown
    assert "[aimc] rows=512" in shown
    custom = _custom_target(tmp_path, "prog_noise_scale = 2.0\ndrift_scale = 0.5\nt_0 = 10.0")
    assert main(["targets", str(custom)]) == 0
    shown = capsys.readouterr().out
    assert "drift_scale=0.5" in shown and "t_0=10.0" in shown and "prog_noise_scale=2.0" in shown
    bad = _custom_target(tmp_path, "prog_noise_scale = 1.0").read_text().replace(
        'model = "pcm"', 'model = "hermes"').replace("prog_noise_scale = 1.0",
                                                     "prog_noise_scale = 1.0\ng_max = 30.0")
    (tmp_path / "bad.toml").write_text(bad)
    assert main(["targets", str(tmp_path / "bad.toml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ")
    assert "g_max 20.7" in captured.err and "\n" not in captured.err.strip()
    assert main(["targets"]) == 0 and "hermes-256" in capsys.readouterr().out
