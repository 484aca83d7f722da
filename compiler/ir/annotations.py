"""Typed node annotations written by hetmap's passes.

An annotation is a frozen dataclass attached with ``node.annotate(...)`` and read with
``node.get(Type)``. Each one knows how to render itself into plan.json (``to_json``: a flat
dict merged into the node's entry), into ir.txt (``brief``), and how to check itself against
its node (``check``, called by the verifier). Plugins may define their own annotations the
same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from hetmap.common.errors import VerificationError
from hetmap.compiler.ir.graph import Node

DIGITAL = "digital"
AIMC = "aimc-tile"
TargetName = Literal["digital", "aimc-tile"]
DensitySource = Literal["calibration", "structural", "uniform-assumption"]


@dataclass(frozen=True)
class Density:
    """Fraction of tokens a node computes on (1.0 for dense modules).

    ``source`` says where the figure comes from: counted on calibration tokens, known from
    structure (dense modules), or assumed uniform routing ``top_k / E`` for a model without
    weights. ``mean_routing_weight`` is the expert's mean routing weight over the tokens
    routed to it (calibration only).
    """

    value: float
    source: DensitySource
    tokens: int = 0
    mean_routing_weight: float | None = None

    def check(self, node: Node) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise VerificationError(f"{node.name}: density {self.value} outside [0, 1]")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"density": round(self.value, 6), "density_source": self.source}
        if self.mean_routing_weight is not None:
            out["mean_routing_weight"] = round(self.mean_routing_weight, 6)
        return out

    def brief(self) -> str:
        return f"density={self.value:.3f}" + ("" if self.source == "calibration" else f"({self.source})")


@dataclass(frozen=True, eq=False)
class InputMoments:
    """Second moments ``E[x_j^2]`` of the inputs of an expert's matrices, over the calibration
    tokens routed to it.

    ``second_moments`` maps a matrix role (``gate``, ``up``, ``down``, ...) to a float64 vector
    ``[in_features]``; for ``down`` the input is the intermediate activation
    ``act(gate x) * (up x)``. ``tokens`` is the number of routed tokens averaged over (0: the
    expert was never routed; the vectors are zeros). plan.json gets only ``input_rms``, the
    root mean square of the first matrix's input.
    """

    second_moments: Mapping[str, np.ndarray]
    tokens: int

    def check(self, node: Node) -> None:
        widths = {m.role: m.in_features for m in node.matrices}
        for role, moment in self.second_moments.items():
            if widths.get(role) != moment.shape[-1] or moment.ndim != 1:
                raise VerificationError(f"{node.name}: input moments of {role!r} have shape "
                                        f"{moment.shape}, matrix inputs {widths.get(role)}")
            if not bool(np.all(moment >= 0.0)):
                raise VerificationError(f"{node.name}: negative or NaN input moment of {role!r}")

    def to_json(self) -> dict[str, Any]:
        first = next(iter(self.second_moments.values()), None)
        if first is None or not self.tokens:
            return {}
        return {"input_rms": round(float(np.sqrt(first.mean())), 6)}


@dataclass(frozen=True)
class ExpertScore:
    """Per-expert scores: the paper's maximum-neuron-norm product, the router-row norm and the
    expected output-error impact under the target's programming noise (see
    :mod:`hetmap.compiler.algorithms.expert_score`)."""

    max_norm: float | None = None
    router_norm: float | None = None
    expected_impact: float | None = None

    def check(self, node: Node) -> None:
        for value in (self.max_norm, self.router_norm, self.expected_impact):
            if value is not None and not value >= 0.0:
                raise VerificationError(f"{node.name}: negative or NaN score {value}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.max_norm is not None:
            out["score"] = self.max_norm
        if self.router_norm is not None:
            out["router_norm"] = self.router_norm
        if self.expected_impact is not None:
            out["expected_impact"] = self.expected_impact
        return out

    def brief(self) -> str:
        parts = []
        if self.max_norm is not None:
            parts.append(f"score={self.max_norm:.4g}")
        if self.router_norm is not None:
            parts.append(f"router_norm={self.router_norm:.4g}")
        if self.expected_impact is not None:
            parts.append(f"impact={self.expected_impact:.4g}")
        return " ".join(parts)


@dataclass(frozen=True)
class Sensitivity:
    """Measured increase of the calibration loss (mean next-token NLL, nats) when this expert
    alone runs on simulated AIMC tiles with the target's noise, averaged over ``seeds``
    programming seeds (``seed_std``: their sample standard deviation), on ``tokens``
    calibration tokens (written by ``sensitivity``)."""

    loss_increase: float
    seeds: int = 1
    tokens: int = 0
    seed_std: float = 0.0

    def check(self, node: Node) -> None:
        if not math.isfinite(self.loss_increase):
            raise VerificationError(f"{node.name}: non-finite sensitivity {self.loss_increase}")

    def to_json(self) -> dict[str, Any]:
        return {"sensitivity": self.loss_increase}

    def brief(self) -> str:
        return f"sensitivity={self.loss_increase:.4g}"


@dataclass(frozen=True)
class Placement:
    """Where a node runs and why."""

    target: TargetName
    reason: str

    def check(self, node: Node) -> None:
        if self.target not in (DIGITAL, AIMC):
            raise VerificationError(f"{node.name}: unknown placement target {self.target!r}")
        if not self.reason:
            raise VerificationError(f"{node.name}: placement without a reason")
        if self.target == AIMC and not node.matrices:
            raise VerificationError(f"{node.name}: placed on {AIMC} but has no matrices")

    @property
    def analog(self) -> bool:
        return self.target == AIMC

    def to_json(self) -> dict[str, Any]:
        return {"placement": self.target, "reason": self.reason}

    def brief(self) -> str:
        return f"@{self.target}"


@dataclass(frozen=True, eq=False)
class Coactivation:
    """Graph-level: per MoE layer, ``[E, E]`` counts of calibration tokens routed to both
    experts i and j (the diagonal: to i); empty without calibration. Read by
    ``allocate{spread_experts=true}``."""

    scope: ClassVar[str] = "graph"
    layers: Mapping[int, np.ndarray]

    def to_json(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, eq=False)
class Traced:
    """Graph-level, written by the front end: the torch.fx ``GraphModule`` the IR was lowered
    from (``wrapped``: it wraps a Hugging Face causal LM's ``input_ids -> logits``). Passes
    that execute the traced model (streamed calibration) read it here. Not serialised; a
    copied graph shares it (the module is the model's, never copied)."""

    scope: ClassVar[str] = "graph"
    module: Any
    wrapped: bool

    def __deepcopy__(self, memo: dict[int, Any]) -> Traced:
        return self

    def to_json(self) -> dict[str, Any]:
        return {}
