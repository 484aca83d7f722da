"""Reduced-precision models: bfloat16 storage and digital compute, float32 analog tiles."""

from __future__ import annotations

import pytest
import torch

from hetmap.compiler.api import compile_model
from hetmap.compiler.frontend.loader import load_model, resolve_dtype


def test_auto_dtype_follows_the_checkpoint() -> None:
    class Config:
        dtype = torch.bfloat16

    assert resolve_dtype("auto", Config()) is torch.bfloat16
    assert resolve_dtype("auto", None) is torch.float32
    assert resolve_dtype("float16", None) is torch.float16
    assert next(load_model("olmoe-tiny", dtype="bfloat16").module.parameters()).dtype \
        is torch.bfloat16


def test_bfloat16_simulation_agrees_with_float32() -> None:
    """demo, 2,048 evaluation tokens, seeds 0-1: perplexities within 1% (digital) and 2%
    (mapped); the analog tiles hold float32 weights either way."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        plan = compile_model("demo", dtype=dtype, calib_tokens=1024)
        assert plan.options["dtype"] == dtype
        assert next(plan.model.runnable().parameters()).dtype == getattr(torch, dtype)
        results[dtype] = plan.simulate(seeds=2, eval_tokens=2048)
    full, half = results["float32"], results["bfloat16"]
    assert half.digital_ppl == pytest.approx(full.digital_ppl, rel=0.01)
    assert half.mapped_ppl_mean == pytest.approx(full.mapped_ppl_mean, rel=0.02)
    # the noise is what it was: mapped stays above digital by a similar margin
    assert (half.mapped_ppl_mean - half.digital_ppl) == pytest.approx(
        full.mapped_ppl_mean - full.digital_ppl, rel=0.5, abs=0.02)


def test_analog_tiles_compute_in_float32_for_a_bfloat16_model() -> None:
    from hetmap.compiler.evaluation.simulate import analog_part
    from hetmap.runtime import build_simulated_model
    from hetmap.runtime.settings import settings_for

    plan = compile_model("olmoe-tiny", dtype="bfloat16", policy="random")
    model = plan.model.runnable()
    part = analog_part(plan.graph, model)
    simulated = build_simulated_model(model, part.linears, part.experts,
                                      settings_for(plan.target), seed=0, layouts=part.layouts)
    from hetmap.runtime.analog import AnalogTileStack, DigitalStack

    analog = [m.weight for m in simulated.modules() if isinstance(m, AnalogTileStack)]
    assert analog and all(b.dtype == torch.float32 for b in analog)
    # digital experts inside a simulated experts module compute as the digital model does
    digital = [m.weight for m in simulated.modules() if isinstance(m, DigitalStack)]
    assert digital and all(b.dtype == torch.bfloat16 for b in digital)
    tokens = torch.randint(0, 256, (1, 16))
    logits = simulated(tokens).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
