"""--emit onnx: onnxruntime equals PyTorch, and the metadata equals plan.json node by node."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FIXTURES, HANDWRITTEN, TINY

from hetmap.compiler.cli import main
from hetmap.compiler.frontend import load_model

MODELS = [*TINY, f"{HANDWRITTEN}:moe", f"{HANDWRITTEN}:dense"]
TARGET = str(FIXTURES / "xbar-32.toml")
IN_MOE_NODE = "in-moe-node"  # marks tags read from a com.microsoft.MoE node's expert list


def tags(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props if p.key.startswith("hetmap.")}


@pytest.mark.parametrize("tiles", [False, True], ids=["whole", "tiles"])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.rsplit(":", 1)[-1].rsplit("/", 1)[-1])
def test_onnx_matches_pytorch_and_plan(model: str, tiles: bool, tmp_path, capsys) -> None:
    check_emitted(model, ["--onnx-tiles"] if tiles else [], tmp_path / "out", capsys)


@pytest.mark.slow
def test_ort_form_with_tiles(tmp_path, capsys) -> None:
    """OLMoE's blocks become com.microsoft.MoE nodes; their experts' tiles stay in metadata
    (the analog matrices here are all experts: nothing is left to lower)."""
    proto = check_emitted("olmoe-tiny", ["--onnx-moe", "ort", "--onnx-tiles"], tmp_path / "out", capsys)
    moe_nodes = [node for node in proto.graph.node if node.op_type == "MoE"]
    assert len(moe_nodes) == 2
    analog = [found for found in matrix_tags_in(proto).values()
              if found[0]["hetmap.placement"] == "aimc-tile"]
    assert analog and all(IN_MOE_NODE in t and "hetmap.tiles" in t for f in analog for t in f)
    assert not any("hetmap.tile" in tags(node) for node in proto.graph.node)


def check_emitted(model: str, options: list[str], out, capsys) -> onnx.ModelProto:
    """Compile with --emit onnx and OPTIONS; onnxruntime equals PyTorch, tags equal plan.json."""
    args = ["compile", model, "--emit", "onnx", "-o", str(out), "--target", TARGET,
            "--calib-tokens", "256", "--budget", "0.25", "--chips", "auto"]
    if model.endswith(":dense"):
        args.append("--allow-dense")
    assert main(args + options) == 0, capsys.readouterr().err
    form = options[options.index("--onnx-moe") + 1] if "--onnx-moe" in options else "dispatch"
    assert f"onnx: {form} MoE form" in capsys.readouterr().err
    tiles = "--onnx-tiles" in options
    plan = json.loads((out / "plan.json").read_text())
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)

    reference = load_model(model).module  # same seed: the same weights the plan was made from
    session = ort.InferenceSession(str(out / "model.onnx"))
    for shape in [(1, 5), (3, 17)]:
        ids = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.int64)
        with torch.no_grad():
            output = reference(torch.from_numpy(ids))
        expected = (output.logits if hasattr(output, "logits") else output).numpy()
        np.testing.assert_allclose(session.run(["logits"], {"input_ids": ids})[0], expected,
                                   atol=1e-4, rtol=1e-4)

    model_props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(model_props["hetmap.target"])["aimc"]["rows"] == 32
    assert json.loads(model_props["hetmap.plan"])["params_total"] == plan["summary"]["params_total"]
    assert model_props["hetmap.version"] == plan["hetmap_version"]

    assert_tags_match_plan(proto, plan, tiles)
    assert {p.key: p.value for p in proto.metadata_props}["hetmap.moe_form"] == form
    return proto


def matrix_tags_in(proto: onnx.ModelProto) -> dict[tuple[str, str], list[dict[str, str]]]:
    """(IR node, role) -> the hetmap.* tags of every ONNX node that multiplies by that matrix:
    MatMul/Gemm nodes (every one with a weight initializer must be tagged) and the experts
    listed in a com.microsoft.MoE node's ``hetmap.moe_experts``."""
    initializers = {init.name for init in proto.graph.initializer}
    by_key: dict[tuple[str, str], list[dict[str, str]]] = {}
    for node in proto.graph.node:
        node_tags = tags(node)
        if node.op_type == "MoE":
            for entry in json.loads(node_tags["hetmap.moe_experts"]):
                for role, matrix_tags in entry["matrices"].items():
                    fused = {**matrix_tags, IN_MOE_NODE: node.name}
                    by_key.setdefault((matrix_tags["hetmap.node"], role), []).append(fused)
            continue
        if node.op_type in ("MatMul", "Gemm") and initializers & set(node.input):
            assert node_tags, f"weight-consuming node {node.name} is not tagged"
        if node_tags:
            by_key.setdefault((node_tags["hetmap.node"], node_tags["hetmap.matrix"]), []).append(node_tags)
    return by_key


def assert_tags_match_plan(proto: onnx.ModelProto, plan: dict, tiles: bool) -> None:
    """The ONNX metadata equals plan.json node by node (placement, layer, expert, tiles)."""
    by_key = matrix_tags_in(proto)
    chips = plan["summary"]["allocation"]["chips"]
    tile = plan["target"]["aimc"]["rows"]
    for entry in plan["nodes"]:
        for matrix in entry.get("matrices", []):
            found = by_key.pop((entry["name"], matrix["role"]))
            assert {t["hetmap.placement"] for t in found} == {entry["placement"]}
            if entry["kind"] == "expert":
                assert {(t["hetmap.layer"], t["hetmap.expert"]) for t in found} == {
                    (str(entry["layer"]), str(entry["expert"]))}
            if entry["placement"] != "aimc-tile":
                assert all("hetmap.tiles" not in t for t in found)
                continue
            listed = json.loads(found[0]["hetmap.tiles"])
            rows, cols = matrix["tile_grid"]
            slots = [s for first, n in matrix["slots"] for s in range(first, first + n)]
            assert [t["array"] for t in listed] == slots
            assert len(listed) == rows * cols
            out_f, in_f = matrix["shape"]
            assert [t["rows"] for t in listed] == [
                [min(i * tile, in_f), min(i * tile + tile, in_f)]
                for i in range(rows) for _ in range(cols)]
            assert all(t["chip"] < chips for t in listed)
            if tiles and not any(IN_MOE_NODE in t for t in found):  # not lowered in MoE nodes
                assert sorted(json.loads(t["hetmap.tile"]) for t in found) == sorted(
                    t["rows"] + t["cols"] for t in listed)
    assert not by_key, f"ONNX tags for matrices the plan does not have: {list(by_key)[:3]}"


def test_meta_model_cannot_be_emitted(tmp_path, capsys) -> None:
    code = main(["compile", "olmoe-1b-7b", "--policy", "random", "--emit", "onnx",
                 "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
