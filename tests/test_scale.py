"""Asymptotics guard: a structure-only compile grows about linearly with the expert count."""

from __future__ import annotations

import time

import pytest
import torch
import transformers

from hetmap.compiler.api import compile_model
from hetmap.compiler.frontend.loader import LoadedModel


def meta_model(experts: int) -> LoadedModel:
    config = transformers.OlmoeConfig(vocab_size=1024, hidden_size=256, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=4, num_experts=experts,
                                      num_experts_per_tok=2)
    with torch.device("meta"):
        module = transformers.AutoModelForCausalLM.from_config(config)
    return LoadedModel(spec=f"synthetic-{experts}", name=f"synthetic-{experts}",
                       source="builtin", module=module, config=config)


def best_time(experts: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan = compile_model(meta_model(experts), policy="random", chips="auto")
        plan.to_json()
        times.append(time.perf_counter() - start)
    assert plan.summary["experts_total"] == 4 * experts
    return min(times)


@pytest.mark.timing
def test_compile_time_grows_linearly_in_experts() -> None:
    small, large = best_time(64), best_time(512)
    # 8x the experts: linear scaling gives ~8x (less, with fixed costs); quadratic would be ~64x
    assert large / small < 16, (small, large)
