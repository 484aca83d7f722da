"""The shipped demo-ds model: a trained fine-grained DeepSeek-V2 MoE on package prose that
loads, beats a bigram, and compiles with its dense first layer and shared expert digital."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV2ForCausalLM

from hetmap.compiler.data import corpus
from hetmap.compiler.frontend.loader import load_model

DEMO_DS_DIR = Path(corpus.__file__).resolve().parent.parent / "assets" / "demo-ds"
WINDOW = 256
EVAL_BYTES = 12 * WINDOW
CORPUS = "package-docs"


@pytest.fixture(scope="module")
def demo_ds_model() -> DeepseekV2ForCausalLM:
    model = DeepseekV2ForCausalLM.from_pretrained(DEMO_DS_DIR, attn_implementation="eager")
    return model.eval()


def test_shipped_files_are_small() -> None:
    assert (DEMO_DS_DIR / "config.json").is_file()
    assert (DEMO_DS_DIR / "model.safetensors").stat().st_size <= 6.5e6
    assert (DEMO_DS_DIR / "TRAINING.md").is_file()


def test_docs_corpus_split_is_disjoint_and_listed() -> None:
    parts = {split: set(corpus.listed_files(split, corpus=CORPUS)) for split in corpus.SPLITS}
    assert all(parts.values())
    assert not parts["train"] & parts["eval"] and not parts["calib"] & parts["eval"]
    assert all(path.endswith(".dist-info/METADATA") for files in parts.values() for path in files)
    assert not any(path.startswith("hetmap-") for files in parts.values() for path in files)


def test_demo_ds_is_a_fine_grained_deepseek_moe(demo_ds_model: DeepseekV2ForCausalLM) -> None:
    config = demo_ds_model.config
    assert config.model_type == "deepseek_v2"
    assert config.n_routed_experts == 16 and config.num_experts_per_tok == 6
    assert config.n_shared_experts == 1 and config.first_k_dense_replace == 1


def test_demo_ds_beats_the_bigram_baseline(demo_ds_model: DeepseekV2ForCausalLM) -> None:
    vocab = demo_ds_model.config.vocab_size
    train = corpus.bytes_to_tokens(corpus.read_corpus_bytes("train", corpus=CORPUS), vocab)
    windows = corpus.token_windows(
        corpus.bytes_to_tokens(corpus.read_corpus_bytes("eval", EVAL_BYTES, corpus=CORPUS), vocab),
        WINDOW)
    bigram = corpus.bigram_perplexity(train, windows, vocab)
    with torch.no_grad():
        logits = demo_ds_model(input_ids=windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, vocab), windows[:, 1:].reshape(-1))
    assert math.exp(nll.item()) < 0.6 * bigram, (math.exp(nll.item()), bigram)


def test_hetmap_compiles_demo_ds() -> None:
    from hetmap.compiler.api import compile_model
    from hetmap.compiler.ir.annotations import Placement

    loaded = load_model("demo-ds")
    assert loaded.vocab_size == 256 and loaded.has_weights
    plan = compile_model("demo-ds", calib_tokens=1024)
    assert plan.summary["moe_layers"] == 3 and plan.summary["experts_total"] == 48
    shared = [n for n in plan.graph if n.kind.value == "shared-expert"]
    dense = [n for n in plan.graph if n.kind.value == "dense-ffn"]
    assert len(shared) == 3 and len(dense) == 1
    assert all(not n.get(Placement).analog for n in [*shared, *dense])
