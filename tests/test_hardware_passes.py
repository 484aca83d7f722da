"""tile, allocate and cost as passes: hand-checked tile counts, capacity errors, plan.json."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, TINY

from hetmap.common.errors import CapacityError
from hetmap.compiler.api import compile_model
from hetmap.compiler.cli import main


def test_olmoe_random_quarter_budget_tile_counts_match_hand_calculation() -> None:
    plan = compile_model("olmoe-1b-7b", policy="random", budget=0.25)
    analog_experts = 16 * 64 - 16 * 16
    # gate/up [1024, 2048]: ceil(2048/512) x ceil(1024/512) = 4 x 2; down [2048, 1024]: 2 x 4
    assert plan.summary["tiles_used"] == analog_experts * (8 + 8 + 8) == 18_432
    assert plan.summary["arrays_used"] == 18_432  # full tiles: one array each
    assert plan.summary["tile_utilization"] == 1.0


def test_every_analog_matrix_has_its_tiles_and_distinct_arrays(tmp_path) -> None:
    plan = compile_model("olmoe-1b-7b", policy="random", budget=0.25)
    plan.write(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "plan.json").read_text())
    seen: set[int] = set()
    for node in data["nodes"]:
        for matrix in node.get("matrices", []):
            if node["placement"] != "aimc-tile":
                assert "tile_grid" not in matrix
                continue
            rows, cols = matrix["tile_grid"]
            out_f, in_f = matrix["shape"]
            assert (rows, cols) == (-(-in_f // 512), -(-out_f // 512))
            slots = [s for first, n in matrix["slots"] for s in range(first, first + n)]
            assert len(slots) == rows * cols
            assert not seen & set(slots)
            seen.update(slots)
    assert len(seen) == data["summary"]["tiles_used"]


def test_all_digital_has_no_tiles_and_digital_cost() -> None:
    plan = compile_model("olmoe-1b-7b", policy="all")
    s = plan.summary
    assert s["tiles_used"] == 0 and s["arrays_used"] == 0
    assert s["energy_per_token_j"] == s["digital_energy_per_token_j"]


def test_all_analog_needs_all_weights_tiled() -> None:
    plan = compile_model("olmoe-1b-7b", policy="none", dense="analog")
    # experts 24576 + attention 16 layers x 4 x (4 x 4) + routers 16 x (4 x 1) + LM head 4 x ceil(50304/512)
    assert plan.summary["tiles_used"] == 24_576 + 1_024 + 64 + 4 * 99


def test_capacity_error_names_needed_and_available(capsys) -> None:
    with pytest.raises(CapacityError, match="need 18432 crossbar arrays but 1 chips hold 256"):
        compile_model("olmoe-1b-7b", policy="random", budget=0.25, chips="1")
    plan = compile_model("olmoe-1b-7b", policy="random", budget=0.25, chips="auto")
    assert plan.summary["allocation"]["chips"] == 72  # ceil(18432 / 256)
    code = main(["compile", "olmoe-1b-7b", "--policy", "random", "--chips", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--chips auto" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("model", [*TINY, "deepseek-v2-lite"])
def test_report_shows_energy_and_latency_against_all_digital(model: str, capsys) -> None:
    policy = "random" if model == "deepseek-v2-lite" else "max-norm"
    code = main(["compile", model, "--policy", policy, "--calib-tokens", "256", "--chips", "auto"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "x all-digital" in stdout and "energy/token" in stdout and "latency/token" in stdout


def test_tiered_target_serializes_tiers() -> None:
    flat = compile_model("olmoe-1b-7b", policy="none", target="aimc-512", chips="auto")
    tiered = compile_model("olmoe-1b-7b", policy="none", target="3d-aimc", chips="auto")
    assert tiered.summary["tiles_used"] == flat.summary["tiles_used"]
    assert tiered.summary["latency_per_token_s"] >= flat.summary["latency_per_token_s"]


def test_spread_experts_puts_coactivated_experts_on_distinct_sites() -> None:
    """Experts 3 and 5 are always routed together (router bias); on a tiered system with 6
    array sites they share sites in plain order, and not once spread by co-activation."""
    from test_placement import _biased_handwritten

    from hetmap.compiler.ir.annotations import Coactivation
    from hetmap.compiler.ir.hwannotations import ArrayAssignment
    from hetmap.compiler.registry import load_registries
    from hetmap.targets import load_target, target_from_dict

    spec = load_target(str(FIXTURES / "xbar-32.toml")).to_json()
    spec["name"] = "tiered-6"
    spec["aimc"].update(tiers=8, arrays_per_chip=6, chips=1, packing=False)
    registries = load_registries(plugins=False)
    registries.targets.register("tiered-6", target_from_dict(spec))

    def sites(spread: bool) -> tuple[set[int], set[int]]:
        plan = compile_model(
            _biased_handwritten({3: 8.0, 5: 8.0}), target="tiered-6", registries=registries,
            policy="none", pipeline="density{calib_tokens=512,seq_len=128},place,tile,"
            f"allocate{{spread_experts={str(spread).lower()}}},cost")
        counts = plan.graph.get(Coactivation).layers[0]
        assert counts[3, 5] == counts[3, 3] == 512  # always together
        def of(e: int) -> set[int]:
            assignment = plan.graph.node(f"layers.0.mlp.experts.{e}").get(ArrayAssignment)
            return {slot % 6 for m in range(3) for slot in assignment.slots(m)}
        return of(3), of(5)

    plain = sites(False)
    assert plain[0] == plain[1]
    spread = sites(True)
    assert not spread[0] & spread[1]
