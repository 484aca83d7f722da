"""Built-in model names: tiny random-weight configs, full-size published configs (built on the
meta device, structure only), and the trained ``demo`` model that ships with hetmap.

Full-size hyper-parameters are the published ones of each checkpoint's ``config.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers

#: Every built-in model uses eager attention: it traces and exports the same way everywhere.
ATTENTION = "eager"
TINY_SEED = 0
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_DIR = ASSETS / "demo"
#: trained models shipped with hetmap: name -> (directory, description)
TRAINED_MODELS = {
    "demo": (DEMO_DIR, "OLMoE architecture, byte-level, trained on Python stdlib sources"),
    "demo-c": (ASSETS / "demo-c", "Mixtral architecture, byte-level, trained on C header files"),
    "demo-ds": (ASSETS / "demo-ds", "DeepSeek-V2 fine-grained MoE (16 experts top-6, shared "
                "expert, dense first layer), byte-level, trained on package docs"),
}

_TINY_COMMON: dict[str, Any] = dict(vocab_size=256, hidden_size=64, num_attention_heads=4,
                                    num_key_value_heads=4, max_position_embeddings=512,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=None)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    full_size: bool
    make_config: Callable[[], transformers.PreTrainedConfig]


def _olmoe_tiny() -> transformers.PreTrainedConfig:
    return transformers.OlmoeConfig(**_TINY_COMMON, intermediate_size=32, num_hidden_layers=2,
                                    num_experts=8, num_experts_per_tok=2)


def _mixtral_tiny() -> transformers.PreTrainedConfig:
    return transformers.MixtralConfig(**_TINY_COMMON, intermediate_size=32, num_hidden_layers=2,
                                      num_local_experts=8, num_experts_per_tok=2)


def _qwen2_moe_tiny() -> transformers.PreTrainedConfig:
    return transformers.Qwen2MoeConfig(
        **_TINY_COMMON, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_experts=8,
        num_experts_per_tok=2)


def _deepseek_v2_tiny() -> transformers.PreTrainedConfig:
    return transformers.DeepseekV2Config(
        **_TINY_COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1)


def _deepseek_v3_tiny() -> transformers.PreTrainedConfig:
    return transformers.DeepseekV3Config(
        **_TINY_COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=2, topk_group=1)


def _olmoe_1b_7b() -> transformers.PreTrainedConfig:
    # allenai/OLMoE-1B-7B-0924
    return transformers.OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=4096, tie_word_embeddings=False)


def _mixtral_8x7b() -> transformers.PreTrainedConfig:
    # mistralai/Mixtral-8x7B-v0.1
    return transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)


def _qwen15_moe() -> transformers.PreTrainedConfig:
    # Qwen/Qwen1.5-MoE-A2.7B
    return transformers.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4)


def _deepseek_v2_lite() -> transformers.PreTrainedConfig:
    # deepseek-ai/DeepSeek-V2-Lite
    return transformers.DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        n_group=1, topk_group=1)


def _deepseek_v3() -> transformers.PreTrainedConfig:
    # deepseek-ai/DeepSeek-V3 (671B): 61 layers, the first 3 dense, 256 routed experts, top-8
    return transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_group=8, topk_group=4)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m for m in [
        BuiltinModel("olmoe-tiny", "OLMoE layout, 2 layers, 8 experts top-2 (random)", False, _olmoe_tiny),
        BuiltinModel("mixtral-tiny", "Mixtral layout, 2 layers, 8 experts top-2 (random)", False, _mixtral_tiny),
        BuiltinModel("qwen2-moe-tiny", "Qwen2-MoE with shared expert (random)", False, _qwen2_moe_tiny),
        BuiltinModel("deepseek-v2-tiny", "DeepSeek-V2, MLA, 2 shared experts, first layer dense (random)", False, _deepseek_v2_tiny),
        BuiltinModel("deepseek-v3-tiny", "DeepSeek-V3, group-limited routing, first layer dense (random)", False, _deepseek_v3_tiny),
        BuiltinModel("olmoe-1b-7b", "OLMoE-1B-7B, 16 layers x 64 experts (meta, structure only)", True, _olmoe_1b_7b),
        BuiltinModel("mixtral-8x7b", "Mixtral-8x7B, 32 layers x 8 experts (meta)", True, _mixtral_8x7b),
        BuiltinModel("qwen1.5-moe-a2.7b", "Qwen1.5-MoE-A2.7B, 24 layers x 60 experts + shared (meta)", True, _qwen15_moe),
        BuiltinModel("deepseek-v2-lite", "DeepSeek-V2-Lite, 27 layers x 64 experts (meta)", True, _deepseek_v2_lite),
        BuiltinModel("deepseek-v3", "DeepSeek-V3 671B, 61 layers, 58 MoE x 256 experts (meta)", True, _deepseek_v3),
    ]
}
