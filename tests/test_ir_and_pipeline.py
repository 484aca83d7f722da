"""IR verifier, text form, pipeline parsing and the pass manager's contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from hetmap.common.errors import PassError, PipelineError, VerificationError
from hetmap.compiler.ir.annotations import Density, Placement
from hetmap.compiler.ir.graph import Graph, Matrix, MoeLayer, Node, NodeKind, WeightRef, verify
from hetmap.compiler.passes.base import PassResult
from hetmap.compiler.passes.manager import run_pipeline
from hetmap.compiler.passes.pipeline import parse_pipeline


def small_graph() -> Graph:
    graph = Graph("toy")
    graph.add(Node("x", NodeKind.INPUT))
    mat = Matrix("weight", "fc", 4, 3, WeightRef("fc.weight"))
    graph.add(Node("fc", NodeKind.LINEAR, "fc", (mat,)), ["x"])
    graph.add(Node("output", NodeKind.OUTPUT), ["fc"])
    return graph


def test_text_form_lists_nodes_and_annotations() -> None:
    graph = small_graph()
    graph.node("fc").annotate(Density(1.0, "structural"))
    graph.node("fc").annotate(Placement("digital", "dense: density 1.00"))
    assert str(graph).splitlines() == [
        "graph toy params=0 moe_layers=0 {",
        "  %x = input ()",
        "  %fc = linear (%x) weight:4x3 | density=1.000(structural) @digital",
        "  %output = output (%fc)",
        "}",
    ]


def test_verifier_rejects_malformed_graphs() -> None:
    graph = small_graph()
    with pytest.raises(VerificationError, match="duplicate"):
        graph.add(Node("fc", NodeKind.OP))
    with pytest.raises(VerificationError, match="unknown node"):
        graph.add(Node("y", NodeKind.OP), ["missing"])
    graph.node("fc").annotate(Density(1.5, "structural"))
    with pytest.raises(VerificationError, match="outside"):
        verify(graph)
    moe = Graph("moe")
    moe.add(Node("in", NodeKind.INPUT))
    m = Matrix("up", "e.0.up", 2, 2, WeightRef("w", 0))
    moe.add(Node("e.0", NodeKind.EXPERT, matrices=(m,), layer=0, expert=1), ["in"])
    moe.moe_layers[0] = MoeLayer(0, "b", "r", "e", "fused", 1, 1)
    with pytest.raises(VerificationError, match="number 0..0"):
        verify(moe)


def test_parse_pipeline() -> None:
    specs = parse_pipeline("density{calib-tokens=128},expert-score, place{policy=max-norm,budget=0.25}")
    assert [s.name for s in specs] == ["density", "expert-score", "place"]
    assert specs[0].options == {"calib_tokens": "128"}
    assert specs[2].options == {"policy": "max-norm", "budget": "0.25"}
    assert str(specs[2]) == "place{policy=max-norm,budget=0.25}"
    for bad in ["", "a,,b", "Place", "a{b}", "a{b=1", "a}b"]:
        with pytest.raises(PipelineError):
            parse_pipeline(bad)


@dataclass(frozen=True)
class BreaksIR:
    name: ClassVar[str] = "breaks-ir"
    description: ClassVar[str] = "test pass that corrupts the IR"

    def run(self, graph, ctx):
        graph.node("fc").annotate(Placement("quantum", "no"))
        return PassResult(graph, True)


@dataclass(frozen=True)
class Crashes:
    name: ClassVar[str] = "crashes"
    description: ClassVar[str] = "test pass that raises"

    def run(self, graph, ctx):
        raise ZeroDivisionError("boom")


def test_manager_names_failing_pass() -> None:
    with pytest.raises(VerificationError, match="after pass breaks-ir"):
        run_pipeline(small_graph(), [BreaksIR()], ctx=None)  # type: ignore[arg-type]
    with pytest.raises(PassError, match="pass crashes crashed .*ZeroDivisionError: boom"):
        run_pipeline(small_graph(), [Crashes()], ctx=None)  # type: ignore[arg-type]


def test_dump_ir_after_each_pass(tmp_path) -> None:
    from hetmap.compiler.api import compile_model

    compile_model("olmoe-tiny", pipeline="density,expert-score,place", calib_tokens=256,
                  dump_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "01-density.txt", "02-expert-score.txt", "03-place.txt"]
    assert "@aimc-tile" in (tmp_path / "03-place.txt").read_text()
