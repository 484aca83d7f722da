"""Neuron-granular placement (``place{granularity=neuron}``): the score, the placement at the
per-expert budget's digital parameter count, split experts through tiling, cost, plan.json,
the simulator and the CLI. The trained ``demo`` model (OLMoE architecture, 4 MoE layers of 8
experts of hidden 128 with 128 intermediate neurons) with 1,024 calibration tokens."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch

from hetmap.common.errors import PassError, VerificationError
from hetmap.compiler.api import Plan, compile_model, load_plan
from hetmap.compiler.cli import main
from hetmap.compiler.ir.annotations import (
    Density,
    ExpertScore,
    InputMoments,
    Placement,
    analog_shape,
)
from hetmap.compiler.ir.hwannotations import Tiling
from hetmap.compiler.passes.place import budget_count

CALIB = 1024


@cache
def plan(granularity: str, budget: float = 0.25, policy: str = "expected-impact") -> Plan:
    return compile_model("demo", granularity=granularity, budget=budget, policy=policy,
                         calib_tokens=CALIB)


def _expert_inputs(compiled: Plan, index: int) -> tuple:
    from hetmap.runtime.programming import make_noise_model
    from hetmap.runtime.settings import settings_for

    node = compiled.graph.experts()[index]
    settings = settings_for(compiled.target)
    weights = {m.role: compiled.model.weights().load(m.weight) for m in node.matrices}
    moments = node.get(InputMoments)
    assert moments is not None
    return node, weights, dict(moments.second_moments), settings, make_noise_model(settings)


def test_marginal_impacts_add_up_and_match_the_analog_part_by_hand() -> None:
    """(3): the falls add up to the expert's expected error (1); the first chunk's fall is
    (1) of the full expert minus (1) of its analog part without that chunk, computed by hand
    from the compacted matrices; the order is by the range each neuron sets."""
    from hetmap.compiler.algorithms.expert_score import (
        NEURON_STEPS,
        expected_squared_error,
        neuron_marginal_impact,
    )

    node, weights, moments, settings, noise = _expert_inputs(plan("neuron"), 5)
    gains, order = neuron_marginal_impact(weights, moments, settings, noise)
    full = sum(expected_squared_error(w, moments[r], settings, noise) for r, w in weights.items())
    assert gains.sum() == pytest.approx(full, rel=1e-9)
    chunk = 128 // NEURON_STEPS
    keep = torch.as_tensor(np.sort(order[chunk:]))
    rest = (expected_squared_error(weights["gate"][keep], moments["gate"], settings, noise)
            + expected_squared_error(weights["up"][keep], moments["up"], settings, noise)
            + expected_squared_error(weights["down"][:, keep], moments["down"][keep.numpy()],
                                     settings, noise))
    np.testing.assert_allclose(gains[order[:chunk]], (full - rest) / chunk, rtol=1e-9)
    spread = np.max([(weights[r].abs().amax(dim=1 if r != "down" else 0)
                      / weights[r].abs().max()).numpy() for r in weights], axis=0)
    assert np.all(np.diff(spread[order]) <= 0)
    # the range effect: removing the top-range chunk cuts more than its own rows and column
    own = sum(expected_squared_error(weights[r][order[:chunk]] if r != "down" else
                                     weights[r][:, order[:chunk]],
                                     moments[r] if r != "down" else moments[r][order[:chunk]],
                                     settings, noise) for r in weights)
    assert full - rest > own


def test_neuron_scores_rank_a_prefix_of_the_range_order() -> None:
    """Each split expert's digital neurons are the first ones of its range order."""
    from hetmap.compiler.algorithms.expert_score import neuron_marginal_impact, prefix_scores

    compiled = plan("neuron")
    for index, node in enumerate(compiled.graph.experts()):
        placement = node.get(Placement)
        assert placement is not None
        if not placement.split:
            continue
        _node, weights, moments, settings, noise = _expert_inputs(compiled, index)
        gains, order = neuron_marginal_impact(weights, moments, settings, noise)
        digital = placement.digital_neurons
        assert sorted(order[: len(digital)].tolist()) == list(digital)
        scores = prefix_scores(gains, order)
        assert np.all(np.diff(scores[order]) <= 0)
        score = node.get(ExpertScore)
        density = node.get(Density)
        assert score is not None and density is not None and score.neuron_impact is not None
        np.testing.assert_allclose(score.neuron_impact, density.value * scores, rtol=1e-9)


@pytest.mark.parametrize("budget", [0.125, 0.25, 0.5])
def test_neuron_budget_equals_the_expert_budget_in_parameters(budget: float) -> None:
    by_expert, by_neuron = plan("expert", budget), plan("neuron", budget)
    for expert_row, neuron_row in zip(by_expert.summary["layers"], by_neuron.summary["layers"],
                                      strict=True):
        assert neuron_row["expert_params_digital"] == expert_row["expert_params_digital"]
        assert neuron_row["expert_params_digital"] == budget_count(budget, 8) * 128 * 3 * 128
    assert by_neuron.summary["params_digital"] == by_expert.summary["params_digital"]


def test_the_top_scored_neurons_of_each_layer_are_digital() -> None:
    compiled = plan("neuron")
    for experts in compiled.graph.experts_by_layer().values():
        scores = np.stack([n.get(ExpertScore).neuron_impact for n in experts])  # type: ignore[union-attr]
        digital = np.zeros_like(scores, dtype=bool)
        for row, node in enumerate(experts):
            placement = node.get(Placement)
            assert placement is not None
            if not placement.analog:
                digital[row] = True
            else:
                digital[row, list(placement.digital_neurons)] = True
        keep = budget_count(0.25, len(experts)) * 128
        assert digital.sum() == keep
        threshold = np.sort(scores.reshape(-1))[::-1][keep - 1]
        assert scores[digital].min() >= threshold > scores[~digital].max() - 1e-30
    assert any(n.get(Placement).split for n in compiled.graph.experts())  # type: ignore[union-attr]


def test_split_experts_tile_only_their_analog_part_and_cost_both() -> None:
    compiled = plan("neuron")
    split = [n for n in compiled.graph.experts() if n.get(Placement).split]  # type: ignore[union-attr]
    for node in split:
        digital = len(node.get(Placement).digital_neurons)  # type: ignore[union-attr]
        tiling = node.get(Tiling)
        assert tiling is not None
        for grid, matrix in zip(tiling.grids, node.matrices, strict=True):
            assert (grid.out_features, grid.in_features) == analog_shape(matrix.role, matrix.shape,
                                                                         digital)
    # the digital part is charged: energy between whole-expert plans at the same parameters
    # and all-analog experts, and the all-digital reference is unchanged by splitting
    by_expert, by_neuron = plan("expert").summary, plan("neuron").summary
    assert by_neuron["digital_energy_per_token_j"] == pytest.approx(
        by_expert["digital_energy_per_token_j"], rel=1e-12)
    none = compile_model("demo", policy="none", calib_tokens=CALIB).summary
    assert none["energy_per_token_j"] < by_neuron["energy_per_token_j"]


def test_split_cost_counts_parts_and_sums_by_hand() -> None:
    """One split expert's cost contribution, by hand from the target's figures."""
    from hetmap.compiler.algorithms.cost import estimate_cost

    compiled = plan("neuron")
    target = compiled.target
    base = dict(kind=["expert"] * 2, density=[0.5, 0.5], layer=[0, 0], stage=[1, 1])
    whole = estimate_cost(target, out_features=[128, 128], in_features=[128, 128],
                          placement=["aimc-tile", "aimc-tile"], tiles=[1, 1], **base)
    split = estimate_cost(target, out_features=[128, 128], in_features=[100, 28],
                          placement=["aimc-tile", "digital"], tiles=[1, 0], adds=[128, 0], **base)
    digital = target.digital
    expected = (whole.mapped.energy_j / 2 + 0.5 * (128 * 28 * digital.mac_energy_j
                + 128 * 28 * digital.weight_bytes * digital.mem_energy_per_byte_j
                + 128 * digital.mac_energy_j))
    assert split.mapped.energy_j == pytest.approx(expected, rel=1e-12)


def test_plan_json_round_trips_split_experts(tmp_path) -> None:
    compiled = plan("neuron")
    compiled.write(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "plan.json").read_text())
    listed = {n["name"]: n["digital_neurons"] for n in data["nodes"] if "digital_neurons" in n}
    assert listed and all(len(v) < 128 for v in listed.values())
    assert data["summary"]["layers"][0]["neurons_digital"] > 0
    loaded = load_plan(tmp_path / "out")
    for node in loaded.graph.experts():
        placement = node.get(Placement)
        assert placement is not None
        assert list(placement.digital_neurons) == listed.get(node.name, [])


def test_verifier_refuses_bad_digital_neurons() -> None:
    node = plan("neuron").graph.experts()[0]
    for neurons in ((3, 1), (0, 0), (128,), tuple(range(128))):
        with pytest.raises(VerificationError):
            Placement("aimc-tile", "test", neurons).check(node)
    with pytest.raises(VerificationError):
        Placement("digital", "test", (1,)).check(node)


def test_policies_without_neuron_scores_are_refused() -> None:
    with pytest.raises(PassError, match="ranks whole experts only"):
        compile_model("demo", granularity="neuron", policy="max-norm", calib_tokens=256)


def test_random_neuron_placement_meets_the_budget() -> None:
    compiled = plan("neuron", 0.125, "random")
    assert compiled.summary["params_digital"] == plan("expert", 0.125).summary["params_digital"]


def test_ideal_simulation_of_a_split_plan_is_digital_and_noise_is_seeded() -> None:
    compiled = plan("neuron")
    ideal = compiled.simulate(seeds=1, eval_tokens=1024, ideal=True)
    assert ideal.mapped_ppl[0] == pytest.approx(ideal.digital_ppl, rel=1e-5)
    first = compiled.simulate(seeds=2, eval_tokens=1024, digital_ppl=ideal.digital_ppl)
    again = compiled.simulate(seeds=2, eval_tokens=1024, digital_ppl=ideal.digital_ppl)
    assert first.mapped_ppl == again.mapped_ppl
    assert first.mapped_ppl[0] != first.mapped_ppl[1]


def test_cli_compile_and_simulate_by_neuron(tmp_path, capsys) -> None:
    out = tmp_path / "plan"
    code = main(["compile", "demo", "--granularity", "neuron", "--calib-tokens", "512",
                 "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "plan.json").read_text())
    assert any("digital_neurons" in n for n in data["nodes"])
    assert "granularity" in (out / "plan.json").read_text()
    code = main(["compile", "demo", "--granularity", "neuron", "--policy", "router-norm",
                 "--calib-tokens", "256", "-o", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "ranks whole experts only" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()



@pytest.mark.slow
@pytest.mark.parametrize("form", ["static", "dispatch", "ort"])
def test_onnx_of_split_experts_is_exact_and_tags_both_parts(form: str, tmp_path) -> None:
    """Every form: onnxruntime equals PyTorch within 1e-4 on two shapes; each split expert
    matrix has an analog part of its analog shape and a digital part of the rest, tagged
    with their neurons (disjoint, together all); ``ort`` falls back to dispatch for them."""
    import onnx
    import onnxruntime as ort
    import torch

    compiled = plan("neuron")
    compiled.emit_onnx(tmp_path, moe=form, tiles=form == "dispatch")
    summary = json.loads((tmp_path / "onnx_summary.json").read_text())
    if form == "ort":
        assert summary["fallbacks"] and all("split by neuron" in why
                                            for why in summary["fallbacks"].values())
    model = onnx.load(str(tmp_path / "model.onnx"))
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    tags: dict[str, list[dict[str, str]]] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if "hetmap.part" in meta:
            tags.setdefault(f"{meta['hetmap.node']}.{meta['hetmap.matrix']}", []).append(meta)
    split = [n for n in compiled.graph.experts() if n.get(Placement).split]  # type: ignore[union-attr]
    assert split
    for node in split:
        digital = node.get(Placement).digital_neurons  # type: ignore[union-attr]
        for matrix in node.matrices:
            parts = {meta["hetmap.part"]: meta for meta in tags[f"{node.name}.{matrix.role}"]}
            assert "hetmap.tiles" in parts["analog-neurons"]
            assert "hetmap.tiles" not in parts["digital-neurons"]
            assert set(parts) == {"analog-neurons", "digital-neurons"}
            analog = json.loads(parts["analog-neurons"]["hetmap.neurons"])
            assert json.loads(parts["digital-neurons"]["hetmap.neurons"]) == list(digital)
            assert sorted(analog + list(digital)) == list(range(128))
            assert parts["digital-neurons"]["hetmap.placement"] == "digital"
            out_features, in_features = analog_shape(matrix.role, matrix.shape, len(digital))
            if form == "dispatch":  # tiled: the tiles cover the analog part exactly
                ranges = [json.loads(meta["hetmap.tile"]) for meta in tags[f"{node.name}."
                          f"{matrix.role}"] if meta["hetmap.part"] == "analog-neurons"]
                assert max(r[1] for r in ranges) == in_features
                assert max(r[3] for r in ranges) == out_features
            else:
                assert shapes[f"{matrix.key}.weight"] == (out_features, in_features)
            prefix, _, role = matrix.key.rpartition(".")
            full_out, full_in = matrix.shape
            assert shapes[f"{prefix}.digital.{role}.weight"] == (
                (full_out, len(digital)) if role == "down" else (len(digital), full_in))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    runnable = compiled.model.runnable()
    generator = torch.Generator().manual_seed(3)
    for shape in ((1, 5), (2, 11)):
        ids = torch.randint(0, 256, shape, generator=generator)
        with torch.no_grad():
            expected = runnable(ids).logits.numpy()
        (actual,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
        assert np.abs(actual - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_sweep_places_policies_by_neuron_when_asked(tmp_path) -> None:
    """``NAME@neuron`` in a sweep: the same digital fraction as the whole-expert policy, its
    own perplexity; a bad granularity is one line before any work."""
    from hetmap.common.errors import SimulationError
    from hetmap.compiler.api import run_sweep

    result = run_sweep("demo", policies=["expected-impact", "expected-impact@neuron"],
                       budgets=[0.25], noise_scales=[1.5], seeds=1, eval_tokens=512,
                       calib_tokens=512, out=tmp_path / "sweep")
    rows = {row["policy"]: row for row in result["summary"]}
    assert set(rows) == {"expected-impact", "expected-impact@neuron"}
    assert rows["expected-impact@neuron"]["digital_fraction"] == pytest.approx(
        rows["expected-impact"]["digital_fraction"], rel=1e-12)
    assert rows["expected-impact@neuron"]["ppl_mean"] != rows["expected-impact"]["ppl_mean"]
    assert "expected-impact@neuron" in (tmp_path / "sweep" / "sweep.csv").read_text()
    with pytest.raises(SimulationError, match="granularity must be one of"):
        run_sweep("demo", policies=["random@row"], budgets=[0.25], noise_scales=[1.5], seeds=1,
                  out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_modulelist_experts_are_placed_whole_with_a_note() -> None:
    """Separate nn.Linear experts are not split (the simulator and ONNX split only stacks):
    neuron granularity places them whole, says so, and the plan simulates."""
    from conftest import HANDWRITTEN

    compiled = compile_model(f"{HANDWRITTEN}:moe", granularity="neuron", budget=0.25,
                             calib_tokens=256)
    assert not any(n.get(Placement).split for n in compiled.graph.experts())  # type: ignore[union-attr]
    notes = [note for t in compiled.timings for note in getattr(t, "notes", ())]
    assert any("placed whole" in note for note in notes), compiled.timings
    result = compiled.simulate(seeds=1, eval_tokens=256, ideal=True)
    assert result.mapped_ppl[0] == pytest.approx(result.digital_ppl, rel=1e-5)


def test_global_scope_ranks_neurons_across_layers() -> None:
    compiled = compile_model("demo", granularity="neuron", budget=0.25, budget_scope="global",
                             calib_tokens=CALIB)
    rows = compiled.summary["layers"]
    assert sum(r["expert_params_digital"] for r in rows) == budget_count(0.25, 32) * 128 * 3 * 128
    assert len({r["expert_params_digital"] for r in rows}) > 1  # not split evenly by layer
