"""Tests for hetmap.compiler.algorithms.cost: hand calculations and the stated invariants."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hetmap.compiler.algorithms.allocate import allocate
from hetmap.compiler.algorithms.cost import AIMC_TILE, DIGITAL, estimate_cost
from hetmap.targets import load_target

TARGET = load_target("aimc-512")


def _olmoe_layer(experts: int = 4) -> dict[str, Any]:
    """One OLMoE-like layer: q/k/v/o, a router, ``experts`` experts (gate, up, down)."""
    kind = ["attention"] * 4 + ["router"] + ["expert"] * (3 * experts) + ["norm"]
    out = [2048] * 4 + [64] + [1024, 1024, 2048] * experts + [2048]
    inp = [2048] * 4 + [2048] + [2048, 2048, 1024] * experts + [1]
    density = [1.0] * 5 + list(np.repeat(np.linspace(0.1, 0.4, experts), 3)) + [1.0]
    return {"kind": kind, "out_features": out, "in_features": inp, "density": density,
            "layer": [0] * len(kind)}


def _heterogeneous(nodes: dict[str, Any]) -> list[str]:
    return [AIMC_TILE if k == "expert" else DIGITAL for k in nodes["kind"]]


def test_all_digital_mapping_equals_the_digital_reference() -> None:
    nodes = _olmoe_layer()
    estimate = estimate_cost(TARGET, placement=[DIGITAL] * len(nodes["kind"]), **nodes)
    assert estimate.mapped == estimate.all_digital
    assert estimate.energy_ratio == 1.0 and estimate.mapped.analog_energy_j == 0.0


def test_digital_matrix_by_hand() -> None:
    d = TARGET.digital
    estimate = estimate_cost(TARGET, kind=["lm-head"], out_features=[50304], in_features=[2048],
                             density=[1.0], placement=[DIGITAL], layer=[16])
    macs = 50304 * 2048
    energy = macs * d.mac_energy_j + macs * d.weight_bytes * d.mem_energy_per_byte_j
    latency = max(macs / d.mac_throughput, macs * d.weight_bytes / d.mem_bandwidth)
    assert estimate.mapped.energy_j == pytest.approx(energy, rel=1e-12)
    assert estimate.mapped.latency_s == pytest.approx(latency, rel=1e-12)
    assert estimate.mapped.weight_bytes_fetched == macs * d.weight_bytes


def test_a_module_kept_whole_is_costed_as_digital_products() -> None:
    """An ``opaque`` node's matrices (a module fx could not trace, e.g. T5 attention) are
    computed digitally: they cost like any digital matrix, and cannot go on tiles."""
    d = TARGET.digital
    estimate = estimate_cost(TARGET, kind=["opaque"], out_features=[64], in_features=[32],
                             density=[1.0], placement=[DIGITAL], layer=[0])
    macs = 64 * 32
    energy = macs * d.mac_energy_j + macs * d.weight_bytes * d.mem_energy_per_byte_j
    assert estimate.mapped.energy_j == pytest.approx(energy, rel=1e-12) and energy > 0
    with pytest.raises(ValueError, match="cannot be placed on aimc-tile"):
        estimate_cost(TARGET, kind=["opaque"], out_features=[64], in_features=[32],
                      density=[1.0], placement=[AIMC_TILE], layer=[0])


def test_analog_matrix_by_hand() -> None:
    a = TARGET.aimc
    estimate = estimate_cost(TARGET, kind=["expert"], out_features=[1024], in_features=[2048],
                             density=[0.25], placement=[AIMC_TILE], layer=[0])
    assert estimate.mapped.tile_activations == 8 * 0.25  # 4 x 2 tiles of 512x512
    assert estimate.mapped.energy_j == pytest.approx(8 * a.mvm_energy_j * 0.25, rel=1e-12)
    assert estimate.mapped.latency_s == a.mvm_latency_s  # tiles in parallel


def test_expert_with_density_zero_costs_nothing() -> None:
    nodes = _olmoe_layer()
    placement = _heterogeneous(nodes)
    base = estimate_cost(TARGET, placement=placement, **nodes)
    for where in (AIMC_TILE, DIGITAL):
        more = {key: [*value, extra] for (key, value), extra in zip(
            nodes.items(), ["expert", 1024, 2048, 0.0, 0], strict=True)}
        cost = estimate_cost(TARGET, placement=[*placement, where], **more)
        assert cost.mapped.energy_j == base.mapped.energy_j
        assert cost.mapped.latency_s == base.mapped.latency_s
        assert cost.all_digital.energy_j == base.all_digital.energy_j


def test_experts_on_analog_save_energy_and_breakdown_adds_up() -> None:
    nodes = _olmoe_layer()
    estimate = estimate_cost(TARGET, placement=_heterogeneous(nodes), **nodes)
    mapped = estimate.mapped
    assert estimate.energy_ratio < 1.0
    assert sum(mapped.energy_by_kind.values()) == pytest.approx(mapped.energy_j, rel=1e-12)
    assert sum(mapped.latency_by_kind.values()) == pytest.approx(mapped.latency_s, rel=1e-12)
    assert mapped.energy_by_kind["norm"] == 0.0
    assert mapped.analog_energy_j + mapped.digital_energy_j == pytest.approx(mapped.energy_j)
    assert set(estimate.to_json()) == {"mapped", "all_digital", "energy_ratio", "latency_ratio"}


def test_stages_run_analog_in_parallel_and_digital_in_sequence() -> None:
    d, a = TARGET.digital, TARGET.aimc
    common = {"kind": ["expert"] * 2, "out_features": [512, 512], "in_features": [512, 512],
              "density": [0.5, 0.5], "layer": [0, 0]}
    analog = estimate_cost(TARGET, placement=[AIMC_TILE] * 2, **common)
    assert analog.mapped.latency_s == a.mvm_latency_s
    one = 0.5 * 512 * 512 * d.weight_bytes / d.mem_bandwidth
    assert analog.all_digital.latency_s == pytest.approx(2 * one)
    split = estimate_cost(TARGET, placement=[AIMC_TILE] * 2, stage=[0, 1], **common)
    assert split.mapped.latency_s == 2 * a.mvm_latency_s


def test_serial_steps_from_a_3d_allocation() -> None:
    target = load_target("3d-aimc")
    alloc = allocate([2048], [2048], target, chips="auto")  # 16 tiles on 2048 sites: 1 step
    steps = alloc.serial_steps()
    cost = estimate_cost(target, kind=["attention"], out_features=[2048], in_features=[2048],
                         density=[1.0], placement=[AIMC_TILE], layer=[0],
                         tiles=np.diff(alloc.tile_start), serial_steps=steps)
    assert cost.mapped.latency_s == target.aimc.mvm_latency_s * steps[0] == 1.33e-7
    stacked = estimate_cost(target, kind=["attention"], out_features=[2048], in_features=[2048],
                            density=[1.0], placement=[AIMC_TILE], layer=[0], serial_steps=[3])
    assert stacked.mapped.latency_s == pytest.approx(3 * target.aimc.mvm_latency_s)


def test_invalid_inputs_are_rejected() -> None:
    args = {"out_features": [8], "in_features": [8], "density": [1.0], "layer": [0]}
    with pytest.raises(ValueError, match="cannot be placed"):
        estimate_cost(TARGET, kind=["norm"], placement=[AIMC_TILE], **args)
    with pytest.raises(ValueError, match="placement must be"):
        estimate_cost(TARGET, kind=["linear"], placement=["gpu"], **args)
    with pytest.raises(ValueError, match=r"density must lie in \[0, 1\]"):
        estimate_cost(TARGET, kind=["linear"], placement=[DIGITAL],
                      **{**args, "density": [1.5]})
    with pytest.raises(ValueError, match="one per matrix"):
        estimate_cost(TARGET, kind=["linear"], placement=[DIGITAL], **{**args, "layer": [0, 1]})
