"""--device-map: a model placed across devices and disk by accelerate simulates as it does
loaded whole (same seeds, same figures); offloaded modules are simulated from their weights
at every call; every mistake in a map is one line."""

from __future__ import annotations

import json

import pytest

from hetmap.compiler.api import compile_model
from hetmap.compiler.cli import main
from hetmap.compiler.evaluation.simulate import analog_part
from hetmap.compiler.frontend import load_model
from hetmap.runtime.rewrite import BuiltOnCall
from hetmap.runtime.settings import settings_for

OFFLOAD = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
           "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
RUN = {"seeds": 2, "eval_tokens": 512, "seq_len": 64, "batch": 4, "noise_scale": 3.0}


def _plan(spec: str = "olmoe-tiny"):  # noqa: ANN202 - a Plan
    return compile_model(spec, policy="random", budget=0.5, calib_tokens=256)


@pytest.mark.parametrize("programming", ["resident", "per-batch"])
def test_offloaded_layers_simulate_as_loaded(tmp_path, programming: str) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(OFFLOAD))
    whole = _plan().simulate(programming=programming, **RUN)
    plan = _plan()
    placed = plan.simulate(programming=programming, device_map=str(path), **RUN)
    assert placed.device_map is not None and placed.device_map["model.layers.1"] == "disk"
    assert placed.digital_ppl == pytest.approx(whole.digital_ppl, rel=1e-6)
    assert placed.mapped_ppl == pytest.approx(whole.mapped_ppl, rel=1e-6)
    assert placed.mapped_ppl_mean - placed.digital_ppl > 1e-3  # the noise is on
    # layer 1's experts are offloaded: simulated from their weights at every call
    model = plan.model.module
    simulated = analog_part(plan.graph, model).build(model, settings_for(plan.target), 0)
    kinds = {name: type(m) for name, m in simulated.named_modules()}
    assert kinds["model.layers.1.mlp.experts"] is BuiltOnCall
    assert kinds["model.layers.0.mlp.experts"] is not BuiltOnCall


def test_auto_map_and_checkpoint_map(tmp_path) -> None:
    """``auto`` (all on the CPU here) and a checkpoint loaded straight onto a map with a layer
    on disk give the figures of the loaded run."""
    whole = _plan().simulate(**RUN)
    auto = _plan().simulate(device_map="auto", **RUN)
    assert auto.mapped_ppl == pytest.approx(whole.mapped_ppl, rel=1e-6)
    load_model("olmoe-tiny").module.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "map.json").write_text(json.dumps(OFFLOAD))
    loaded = _plan(str(tmp_path / "ckpt")).simulate(**RUN)
    plan = _plan(str(tmp_path / "ckpt"))
    placed = plan.simulate(device_map=str(tmp_path / "map.json"), **RUN)
    assert placed.device_map["model.layers.1"] == "disk"
    assert placed.mapped_ppl == pytest.approx(loaded.mapped_ppl, rel=1e-6)


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "no such file"),
    ("{not json", "not a JSON file"),
    ("[1, 2]", "must be a JSON object"),
    ('{"model": "tpu"}', "maps to 'tpu'"),
    ('{"model": 3}', "maps to GPU 3, but this machine has 0 GPU(s)"),
    ('{"model.nope": "cpu", "": "cpu"}', "'model.nope' is not a module of the model"),
    ('{"model": "cpu"}', "parameter 'lm_head.weight' has no device"),
])
def test_bad_maps_are_one_line(tmp_path, capsys, content: str | None, fragment: str) -> None:
    path = tmp_path / "map.json"
    if content is not None:
        path.write_text(content)
    code = main(["simulate", "olmoe-tiny", "--device-map", str(path), "--seeds", "1",
                 "--eval-tokens", "256", "--calib-tokens", "256"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_device_map_and_stream_on_is_one_line(capsys) -> None:
    code = main(["simulate", "olmoe-tiny", "--device-map", "auto", "--stream", "on",
                 "--seeds", "1", "--eval-tokens", "256", "--calib-tokens", "256"])
    err = capsys.readouterr().err
    assert code == 2 and "--device-map and --stream on" in err
