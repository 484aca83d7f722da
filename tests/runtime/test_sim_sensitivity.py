"""The ``sensitivity`` pass's replayed runs against full reruns of a simulated model copy.

Replaying the recorded baseline and running only the layers after a perturbed expert's own
must give the scores of the brute-force path (a simulated copy of the whole model per run)
up to float rounding: 1e-6 nats here (the scores are 1e-5 .. 1e-2 nats).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetmap.compiler.api import compile_model
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.frontend import load_model
from hetmap.compiler.ir.annotations import Sensitivity
from hetmap.compiler.passes.sensitivity import _mean_nll, full_rerun_increase
from hetmap.runtime import perturbed
from hetmap.runtime.settings import settings_for

TOLERANCE = 1e-6
TOKENS = 256


def _measured(pipeline_options: str, target: str = "aimc-512"):
    loaded = load_model("demo")
    plan = compile_model(loaded, target=target,
                         pipeline=f"sensitivity{{tokens={TOKENS},seq_len=128,{pipeline_options}}}")
    return loaded, plan


def _full_reruns(loaded, plan, seeds: int) -> dict[str, float]:
    model = loaded.runnable()
    windows = batches(load_tokens(loaded, None, "calib", TOKENS), 128, 8)
    settings = settings_for(plan.target)
    baseline = _mean_nll(model, windows)
    measured = [n for n in plan.graph.experts() if n.get(Sensitivity) is not None]
    return {
        node.name: sum(full_rerun_increase(model, plan.graph.moe_layers[node.layer], node,
                                           settings, seed, windows, baseline)
                       for seed in range(seeds)) / seeds
        for node in measured
    }


def _assert_same_scores(plan, expected: dict[str, float]) -> None:
    scores = {n.name: n.get(Sensitivity).loss_increase for n in plan.graph.experts()
              if n.get(Sensitivity) is not None}
    assert scores.keys() == expected.keys()
    assert max(abs(v) for v in expected.values()) > 1e-4  # the noise moved the loss
    worst = max(abs(scores[name] - expected[name]) for name in expected)
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("replicas", [1, 3])
def test_replayed_scores_equal_full_reruns(replicas: int) -> None:
    loaded, plan = _measured(f"seeds=2,replicas={replicas}")
    assert "4 of 4 layer(s) replayed" in plan.timings[0].notes[0]
    _assert_same_scores(plan, _full_reruns(loaded, plan, seeds=2))


def test_replayed_scores_equal_full_reruns_with_output_noise() -> None:
    """Output noise is drawn per forward: the replay feeds each expert's tiles the same rows
    in the same order as the full rerun, so even the noise draws agree."""
    loaded, plan = _measured("layers=1+3", target="hermes-256")
    assert settings_for(plan.target).out_noise > 0
    _assert_same_scores(plan, _full_reruns(loaded, plan, seeds=1))


def test_layers_that_are_not_additive_run_with_replayed_experts(monkeypatch) -> None:
    monkeypatch.setattr(perturbed, "output_is_additive", lambda *_args: False)
    loaded, plan = _measured("layers=0+2,replicas=2")
    _assert_same_scores(plan, _full_reruns(loaded, plan, seeds=1))


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class _Layer(nn.Module):
    def __init__(self, norm_after: bool) -> None:
        super().__init__()
        self.experts = _Experts()
        self.norm = nn.LayerNorm(8) if norm_after else nn.Identity()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden + self.experts(hidden))


@pytest.mark.parametrize("norm_after", [False, True])
def test_additivity_check_tells_residual_adds_from_norms(norm_after: bool) -> None:
    torch.manual_seed(0)
    layer = _Layer(norm_after)
    hidden = torch.randn(2, 5, 8)
    output = layer(hidden)
    additive = perturbed.output_is_additive(layer, layer.experts, ((hidden,), {}), output)
    assert additive is not norm_after


def test_estimate_is_logged_before_the_measured_runs() -> None:
    events: list[str] = []

    def progress(_description: str, _total: int):
        return lambda count: events.extend(["run"] * count)

    compile_model(load_model("demo"), pipeline=f"sensitivity{{tokens={TOKENS},layers=2}}",
                  log=events.append, progress=progress)
    assert "estimated" in events[0] and events[1:] == ["run"] * 8


@pytest.mark.parametrize("name", ["mixtral-tiny", "deepseek-v3-tiny", "tiny:qwen3_vl_moe"])
def test_replay_across_families(name: str) -> None:
    """Renormalised top-k (Mixtral); shared experts and dense first layers (DeepSeek-V3); a
    multimodal family's text model, whose forward has no ``use_cache`` argument, so only the
    loader's switching off of the KV cache keeps a replayed layer call from extending the
    cache of the recorded one (Qwen3-VL-MoE)."""
    loaded = load_model(name)
    plan = compile_model(loaded, pipeline="sensitivity{tokens=128,seq_len=64,replicas=2}")
    layers = len(plan.graph.moe_layers)
    assert f"{layers} of {layers} layer(s) replayed" in plan.timings[0].notes[0]
    model = loaded.runnable()
    windows = batches(load_tokens(loaded, None, "calib", 128), 64, 8)
    settings = settings_for(plan.target)
    baseline = _mean_nll(model, windows)
    for node in plan.graph.experts():
        expected = full_rerun_increase(model, plan.graph.moe_layers[node.layer], node, settings,
                                       0, windows, baseline)
        assert abs(node.get(Sensitivity).loss_increase - expected) < TOLERANCE
