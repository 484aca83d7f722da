"""The Python API: a model object or name in, a Plan out; emit ONNX and simulate from it."""

from __future__ import annotations

import sys

import onnx
import pytest
from conftest import FIXTURES

from hetmap.common.errors import PipelineError
from hetmap.compiler.api import compile_model, load_plan
from hetmap.compiler.ir.annotations import Placement


def test_compile_module_object_emit_and_simulate(tmp_path) -> None:
    sys.path.insert(0, str(FIXTURES))
    try:
        import handwritten
    finally:
        sys.path.remove(str(FIXTURES))
    plan = compile_model(handwritten.moe(), policy="activation-frequency", budget=0.25,
                         calib_tokens=256)
    assert plan.summary["experts_digital"] == 4
    assert isinstance(plan.placement("layers.0.mlp.experts.0"), Placement)
    plan.write(tmp_path / "plan")
    paths = plan.emit_onnx(tmp_path / "plan")
    assert paths == [tmp_path / "plan" / "model.onnx"]
    tagged = [n for n in onnx.load(str(paths[0])).graph.node
              if any(p.key == "hetmap.placement" for p in n.metadata_props)]
    assert len(tagged) >= 16 * 3
    result = plan.simulate(ideal=True, eval_tokens=512)
    assert result.mapped_ppl == [pytest.approx(result.digital_ppl, rel=1e-6)]


def test_load_plan_roundtrip(tmp_path) -> None:
    plan = compile_model("olmoe-tiny", policy="router-norm", budget=0.25, calib_tokens=256)
    plan.write(tmp_path / "p")
    again = load_plan(tmp_path / "p")
    for node in plan.graph:
        assert again.graph.node(node.name).get(Placement) == node.get(Placement)
    assert again.target == plan.target


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(PipelineError, match="budget not taken by any pass"):
        compile_model("olmoe-tiny", pipeline="density", budget=0.5)
