"""JetMoE's experts: two stacks ``weight [E, out, in]`` called with rows sorted by expert and
rows per expert (the ``sizes`` layout, :func:`hetmap.runtime.layouts.read_layout` rule 5),
read, calibrated and simulated; its mixture-of-attention experts stay with the attention."""

from __future__ import annotations

import pytest
import torch

from hetmap.compiler.api import compile_model
from hetmap.compiler.frontend import load_model
from hetmap.compiler.frontend.moe import find_moe_blocks
from hetmap.compiler.ir.annotations import Density, InputMoments
from hetmap.runtime.layouts import read_layout, sized_stacks
from hetmap.runtime.settings import AnalogSettings
from hetmap.runtime.sized import SimulatedSizedStack

JETMOE = "tiny:jetmoe"


def _model() -> torch.nn.Module:
    return load_model(JETMOE).module


def test_blocks_are_the_mlps_and_their_layout_is_sizes() -> None:
    model = _model()
    blocks = find_moe_blocks(model, model.config)
    assert sorted(blocks) == ["model.layers.0.mlp", "model.layers.1.mlp"]  # not self_attention
    block = blocks["model.layers.0.mlp"]
    assert block.experts == block.path and block.router == "model.layers.0.mlp.router.layer"
    assert block.layout == "fused-sizes" and block.top_k == 2 and block.num_experts == 8
    layout = read_layout(model.get_submodule(block.path), 8, 64)
    assert layout is not None and layout.has_gate and layout.intermediate == 32
    assert sized_stacks(layout) == ("input_linear", "output_linear")
    gate, up, down = block.expert_matrices[3]
    assert (gate.role, up.role, down.role) == ("gate", "up", "down")
    assert gate.shape == up.shape == (32, 64) and down.shape == (64, 32)
    full = model.get_parameter(gate.weight.tensor)
    assert gate.weight.tensor == "model.layers.0.mlp.input_linear.weight"
    assert torch.equal(gate.weight.select(full), full[3, :32])  # chunk(2): gate first
    assert torch.equal(up.weight.select(full), full[3, 32:])


@pytest.mark.parametrize("analog", [[], [0, 3, 5], list(range(8))])
def test_ideal_stack_equals_the_original(analog: list[int]) -> None:
    stack = _model().get_submodule("model.layers.0.mlp.input_linear")
    sizes = [3, 0, 5, 1, 2, 4, 0, 6]
    rows = torch.randn(sum(sizes), 64, generator=torch.Generator().manual_seed(0))
    simulated = SimulatedSizedStack(stack, analog, AnalogSettings(ideal=True), 0, "s", (32, 32))
    with torch.no_grad():
        torch.testing.assert_close(simulated(rows, sizes), stack(rows, sizes),
                                   rtol=1e-5, atol=1e-5)


def test_noise_reaches_only_the_analog_experts_rows() -> None:
    stack = _model().get_submodule("model.layers.0.mlp.output_linear")
    sizes = [4, 4, 4, 4, 4, 4, 4, 4]
    rows = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    simulated = SimulatedSizedStack(stack, [2, 6], AnalogSettings(noise_scale=2.0), 7, "s")
    with torch.no_grad():
        noisy, exact = simulated(rows, sizes), stack(rows, sizes)
    analog_rows = torch.zeros(32, dtype=torch.bool)
    analog_rows[8:12] = analog_rows[24:28] = True
    torch.testing.assert_close(noisy[~analog_rows], exact[~analog_rows], rtol=0, atol=1e-6)
    assert (noisy[analog_rows] - exact[analog_rows]).abs().max() > 1e-3
    again = SimulatedSizedStack(stack, [2, 6], AnalogSettings(noise_scale=2.0), 7, "s")
    assert torch.equal(again(rows, sizes), noisy)  # the seed fixes the programming


def test_calibration_counts_routing_and_input_moments() -> None:
    plan = compile_model(JETMOE, pipeline="density{calib_tokens=512,seq_len=128}")
    for layer in (0, 1):
        experts = plan.graph.experts(layer)
        assert sum(n.get(Density).value for n in experts) == pytest.approx(2.0)  # top-2
        for node in experts:
            moments = node.get(InputMoments)
            assert set(moments.second_moments) == {"gate", "up", "down"}
            assert moments.tokens == round(node.get(Density).value * 512)
            assert moments.tokens == 0 or float(moments.second_moments["down"].sum()) > 0
