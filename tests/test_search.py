"""``hetmap search``: the candidate budgets, the bisection, the loss parser, and end to end on
the trained demo model (the chosen plan meets the loss on fresh seeds; a 0% loss on a noisy
target has no answer and says so in one line)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetmap.compiler.api import load_plan, search
from hetmap.compiler.cli import main
from hetmap.compiler.evaluation.search import bisect_smallest, candidate_budgets, parse_loss
from hetmap.compiler.passes.place import budget_count


def test_parse_loss() -> None:
    assert parse_loss("1%") == pytest.approx(0.01)
    assert parse_loss(" 0.5 % ") == pytest.approx(0.005)
    assert parse_loss("0.02") == pytest.approx(0.02)
    assert parse_loss("0%") == 0.0
    for bad in ("1", "-1%", "abc", "nan%", ""):
        with pytest.raises(Exception, match="max-loss"):
            parse_loss(bad)


def test_candidate_budgets_of_the_demo_shape() -> None:
    assert candidate_budgets([8, 8, 8, 8]) == [k / 8 for k in range(8)]
    assert candidate_budgets([3]) == [0.0, 0.333333, 0.666667]
    # layers of 2 and 4 experts: 0.1875 (0 of 2, 1 of 4) and 0.6875 (1 of 2, 3 of 4) lie
    # between simple fractions; 0.25 puts 1 of 2 and 1 of 4 on digital (halves round up)
    assert candidate_budgets([2, 4]) == [0.0, 0.1875, 0.25, 0.5, 0.6875, 0.75]


@given(st.lists(st.integers(1, 8), min_size=1, max_size=4))
def test_candidate_budgets_cover_every_placement_once(sizes: list[int]) -> None:
    budgets = candidate_budgets(sizes)
    placements = [tuple(budget_count(b, n) for n in sizes) for b in budgets]
    assert budgets == sorted(budgets) and len(set(placements)) == len(placements)
    assert tuple(sizes) not in placements  # all-digital is no candidate
    # every placement edge (2k - 1) / 2n is a multiple of 1/3360 for n <= 8: the midpoints of
    # that grid sample every interval between edges
    every = {tuple(budget_count((i + 0.5) / 3360, n) for n in sizes) for i in range(3360)}
    assert set(placements) == every - {tuple(sizes)}


@pytest.mark.parametrize("count", range(10))
def test_bisection_finds_the_threshold_in_log_steps(count: int) -> None:
    for threshold in range(count + 1):
        asked: list[int] = []

        def passes(index: int, threshold: int = threshold, asked: list[int] = asked) -> bool:
            asked.append(index)
            return index >= threshold

        found = bisect_smallest(count, passes)
        assert found == (threshold if threshold < count else None)
        assert len(asked) == len(set(asked)) <= math.ceil(math.log2(count + 1))


def test_search_user_errors_are_one_line(tmp_path, capsys) -> None:
    for args, message in ((["--max-loss", "5"], "ambiguous"),
                          (["--max-loss", "1%", "--policy", "none"], "ranking policy"),
                          (["--max-loss", "1%", "--metric", "hellaswag"], "not available"),
                          (["--max-loss", "1%", "--programming", "never"], "--programming")):
        assert main(["search", "demo", *args, "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_search_api_walks_a_boundary() -> None:
    result = search("demo", max_loss=0.02, seeds=2, eval_tokens=512, calib_tokens=256)
    assert result.candidates == [k / 8 for k in range(8)]
    assert len(result.steps) <= math.ceil(math.log2(len(result.candidates) + 1))
    assert len({s.budget for s in result.steps}) == len(result.steps)
    chosen = result.chosen
    assert chosen is not None and chosen.passed and result.require_plan() is result.plan
    index = result.candidates.index(chosen.budget)
    below = [s for s in result.steps if s.budget < chosen.budget]
    assert all(not s.passed for s in below)  # bisection: nothing smaller passed
    if index > 0:
        assert any(s.budget == result.candidates[index - 1] for s in below)
    plan = result.require_plan()
    assert plan.options["budget"] == chosen.budget
    assert plan.summary["energy_per_token_j"] == chosen.energy_per_token_j
    assert plan.summary["experts_digital"] == chosen.experts_digital == round(chosen.budget * 32)


@pytest.mark.slow
def test_search_demo_meets_the_loss_on_fresh_seeds(tmp_path, capsys) -> None:
    out = tmp_path / "search"
    code = main(["search", "demo", "--max-loss", "1%", "--seeds", "3", "--eval-tokens", "2048",
                 "--calib-tokens", "1024", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "search.json").read_text())
    chosen = report["chosen"]
    assert chosen["passed"] and chosen["loss"] <= 0.01
    assert chosen["loss"] == pytest.approx(
        (chosen["ppl_mean"] + chosen["ppl_std"]) / report["digital_ppl"] - 1)
    steps = {s["budget"]: s for s in report["steps"]}
    assert len(steps) <= math.ceil(math.log2(len(report["candidates"]) + 1))
    index = report["candidates"].index(chosen["budget"])
    if index > 0:  # the next smaller budget was tried and failed: the answer is a boundary
        assert not steps[report["candidates"][index - 1]]["passed"]
    for line in ("pass", "chosen: budget"):
        assert line in captured.out
    plan = load_plan(out)
    assert plan.options["budget"] == chosen["budget"]
    assert plan.summary["experts_digital"] == chosen["experts_digital"]
    fresh = plan.simulate(seeds=3, seed=100, eval_tokens=2048)
    assert fresh.digital_ppl == pytest.approx(report["digital_ppl"], rel=1e-9)
    assert fresh.mapped_ppl_mean <= fresh.digital_ppl * 1.01


@pytest.mark.slow
def test_zero_loss_on_a_noisy_target_has_no_budget(tmp_path, capsys) -> None:
    out = tmp_path / "none"
    code = main(["search", "demo", "--max-loss", "0%", "--noise-scale", "8", "--seeds", "2",
                 "--eval-tokens", "1024", "--calib-tokens", "512", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no budget short of all-digital" in errors[0]
    assert "the best evaluated, budget" in errors[0] and "loses +" in errors[0]
    rows = [line.split() for line in captured.out.splitlines()
            if line.rstrip().endswith(("pass", "fail"))]
    assert rows and all(row[-1] == "fail" for row in rows)
    assert rows[-1][1] == "0.875"  # all fail: the bisection ends at the largest candidate
    assert not out.exists()


def test_search_programs_tiles_per_batch_as_asked() -> None:
    """--programming per-batch: the same tiles for a seed as resident ones, so the same
    perplexities at every step (the demo target has no output noise), and the result says
    which mode ran; auto on the demo keeps them resident (a few MB of tiles)."""
    common = dict(max_loss=0.02, seeds=1, eval_tokens=512, calib_tokens=256)
    resident = search("demo", programming="resident", **common)
    batched = search("demo", programming="per-batch", **common)
    automatic = search("demo", **common)
    assert [s.budget for s in batched.steps] == [s.budget for s in resident.steps]
    for ours, theirs in zip(batched.steps, resident.steps, strict=True):
        assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-5)
    assert resident.settings["programming"] == "resident"
    assert batched.settings["programming"] == "per-batch"
    assert batched.settings["programming_reason"] == "asked for"
    assert automatic.settings["programming"] == "resident"
    assert "MB of tiles" in automatic.settings["programming_reason"]
