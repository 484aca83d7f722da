"""Tiny random-weight configs of every MoE family in the pinned transformers (``tiny:<family>``).

Each family's config class is built with its own defaults, then shrunk by one generic rule set
(:func:`shrink`) plus a few per-family overrides; the family's features stay:

1. sizes are overridden by field name (hidden 64, 4 heads, 8 routed experts, top-2,
   vocabulary 512, intermediate sizes 16-32, MLA ranks, linear-attention and Mamba sizes),
   also inside nested config dicts (DBRX's ``ffn_config``);
2. per-layer lists (``layer_types``, ``mlp_layer_types``, ...) are resized to the tiny layer
   count with every kind they held still present (first appearances first, then the most
   common kind), so hybrid attention / Mamba / linear-attention patterns and dense layers stay;
3. dense-first fields (``first_k_dense_replace``, ``num_dense_layers``, ...) become 1, shared
   and zero experts are kept (at most 2 each), grouped routing keeps 2 groups;
4. families with several layer kinds or a dense first layer get 3 layers, others 2.

A family may also adjust the random weights after they are drawn (:meth:`ZooFamily.initialize`,
deterministic, from :data:`INIT_SEED`): where an initialisation zero-fills matrices (AFMoE's
routers), every such matrix would be byte-identical, so routing would tie everywhere and the
ONNX optimizer would merge the copies.

``ZOO`` maps family (the transformers module name) to :class:`ZooFamily`; ``EXCLUDED`` says why
the other MoE modules of transformers are not in it. Every ``causal-lm`` and
``text-of-multimodal`` config builds with ``AutoModelForCausalLM.from_config`` and runs a
forward; ``multimodal`` ones (image-text-to-text families with no causal-LM class) build the
same way once :mod:`hetmap.compiler.frontend.multimodal` has registered their text-only class
(language model and LM head, no towers); ``encoder-decoder`` ones build with ``AutoModelForSeq2SeqLM`` and run as next-token
models (:func:`hetmap.compiler.frontend.loader.as_next_token_model`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import transformers
from torch import nn

Kind = Literal["causal-lm", "text-of-multimodal", "multimodal", "encoder-decoder"]

VOCAB = 512
HIDDEN = 64
EXPERTS = 8
TOP_K = 2
#: seed of the weights a family's ``post_init`` draws (its own generator: global RNG untouched)
INIT_SEED = 0

#: field name -> tiny value (where the default config has the field, not 0 and not None)
SIZES: dict[str, int] = {
    **dict.fromkeys(["hidden_size", "d_model"], HIDDEN),
    **dict.fromkeys(["vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input"], VOCAB),
    **dict.fromkeys(["max_position_embeddings", "max_seq_len", "model_max_length"], 512),
    **dict.fromkeys(["intermediate_size", "ffn_hidden_size", "d_ff", "intermediate_size_mlp",
                     "dense_intermediate_size", "prefix_dense_intermediate_size",
                     "encoder_ffn_dim", "decoder_ffn_dim", "shared_expert_intermediate_size",
                     "shared_intermediate_size", "moe_shared_expert_intermediate_size",
                     "shared_experts_intermediate_size"], 32),
    **dict.fromkeys(["moe_intermediate_size", "expert_ffn_hidden_size"], 16),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts",
                     "moe_num_experts"], EXPERTS),
    **dict.fromkeys(["num_experts_per_tok", "num_experts_per_token", "top_k", "moe_topk",
                     "moe_k", "moe_top_k", "top_k_experts"], TOP_K),
    **dict.fromkeys(["num_attention_heads", "n_heads", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "swa_num_attention_heads", "index_n_heads",
                     "indexer_n_heads", "linear_num_heads", "linear_num_value_heads",
                     "mamba_n_heads", "mamba_num_heads", "num_attention_heads_per_layer",
                     "heads_per_ngram"], 4),
    **dict.fromkeys(["head_dim", "swa_head_dim", "kv_channels", "d_kv",
                     "mamba_head_dim", "linear_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "index_head_dim", "indexer_head_dim",
                     "v_head_dim", "hidden_size_per_layer_input", "router_hidden_size",
                     "ple_embed_dim", "kv_lora_rank", "o_lora_rank", "qk_head_dim"], 16),
    **dict.fromkeys(["qk_rope_head_dim", "qk_nope_head_dim", "mamba_d_state", "ssm_state_size",
                     "mamba_dt_rank", "hc_lowrank", "loop_gate_rank", "d_rel"], 8),
    **dict.fromkeys(["q_lora_rank", "mamba_d_head"], 32),  # mamba_d_head: expand 2 x 64 / 4
    # sparse/chunked attention and scans small enough to act on a 7-token input
    **dict.fromkeys(["index_topk", "index_block_size", "index_topk_blocks", "block_size",
                     "chunk_size", "mamba_chunk_size", "attention_chunk_size", "rel_extent",
                     "keep_window_size"], 4),
}
#: fields that count or space layers: at most this (dense first layer, every-n-th patterns)
AT_MOST: dict[str, int] = {
    **dict.fromkeys(["n_shared_experts", "num_shared_experts", "moe_num_shared_experts",
                     "zero_expert_num", "n_group", "num_expert_group", "n_groups", "o_groups",
                     "global_attn_every_n_layers", "sliding_window_pattern",
                     "no_rope_layer_interval", "layer_group_size",
                     "n_layers_per_attn_res_block", "interleave_moe_layer_step"], 2),
    **dict.fromkeys(["first_k_dense_replace", "num_dense_layers", "moe_layer_start_index",
                     "topk_group", "mamba_n_groups"], 1),
}
#: fields set even where the default is None (None there means "not an MoE" or "unset")
FILL_NONE = ("num_experts", "n_routed_experts", "num_experts_per_tok", "top_k_experts",
             "moe_intermediate_size")
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layers")
WINDOWS = ("sliding_window", "sliding_window_size")
#: per-layer lists that are resized (kinds kept); other lists of the layer count's length too
PER_LAYER = ("layer_types", "mlp_layer_types", "layers_block_type", "indexer_types",
             "no_rope_layers", "layer_rope_theta", "num_attention_heads_per_layer")
#: nested dicts shrunk by the same rules
NESTED = ("attn_config", "ffn_config")


@dataclass(frozen=True)
class ZooFamily:
    """One MoE family: the config model_type it is built from and what it is."""

    name: str
    model_type: str
    kind: Kind
    #: fields set after shrinking (family features the generic rules cannot know)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    #: layer count; None: 3 with several layer kinds or a dense first layer, else 2
    layers: int | None = None
    #: adjusts the freshly initialised model in place (same weights on every call); None: none
    post_init: Callable[[nn.Module, torch.Generator], None] | None = None

    def make_config(self) -> transformers.PreTrainedConfig:
        """The tiny config (a fresh object on every call). A ``multimodal`` family's text
        config is shrunk (``overrides`` apply to it); its towers' configs and special token
        ids (image, video: never in text) stay as they are, since no tower is built."""
        config_class = transformers.CONFIG_MAPPING[self.model_type]
        defaults = config_class().to_dict()
        if self.kind == "multimodal":
            return config_class(**_tiny_text(defaults, self.layers, self.overrides))
        fields = shrink(defaults, self.layers or _layer_count(defaults))
        fields.update(self.overrides)
        return config_class(**fields)

    def initialize(self, model: nn.Module) -> nn.Module:
        """``model`` (built from :meth:`make_config`) after the family's ``post_init``, which
        draws from its own generator seeded with :data:`INIT_SEED`."""
        if self.post_init is not None:
            with torch.no_grad():
                self.post_init(model, torch.Generator().manual_seed(INIT_SEED))
        return model


def _tiny_text(defaults: Mapping[str, Any], layers: int | None,
               overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A multimodal config's fields with its text config shrunk (``overrides`` applied to it)
    and its towers' output widths (``out_hidden_size``, fed to the text model) made the text
    width; a thinker's config (Qwen3-Omni) is shrunk the same way, one level down."""
    if "text_config" not in defaults and isinstance(defaults.get("thinker_config"), dict):
        thinker = _tiny_text(defaults["thinker_config"], layers, overrides)
        return {**defaults, "thinker_config": thinker, "enable_audio_output": False}
    text = defaults["text_config"]
    fields = {**shrink(text, layers or _layer_count(text)), **overrides}
    towers = {key: {**value, "out_hidden_size": HIDDEN} for key, value in defaults.items()
              if isinstance(value, dict) and "out_hidden_size" in value}
    return {**defaults, **towers, "text_config": {**text, **fields}}


def distinct_routers(model: nn.Module, generator: torch.Generator) -> None:
    """Draw every all-zero router matrix (a module path ending in ``router.gate``, such as
    AFMoE's, which its initialisation zero-fills) from ``N(0, initializer_range)``."""
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if path.endswith("router.gate") and weight is not None and not weight.any():
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def _kv_heads(defaults: Mapping[str, Any], key: str) -> int | None:
    kv, heads = defaults[key], defaults.get("num_attention_heads")
    if not isinstance(kv, int):
        return None
    return 4 if kv == heads else min(kv, 2)


def _window(value: int) -> int:
    return 5 if value % 2 else 4  # odd windows (513, 129) are "n + 1" in their families


def _kinds(values: list[Any], layers: int) -> list[Any]:
    """``values`` cut to ``layers`` entries with every distinct value kept where they fit: the
    first value first, the last value last, the others between, the most common as filler."""
    first, last = values[0], values[-1]
    head = [v for v in dict.fromkeys(values) if v == first or v != last]
    if len(head) >= layers:
        return head[:layers]
    filler = Counter(values).most_common(1)[0][0]
    return head + [filler] * (layers - len(head) - 1) + [last]


def _default_layers(defaults: Mapping[str, Any]) -> int | None:
    return next((defaults[k] for k in LAYER_COUNTS if isinstance(defaults.get(k), int)), None)


def _is_per_layer(key: str, value: Any, default_layers: int | None) -> bool:
    if not isinstance(value, list) or not value:
        return False
    return key in PER_LAYER or (len(value) == default_layers and len(value) > 2
                                and not key.endswith("_ids"))


def _layer_count(defaults: Mapping[str, Any]) -> int:
    default_layers = _default_layers(defaults)
    mixed = any(_is_per_layer(k, v, default_layers) and len(set(map(str, v))) > 1
                for k, v in defaults.items())
    dense_first = any(defaults.get(k) for k in ("first_k_dense_replace", "num_dense_layers",
                                                  "mlp_only_layers", "moe_layer_start_index"))
    periodic = any(k.endswith("_layer_period") for k in defaults)
    return 3 if mixed or dense_first or periodic else 2


def shrink(defaults: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """The fields to change in ``defaults`` (a config's ``to_dict()``) to make it tiny."""
    default_layers = _default_layers(defaults)
    fields: dict[str, Any] = {}
    for key, value in defaults.items():
        if (value is None and key not in FILL_NONE) or isinstance(value, bool):
            continue
        if key in LAYER_COUNTS:
            fields[key] = layers
        elif _is_per_layer(key, value, default_layers):
            tiny = SIZES.get(key)
            fields[key] = [tiny] * layers if tiny is not None else _kinds(value, layers)
        elif key in SIZES and (value is None or isinstance(value, int) and value > 0):
            fields[key] = SIZES[key]
        elif key in AT_MOST and isinstance(value, int):
            fields[key] = min(value, AT_MOST[key])
        elif key.endswith("num_key_value_heads") or key == "linear_num_key_heads":
            fields[key] = _kv_heads(defaults, key)
        elif key in WINDOWS and isinstance(value, int) and value > 0:
            fields[key] = _window(value)
        elif key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            fields[key] = None
        elif key == "mlp_only_layers" and value:
            fields[key] = [0]
        elif key in NESTED and isinstance(value, dict):
            fields[key] = shrink(value, layers)
        elif key == "per_layer_config" and isinstance(value, dict):
            fields[key] = {k: {**v, **shrink(v, layers)} for k, v in value.items()
                           if int(k) < layers}
    if "qk_rope_head_dim" in fields and defaults.get("head_dim") == defaults["qk_rope_head_dim"]:
        fields["head_dim"] = fields["qk_rope_head_dim"]  # MLA: rotary on the rope part only
    return fields


def _family(name: str, model_type: str | None = None, *, layers: int | None = None,
            post_init: Callable[[nn.Module, torch.Generator], None] | None = None,
            multimodal: bool = False, **overrides: Any) -> ZooFamily:
    model_type = model_type or name
    kind: Kind = ("encoder-decoder" if name in ("switch_transformers", "nllb_moe")
                  else "multimodal" if multimodal
                  else "text-of-multimodal" if model_type.endswith("_text") else "causal-lm")
    return ZooFamily(name, model_type, kind, overrides, layers, post_init)


_FAMILIES = [
    _family("afmoe", post_init=distinct_routers),  # its routers start at zero
    _family("aria", "aria_text"),
    _family("axk1"),
    _family("axk2"),
    _family("bailing_hybrid"),
    _family("beam"),
    _family("cohere2_moe"),
    # transformers 5.24's DbrxAttention reads attn_config.rope_theta (not a field) and clamps
    # with clip_qkv unconditionally (None fails): set both, as DBRX's checkpoint does
    _family("dbrx", attn_config={"kv_n_heads": 1, "clip_qkv": 8.0, "rope_theta": 500000.0}),
    _family("deepseek_v2", n_group=1, topk_group=1),
    _family("deepseek_v3"),
    _family("deepseek_v32"),
    _family("deepseek_v4", compress_rates={"compressed_sparse_attention": 2,
                                           "heavily_compressed_attention": 4}),
    _family("doge", is_moe=True, num_experts=16),  # product-key routing: a square expert count
    _family("deepseek_ocr2", multimodal=True, layers=3,  # its defaults leave the kinds unset
            mlp_layer_types=["dense", "sparse", "sparse"]),
    _family("dots1", n_shared_experts=2),
    _family("dots3_note", "dots3_note_text"),
    _family("ernie4_5_moe", moe_layer_end_index=2),
    _family("ernie4_5_vl_moe", multimodal=True, moe_intermediate_size=[16, 16],  # text, vision
            rope_parameters={"rope_theta": 500000.0, "rope_type": "default",
                             "mrope_section": [3, 3, 2]}),  # the 8 frequencies of head_dim 16
    _family("exaone_moe"),
    _family("flex_olmo"),
    _family("flint"),
    _family("gemma4", "gemma4_text", enable_moe_block=True),
    _family("glm4_moe"),
    _family("glm4v_moe", multimodal=True, rope_parameters={
        "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default",
        "mrope_section": [2, 1, 1]}),  # sections of the 4 rotary frequencies of head_dim 16
    _family("glm4_moe_lite"),
    _family("glm_moe_dsa"),
    _family("glm5_next", multimodal=True, index_kpool=2),
    _family("gpt_oss"),
    _family("granitemoe"),
    _family("granitemoe_swa"),
    _family("granitemoehybrid", layers=3, layer_types=["linear_attention", "full_attention",
                                                       "linear_attention"]),  # default: Mamba
    _family("granitemoeshared", shared_intermediate_size=32),
    _family("hunyuan_v1_moe", head_dim=16),
    _family("hy_v3"),
    _family("hy_v4"),
    _family("hy_v4_vl", multimodal=True, rope_parameters={
        "rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 1, 1]}),
    _family("inkling", "inkling_text"),
    _family("inkling2", "inkling2_text"),
    _family("inkling2_loop", "inkling2_loop_text", loop_layer_index_start=1,
            loop_layer_index_end=2, loop_num_passes=2, n_layers_per_attn_res_block=1),
    _family("jamba", attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=1, use_mamba_kernels=False),
    _family("jetmoe"),
    _family("kimi_linear"),
    _family("kolibri1"),
    _family("laguna"),
    _family("lara_mini"),
    _family("lfm2_moe", layer_types=["conv", "full_attention", "conv"]),
    _family("llama4", "llama4_text", interleave_moe_layer_step=2, moe_layers=None, layers=3),
    _family("longcat_flash"),
    _family("mellum"),
    _family("mimo_v2_flash"),
    _family("mistral4"),  # a causal LM that transformers files under image-text-to-text
    _family("mistral_large4", multimodal=True),
    _family("minimax"),
    _family("minimax_m2"),
    _family("minimax_m3_vl", "minimax_m3_vl_text"),
    _family("muse_spark", multimodal=True, moe_hidden_size=32),
    _family("mixtral"),
    _family("nemotron_h", use_mamba_kernels=False, layers=4),
    _family("olmoe"),
    _family("phimoe"),
    _family("qwen2_moe"),
    _family("qwen3_5_moe", "qwen3_5_moe_text"),
    _family("qwen3_moe"),
    _family("qwen3_omni_moe", multimodal=True),  # its thinker; no talker built
    _family("qwen3_vl_moe", multimodal=True),
    _family("qwen3_next"),
    _family("qwen4_exp", "qwen4_exp_text", indexer_n_heads=4, indexer_kv_heads=1,
            indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2),
    _family("sarvam_mla"),
    _family("sarvam_moe"),
    _family("solar_open"),
    _family("step3p7", multimodal=True, sliding_window=4),
    _family("unlimited_ocr", multimodal=True),
    _family("zaya", num_experts_per_tok=1),  # ZAYA supports top-1 routing only
    _family("switch_transformers", num_decoder_layers=2, num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1, encoder_sparse_step=2, decoder_sparse_step=2, layers=2),
    _family("nllb_moe", "nllb-moe", encoder_layers=2, decoder_layers=2, encoder_sparse_step=2,
            decoder_sparse_step=2, layers=2),
]
ZOO: dict[str, ZooFamily] = {family.name: family for family in _FAMILIES}

_NO_CAUSAL_LM = "no AutoModelForCausalLM class for it or its text config in transformers 5.24"
#: transformers modules with routed experts that are not in ZOO, and why
EXCLUDED: dict[str, str] = {
    "vitpose_backbone": "vision backbone (pose estimation), not a language model",
    "openai_privacy_filter": "token classifier (PII tagging), not a causal LM",
    "diffusion_gemma": "diffusion (bidirectional) text model, " + _NO_CAUSAL_LM,
    "nemotron3_5_transcribe": "speech recognition model; its MoE text decoder is nemotron_h",
}
