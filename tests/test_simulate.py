"""Simulating plans: ideal equals digital, noise hurts monotonically, seeds reproduce, the CLI
writes simulation.json, and sweeps give identical numbers serially, in processes and on Ray."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import TINY

from hetmap.compiler.api import compile_model
from hetmap.compiler.cli import main
from hetmap.compiler.evaluation.simulate import analog_part, settings_for
from hetmap.runtime import build_simulated_model

FAST = {"calib_tokens": 256}


@pytest.mark.parametrize("name", TINY)
def test_ideal_all_analog_logits_equal_digital(name: str) -> None:
    plan = compile_model(name, policy="none", dense="analog", **FAST)
    model = plan.model.runnable()
    part = analog_part(plan.graph, model)
    assert part.experts and part.linears  # experts and dense matrices really are analog
    simulated = build_simulated_model(model, part.linears, part.experts,
                                      settings_for(plan.target, ideal=True), seed=0)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
        got = simulated(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_all_digital_plan_gives_digital_perplexity_exactly() -> None:
    plan = compile_model("mixtral-tiny", policy="all", **FAST)
    result = plan.simulate(seeds=2, eval_tokens=1024)
    assert result.analog_experts == 0 and result.analog_linears == 0
    assert result.mapped_ppl == [result.digital_ppl, result.digital_ppl]


def test_noise_raises_perplexity_monotonically_and_seeds_reproduce() -> None:
    # a trained model: on random weights perplexity is ~vocabulary size whatever the noise
    plan = compile_model("demo", policy="none", **FAST)
    means = []
    for scale in (0.0, 3.0, 12.0):
        result = plan.simulate(seeds=3, noise_scale=scale, eval_tokens=1024)
        means.append(statistics.fmean(result.mapped_ppl))
    digital = result.digital_ppl
    assert digital <= means[0] * 1.01  # converters alone cost little
    assert means[0] < means[1] < means[2]
    again = plan.simulate(seeds=3, noise_scale=12.0, eval_tokens=1024)
    assert again.mapped_ppl == result.mapped_ppl  # same seeds: identical
    assert len(set(result.mapped_ppl)) == 3  # different seeds: different programming


def test_simulate_cli_on_model_and_plan(tmp_path, capsys) -> None:
    out = tmp_path / "sim"
    code = main(["simulate", "olmoe-tiny", "-o", str(out), "--seeds", "2", "--eval-tokens", "512",
                 "--calib-tokens", "256"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "simulation.json").read_text())
    for key in ("digital_ppl", "mapped_ppl_mean", "mapped_ppl_std", "seeds", "settings"):
        assert key in data
    assert data["seeds"] == [0, 1] and data["settings"]["noise_scale"] == 1.5
    assert "all digital" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0 and "mapped" in capsys.readouterr().out
    code = main(["simulate", str(out), "--seeds", "1", "--eval-tokens", "512", "--ideal"])
    assert code == 0
    again = json.loads((out / "simulation.json").read_text())
    assert again["settings"]["ideal"] and again["mapped_ppl"] == [pytest.approx(again["digital_ppl"], rel=1e-6)]


def test_simulate_errors_are_one_line(tmp_path, capsys) -> None:
    code = main(["simulate", "olmoe-tiny", "--seeds", "0", "--calib-tokens", "256"])
    assert code == 2 and "0 is not in the range x>=1" in capsys.readouterr().err
    code = main(["simulate", "olmoe-tiny", "--eval", str(tmp_path / "missing.txt"), "--calib-tokens", "256"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_simulate_cli_programming_and_stream(tmp_path, capsys) -> None:
    """--programming per-batch gives the resident figures and says so; --stream on a model
    that is not a checkpoint runs loaded; a streamed aihwkit run is one line."""
    from hetmap.compiler.frontend import load_model

    common = ["--seeds", "2", "--eval-tokens", "512", "--calib-tokens", "256"]
    results = {}
    for mode in ("resident", "per-batch"):
        out = tmp_path / mode
        assert main(["simulate", "olmoe-tiny", "-o", str(out), "--programming", mode,
                     *common]) == 0
        assert ("programmed per batch" if mode == "per-batch" else "programmed once per seed") \
            in capsys.readouterr().out
        results[mode] = json.loads((out / "simulation.json").read_text())
        assert results[mode]["programming"] == mode and not results[mode]["streamed"]
    assert results["per-batch"]["mapped_ppl"] == pytest.approx(results["resident"]["mapped_ppl"],
                                                               rel=1e-6)
    load_model("olmoe-tiny").module.save_pretrained(tmp_path / "ckpt")
    code = main(["simulate", str(tmp_path / "ckpt"), "--stream", "on", "--backend", "aihwkit",
                 "--pipeline", "density{calib_tokens=256,stream=on},expert-score,place", *common])
    err = capsys.readouterr().err
    assert code == 2 and "streamed simulation runs the hetmap backend only" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code = main(["simulate", "olmoe-tiny", "--backend", "aihwkit", "--programming", "per-batch",
                 *common])
    err = capsys.readouterr().err
    assert code == 2 and "--programming per-batch is a mode of hetmap's tiles" in err


@pytest.mark.slow
def test_simulate_cli_compiled_kernels(tmp_path, capsys) -> None:
    """--kernels compiled (torch.compile, compiling once) runs hetmap's tiles through the
    compiled kernels and records it; their samples are other than eager's, the damage of the
    same size: on demo (trained; a seed's gap spreads by about half of the mean) the mean
    mapped-minus-digital gaps of 3 seeds within a factor 2.5 of each other. With the aihwkit
    backend, or a value click does not know, it is one line."""
    common = ["--seeds", "3", "--eval-tokens", "1024", "--calib-tokens", "1024",
              "--drift-time", "3600"]
    gaps = {}
    for kernels in ("eager", "compiled"):
        out = tmp_path / kernels
        assert main(["simulate", "demo", "-o", str(out), "--kernels", kernels,
                     *common]) == 0, capsys.readouterr().err
        capsys.readouterr()
        data = json.loads((out / "simulation.json").read_text())
        assert data["settings"]["kernels"] == kernels
        gaps[kernels] = data["mapped_ppl_mean"] - data["digital_ppl"]
    assert gaps["eager"] > 0 and 0.4 < gaps["compiled"] / gaps["eager"] < 2.5
    code = main(["simulate", "olmoe-tiny", "--backend", "aihwkit", "--kernels", "compiled",
                 *common])
    err = capsys.readouterr().err
    assert code == 2 and "--kernels compiled is a mode of hetmap's tiles" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["simulate", "olmoe-tiny", "--kernels", "fused", *common]) == 2
    assert "Invalid value for '--kernels'" in capsys.readouterr().err


def test_simulate_cli_sdpa_attention(tmp_path, capsys) -> None:
    """--attention sdpa: the digital perplexity of eager attention within 1e-6 and every
    seed's mapped one within 1e-3 (float rounding, which the ADC's rounding can carry), said
    in the report and recorded; the model runs eager attention again afterwards; an unknown
    value and a model without a choice of attention are one line."""
    from hetmap.common.errors import SimulationError
    from hetmap.compiler.evaluation.simulate import attention_implementation

    common = ["--seeds", "2", "--eval-tokens", "1024", "--calib-tokens", "256"]
    runs = {}
    for attention in ("eager", "sdpa"):
        out = tmp_path / attention
        assert main(["simulate", "olmoe-tiny", "-o", str(out), "--attention", attention,
                     *common]) == 0
        header = capsys.readouterr().out.splitlines()[0]
        assert ("sdpa attention" in header) == (attention == "sdpa")
        runs[attention] = json.loads((out / "simulation.json").read_text())
        assert runs[attention]["attention"] == attention
    assert runs["sdpa"]["digital_ppl"] == pytest.approx(runs["eager"]["digital_ppl"], rel=1e-6)
    assert runs["sdpa"]["mapped_ppl"] == pytest.approx(runs["eager"]["mapped_ppl"], rel=1e-3)
    plan = compile_model("olmoe-tiny", **FAST)
    plan.simulate(eval_tokens=256, attention="sdpa")
    assert plan.model.runnable().config._attn_implementation == "eager"
    assert main(["simulate", "olmoe-tiny", "--attention", "flash", *common]) == 2
    assert "Invalid value for '--attention'" in capsys.readouterr().err
    with pytest.raises(SimulationError, match="needs a transformers model"), \
            attention_implementation(torch.nn.Linear(2, 2), "sdpa"):
        pass
    with attention_implementation(torch.nn.Linear(2, 2), "eager"):  # nothing to choose
        pass


SWEEP = ["--policies", "max-norm,random", "--budgets", "0.25", "--noise-scales", "2.5",
         "--seeds", "1", "--eval-tokens", "512", "--calib-tokens", "256"]


def test_sweep_serial_processes_and_ray_agree(tmp_path, capsys) -> None:
    pytest.importorskip("ray")
    runs = {"serial": [], "workers": ["--workers", "2"], "ray": ["--ray"]}
    results = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["sweep", "olmoe-tiny", "-o", str(out), *SWEEP, *extra]) == 0, capsys.readouterr().err
        results[name] = (out / "sweep.csv").read_text()
        assert (out / "sweep.png").stat().st_size > 0
    assert results["serial"] == results["workers"] == results["ray"]
    data = json.loads((tmp_path / "serial" / "sweep.json").read_text())
    assert [row["policy"] for row in data["summary"]] == ["max-norm", "random"]
    assert len(data["points"]) == 2
