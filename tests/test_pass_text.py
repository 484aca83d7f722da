"""Per-pass Before/Expected tests in the style of TVM's: a small hand-built graph printed in
the IR's text form before and after one pass, compared with the expected text."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import FIXTURES, moe_graph

from hetmap.compiler.ir.annotations import Density, Placement
from hetmap.compiler.passes.manager import run_pipeline
from hetmap.compiler.passes.place import PlacePass
from hetmap.compiler.passes.tile import TilePass
from hetmap.compiler.registry import load_registries
from hetmap.targets import load_target_file


def _ctx() -> SimpleNamespace:
    return SimpleNamespace(target=load_target_file(str(FIXTURES / "xbar-32.toml")),
                           registries=load_registries(plugins=False), seed=0,
                           log=lambda _m: None, progress=lambda _d, _t: (lambda _n: None))


def _before() -> object:
    graph = moe_graph()
    for node in graph:
        if node.matrices and node.expert is None:
            node.annotate(Density(1.0, "structural"))
    for e, value in enumerate((0.1, 0.7, 0.4, 0.8)):
        graph.node(f"moe.experts.{e}").annotate(Density(value, "calibration", 100))
    return graph


BEFORE = """\
graph toy-moe params=0 moe_layers=1 {
  # moe layer 0: moe experts=4 top_k=2 layout=fused
  %x = input ()
  %attn = attention (%x) layer=0 q_proj:48x48 o_proj:48x48 | density=1.000(structural)
  %moe.gate = router (%attn) layer=0 router:4x48 | density=1.000(structural)
  %moe.experts.0 = expert[moe.experts] (%attn, %moe.gate) layer=0 expert=0 gate:40x48 up:40x48 down:48x40 | density=0.100
  %moe.experts.1 = expert[moe.experts] (%attn, %moe.gate) layer=0 expert=1 gate:40x48 up:40x48 down:48x40 | density=0.700
  %moe.experts.2 = expert[moe.experts] (%attn, %moe.gate) layer=0 expert=2 gate:40x48 up:40x48 down:48x40 | density=0.400
  %moe.experts.3 = expert[moe.experts] (%attn, %moe.gate) layer=0 expert=3 gate:40x48 up:40x48 down:48x40 | density=0.800
  %output = output (%moe.experts.0, %moe.experts.1, %moe.experts.2, %moe.experts.3)
}
"""


def test_place_text() -> None:
    graph = _before()
    assert str(graph) == BEFORE
    run = run_pipeline(graph, [PlacePass(policy="activation-frequency", budget=0.5)], _ctx())
    expected = BEFORE.replace(
        "| density=1.000(structural)", "| density=1.000(structural) @digital").replace(
        "%x = input ()", "%x = input () | @digital").replace(
        "%output = output (%moe.experts.0, %moe.experts.1, %moe.experts.2, %moe.experts.3)",
        "%output = output (%moe.experts.0, %moe.experts.1, %moe.experts.2, %moe.experts.3) | @digital")
    # the two most frequently routed experts (1 and 3) take the 50% budget
    for e, where in ((0, "aimc-tile"), (1, "digital"), (2, "aimc-tile"), (3, "digital")):
        density = ("0.100", "0.700", "0.400", "0.800")[e]
        expected = expected.replace(f"expert={e} gate:40x48 up:40x48 down:48x40 | density={density}",
                                    f"expert={e} gate:40x48 up:40x48 down:48x40 | density={density} @{where}")
    assert str(run.graph) == expected


def test_tile_text() -> None:
    graph = _before()
    run = run_pipeline(graph, [PlacePass(policy="activation-frequency", budget=0.5)], _ctx())
    placed = str(run.graph)
    run = run_pipeline(run.graph, [TilePass()], _ctx())
    # 32x32 crossbars: gate/up [40, 48] -> ceil(48/32) x ceil(40/32) = 2 x 2 = 4 tiles each,
    # down [48, 40] -> 2 x 2 = 4: 12 tiles per analog expert; digital nodes get none
    expected = placed.replace("density=0.100 @aimc-tile", "density=0.100 @aimc-tile tiles=12")
    expected = expected.replace("density=0.400 @aimc-tile", "density=0.400 @aimc-tile tiles=12")
    assert str(run.graph) == expected
    assert sum(1 for n in run.graph if n.get(Placement) and n.get(Placement).analog) == 2


def test_cost_counts_every_call_of_a_looped_module() -> None:
    """A module called twice (``repeat`` node) costs twice: the mapped and all-digital energy
    of the repeated attention grow by exactly its own, and its second call adds a stage."""
    from hetmap.compiler.ir.graph import Node, NodeKind
    from hetmap.compiler.ir.hwannotations import CostSummary
    from hetmap.compiler.passes.allocate import AllocatePass
    from hetmap.compiler.passes.cost import CostPass

    def cost(repeat: bool) -> object:
        graph = _before()
        if repeat:
            graph.add(Node("attn#1", NodeKind.OP, "attn", layer=0, op="repeat"), ["attn"])
        passes = [PlacePass(policy="activation-frequency", budget=0.5), TilePass(),
                  AllocatePass(), CostPass()]
        summary = run_pipeline(graph, passes, _ctx()).graph.get(CostSummary)
        assert summary is not None
        return summary.estimate

    once, twice = cost(False), cost(True)
    for report in ("mapped", "all_digital"):
        a, b = getattr(once, report), getattr(twice, report)
        assert b.energy_by_kind["attention"] == 2 * a.energy_by_kind["attention"]
        assert b.energy_by_kind["expert"] == a.energy_by_kind["expert"]
        assert b.latency_by_kind["attention"] == 2 * a.latency_by_kind["attention"]
