"""Multimodal MoE families mapped through their text model (frontend/multimodal.py).

The text-only class of a family keeps the full class's forward, language model and LM head
and drops its towers. Checked here: on text-only input its logits equal the full class's with
the same weights (the towers left on the meta device, where any read of them would fail); a
checkpoint of the full model (towers included) loads into it with the towers' tensors skipped
and compiles, loaded and streamed alike; and a family transformers files as image-text-to-text
although it is a plain causal LM (Mistral 4) is taken as it is.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import densities_loaded_and_streamed

from hetmap.compiler.api import compile_model
from hetmap.compiler.frontend import load_model
from hetmap.compiler.frontend.multimodal import full_class, register_text_model
from hetmap.compiler.frontend.zoo import ZOO, _layer_count, shrink

MULTIMODAL = sorted(name for name, family in ZOO.items() if family.kind == "multimodal")


def _full_with_weights_of(text_only: torch.nn.Module, config: object) -> torch.nn.Module:
    """The family's full class on the meta device, with ``text_only``'s tensors (parameters and
    every buffer, persistent or not) in place: the towers stay on the meta device."""
    full = full_class(config)
    assert full is not None
    with torch.device("meta"):
        model = full(config)
    result = model.load_state_dict(text_only.state_dict(), strict=False, assign=True)
    assert not result.unexpected_keys
    for path, module in text_only.named_modules():
        target = model.get_submodule(path)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                target._buffers[name] = buffer
    return model.eval()


def test_zoo_has_the_multimodal_families() -> None:
    assert {"qwen3_vl_moe", "glm4v_moe", "ernie4_5_vl_moe", "mistral_large4"} <= set(MULTIMODAL)
    assert ZOO["mistral4"].kind == "causal-lm"


@pytest.mark.parametrize("family", MULTIMODAL)
def test_text_only_logits_equal_the_full_models(family: str) -> None:
    loaded = load_model(f"tiny:{family}")
    assert type(loaded.module).__name__.endswith("TextOnly")
    assert not any(p.is_meta for p in loaded.module.parameters())
    prefix = "thinker." if family == "qwen3_omni_moe" else ""
    outside = [path for path, _ in loaded.module.named_modules()
               if path not in ("", "thinker", f"{prefix}model") and not path.startswith(
                   (f"{prefix}model.language_model", f"{prefix}lm_head"))]
    assert not outside  # no tower, projector, merger or talker left
    full = _full_with_weights_of(loaded.module, loaded.config)
    if type(full).forward is torch.nn.Module.forward:  # Qwen3-Omni: the thinker's forward
        full = full.thinker
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = full(input_ids=ids, use_cache=False).logits
        actual = loaded.module(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_mistral4_is_its_own_causal_lm() -> None:
    loaded = load_model("tiny:mistral4")
    assert type(loaded.module).__name__ == "Mistral4ForCausalLM"
    assert register_text_model(loaded.config) is type(loaded.module)


def _tiny_full_qwen3_vl_moe() -> transformers.PreTrainedModel:
    """A whole Qwen3-VL-MoE (vision tower shrunk to 2 blocks) with seeded weights."""
    config = ZOO["qwen3_vl_moe"].make_config()
    vision = config.vision_config.to_dict()
    vision.update(shrink(vision, 2), depth=2, out_hidden_size=config.text_config.hidden_size,
                  deepstack_visual_indexes=[0])
    config.vision_config = type(config.vision_config)(**vision)
    torch.manual_seed(0)
    full = full_class(config)
    assert full is not None
    return full(config).eval()


@pytest.mark.slow
def test_full_checkpoint_loads_text_only_and_compiles_alike_streamed(tmp_path, caplog) -> None:
    """The full model's checkpoint (vision tower and all) is read by the text-only class: its
    logits are the full model's, no tower tensor is loaded or reported as unexpected, and the
    densities streamed from the checkpoint equal the loaded model's."""
    full = _tiny_full_qwen3_vl_moe()
    assert _layer_count(full.config.text_config.to_dict()) >= 2
    full.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        module = loaded.runnable()
    assert "unexpected" not in caplog.text.lower()
    assert type(module).__name__.endswith("TextOnly")
    assert not any("visual" in name for name in module.state_dict())
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # (hetmap loads eager attention, the full model has SDPA: 2e-7)
        torch.testing.assert_close(module(input_ids=ids, use_cache=False).logits,
                                   full(input_ids=ids, use_cache=False).logits, rtol=0, atol=1e-5)
    assert len(densities_loaded_and_streamed(tmp_path)) == 16


def test_multimodal_checkpoint_whose_config_builds_nothing_is_one_line(tmp_path) -> None:
    """A DeepSeek-OCR 2 config.json that leaves its layer kinds unset: its class cannot be
    built from it (the reason rule 5 gives), and loading the checkpoint, once the family's
    text-only class is registered from a complete config, is one line too."""
    from safetensors.torch import save_file

    from hetmap.common.errors import ModelLoadError
    from hetmap.compiler.frontend import multimodal

    incomplete = transformers.CONFIG_MAPPING["deepseek_ocr2"]()
    full = full_class(incomplete)
    assert full is not None
    assert multimodal._structure(full, incomplete) == (
        "its DeepseekOcr2ForConditionalGeneration cannot be built from this config")
    load_model("tiny:deepseek_ocr2")  # registers the family
    incomplete.save_pretrained(tmp_path)
    save_file({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(tmp_path))
    message = str(caught.value)
    assert "config.json does not build its model (TypeError" in message and "\n" not in message


def test_qwen3_omni_is_its_thinker() -> None:
    """Qwen3-Omni's class has no forward (a thinker writes text, a talker speaks): its text
    model is the thinker's, under ``thinker.``, and no talker or tower is kept."""
    loaded = load_model("tiny:qwen3_omni_moe")
    names = {name.split(".")[0] for name, _ in loaded.module.named_parameters()}
    assert names == {"thinker"}
    kept = {".".join(name.split(".")[:3]) for name, _ in loaded.module.named_parameters()}
    assert kept == {"thinker.model.language_model", "thinker.lm_head.weight"}


def test_experts_narrower_than_the_router_input_read_at_their_own_width() -> None:
    """MuseSpark projects each row from hidden 64 to 32 before its experts, and normalises
    each expert's output before the routing weight: the layout reads the experts' own width
    (not the router's 64) and the post-expert norm, and the IR's matrices say so."""
    from hetmap.runtime.experts import routed_layout

    loaded = load_model("tiny:muse_spark")
    block = "model.language_model.layers.0.mlp"
    experts = loaded.module.get_submodule(f"{block}.experts")
    router = loaded.module.get_submodule(f"{block}.gate")
    assert router.weight.shape[1] == 64
    layout = routed_layout(experts, f"{block}.experts", router)
    assert (layout.hidden, layout.intermediate, layout.post_norm) == (32, 16, True)
    plan = compile_model("tiny:muse_spark", pipeline="density{calib_tokens=128,seq_len=32}")
    first = next(n for n in plan.graph.experts() if n.module.startswith(block))
    assert {m.in_features for m in first.matrices if m.role != "down"} == {32}
