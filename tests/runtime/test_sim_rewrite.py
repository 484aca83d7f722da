"""build_simulated_model on a tiny OLMoE: exactness in ideal mode, backend parity, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetmap.common.errors import SimulationError
from hetmap.runtime import (
    AnalogSettings,
    ReferenceExperts,
    ReferenceLinear,
    SimulatedExperts,
    SimulatedLinear,
    build_simulated_model,
)

IDEAL = AnalogSettings(rows=16, cols=16, ideal=True)
QUANTIZED = AnalogSettings(rows=16, cols=16, noise_scale=0.0)


def _input_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(9))


def _relative(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    return ((outputs - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("backend", ["hetmap", "aihwkit"])
def test_ideal_mode_reproduces_the_model(
    backend: str, tiny_olmoe, attention_linears, all_experts
) -> None:
    model = tiny_olmoe(seed=0)
    simulated = build_simulated_model(
        model, attention_linears(model), all_experts(model), IDEAL, seed=0, backend=backend
    )
    with torch.no_grad():
        reference = model(_input_ids()).logits
        outputs = simulated(_input_ids()).logits
    assert _relative(outputs, reference) < 1e-5


def test_replaces_exactly_the_listed_modules(tiny_olmoe, attention_linears) -> None:
    model = tiny_olmoe(seed=0)
    linears = {"model.layers.0.self_attn.q_proj", "lm_head"}
    experts = {"model.layers.1.mlp.experts": [1, 3]}
    simulated = build_simulated_model(model, linears, experts, QUANTIZED, seed=0)
    modules = dict(simulated.named_modules())
    assert all(isinstance(modules[path], SimulatedLinear) for path in linears)
    assert isinstance(modules["model.layers.1.mlp.experts"], SimulatedExperts)
    assert modules["model.layers.1.mlp.experts"].analog_experts == (1, 3)
    assert type(modules["model.layers.0.mlp.experts"]).__name__ == "OlmoeExperts"
    assert isinstance(modules["model.layers.0.self_attn.k_proj"], nn.Linear)
    # the original is untouched; every module off the replaced paths is shared, not copied
    assert all(isinstance(dict(model.named_modules())[path], nn.Linear) for path in linears)
    replaced = linears | set(experts)
    on_path = {p for r in replaced for p in [r.rsplit(".", i)[0] for i in range(r.count(".") + 1)]}
    kept = {path: module for path, module in model.named_modules()
            if path and path not in on_path and not any(path.startswith(r + ".") for r in replaced)}
    shared = dict(simulated.named_modules())
    assert kept and all(shared[path] is module for path, module in kept.items())
    replaced_tensors = {t.data_ptr() for r in replaced for t in model.get_submodule(r).parameters()}
    assert not replaced_tensors & {t.data_ptr() for t in simulated.parameters()}
    assert model.get_submodule("model.layers.1.mlp") is not shared["model.layers.1.mlp"]


def test_aihwkit_backend_matches_hetmap_on_the_whole_model(
    tiny_olmoe, attention_linears, all_experts
) -> None:
    """float64, DAC/ADC on, noise off: the two backends give the same logits."""
    model = tiny_olmoe(seed=0).double()
    linears, experts = attention_linears(model), all_experts(model)
    ours = build_simulated_model(model, linears, experts, QUANTIZED, seed=0)
    theirs = build_simulated_model(model, linears, experts, QUANTIZED, seed=0, backend="aihwkit")
    assert isinstance(theirs.get_submodule("model.layers.0.self_attn.q_proj"), ReferenceLinear)
    assert isinstance(theirs.get_submodule("model.layers.0.mlp.experts"), ReferenceExperts)
    with torch.no_grad():
        outputs, reference = ours(_input_ids()).logits, theirs(_input_ids()).logits
    assert _relative(outputs, reference) < 1e-5


def test_noisy_model_is_seeded(tiny_olmoe, all_experts) -> None:
    model = tiny_olmoe(seed=0)
    noisy = AnalogSettings(rows=16, cols=16, noise_scale=1.5, out_noise=0.02)
    with torch.no_grad():
        runs = [
            build_simulated_model(model, set(), all_experts(model), noisy, seed)(_input_ids())
            for seed in (4, 4, 5)
        ]
    assert torch.equal(runs[0].logits, runs[1].logits)
    assert not torch.allclose(runs[0].logits, runs[2].logits)


@pytest.mark.parametrize(
    ("linears", "experts", "backend", "fragment"),
    [
        ({"model.layers.0.self_attn.nope"}, {}, "hetmap", "'model.layers.0.self_attn.nope'"),
        ({""}, {}, "hetmap", "analog linear '' is a OlmoeForCausalLM"),
        ({"model.layers.0.mlp.experts"}, {}, "hetmap", "not an nn.Linear"),
        (set(), {"model.layers.0.mlp.gate": [0]}, "hetmap", "'model.layers.0.mlp.gate'"),
        (set(), {"model.layers.9.mlp.experts": [0]}, "hetmap", "'model.layers.9.mlp.experts'"),
        (set(), {"model.layers.0.mlp.experts": [4]}, "hetmap", "got analog experts \\[4\\]"),
        (set(), {}, "lightning", "unknown simulation backend 'lightning'"),
    ],
)
def test_bad_requests_raise_simulation_errors(
    tiny_olmoe, linears, experts, backend, fragment
) -> None:
    model = tiny_olmoe(seed=0)
    with pytest.raises(SimulationError, match=fragment):
        build_simulated_model(model, linears, experts, IDEAL, seed=0, backend=backend)


class _ClaimsBiasExperts(nn.Module):
    """Fused experts that say ``has_bias`` but hold no bias parameters: unreadable."""

    has_bias = True

    def __init__(self, hidden: int = 4, intermediate: int = 6) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(2, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.zeros(2, hidden, intermediate))
        self.act_fn = nn.SiLU()


@pytest.mark.parametrize(
    ("experts", "fragment"),
    [
        (_ClaimsBiasExperts(), "says has_bias=True"),
        (_ClaimsBiasExperts(hidden=4, intermediate=4), "cannot tell the orientation"),
    ],
)
def test_unreadable_experts_layout_is_refused(experts: nn.Module, fragment: str) -> None:
    model = nn.Sequential()
    model.add_module("experts", experts)
    with pytest.raises(SimulationError, match=f"experts module 'experts'.*{fragment}"):
        build_simulated_model(model, set(), {"experts": [0]}, IDEAL, seed=0)


def test_hooks_on_the_simulated_model_do_not_reach_the_digital_one(tiny_olmoe) -> None:
    model = tiny_olmoe(seed=0)
    simulated = build_simulated_model(model, set(), {"model.layers.1.mlp.experts": [0]},
                                      QUANTIZED, seed=0)
    calls: list[str] = []
    simulated.register_forward_hook(lambda *_: calls.append("root"))
    simulated.get_submodule("model.layers.1").register_forward_hook(lambda *_: calls.append("layer"))
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert calls == []
