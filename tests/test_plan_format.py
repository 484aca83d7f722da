"""plan.json: one versioned schema, plans that round-trip, hand edits refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from hetmap.common.errors import OutputError
from hetmap.compiler.api import Plan, compile_model, load_plan
from hetmap.compiler.backends.plan import SCHEMA_FILE, plan_schema
from hetmap.compiler.ir.hwannotations import AllocationSummary, ArrayAssignment, CostSummary, Tiling

MODEL = "olmoe-tiny"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path]:
    out = tmp_path_factory.mktemp("plan") / "out"
    plan = compile_model(MODEL, policy="random", budget=0.25)
    plan.write(out)
    return plan, out


def _without_timings(data: dict[str, Any]) -> dict[str, Any]:
    """The plan less its timings and the calibration moments' summary (``input_rms``): the
    moments themselves are calibration data, not stored in plan.json, and not restored."""
    nodes = [{k: v for k, v in n.items() if k != "input_rms"} for n in data["nodes"]]
    return {**{k: v for k, v in data.items() if k != "timings"}, "nodes": nodes}


def test_schema_is_a_valid_json_schema_and_plans_satisfy_it(compiled: tuple[Plan, Path]) -> None:
    _plan, out = compiled
    jsonschema.Draft202012Validator.check_schema(plan_schema())
    data = json.loads((out / "plan.json").read_text())
    jsonschema.validate(data, plan_schema())
    assert data["schema_version"] == 1
    assert data["provided"]["CostSummary"] == "cost"
    assert SCHEMA_FILE.name == "plan.schema.json"


def test_load_plan_restores_every_annotation(compiled: tuple[Plan, Path]) -> None:
    plan, out = compiled
    loaded = load_plan(out)
    assert _without_timings(loaded.to_json()) == _without_timings(
        json.loads((out / "plan.json").read_text()))
    for name in ("tiles_used", "arrays_used", "energy_per_token_j"):
        assert loaded.summary[name] == plan.summary[name]
    assert loaded.graph.get(AllocationSummary) == plan.graph.get(AllocationSummary)
    assert loaded.graph.get(CostSummary) == plan.graph.get(CostSummary)
    for node in plan.graph.matrix_nodes():
        assert loaded.graph.node(node.name).get(Tiling) == node.get(Tiling)
        assert loaded.graph.node(node.name).get(ArrayAssignment) == node.get(ArrayAssignment)
    # the restored plan knows what its passes provided: cost may run again on it
    from hetmap.compiler.passes.cost import CostPass
    from hetmap.compiler.passes.manager import check_contracts

    check_contracts(loaded.graph, [CostPass()], None)


def _edited(out: Path, tmp_path: Path, edit: Any) -> Path:
    data = json.loads((out / "plan.json").read_text())
    data = edit(data)
    target = tmp_path / "edited"
    target.mkdir()
    (target / "plan.json").write_text(json.dumps(data))
    return target


def _drop_expert(data: dict[str, Any]) -> dict[str, Any]:
    data["nodes"] = [n for n in data["nodes"] if n["name"] != "model.layers.0.mlp.experts.3"]
    return data


def _gpu(data: dict[str, Any]) -> dict[str, Any]:
    for node in data["nodes"]:
        if node.get("kind") == "expert":
            node["placement"] = "gpu"
            break
    return data


def _other_model(data: dict[str, Any]) -> dict[str, Any]:
    data["model"]["spec"] = "mixtral-tiny"
    return data


def _shape(data: dict[str, Any]) -> dict[str, Any]:
    for node in data["nodes"]:
        if node.get("kind") == "expert":
            node["matrices"][0]["shape"] = [3, 4]
            break
    return data


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: [d], "is not a hetmap plan (a JSON list, not an object)"),
    (lambda d: "plan", "is not a hetmap plan (a JSON str"),
    (lambda d: {**d, "model": "olmoe-tiny"}, "at model: 'olmoe-tiny' is not of type 'object'"),
    (lambda d: {k: v for k, v in d.items() if k != "schema_version"}, "schema version None"),
    (_gpu, "is not one of ['digital', 'aimc-tile']"),
    (_drop_expert, "has no node 'model.layers.0.mlp.experts.3'"),
    (_other_model, "was compiled for model"),
    (_shape, "has matrices [(3, 4)"),
])
def test_hand_edited_plans_are_refused_in_one_line(compiled: tuple[Plan, Path], tmp_path: Path,
                                                   edit: Any, message: str) -> None:
    _plan, out = compiled
    with pytest.raises(OutputError) as caught:
        load_plan(_edited(out, tmp_path, edit))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
