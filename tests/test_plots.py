"""Pictures: the sweep's energy-accuracy frontier (pareto.png, with energy and latency per
token in sweep.csv) and a plan's placement.png and floorplan.png (``inspect --plot``), each
checked through the data it drew."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest

from hetmap.compiler.backends.plan import read_plan
from hetmap.compiler.cli import main
from hetmap.compiler.evaluation.plots import (
    floorplan,
    pareto_mask,
    pareto_rows,
    placement_grid,
    plot_floorplan,
    write_plan_pictures,
)


def test_pareto_mask_keeps_the_undominated_points() -> None:
    energy = [1.0, 2.0, 2.0, 3.0, 1.5, 1.0]
    ppl = [5.0, 4.0, 4.5, 3.0, 4.0, 5.0]
    # (2.0, 4.5) is dominated by (2.0, 4.0), (2.0, 4.0) by (1.5, 4.0); equal points both stay
    assert pareto_mask(energy, ppl).tolist() == [True, False, False, True, True, True]


@pytest.fixture(scope="module")
def demo_plan(tmp_path_factory) -> tuple[object, dict]:
    out = tmp_path_factory.mktemp("plots") / "demo"
    assert main(["compile", "demo", "--calib-tokens", "512", "-o", str(out)]) == 0
    return out, read_plan(out)


def test_inspect_plot_writes_placement_and_floorplan(demo_plan, capsys) -> None:
    out, _ = demo_plan
    assert main(["inspect", str(out), "--plot"]) == 0
    assert "placement.png" in capsys.readouterr().err
    for name in ("placement.png", "floorplan.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert not list(out.glob(".*.tmp.png"))


def test_placement_grid_is_the_plan(demo_plan) -> None:
    _, plan = demo_plan
    grid = placement_grid(plan)
    assert grid.policy == "expected-impact" and grid.score_name == "expected_impact"
    assert grid.layers == [0, 1, 2, 3] and grid.digital.shape == (4, 8)
    summary = plan["summary"]
    assert grid.digital.sum(axis=1).tolist() == [r["experts_digital"] for r in summary["layers"]]
    experts = {(n["layer"], n["expert"]): n for n in plan["nodes"] if n["kind"] == "expert"}
    for (layer, expert), node in experts.items():
        assert grid.density[layer, expert] == node["density"]
        assert grid.digital[layer, expert] == (node["placement"] == "digital")
    # the budget goes to the top score of each layer: digital experts score 1 of the layer max
    assert np.all(grid.score[grid.digital == 1] == 1.0)
    assert np.all(grid.score[grid.digital == 0] < 1.0)


def test_floorplan_tiles_are_the_allocation(demo_plan) -> None:
    _, plan = demo_plan
    tiles = floorplan(plan)
    allocation = plan["summary"]["allocation"]
    assert tiles.slot.size == allocation["tiles_used"]
    assert tiles.slots_used().size == allocation["arrays_used"]
    assert float(np.dot(tiles.height, tiles.width)) == allocation["stored_weights"]
    utilization = tiles.utilization()
    assert np.mean(list(utilization.values())) == pytest.approx(allocation["tile_utilization"])
    assert any(tiles.row_offset) and any(tiles.col_offset)  # packed tiles are drawn packed
    assert np.all(tiles.row_offset + tiles.height <= tiles.rows)
    assert np.all(tiles.col_offset + tiles.width <= tiles.cols)
    for slot in tiles.slots_used():  # tiles sharing an array never overlap
        inside = np.flatnonzero(tiles.slot == slot)
        for a, b in itertools.combinations(inside, 2):
            apart = (tiles.row_offset[a] + tiles.height[a] <= tiles.row_offset[b]
                     or tiles.row_offset[b] + tiles.height[b] <= tiles.row_offset[a]
                     or tiles.col_offset[a] + tiles.width[a] <= tiles.col_offset[b]
                     or tiles.col_offset[b] + tiles.width[b] <= tiles.col_offset[a])
            assert apart, (tiles.labels[tiles.owner[a]], tiles.labels[tiles.owner[b]])
    assert {label.split()[0] for label in tiles.labels} == {"L0", "L1", "L2", "L3"}


def test_floorplan_aggregates_large_plans(demo_plan, tmp_path) -> None:
    _, plan = demo_plan
    tiles = plot_floorplan(tmp_path / "floorplan.png", plan, detail_limit=4)
    assert (tmp_path / "floorplan.png").stat().st_size > 5_000
    chips, layer, utilization = tiles.site_grid()
    assert chips == [0] and layer.shape == (1, tiles.arrays_per_chip)
    assert np.isfinite(layer).sum() == plan["summary"]["arrays_used"]
    assert utilization.sum() == pytest.approx(
        plan["summary"]["tile_utilization"] * plan["summary"]["arrays_used"])


def test_an_all_digital_plan_has_no_floorplan(demo_plan, tmp_path) -> None:
    _, plan = demo_plan
    digital = {**plan, "nodes": [{**n, "placement": "digital"} for n in plan["nodes"]]}
    written, skipped = write_plan_pictures(tmp_path, digital)
    assert written == [tmp_path / "placement.png"]
    assert len(skipped) == 1 and "no analog tiles" in skipped[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.png"]


def test_inspect_plot_on_a_full_size_config(tmp_path, capsys) -> None:
    out = tmp_path / "olmoe"
    assert main(["compile", "olmoe-1b-7b", "--policy", "random", "--budget", "0.25",
                 "-o", str(out)]) == 0
    assert main(["inspect", str(out), "--plot"]) == 0
    capsys.readouterr()
    plan = read_plan(out)
    tiles = floorplan(plan)
    chips, layer, utilization = tiles.site_grid()
    assert tiles.slot.size == plan["summary"]["tiles_used"] == 18_432
    assert np.isfinite(layer).sum() == plan["summary"]["arrays_used"]
    assert len(chips) == -(-plan["summary"]["arrays_used"] // tiles.arrays_per_chip)
    assert placement_grid(plan).digital.shape == (16, 64)
    for name in ("placement.png", "floorplan.png"):
        assert (out / name).stat().st_size > 10_000


def test_sweep_records_cost_and_draws_the_frontier(tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    code = main(["sweep", "demo", "-o", str(out), "--policies", "expected-impact,random",
                 "--budgets", "0,0.25", "--noise-scales", "2.5", "--seeds", "1",
                 "--eval-tokens", "512", "--calib-tokens", "512"])
    assert code == 0, capsys.readouterr().err
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    energy = {(r["policy"], float(r["budget"])): float(r["energy_per_token_j"]) for r in rows}
    assert all(float(r["latency_per_token_s"]) > 0 for r in rows)
    data = json.loads((out / "sweep.json").read_text())
    digital_energy = data["digital_energy_per_token_j"]
    # no expert digital: the same placement whatever the policy; more digital costs energy
    assert energy["expected-impact", 0.0] == energy["random", 0.0]
    for policy in ("expected-impact", "random"):
        assert energy[policy, 0.0] < energy[policy, 0.25] < digital_energy
    drawn = pareto_rows(data["summary"], data["digital_ppl"], digital_energy)
    assert len(drawn) == len(data["summary"]) + 1
    reference = next(r for r in drawn if r["policy"] == "all digital")
    cheapest = min(drawn, key=lambda r: (r["energy_per_token_j"], r["ppl_mean"]))
    assert reference["pareto"] and cheapest["pareto"]
    for row in drawn:  # flags match the definition, point by point
        dominated = any(o["energy_per_token_j"] <= row["energy_per_token_j"]
                        and o["ppl_mean"] <= row["ppl_mean"]
                        and (o["energy_per_token_j"], o["ppl_mean"])
                        != (row["energy_per_token_j"], row["ppl_mean"]) for o in drawn)
        assert row["pareto"] == (not dominated)
