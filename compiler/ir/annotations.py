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


@dataclass(frozen=True, eq=False)
class ExpertScore:
    """Per-expert scores: the paper's maximum-neuron-norm product, the router-row norm and the
    expected output-error impact under the target's programming noise (see
    :mod:`hetmap.compiler.algorithms.expert_score`)."""

    max_norm: float | None = None
    router_norm: float | None = None
    expected_impact: float | None = None
    #: per intermediate neuron, the score of neuron-granular placement: how much
    #: ``expected_impact`` falls when it goes digital (its rows of gate/up and column of down,
    #: and the tile range it sets; see (3) in hetmap.compiler.algorithms.expert_score). Not
    #: written to plan.json.
    neuron_impact: np.ndarray | None = None

    def check(self, node: Node) -> None:
        for value in (self.max_norm, self.router_norm, self.expected_impact):
            if value is not None and not value >= 0.0:
                raise VerificationError(f"{node.name}: negative or NaN score {value}")
        if self.neuron_impact is not None:
            width = intermediate_width(node)
            if self.neuron_impact.shape != (width,) or not bool(np.all(self.neuron_impact >= 0)):
                raise VerificationError(f"{node.name}: neuron impacts of shape "
                                        f"{self.neuron_impact.shape} (negative or NaN?) for "
                                        f"{width} neurons")

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


#: roles of the matrices that produce an expert's intermediate neurons (rows of W [out, in])
NEURON_PRODUCERS = ("gate", "up")
#: the role that consumes them (columns of W [out, in])
NEURON_CONSUMER = "down"


def intermediate_width(node: Node) -> int | None:
    """The number of intermediate neurons of a splittable expert (matrices gate/up ``[I, H]``
    and down ``[H, I]``, down present), or None when its matrices are not of that form."""
    roles = {m.role: m for m in node.matrices}
    down = roles.get(NEURON_CONSUMER)
    if down is None or set(roles) - {*NEURON_PRODUCERS, NEURON_CONSUMER} or len(roles) < 2:
        return None
    width = down.in_features
    if any(roles[r].out_features != width for r in NEURON_PRODUCERS if r in roles):
        return None
    return width


def analog_shape(role: str, shape: tuple[int, int], digital: int) -> tuple[int, int]:
    """The shape of the analog part of a matrix of a split expert with ``digital`` of its
    intermediate neurons digital: gate/up lose rows, down loses columns."""
    out_features, in_features = shape
    if role == NEURON_CONSUMER:
        return out_features, in_features - digital
    return out_features - digital, in_features


@dataclass(frozen=True)
class Placement:
    """Where a node runs and why.

    ``digital_neurons`` (neuron-granular placement, experts only): the intermediate neurons of
    an analog expert that run digitally -- rows of its gate/up, columns of its down. Its
    analog part is the smaller matrices without them (tiled on their own); the two parts'
    outputs are added digitally. Empty for a whole-expert placement.
    """

    target: TargetName
    reason: str
    digital_neurons: tuple[int, ...] = ()

    def check(self, node: Node) -> None:
        if self.target not in (DIGITAL, AIMC):
            raise VerificationError(f"{node.name}: unknown placement target {self.target!r}")
        if not self.reason:
            raise VerificationError(f"{node.name}: placement without a reason")
        if self.target == AIMC and not node.matrices:
            raise VerificationError(f"{node.name}: placed on {AIMC} but has no matrices")
        if self.digital_neurons:
            width = intermediate_width(node)
            if self.target != AIMC or width is None:
                raise VerificationError(f"{node.name}: digital neurons on a node that is not a "
                                        "splittable analog expert")
            neurons = self.digital_neurons
            if list(neurons) != sorted(set(neurons)) or neurons[0] < 0 or neurons[-1] >= width:
                raise VerificationError(f"{node.name}: digital neurons must be distinct, sorted "
                                        f"and in 0..{width - 1}")
            if len(neurons) == width:
                raise VerificationError(f"{node.name}: every neuron digital: place it digital")

    @property
    def analog(self) -> bool:
        return self.target == AIMC

    @property
    def split(self) -> bool:
        return bool(self.digital_neurons)

    def digital_params(self, node: Node) -> int:
        """Parameters of ``node`` that this placement puts on digital: all for a digital
        node, the digital neurons' rows of gate/up (with their biases) and columns of down
        for a split expert, none otherwise."""
        if not self.analog:
            return node.matrix_params
        per_neuron = sum(m.out_features if m.role == NEURON_CONSUMER
                         else m.in_features + (1 if m.bias is not None else 0)
                         for m in node.matrices)
        return len(self.digital_neurons) * per_neuron

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"placement": self.target, "reason": self.reason}
        if self.digital_neurons:
            out["digital_neurons"] = list(self.digital_neurons)
        return out

    def brief(self) -> str:
        if self.digital_neurons:
            return f"@{self.target}+{len(self.digital_neurons)}-digital-neurons"
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
