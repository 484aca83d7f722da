"""SimulatedExperts on every expert storage layout of transformers' MoE families.

Tiny random models (hidden 64, 8 experts, top-2, vocabulary 512; ``compiler.frontend.zoo``
configs where the family has a causal LM, the text model otherwise), fixed seeds:

(a) ideal tiles: the simulated experts module equals the original within 1e-5 (relative to the
    largest output), same shape and dtype, on random routing;
(b) noisy tiles: only the outputs of tokens routed to an analog expert change;
(c) ``build_simulated_model`` with every expert analog and ideal tiles gives the digital
    model's output;
and the aihwkit reference backend against the hetmap tiles on the same layouts (float64).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import pytest
import torch
import transformers
from torch import nn
from transformers.models.muse_spark import modeling_muse_spark
from transformers.models.step3p7 import modeling_step3p7

from hetmap.common.errors import SimulationError
from hetmap.compiler.frontend.moe import find_moe_blocks
from hetmap.compiler.frontend.zoo import ZOO, shrink
from hetmap.runtime import AnalogSettings, ReferenceExperts, SimulatedExperts, build_simulated_model
from hetmap.runtime.experts import experts_layout
from hetmap.runtime.layouts import read_layout

IDEAL = AnalogSettings(rows=32, cols=32, ideal=True)
NOISY = AnalogSettings(rows=32, cols=32, noise_scale=1.5, out_noise=0.02)
QUANTIZED = AnalogSettings(rows=32, cols=16, noise_scale=0.0, out_noise=0.0)
ANALOG = (1, 4, 6)
DIGITAL = (0, 2, 3, 5, 7)
TOKENS = 12


@dataclass(frozen=True)
class Case:
    model: nn.Module
    experts_path: str
    router_slots: int  # experts with weights plus identity experts
    top_k: int

    @property
    def experts(self) -> nn.Module:
        return self.model.get_submodule(self.experts_path)


def _text_model(model_class: type[nn.Module], config_class: type, **overrides: object) -> nn.Module:
    fields = shrink(config_class().to_dict(), 2)
    fields.update(overrides)
    return model_class(config_class(**fields))


def _causal_lm(family: str, **overrides: object) -> nn.Module:
    config = ZOO[family].make_config()
    for name, value in overrides.items():
        setattr(config, name, value)
    return transformers.AutoModelForCausalLM.from_config(config)


_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    **{family: partial(_causal_lm, family)
       for family in ("olmoe", "llama4", "longcat_flash", "dbrx", "nemotron_h", "aria")},
    # small clamps, so that the clamped SwiGLUs of GPT-OSS and Step 3.7 really clamp
    "gpt_oss": partial(_causal_lm, "gpt_oss", swiglu_limit=0.1),
    "muse_spark": partial(_text_model, modeling_muse_spark.MuseSparkTextModel,
                          modeling_muse_spark.MuseSparkTextConfig, moe_hidden_size=64),
    "step3p7": partial(_text_model, modeling_step3p7.Step3p7TextModel,
                       modeling_step3p7.Step3p7TextConfig, swiglu_limits=[0.05, 0.05],
                       sliding_window=4),
}
#: family -> layout name the reader must find
LAYOUTS = {
    "olmoe": "fused", "gpt_oss": "fused-t-interleaved+bias", "llama4": "fused-t-dense-input",
    "longcat_flash": "fused+2-identity", "dbrx": "flat", "nemotron_h": "fused-no-gate",
    "muse_spark": "fused+post-norm", "step3p7": "fused", "aria": "fused-t",
}


@cache
def case(family: str) -> Case:
    torch.manual_seed(0)
    model = _BUILDERS[family]().eval()
    config = getattr(model, "config", None)
    block = next(iter(find_moe_blocks(model, config).values()))
    router = model.get_submodule(block.router)
    return Case(model, block.experts, int(router.weight.shape[0]), block.top_k)


def _routing(slots: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 routing of TOKENS tokens: 0-3 to digital experts only, 4-7 to an analog one and
    a digital one, the rest anywhere in the router's slots (identity experts included)."""
    rows = []
    for token in range(TOKENS):
        if token < 4:
            pick = torch.tensor(DIGITAL)[torch.randperm(len(DIGITAL), generator=generator)[:2]]
        elif token < 8:
            pick = torch.tensor([ANALOG[token % 3], DIGITAL[token % 5]])
        else:
            pick = torch.randperm(slots, generator=generator)[:2]
        rows.append(pick)
    weights = torch.rand(TOKENS, 2, generator=generator) + 0.1
    return torch.stack(rows), weights


def _call(case: Case, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
          ) -> tuple[torch.Tensor, ...]:
    """The experts module's arguments as its MoE block builds them."""
    layout = experts_layout(case.experts, case.experts_path)
    if layout.call != "dense-input":
        return hidden, index, weights
    scores = torch.zeros(hidden.shape[0], case.router_slots).scatter_(1, index, weights)
    return (hidden.repeat(case.router_slots, 1) * scores.T.reshape(-1, 1),)


def _relative(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    return ((outputs - reference).abs().max() / reference.abs().max()).item()


def _inputs(case: Case, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, 64, generator=generator)
    index, weights = _routing(case.router_slots, generator)
    return _call(case, hidden, index, weights)


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_reader_finds_the_family_layout(family: str) -> None:
    """The layout inferred from the module alone is the one read with the router's size."""
    found = case(family)
    layout = experts_layout(found.experts, found.experts_path)
    assert layout.name == LAYOUTS[family]
    assert layout == read_layout(found.experts, found.router_slots, 64)


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_ideal_tiles_reproduce_the_experts_module(family: str) -> None:
    found = case(family)
    simulated = SimulatedExperts(found.experts, ANALOG, IDEAL, seed=0, path=found.experts_path)
    arguments = _inputs(found, seed=1)
    with torch.no_grad():
        reference, outputs = found.experts(*arguments), simulated(*arguments)
    assert outputs.shape == reference.shape and outputs.dtype == reference.dtype
    assert _relative(outputs, reference) < 1e-5


def test_dbrx_output_keeps_the_batch_view() -> None:
    """DBRX's experts return ``view(batch, -1, H)``: [T, 1, H] for [T, H], [B, S, H] for 3-D."""
    found = case("dbrx")
    simulated = SimulatedExperts(found.experts, ANALOG, IDEAL, seed=0, path=found.experts_path)
    hidden, index, weights = _inputs(found, seed=2)
    with torch.no_grad():
        for states in (hidden, hidden.view(3, 4, 64)):
            reference, outputs = found.experts(states, index, weights), simulated(states, index, weights)
            assert outputs.shape == reference.shape
            assert _relative(outputs, reference) < 1e-5
    assert simulated(hidden, index, weights).shape == (TOKENS, 1, 64)


def test_sentinel_indices_are_skipped() -> None:
    found = case("olmoe")
    simulated = SimulatedExperts(found.experts, ANALOG, IDEAL, seed=0, path=found.experts_path)
    hidden, index, weights = _inputs(found, seed=3)
    index[::3, 1] = 8  # expert-parallel sentinel: experts 0..7 live here
    eager = inspect.unwrap(type(found.experts).forward)  # transformers' kernels assume no EP
    with torch.no_grad():
        reference = eager(found.experts, hidden, index, weights)
        assert _relative(simulated(hidden, index, weights), reference) < 1e-5


def _changed_rows(case: Case, arguments: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the output that involve an analog expert, and those that do not."""
    if len(arguments) == 1:  # dense input: block e of TOKENS rows is expert e's
        expert = torch.arange(arguments[0].shape[0]) // TOKENS
        analog = torch.isin(expert, torch.tensor(ANALOG)) & arguments[0].ne(0).any(-1)
    else:
        analog = torch.isin(arguments[1], torch.tensor(ANALOG)).any(-1)
    return analog, ~analog


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_noise_changes_only_analog_experts(family: str) -> None:
    found = case(family)
    simulated = SimulatedExperts(found.experts, ANALOG, NOISY, seed=0, path=found.experts_path)
    arguments = _inputs(found, seed=4)
    with torch.no_grad():
        reference = found.experts(*arguments).reshape(-1, 64)
        outputs = simulated(*arguments).reshape(-1, 64)
    analog, digital = _changed_rows(found, arguments)
    assert int(analog.sum()) >= 4 and int(digital.sum()) >= 4
    scale = reference.abs().max()
    torch.testing.assert_close(outputs[digital], reference[digital], rtol=1e-5,
                               atol=1e-6 * float(scale))
    assert ((outputs[analog] - reference[analog]).abs().amax(-1) > 1e-3 * scale).all()


def _run(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_ideal_whole_model_gives_the_digital_output(family: str) -> None:
    found = case(family)
    config = getattr(found.model, "config", None)
    experts = {block.experts: range(block.num_experts)
               for block in find_moe_blocks(found.model, config).values()}
    simulated = build_simulated_model(found.model, set(), experts, IDEAL, seed=0)
    assert all(isinstance(simulated.get_submodule(path), SimulatedExperts) for path in experts)
    input_ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _relative(_run(simulated, input_ids), _run(found.model, input_ids)) < 1e-5


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "longcat_flash", "dbrx", "nemotron_h"])
def test_aihwkit_reference_matches_hetmap_tiles(family: str) -> None:
    """float64, DAC/ADC on, noise off: the per-expert aihwkit modules give the same outputs."""
    found = case(family)
    experts = found.experts.double()
    try:
        ours = SimulatedExperts(experts, ANALOG, QUANTIZED, seed=5, path=found.experts_path)
        theirs = ReferenceExperts(experts, ANALOG, QUANTIZED, seed=5, path=found.experts_path)
    finally:
        found.experts.float()
    arguments = tuple(a.double() if a.is_floating_point() else a for a in _inputs(found, seed=6))
    with torch.no_grad():
        outputs, reference = ours(*arguments), theirs(*arguments)
    assert outputs.shape == reference.shape
    assert ((outputs - reference).norm() / reference.norm()).item() < 1e-5


# --- split experts (neuron-granular placement) ---------------------------------------------

#: analog expert -> its digital neurons (those below each case's intermediate width)
SPLIT = {1: (0, 5, 17, 63), 4: tuple(range(0, 64, 2)), 6: (31,)}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_ideal_split_experts_reproduce_the_experts_module(family: str) -> None:
    """Ideal tiles: analog part + exact digital part = the expert, on every layout (biases,
    custom gating, post-expert norm, identity experts, dense-input calls included)."""
    found = case(family)
    width = experts_layout(found.experts, found.experts_path).intermediate
    split = {e: tuple(j for j in neurons if j < width) for e, neurons in SPLIT.items()}
    simulated = SimulatedExperts(found.experts, ANALOG, IDEAL, seed=0, path=found.experts_path,
                                 digital_neurons=split)
    arguments = _inputs(found, seed=5)
    with torch.no_grad():
        reference, outputs = found.experts(*arguments), simulated(*arguments)
    assert outputs.shape == reference.shape and outputs.dtype == reference.dtype
    assert _relative(outputs, reference) < 1e-5


def test_split_analog_part_is_the_compacted_expert_on_tiles() -> None:
    """The analog part of experts split on neurons D computes exactly what the same experts
    without D (a smaller store) compute on tiles programmed with the same seed: the packing
    adds nothing (same tiles, scales, noise draws)."""
    from hetmap.runtime.experts import canonical_experts, expert_group
    from hetmap.runtime.grouped import RowGroups
    from hetmap.runtime.layouts import activation_of

    found = case("olmoe")
    store = found.experts
    width = experts_layout(store, "e").intermediate
    keep = torch.tensor([j for j in range(width) if j not in (3, 9, width - 1)])
    compact = copy.deepcopy(store)
    gate, up = store.gate_up_proj.detach().split(width, dim=1)
    compact.gate_up_proj = nn.Parameter(torch.cat([gate[:, keep], up[:, keep]], dim=1))
    compact.down_proj = nn.Parameter(store.down_proj.detach()[:, :, keep])
    settings = AnalogSettings(rows=16, cols=16, noise_scale=2.0, out_noise=0.05)
    chosen = [1, 4, 6]
    split = expert_group(canonical_experts(store, "e"), chosen, settings, 7,
                         neurons=[keep] * len(chosen))
    whole = expert_group(canonical_experts(compact, "e"), chosen, settings, 7)
    inputs = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    rows = RowGroups.from_sorted(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]), 3)
    activation = activation_of(store, experts_layout(store, "e"))
    with torch.no_grad():
        torch.testing.assert_close(split(inputs, rows, activation),
                                   whole(inputs, rows, activation), rtol=0, atol=0)


def test_split_digital_neurons_are_exact_under_noise() -> None:
    """With noise, an expert whose every neuron but one is digital is far closer to the exact
    expert than the same expert fully analog (fixed seeds, 5 programmings)."""
    found = case("olmoe")
    arguments = _inputs(found, seed=6)
    analog_rows, _ = _changed_rows(found, arguments)
    errors = {}
    with torch.no_grad():
        reference = found.experts(*arguments)
        width = experts_layout(found.experts, found.experts_path).intermediate
        for name, split in (("analog", {}), ("split", {e: tuple(range(1, width)) for e in ANALOG})):
            total = 0.0
            for seed in range(5):
                simulated = SimulatedExperts(found.experts, ANALOG, NOISY, seed=seed,
                                             path=found.experts_path, digital_neurons=split)
                total += float((simulated(*arguments) - reference)[analog_rows].square().mean())
            errors[name] = total / 5
    assert errors["split"] < 0.1 * errors["analog"], errors


def test_split_experts_are_refused_when_inconsistent() -> None:
    found = case("olmoe")
    width = experts_layout(found.experts, found.experts_path).intermediate
    for split, says in (({0: (1,)}, "not an analog expert"), ({1: tuple(range(width))}, "not all"),
                        ({1: (width,)}, f"some of 0..{width - 1}")):
        with pytest.raises(SimulationError, match=says):
            SimulatedExperts(found.experts, ANALOG, IDEAL, seed=0, path=found.experts_path,
                             digital_neurons=split)
    with pytest.raises(SimulationError, match="does not simulate split experts"):
        build_simulated_model(found.model, [], {found.experts_path: ANALOG}, IDEAL, seed=0,
                              backend="aihwkit", digital_neurons={found.experts_path: {1: (0,)}})
