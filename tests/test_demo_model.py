"""The shipped demo model: a real OLMoE MoE that loads with from_pretrained and beats a bigram."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import OlmoeForCausalLM

from hetmap.compiler.data import corpus

DEMO_DIR = Path(corpus.__file__).resolve().parent.parent / "assets" / "demo"
WINDOW = 256
EVAL_BYTES = 16 * WINDOW  # a few thousand bytes keep the test fast


@pytest.fixture(scope="module")
def demo_model() -> OlmoeForCausalLM:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return OlmoeForCausalLM.from_pretrained(DEMO_DIR).eval()


def test_shipped_files_are_small() -> None:
    assert (DEMO_DIR / "config.json").is_file()
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= 10.5e6
    assert (DEMO_DIR / "TRAINING.md").is_file()


def test_demo_is_a_real_moe(demo_model: OlmoeForCausalLM) -> None:
    config = demo_model.config
    assert config.model_type == "olmoe"
    assert config.num_hidden_layers >= 4
    assert config.num_experts >= 8
    assert config.num_experts_per_tok >= 2
    assert config.vocab_size == 256
    assert next(demo_model.parameters()).dtype == torch.float32


def test_demo_beats_the_bigram_baseline(demo_model: OlmoeForCausalLM) -> None:
    vocab = demo_model.config.vocab_size
    train = corpus.bytes_to_tokens(corpus.read_corpus_bytes("train"), vocab)
    windows = corpus.token_windows(
        corpus.bytes_to_tokens(corpus.read_corpus_bytes("eval", EVAL_BYTES), vocab), WINDOW
    )
    bigram = corpus.bigram_perplexity(train, windows, vocab)
    with torch.no_grad():
        logits = demo_model(input_ids=windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, vocab), windows[:, 1:].reshape(-1))
    perplexity = math.exp(nll.item())
    assert perplexity < 0.8 * bigram, (perplexity, bigram)
