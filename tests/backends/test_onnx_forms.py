"""The MoE forms of the ONNX back end (static, dispatch, ort), the FLOP counter, external data.

Each form must run in onnxruntime equal to PyTorch within 1e-4 on two input shapes, pass
onnx.checker, carry the plan's metadata node by node, and its FLOP count must show the
sparsity: the routed experts of ``dispatch`` and ``ort`` count top-k / (router slots) of
``static``'s expert FLOPs (expected routed token counts, see hetmap.compiler.backends.onnx_flops).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_onnx_emit import IN_MOE_NODE, assert_tags_match_plan, matrix_tags_in
from test_onnx_export import CHECK_SHAPES, EXAMPLE_SHAPE, TOP_K, VOCAB, Tiny, _logits, mixtral
from test_onnx_export import EXPERTS as NUM_EXPERTS
from test_zoo import ONNX_IN_CI, compiled

from hetmap.common.errors import EmitError
from hetmap.compiler.backends.onnx_export import MOE_FORMS, ExportReport, export_onnx
from hetmap.compiler.backends.onnx_flops import count_cost

TOLERANCE = 1e-4
DIMS = {"batch": 2, "sequence": 8}


def _tags(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props if p.key.startswith("hetmap.")}


def _mixtral_tags(model: torch.nn.Module) -> dict[str, dict[str, str]]:
    """Every matrix tagged; experts also with layer, expert and (analog) one tile."""
    tags = {}
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding):
            tags[path] = {"hetmap.node": path, "hetmap.matrix": "linear",
                          "hetmap.placement": "digital"}
        if "gate_up_proj" in module._parameters:
            layer = path.split(".")[2]
            for expert in range(NUM_EXPERTS):
                for role in ("gate", "up", "down"):
                    tags[f"{path}.{expert}.{role}"] = {
                        "hetmap.node": f"{path}.{expert}", "hetmap.matrix": role,
                        "hetmap.placement": "aimc-tile", "hetmap.layer": layer,
                        "hetmap.expert": str(expert), "hetmap.tiles": json.dumps([{"array": expert}])}
    return tags


@pytest.fixture(scope="module")
def mixtral_forms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportReport]:
    """Mixtral (softmax top-k, renormalised, SwiGLU) in each form (~10 s each)."""
    model = mixtral()
    tags = _mixtral_tags(model)
    example = torch.randint(0, VOCAB, EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(1))
    reports = {}
    for form in MOE_FORMS:
        path = tmp_path_factory.mktemp(form) / "model.onnx"
        reports[form] = export_onnx(model, path, matrix_tags=tags, model_props={},
                                    example_input=example, moe_form=form)
        assert not reports[form].missing_keys and not reports[form].untagged_nodes
    return reports


@pytest.mark.parametrize("form", MOE_FORMS)
def test_each_form_matches_pytorch(mixtral_forms: dict[str, ExportReport], form: str) -> None:
    report = mixtral_forms[form]
    onnx.checker.check_model(str(report.path), full_check=True)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    model = mixtral()
    generator = torch.Generator().manual_seed(2)
    for shape in [*CHECK_SHAPES, (1, 1)]:
        input_ids = torch.randint(0, VOCAB, shape, generator=generator)
        (actual,) = session.run(None, {"input_ids": input_ids.numpy()})
        np.testing.assert_allclose(actual, _logits(model, input_ids), atol=TOLERANCE)


def test_forms_encode_routing_as_documented(mixtral_forms: dict[str, ExportReport]) -> None:
    ops = {form: Counter(n.op_type for n in onnx.load(str(r.path)).graph.node)
           for form, r in mixtral_forms.items()}
    layers = 2
    assert ops["static"]["NonZero"] == 0 and ops["static"]["MoE"] == 0
    assert ops["dispatch"]["NonZero"] == layers * NUM_EXPERTS
    assert ops["dispatch"]["ScatterND"] == layers * NUM_EXPERTS and ops["dispatch"]["MoE"] == 0
    assert ops["ort"]["MoE"] == layers and ops["ort"]["NonZero"] == 0
    for form, report in mixtral_forms.items():
        props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
        assert props["hetmap.moe_form"] == form and report.moe_form == form
    assert mixtral_forms["ort"].fallbacks == ()


def test_ort_node_lists_every_expert_with_its_tags(mixtral_forms: dict[str, ExportReport]) -> None:
    proto = onnx.load(str(mixtral_forms["ort"].path))
    moe_nodes = [n for n in proto.graph.node if n.op_type == "MoE"]
    for layer, node in enumerate(moe_nodes):
        tags = _tags(node)
        assert tags["hetmap.experts_module"] == f"model.layers.{layer}.mlp.experts"
        assert tags["hetmap.layer"] == str(layer)
        experts = json.loads(tags["hetmap.moe_experts"])
        assert [e["expert"] for e in experts] == list(range(NUM_EXPERTS))
        for entry in experts:
            assert sorted(entry["matrices"]) == ["down", "gate", "up"]
            assert json.loads(entry["matrices"]["gate"]["hetmap.tiles"]) == [{"array": entry["expert"]}]
    fused = [key for key, found in matrix_tags_in(proto).items()
             if any(IN_MOE_NODE in t for t in found)]
    assert len(fused) == 2 * NUM_EXPERTS * 3


def test_flops_show_the_sparsity(mixtral_forms: dict[str, ExportReport]) -> None:
    costs = {form: count_cost(r.path, DIMS) for form, r in mixtral_forms.items()}
    static = costs["static"]
    tokens = DIMS["batch"] * DIMS["sequence"]
    hidden, intermediate, layers = 32, 16, 2
    assert static.expert_flops == 2 * tokens * 3 * hidden * intermediate * NUM_EXPERTS * layers
    for form in ("dispatch", "ort"):
        cost = costs[form]
        assert not cost.upper_bounds and not cost.uncounted
        assert cost.expert_flops == pytest.approx(static.expert_flops * TOP_K / NUM_EXPERTS, rel=1e-12)
        dense = static.flops - static.expert_flops
        assert cost.flops - cost.expert_flops == pytest.approx(dense, rel=1e-12)
        assert cost.activation_bytes < static.activation_bytes
    assert costs["ort"].weight_bytes == pytest.approx(static.weight_bytes, rel=0.01)


def test_external_data_on_request(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    report = export_onnx(Tiny(), path, matrix_tags={}, model_props={}, external_data=True)
    assert report.external_data == tmp_path / "tiny.onnx.data"
    assert {p.name for p in tmp_path.iterdir()} == {"tiny.onnx", "tiny.onnx.data"}
    proto = onnx.load(str(path), load_external_data=False)
    external = [i.name for i in proto.graph.initializer
                if i.data_location == onnx.TensorProto.EXTERNAL]
    assert {"proj.weight", "head.weight"} <= set(external)  # head: tied to the embedding
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    (actual,) = session.run(None, {"input_ids": input_ids.numpy()})
    np.testing.assert_allclose(actual, _logits(Tiny().eval(), input_ids), atol=TOLERANCE)
    parameter_bytes = sum(p.numel() * 4 for p in Tiny().parameters())  # weights read from .data
    assert count_cost(path, DIMS).weight_bytes == pytest.approx(parameter_bytes, rel=0.01)


def test_unknown_moe_form_is_an_emit_error(tmp_path: Path) -> None:
    with pytest.raises(EmitError, match="unknown MoE form 'sparse'; choose one of static, dispatch, ort"):
        export_onnx(Tiny(), tmp_path / "t.onnx", matrix_tags={}, model_props={}, moe_form="sparse")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the zoo (slow)


@pytest.mark.slow
@pytest.mark.parametrize("family", ONNX_IN_CI)
def test_forms_on_the_zoo(family: str, tmp_path: Path) -> None:
    """Every form of a family: checker, parity on two shapes, plan metadata, FLOP sparsity."""
    plan = compiled(family)
    plan_json = plan.to_json()
    module, config = plan.model.module, plan.model.config
    vocab = int((getattr(config, "text_config", None) or config).vocab_size)
    costs = {}
    for form in MOE_FORMS:
        out = tmp_path / form
        out.mkdir()
        (path,) = plan.emit_onnx(out, moe=form)
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for shape in [(2, 7), (1, 5)]:
            ids = np.random.default_rng(sum(shape)).integers(0, vocab, shape).astype(np.int64)
            with torch.no_grad():
                expected = module(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
            np.testing.assert_allclose(session.run(["logits"], {"input_ids": ids})[0], expected,
                                       atol=TOLERANCE, rtol=TOLERANCE, err_msg=form)
        assert_tags_match_plan(proto, plan_json, tiles=False)
        summary = json.loads((out / "onnx_summary.json").read_text())
        assert summary["moe_form"] == form
        if form == "ort":  # only OLMoE's blocks are softmax top-k SwiGLU experts alone
            assert bool(summary["fallbacks"]) == (family != "olmoe"), summary["fallbacks"]
            moe_nodes = sum(n.op_type == "MoE" for n in proto.graph.node)
            assert moe_nodes == (len(plan.graph.moe_layers) if family == "olmoe" else 0)
        costs[form] = count_cost(proto, DIMS)
    layers = list(plan.graph.moe_layers.values())
    slots = {(m.top_k, m.num_experts + m.identity_experts) for m in layers}
    assert len(slots) == 1
    ((top_k, router_slots),) = slots
    static = costs["static"].expert_flops
    for form in ("dispatch", "ort"):
        cost = costs[form]
        if cost.upper_bounds:  # Llama 4's dense-input experts: routing is not visible to them,
            # so the counter takes every row (rule 2's upper bound): the static form's count
            assert family == "llama4" and cost.expert_flops == pytest.approx(static), form
        else:
            assert cost.expert_flops == pytest.approx(static * top_k / router_slots, rel=1e-9), form


def test_readme_snippet_reads_every_form(mixtral_forms: dict[str, ExportReport]) -> None:
    """The README's toolchain snippet reads the same placements off each form."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## For toolchain authors", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    definitions = snippet.split("\nfor form in", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(definitions, "README.md", "exec"), namespace)  # noqa: S102 - our own docs
    read = {form: sorted(namespace["matrices"](str(r.path)))  # type: ignore[operator]
            for form, r in mixtral_forms.items()}
    placements = {form: {(ir, role, where) for _, ir, role, where, _ in rows}
                  for form, rows in read.items()}
    analog = {(ir, role) for ir, role, where in placements["static"] if where == "aimc-tile"}
    assert len(analog) == 2 * NUM_EXPERTS * 3
    assert placements["dispatch"] == placements["ort"] == placements["static"]
