"""Energy and latency per generated token of a mapping (batch 1), and of all-digital execution.

Reads, per weight matrix: kind, shape ``[out, in]``, activation density, placement
(``digital`` or ``aimc-tile``), layer; optionally its tile count, serial MVM steps (from
:meth:`Allocation.serial_steps`) and a stage number. Writes a :class:`CostEstimate`.

Assumptions:

1. A matrix computes on a fraction ``density`` of the tokens (1 for dense modules, the routed
   fraction for a routed expert). Energies and digital times are expectations per token, so
   they scale with density; a matrix with density 0 costs nothing.
2. Analog: every tile of the matrix is activated once per token it computes on:
   ``tiles x mvm_energy_j x density``. The target's figure covers the DAC/ADC; a partial or
   packed tile costs a full activation (conservative); adding partial sums is not costed.
3. Analog latency: tiles on different crossbar sites run in parallel, tiers of one site one
   after another: ``serial_steps x mvm_latency_s`` (serial_steps defaults to 1).
4. Digital: ``MACs = out x in`` (for every matrix, the matrices of modules kept whole
   included); every weight is fetched from memory for every token the
   matrix computes on (batch 1, no reuse): energy ``(MACs x mac_energy_j + out x in x
   weight_bytes x mem_energy_per_byte_j) x density``; time from the roofline
   ``max(MACs / mac_throughput, bytes / mem_bandwidth) x density``.
5. Schedule: matrices form stages by (layer, kind, stage); stages run in sequence. Within a
   stage, analog matrices run in parallel on their own arrays (the stage's analog time is its
   slowest analog matrix with density > 0), digital matrices share the digital units (their
   expected times add), and the analog and digital parts overlap (the stage takes the longer).
   Pass ``stage`` to split dependent matrices (e.g. an expert's up/gate before its down).
6. Extra digital additions (``adds`` per matrix and token, e.g. the partial sums of a split
   expert's analog and digital parts): ``adds x mac_energy_j x density`` (an addition costed
   as a MAC, conservative) and ``adds / mac_throughput x density`` of digital time, charged
   only where the matrix runs analog (all-digital execution has no parts to add).
7. Not costed: non-matrix nodes (embedding lookup, norms, element-wise ops, attention scores
   and softmax), activation traffic, and moving activations between analog and digital units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hetmap.common.grid import tiles_per_matrix
from hetmap.targets.capability import MATMUL_KINDS
from hetmap.targets.model import Target

DIGITAL = "digital"
AIMC_TILE = "aimc-tile"
#: kinds whose matrices are multiplied (and costed): those a tile can hold, and the matrices
#: of modules kept whole (``opaque``: computed digitally, never placed on tiles)
COSTED_KINDS = MATMUL_KINDS | {"opaque"}


@dataclass(frozen=True)
class CostReport:
    """Expected cost of one token under one placement."""

    energy_j: float
    latency_s: float
    analog_energy_j: float
    digital_energy_j: float
    weight_bytes_fetched: float
    tile_activations: float
    energy_by_kind: dict[str, float]
    latency_by_kind: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "energy_j": self.energy_j,
            "latency_s": self.latency_s,
            "analog_energy_j": self.analog_energy_j,
            "digital_energy_j": self.digital_energy_j,
            "weight_bytes_fetched": self.weight_bytes_fetched,
            "tile_activations": self.tile_activations,
            "energy_by_kind": dict(self.energy_by_kind),
            "latency_by_kind": dict(self.latency_by_kind),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostReport:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CostEstimate:
    """A mapping's cost beside the cost of running every matrix digitally."""

    mapped: CostReport
    all_digital: CostReport

    @property
    def energy_ratio(self) -> float:
        """Mapped energy / all-digital energy (below 1: the mapping saves energy)."""
        return _ratio(self.mapped.energy_j, self.all_digital.energy_j)

    @property
    def latency_ratio(self) -> float:
        return _ratio(self.mapped.latency_s, self.all_digital.latency_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "mapped": self.mapped.to_json(),
            "all_digital": self.all_digital.to_json(),
            "energy_ratio": self.energy_ratio,
            "latency_ratio": self.latency_ratio,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostEstimate:
        return cls(CostReport.from_json(data["mapped"]), CostReport.from_json(data["all_digital"]))


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass(frozen=True)
class _Matrices:
    """Validated per-matrix inputs as arrays."""

    kind: NDArray[np.str_]
    macs: NDArray[np.float64]
    density: NDArray[np.float64]
    tiles: NDArray[np.float64]
    serial_steps: NDArray[np.float64]
    stage_id: NDArray[np.int64]
    adds: NDArray[np.float64]


def estimate_cost(
    target: Target,
    *,
    kind: Sequence[str],
    out_features: ArrayLike,
    in_features: ArrayLike,
    density: ArrayLike,
    placement: Sequence[str],
    layer: ArrayLike,
    tiles: ArrayLike | None = None,
    serial_steps: ArrayLike | None = None,
    stage: ArrayLike | None = None,
    adds: ArrayLike | None = None,
) -> CostEstimate:
    """Cost per token of ``placement`` and of all-digital execution (see module docstring)."""
    matrices = _matrices(target, kind, out_features, in_features, density, layer, tiles,
                         serial_steps, stage, adds)
    analog = np.asarray(placement) == AIMC_TILE
    if analog.shape != matrices.macs.shape:
        raise ValueError(f"placement has shape {analog.shape}, expected {matrices.macs.shape}")
    unknown = set(np.unique(np.asarray(placement)).tolist()) - {DIGITAL, AIMC_TILE}
    if unknown:
        raise ValueError(f"placement must be {DIGITAL!r} or {AIMC_TILE!r}, got {sorted(unknown)}")
    off_matmul = analog & ~np.isin(matrices.kind, sorted(MATMUL_KINDS))
    if off_matmul.any():
        raise ValueError(f"kind {matrices.kind[off_matmul][0]!r} cannot be placed on {AIMC_TILE}")
    return CostEstimate(
        mapped=_report(target, matrices, analog),
        all_digital=_report(target, matrices, np.zeros_like(analog)),
    )


def _matrices(target: Target, kind: Sequence[str], out_features: ArrayLike,
              in_features: ArrayLike, density: ArrayLike, layer: ArrayLike,
              tiles: ArrayLike | None, serial_steps: ArrayLike | None,
              stage: ArrayLike | None, adds: ArrayLike | None = None) -> _Matrices:
    kinds = np.asarray(kind, dtype=str)
    shape = kinds.shape
    given: dict[str, ArrayLike | None] = {
        "out_features": out_features, "in_features": in_features, "density": density,
        "layer": layer, "tiles": tiles, "serial_steps": serial_steps, "stage": stage,
        "adds": adds}
    arrays: dict[str, NDArray[Any]] = {}
    for name, value in given.items():
        if value is not None:
            arrays[name] = np.asarray(value)
            if arrays[name].shape != shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, expected {shape} "
                                 "(one per matrix)")
    out_arr = arrays["out_features"].astype(np.int64)
    in_arr = arrays["in_features"].astype(np.int64)
    dens = arrays["density"].astype(np.float64)
    if np.any((dens < 0) | (dens > 1)):
        raise ValueError("density must lie in [0, 1]")
    macs = np.where(np.isin(kinds, sorted(COSTED_KINDS)), out_arr * in_arr, 0)
    if "tiles" not in arrays:
        rows, cols = target.aimc.rows, target.aimc.cols
        arrays["tiles"] = tiles_per_matrix(np.maximum(out_arr, 1), np.maximum(in_arr, 1),
                                           rows, cols)
    _, kind_index = np.unique(kinds, return_inverse=True)
    stage_key = np.stack([arrays["layer"].astype(np.int64), kind_index.reshape(shape),
                          arrays.get("stage", np.zeros(shape, dtype=np.int64))], axis=-1)
    _, stage_id = np.unique(stage_key.reshape(-1, 3), axis=0, return_inverse=True)
    return _Matrices(kind=kinds, macs=macs.astype(np.float64), density=dens,
                     tiles=arrays["tiles"].astype(np.float64),
                     serial_steps=arrays.get("serial_steps", np.ones(shape)).astype(np.float64),
                     stage_id=stage_id.reshape(-1),
                     adds=arrays.get("adds", np.zeros(shape)).astype(np.float64))


def _report(target: Target, m: _Matrices, analog: NDArray[np.bool_]) -> CostReport:
    aimc, digital = target.aimc, target.digital
    on_digital = ~analog
    weight_bytes = np.where(on_digital, m.macs * digital.weight_bytes, 0.0) * m.density
    adds = np.where(analog, m.adds, 0.0) * m.density
    digital_energy = ((np.where(on_digital, m.macs, 0.0) * m.density + adds)
                      * digital.mac_energy_j + weight_bytes * digital.mem_energy_per_byte_j)
    activations = np.where(analog, m.tiles, 0.0) * m.density
    analog_energy = activations * aimc.mvm_energy_j
    digital_time = np.where(on_digital, np.maximum(m.macs / digital.mac_throughput,
                                                   m.macs * digital.weight_bytes
                                                   / digital.mem_bandwidth), 0.0) * m.density
    digital_time = digital_time + adds / digital.mac_throughput
    analog_time = np.where(analog & (m.density > 0), m.serial_steps * aimc.mvm_latency_s, 0.0)
    n_stages = int(m.stage_id.max(initial=-1)) + 1
    stage_analog = np.zeros(n_stages)
    np.maximum.at(stage_analog, m.stage_id, analog_time)
    stage_digital = np.bincount(m.stage_id, weights=digital_time, minlength=n_stages)
    stage_time = np.maximum(stage_analog, stage_digital)
    stage_kind = np.empty(n_stages, dtype=m.kind.dtype)
    stage_kind[m.stage_id] = m.kind
    energy = analog_energy + digital_energy
    return CostReport(
        energy_j=float(energy.sum()),
        latency_s=float(stage_time.sum()),
        analog_energy_j=float(analog_energy.sum()),
        digital_energy_j=float(digital_energy.sum()),
        weight_bytes_fetched=float(weight_bytes.sum()),
        tile_activations=float(activations.sum()),
        energy_by_kind=_sum_by(m.kind, energy),
        latency_by_kind=_sum_by(stage_kind, stage_time),
    )


def _sum_by(labels: NDArray[np.str_], values: NDArray[np.float64]) -> dict[str, float]:
    names, index = np.unique(labels, return_inverse=True)
    totals = np.bincount(index.reshape(-1), weights=values, minlength=names.size)
    return {str(name): float(total) for name, total in zip(names, totals, strict=True)}
