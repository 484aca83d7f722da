"""The export forms of :mod:`hetmap.compiler.backends.onnx_sequence` equal their references.

Mamba-2's chunked scan (any length, with and without initial and final states), MiniMax's
lightning attention and Qwen4-Exp's QSA indexer (causal masks with padded rows, bool and
float) against the transformers code they replace while exporting; and the replacements are
put back afterwards.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from hetmap.compiler.backends.onnx_sequence import (
    chunk_scan,
    dynamic_sequence_forms,
    lightning_attention,
    qsa_indexer,
)
from hetmap.compiler.frontend.zoo import ZOO


def _tiny(family: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = ZOO[family].make_config()
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("length", [1, 5, 7, 8, 13])
def test_chunk_scan_equals_the_reference(length: int) -> None:
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    generator = torch.Generator().manual_seed(length)
    batch, heads, head_dim, groups, state = 2, 4, 3, 2, 5
    x = torch.randn(batch, length, heads, head_dim, generator=generator)
    dt = torch.randn(batch, length, heads, generator=generator)
    b, c = (torch.randn(batch, length, groups, state, generator=generator) for _ in range(2))
    a = -torch.rand(heads, generator=generator)
    d, bias = torch.rand(heads, generator=generator), torch.randn(heads, generator=generator)
    initial = torch.randn(batch, heads, head_dim, state, generator=generator)
    for extra in ({}, {"initial_states": initial, "return_final_states": True}):
        options = {"D": d, "dt_bias": bias, "dt_softplus": True, "dt_limit": (0.001, 10.0), **extra}
        expected = mamba2_chunk_scan(x, dt, a, b, c, chunk_size=4, **options)
        actual = chunk_scan(x, dt, a, b, c, chunk_size=4, **options)
        torch.testing.assert_close(actual, expected)


def test_lightning_attention_equals_the_reference_blocks() -> None:
    model = _tiny("minimax")
    module = next(m for m in model.modules() if type(m).__name__ == "MiniMaxLightningAttention")
    for length in (3, 4, 7, 9):  # block size 4: shorter than, equal to and across blocks
        hidden = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = module(hidden, position_embeddings=None, attention_mask=None)
            actual = lightning_attention(module, hidden, None)
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-6)


def test_qsa_indexer_selects_the_reference_tokens() -> None:
    model = _tiny("qwen4_exp")
    (path, indexer), = [(p, m) for p, m in model.named_modules() if p.endswith("indexer")]
    rotate = sys.modules[type(indexer).__module__].apply_rotary_pos_emb
    for length in (5, 16, 23):
        hidden = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(length))
        positions = torch.arange(length)[None].expand(2, length)
        embeddings = model.model.rotary_emb(hidden, positions)
        causal = torch.arange(length)[:, None] >= torch.arange(length)[None]
        mask = causal[None, None].expand(2, 1, length, length).clone()
        mask[1, :, :, :2] = False  # a left-padded row
        for attention_mask in (mask, torch.where(mask, 0.0, torch.finfo(torch.float32).min)):
            with torch.no_grad():
                expected = indexer(hidden, embeddings, attention_mask, None)
                actual = qsa_indexer(indexer, hidden, embeddings, attention_mask, rotate)
            assert torch.equal(actual, expected), (path, length, attention_mask.dtype)
            if length > 5:  # beyond the budget (4 tokens + a tail) the indexer selects
                assert actual.sum() < mask.sum()


def test_replacements_are_put_back() -> None:
    model = _tiny("minimax")
    modeling = sys.modules[type(model).__module__]
    with dynamic_sequence_forms(model) as patched:
        assert patched and all("forward" in model.get_submodule(p).__dict__ for p in patched)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not hasattr(modeling, "mamba2_chunk_scan")
    nemotron = _tiny("nemotron_h")
    modeling = sys.modules[type(nemotron).__module__]
    original = modeling.mamba2_chunk_scan
    with dynamic_sequence_forms(nemotron) as patched:
        assert patched == [modeling.__name__] and modeling.mamba2_chunk_scan is chunk_scan
    assert modeling.mamba2_chunk_scan is original
