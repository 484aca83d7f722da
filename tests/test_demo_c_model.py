"""The shipped demo-c model: a trained Mixtral MoE on C headers that loads and beats a bigram."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM

from hetmap.compiler.data import corpus
from hetmap.compiler.frontend.loader import load_model

DEMO_C_DIR = Path(corpus.__file__).resolve().parent.parent / "assets" / "demo-c"
WINDOW = 256
EVAL_BYTES = 12 * WINDOW  # a few thousand bytes keep the test fast
CORPUS = "c-headers"


@pytest.fixture(scope="module")
def demo_c_model() -> MixtralForCausalLM:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return MixtralForCausalLM.from_pretrained(DEMO_C_DIR, attn_implementation="eager").eval()


def test_shipped_files_are_small() -> None:
    assert (DEMO_C_DIR / "config.json").is_file()
    assert (DEMO_C_DIR / "model.safetensors").stat().st_size <= 6.5e6
    assert (DEMO_C_DIR / "TRAINING.md").is_file()


def test_c_corpus_split_is_disjoint_and_listed() -> None:
    parts = {split: set(corpus.listed_files(split, corpus=CORPUS)) for split in corpus.SPLITS}
    assert all(parts.values())
    assert not parts["train"] & parts["eval"]
    assert not parts["train"] & parts["calib"]
    assert not parts["calib"] & parts["eval"]
    assert all(path.endswith(".h") for files in parts.values() for path in files)
    assert all(corpus.split_of(path) == split for split, files in parts.items() for path in files)
    # the default corpus is unchanged: stdlib Python files
    assert corpus.listed_files("eval")[0].endswith(".py")


def test_demo_c_is_a_mixtral_moe(demo_c_model: MixtralForCausalLM) -> None:
    config = demo_c_model.config
    assert config.model_type == "mixtral"
    assert config.num_hidden_layers == 4
    assert config.num_local_experts == 8
    assert config.num_experts_per_tok == 2
    assert config.vocab_size == 256
    assert next(demo_c_model.parameters()).dtype == torch.float32


def test_demo_c_beats_the_bigram_baseline(demo_c_model: MixtralForCausalLM) -> None:
    vocab = demo_c_model.config.vocab_size
    train = corpus.bytes_to_tokens(corpus.read_corpus_bytes("train", corpus=CORPUS), vocab)
    windows = corpus.token_windows(
        corpus.bytes_to_tokens(corpus.read_corpus_bytes("eval", EVAL_BYTES, corpus=CORPUS), vocab),
        WINDOW,
    )
    bigram = corpus.bigram_perplexity(train, windows, vocab)
    with torch.no_grad():
        logits = demo_c_model(input_ids=windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, vocab), windows[:, 1:].reshape(-1))
    perplexity = math.exp(nll.item())
    assert perplexity < 0.6 * bigram, (perplexity, bigram)


def test_hetmap_loads_demo_c_by_name() -> None:
    loaded = load_model("demo-c")
    assert loaded.vocab_size == 256
    assert loaded.has_weights
