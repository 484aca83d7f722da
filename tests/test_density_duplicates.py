"""The density pass counts an expert once per token, even when a token's top-k names it twice.

DeepSeek-V4's hash router takes a token's experts from a fixed table ``tid2eid[token]``; a row
of that table may repeat an expert (a random tiny model's all-zero table repeats expert 0 in
every row). Densities, routing weights and input moments must count distinct (token, expert)
pairs; the check recomputes them from the table itself.
"""

from __future__ import annotations

import pytest
import torch

from hetmap.compiler.api import compile_model
from hetmap.compiler.data.textdata import load_tokens
from hetmap.compiler.frontend import load_model
from hetmap.compiler.ir.annotations import Density, InputMoments

CALIB_TOKENS = 512


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_an_expert_named_twice_in_a_tokens_top_k_counts_once() -> None:
    loaded = load_model("tiny:deepseek_v4")
    hash_layers = [(path, m) for path, m in loaded.module.named_modules()
                   if type(m).__name__ == "DeepseekV4HashRouter"]
    assert hash_layers, "the tiny DeepSeek-V4 config lost its hash-routed layers"
    path, router = hash_layers[0]
    table = torch.randint(0, router.num_experts, router.tid2eid.shape,
                          generator=torch.Generator().manual_seed(0))
    table[::2, 1] = table[::2, 0]  # every other token names one expert twice
    router.tid2eid.copy_(table)
    plan = compile_model(loaded, pipeline=f"density{{calib_tokens={CALIB_TOKENS},seq_len=128}}")
    layer = next(layer for layer, moe in plan.graph.moe_layers.items()
                 if moe.router == path or moe.router.startswith(path + "."))
    tokens = load_tokens(plan.model, None, "calib", CALIB_TOKENS).reshape(-1)
    chosen = table[tokens]  # [T, 2]
    repeated = chosen[:, 0] == chosen[:, 1]
    assert repeated.any() and not repeated.all()
    nodes = plan.graph.experts(layer)
    total = 0.0
    for node in nodes:
        routed = (chosen == node.expert).any(dim=-1)  # distinct: once per token
        density = node.get(Density)
        assert density.value == pytest.approx(float(routed.float().mean()))
        assert 0.0 <= density.value <= 1.0
        assert node.get(InputMoments).tokens == int(routed.sum())
        total += density.value
    distinct_per_token = 2.0 - float(repeated.float().mean())
    assert total == pytest.approx(distinct_per_token)
