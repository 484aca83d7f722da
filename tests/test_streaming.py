"""Checkpoints run streamed (one leaf module at a time) give exactly the in-memory results."""

from __future__ import annotations

import pytest
from conftest import TINY

from hetmap.compiler.api import compile_model
from hetmap.compiler.frontend import load_model
from hetmap.compiler.ir.annotations import Density, ExpertScore

PIPE = "density{{calib_tokens=512,seq_len=128,stream={}}},expert-score"


@pytest.mark.parametrize("name", TINY)
def test_streamed_calibration_and_scores_equal_in_memory(name: str, tmp_path) -> None:
    load_model(name).module.save_pretrained(tmp_path)
    streamed = compile_model(str(tmp_path), pipeline=PIPE.format("on"))
    assert streamed.model.on_meta  # never materialised
    in_memory = compile_model(str(tmp_path), pipeline=PIPE.format("off"))
    assert not in_memory.model.on_meta
    for node in in_memory.graph.experts():
        other = streamed.graph.node(node.name)
        assert other.get(Density) == node.get(Density)
        assert other.get(ExpertScore).max_norm == pytest.approx(node.get(ExpertScore).max_norm, rel=1e-6)


def test_stored_buffers_come_from_the_checkpoint_not_the_init(tmp_path) -> None:
    """DeepSeek-V3's routing bias is a persistent buffer: a checkpoint's trained values (not
    the zeros of its initialisation) decide the routing, streamed or loaded whole."""
    import torch

    model = load_model("tiny:deepseek_v3").module
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 3)
    model.save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).module.get_buffer(
        "model.layers.1.mlp.gate.e_score_correction_bias").is_meta
    densities = {}
    for stream in ("off", "on"):
        plan = compile_model(str(tmp_path), pipeline=f"density{{calib_tokens=256,seq_len=64,"
                                                     f"stream={stream}}}")
        densities[stream] = [n.get(Density).value for n in plan.graph.experts()]
    plain = compile_model("tiny:deepseek_v3", pipeline="density{calib_tokens=256,seq_len=64}")
    assert densities["on"] == densities["off"]
    assert densities["on"] != [n.get(Density).value for n in plain.graph.experts()]


@pytest.mark.parametrize("name", TINY)
def test_streamed_simulation_equals_loaded(name: str, tmp_path) -> None:
    """A checkpoint simulated leaf by leaf (weights read and tiles programmed per leaf and
    batch) gives the loaded run's digital and mapped perplexities: the same noise per seed."""
    load_model(name).module.save_pretrained(tmp_path)
    pipeline = "density{calib_tokens=256,seq_len=64,stream=on},expert-score,place,tile,allocate"
    runs = {}
    for stream in ("on", "off"):
        plan = compile_model(str(tmp_path), pipeline=pipeline, policy="random", budget=0.5)
        runs[stream] = plan.simulate(seeds=2, eval_tokens=512, seq_len=64, batch=2,
                                     noise_scale=3.0, stream=stream)
        assert plan.model.on_meta is (stream == "on")  # streamed: never loaded whole
    streamed, loaded = runs["on"], runs["off"]
    assert streamed.streamed and streamed.programming == "per-batch"
    assert not loaded.streamed
    assert streamed.weight_reads == 1  # 512 tokens: one batch
    assert streamed.digital_ppl == pytest.approx(loaded.digital_ppl, rel=1e-5)
    assert streamed.mapped_ppl == pytest.approx(loaded.mapped_ppl, rel=1e-5)
    assert abs(streamed.mapped_ppl[0] - streamed.mapped_ppl[1]) > 1e-6  # seeds differ
    assert abs(streamed.mapped_ppl_mean - streamed.digital_ppl) > 1e-3  # noise is on


def test_safetensors_reader_equals_safetensors(tmp_path) -> None:
    """hetmap's positional reader gives what safetensors gives: whole tensors of every dtype,
    leading-index ranges, scalars; a truncated file is one MissingDataError."""
    import torch
    from safetensors.torch import load_file, save_file

    from hetmap.common.errors import MissingDataError
    from hetmap.compiler.data.weights import SafetensorsFile

    generator = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(6, 5, 4, generator=generator),
               "h": torch.randn(3, 7, generator=generator).to(torch.bfloat16),
               "f": torch.randn(2, 2, generator=generator).to(torch.float16),
               "b": torch.tensor([True, False, True]), "i": torch.arange(5),
               "s": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    reader, expected = SafetensorsFile(path), load_file(str(path))
    for key, value in expected.items():
        got = reader.read(key)
        assert got.dtype == value.dtype and torch.equal(got, value), key
    assert torch.equal(reader.read("w", 2, 5), expected["w"][2:5])
    assert torch.equal(reader.read("h", 1, 2), expected["h"][1:2])
    path.write_bytes(path.read_bytes()[:reader.start + 8])  # the header and 8 bytes of data
    with pytest.raises(MissingDataError, match="ends inside tensor"):
        SafetensorsFile(path).read("w")
