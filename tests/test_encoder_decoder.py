"""Encoder-decoder MoE families (Switch Transformers): loaded as next-token models, traced,
numbered across both stacks, calibrated on the rows their experts really compute on.

NLLB-MoE (refused: its transformers dispatch does not follow its router) is in
``tests/test_zoo.py``'s ``UNSUPPORTED``.
"""

from __future__ import annotations

import pytest
import torch

from hetmap.common.errors import SimulationError
from hetmap.compiler.api import compile_model
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.frontend import load_model
from hetmap.compiler.ir.annotations import Density
from hetmap.runtime.analog import SimulatedLinear
from hetmap.runtime.settings import AnalogSettings

SWITCH = "tiny:switch_transformers"


def test_encoder_decoder_is_called_like_a_causal_lm() -> None:
    """``model(ids)`` is the encoder reading ``ids`` and the decoder reading them too, with the
    default all-ones masks; the class's own forward is untouched."""
    model = load_model(SWITCH).module
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        expected = type(model).forward(model, input_ids=ids, decoder_input_ids=ids).logits
    assert logits.shape == (2, 9, 512)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_layers_are_numbered_across_encoder_and_decoder() -> None:
    plan = compile_model(SWITCH, pipeline="density{calib_tokens=256,seq_len=64}")
    layers = {layer: moe.experts_module for layer, moe in plan.graph.moe_layers.items()}
    # 2 encoder layers (0, 1) then 2 decoder layers (2, 3); the second of each is sparse
    assert layers == {1: "encoder.block.1.layer.1.mlp.experts",
                      3: "decoder.block.1.layer.2.mlp.experts"}
    assert len(plan.graph.experts()) == 16


def test_densities_are_the_rows_each_expert_computes_on() -> None:
    """Switch drops tokens beyond an expert's capacity: the density counts the rows the expert
    really computed on (here fewer than its router chose), measured independently by hooks."""
    plan = compile_model(SWITCH, pipeline="density{calib_tokens=1024,seq_len=256,batch=2}")
    loaded = load_model(SWITCH)
    model = loaded.module
    rows: dict[tuple[int, int], int] = {}
    stacks = {1: "encoder.block.1.layer.1", 3: "decoder.block.1.layer.2"}
    for layer, path in stacks.items():
        for e in range(8):
            module = model.get_submodule(f"{path}.mlp.experts.expert_{e}.wi")
            module.register_forward_pre_hook(
                lambda _m, args, key=(layer, e): rows.__setitem__(
                    key, rows.get(key, 0) + args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    tokens = load_tokens(loaded, None, "calib", 1024)
    chunks = batches(tokens, 256, 2)
    with torch.no_grad():
        for chunk in chunks:
            model(chunk)
    count = sum(chunk.numel() for chunk in chunks)
    for node in plan.graph.experts():
        assert node.layer is not None and node.expert is not None
        expected = rows.get((node.layer, node.expert), 0) / count
        assert node.get(Density).value == pytest.approx(expected, abs=1e-12)
    routed = sum(node.get(Density).value for node in plan.graph.experts() if node.layer == 1)
    assert 0.5 < routed < 1.0  # top-1 routing, some tokens over capacity


def test_simulated_linear_weight_is_a_data_less_stand_in() -> None:
    """Model code may read ``linear.weight.dtype`` (Switch, NLLB); computing with it raises
    (a meta tensor alone would give uninitialised numbers from ``F.linear``)."""
    linear = torch.nn.Linear(16, 8)
    simulated = SimulatedLinear(linear, AnalogSettings(), seed=0)
    weight = simulated.weight
    assert isinstance(weight, torch.Tensor) and weight.dtype == torch.float32
    assert weight.shape == (8, 16) and weight.dtype != torch.int8
    for compute in (lambda: torch.nn.functional.linear(torch.ones(2, 16), weight),
                    lambda: torch.ones(2, 16) @ weight.T, lambda: weight + 1):
        with pytest.raises(SimulationError, match="only its shape, dtype and device"):
            compute()


def test_simulated_encoder_decoder_runs_its_own_analog_layers() -> None:
    """The simulated model is a shallow clone of the digital one: the forward bound to the
    digital instance (``as_next_token_model``) must be rebound to the clone, or the mapped
    model would silently compute digitally."""
    from hetmap.compiler.evaluation.simulate import analog_part
    from hetmap.runtime.settings import settings_for

    plan = compile_model(SWITCH, calib_tokens=256)
    model = plan.model.runnable()
    part = analog_part(plan.graph, model)
    assert part.linears  # per-expert modules: their linears go analog
    simulated = part.build(model, settings_for(plan.target), seed=0)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        digital = model(ids).logits
        mapped = simulated(ids).logits
        again = model(ids).logits
    assert simulated.forward.__self__ is simulated and model.forward.__self__ is model
    assert (mapped - digital).abs().max() > 1e-3  # programming noise reached the output
    torch.testing.assert_close(again, digital, rtol=0, atol=0)  # the digital model untouched
