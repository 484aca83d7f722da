"""Shared fixtures of the runtime (simulator) tests: one CPU thread, a tiny OLMoE."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from transformers import OlmoeConfig, OlmoeForCausalLM


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The test machines' cores are shared: one thread is faster and steadier than several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_olmoe(seed: int = 0, intermediate: int = 32) -> OlmoeForCausalLM:
    torch.manual_seed(seed)
    config = OlmoeConfig(
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        vocab_size=64,
        max_position_embeddings=64,
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
    )
    return OlmoeForCausalLM(config).eval()


@pytest.fixture
def tiny_olmoe() -> Callable[..., OlmoeForCausalLM]:
    """Factory: OLMoE with hidden 32, 2 layers, 4 experts top-2, vocab 64, seeded random init."""
    return _tiny_olmoe


@pytest.fixture
def attention_linears() -> Callable[[nn.Module], set[str]]:
    def paths(model: nn.Module) -> set[str]:
        return {
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".self_attn." in name
        }

    return paths


@pytest.fixture
def all_experts() -> Callable[[nn.Module], dict[str, list[int]]]:
    def paths(model: nn.Module) -> dict[str, list[int]]:
        return {
            name: list(range(module.gate_up_proj.shape[0]))
            for name, module in model.named_modules()
            if name.endswith("mlp.experts")
        }

    return paths
