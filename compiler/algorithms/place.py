"""Placement policies: which routed experts deserve the digital budget.

A policy is a class with a kebab-case ``name``, a ``description`` and
``scores(graph, experts, ctx) -> dict[node name, float]``: a higher score means "more
deserving of digital". The ``place`` pass ranks experts by score (within each layer, or
globally) and puts the top ``budget`` fraction on digital. ``fixed`` policies (``none``,
``all``) bypass the ranking. Third-party policies register under the entry-point group
``hetmap.policies``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hetmap.common.errors import MissingDataError
from hetmap.compiler.ir.annotations import Density, ExpertScore, Sensitivity
from hetmap.compiler.ir.graph import Graph, Node

if TYPE_CHECKING:  # the context policies are called with (a type only)
    from hetmap.compiler.passes.base import CompileContext


def _require(experts: list[Node], policy: str, read: Callable[[Node], float | None],
             what: str, ctx: CompileContext) -> dict[str, float]:
    values = {n.name: read(n) for n in experts}
    if any(v is None for v in values.values()):
        why = ("the model has no weights (meta device)" if not ctx.model.has_weights
               else f"run the pass that computes it first ({what})")
        raise MissingDataError(f"policy {policy} needs {what}, but {why}; "
                               "weight-free policies: none, all, random")
    return values  # type: ignore[return-value]


def _calibrated(node: Node) -> Density | None:
    density = node.get(Density)
    return density if density is not None and density.source == "calibration" else None


class MaxNorm:
    name: ClassVar[str] = "max-norm"
    description: ClassVar[str] = "largest max-neuron-norm product first (the paper's score)"
    fixed: ClassVar[str | None] = None

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        return _require(experts, self.name, lambda n: getattr(n.get(ExpertScore), "max_norm", None),
                        "expert scores (expert-score pass)", ctx)


class ActivationFrequency:
    name: ClassVar[str] = "activation-frequency"
    description: ClassVar[str] = "most often routed experts first (calibration density)"
    fixed: ClassVar[str | None] = None

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        return _require(experts, self.name, lambda n: getattr(_calibrated(n), "value", None),
                        "calibrated activation densities (density pass)", ctx)


class ActivationWeight:
    name: ClassVar[str] = "activation-weight"
    description: ClassVar[str] = "largest mean routing weight first (calibration)"
    fixed: ClassVar[str | None] = None

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        return _require(experts, self.name,
                        lambda n: getattr(_calibrated(n), "mean_routing_weight", None),
                        "mean routing weights (density pass)", ctx)


class RouterNorm:
    name: ClassVar[str] = "router-norm"
    description: ClassVar[str] = "largest router-row L2 norm first (needs no data)"
    fixed: ClassVar[str | None] = None

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        return _require(experts, self.name, lambda n: getattr(n.get(ExpertScore), "router_norm", None),
                        "router norms (expert-score pass)", ctx)


class ExpectedImpact:
    """``density x sum over matrices of sum_ij sigma_ij^2 E[x_j^2]``: the expected squared
    output error an expert adds per token on AIMC tiles, with ``sigma_ij`` from aihwkit's
    programming-noise model at the target's settings and ``E[x_j^2]`` the calibration inputs'
    second moments (written by ``expert-score``; see :mod:`hetmap.compiler.algorithms.expert_score`)."""

    name: ClassVar[str] = "expected-impact"
    description: ClassVar[str] = "largest expected output error under the target's noise first"
    fixed: ClassVar[str | None] = None

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        return _require(experts, self.name,
                        lambda n: getattr(n.get(ExpertScore), "expected_impact", None),
                        "expected impacts (density, then expert-score)", ctx)

    def neuron_scores(self, graph: Graph, experts: list[Node], ctx: CompileContext
                      ) -> dict[str, np.ndarray]:
        """Each neuron's score (``ExpertScore.neuron_impact``: (3) of
        :mod:`hetmap.compiler.algorithms.expert_score`)."""
        values = {n.name: getattr(n.get(ExpertScore), "neuron_impact", None) for n in experts}
        _require(experts, self.name, lambda n: None if values[n.name] is None else 0.0,
                 "per-neuron expected impacts (density, then "
                 "expert-score{granularity=neuron})", ctx)
        return values  # type: ignore[return-value]


#: The pipeline the ``measured`` policy's error message suggests.
MEASURED_PIPELINE = "density,expert-score,sensitivity,place,tile,allocate,cost"


class Measured:
    """Calibration-loss increase when the expert alone runs analog with the target's noise,
    measured by the ``sensitivity`` pass (one simulation per expert and seed)."""

    name: ClassVar[str] = "measured"
    description: ClassVar[str] = "largest measured loss increase when analog first (sensitivity)"
    fixed: ClassVar[str | None] = None

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        values = {n.name: getattr(n.get(Sensitivity), "loss_increase", None) for n in experts}
        if ctx.model.has_weights and any(v is None for v in values.values()):
            layer = next(n.layer for n in experts if values[n.name] is None)
            raise MissingDataError(
                f"policy {self.name} needs measured sensitivities, but layer {layer} has none; "
                f"add sensitivity to the pipeline before place (e.g. --pipeline "
                f"{MEASURED_PIPELINE})")
        return _require(experts, self.name, lambda n: values[n.name],
                        "measured sensitivities (sensitivity pass)", ctx)


class Random:
    name: ClassVar[str] = "random"
    description: ClassVar[str] = "uniformly random experts (seeded sanity baseline)"
    fixed: ClassVar[str | None] = None

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        layer = experts[0].layer if experts else 0
        rng = np.random.default_rng([ctx.seed, -1 if layer is None else layer])
        return {n.name: float(v) for n, v in zip(experts, rng.random(len(experts)), strict=True)}

    def neuron_scores(self, graph: Graph, experts: list[Node], ctx: CompileContext
                      ) -> dict[str, np.ndarray]:
        layer = experts[0].layer if experts else 0
        rng = np.random.default_rng([ctx.seed, -2 if layer is None else layer])
        from hetmap.compiler.ir.annotations import intermediate_width

        return {n.name: rng.random(intermediate_width(n) or 0) for n in experts}


class NoExperts:
    name: ClassVar[str] = "none"
    description: ClassVar[str] = "no routed expert digital (dense modules only)"
    fixed: ClassVar[str | None] = "none"

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        return {n.name: 0.0 for n in experts}


class AllExperts:
    name: ClassVar[str] = "all"
    description: ClassVar[str] = "every routed expert digital"
    fixed: ClassVar[str | None] = "all"

    def scores(self, graph: Graph, experts: list[Node], ctx: CompileContext) -> dict[str, float]:
        return {n.name: 1.0 for n in experts}


def builtin_policies() -> list[type[Any]]:
    return [MaxNorm, ActivationFrequency, ActivationWeight, RouterNorm, ExpectedImpact, Measured,
            Random, NoExperts, AllExperts]


def check_neuron_scores(policy: Any, origin: str, experts: list[Node], scores: Any
                        ) -> dict[str, np.ndarray]:
    """Validate a policy's per-neuron scores (one finite vector per expert, of its intermediate
    width); raise PluginError naming the policy when they are invalid."""
    from hetmap.common.errors import PluginError
    from hetmap.compiler.ir.annotations import intermediate_width

    name = getattr(policy, "name", type(policy).__name__)
    if not isinstance(scores, dict) or set(scores) != {n.name for n in experts}:
        raise PluginError(f"policy {name} ({origin}) must return one neuron-score vector per "
                          "expert node name")
    checked = {}
    for node in experts:
        vector = np.asarray(scores[node.name], dtype=np.float64)
        if vector.shape != (intermediate_width(node),) or not np.all(np.isfinite(vector)):
            raise PluginError(f"policy {name} ({origin}) gave {node.name} neuron scores of shape "
                              f"{vector.shape}, expected {intermediate_width(node)} finite values")
        checked[node.name] = vector
    return checked


def check_scores(policy: Any, origin: str, experts: list[Node], scores: Any) -> dict[str, float]:
    """Validate a policy's result; raise PluginError naming the policy when it is invalid."""
    from hetmap.common.errors import PluginError

    name = getattr(policy, "name", type(policy).__name__)
    if not isinstance(scores, dict):
        raise PluginError(f"policy {name} ({origin}) returned {type(scores).__name__}, "
                          "expected a dict of expert node name -> score")
    expected = {n.name for n in experts}
    unknown = sorted(set(scores) - expected)
    if unknown:
        raise PluginError(f"policy {name} ({origin}) named experts that do not exist: {unknown[:3]}")
    missing = sorted(expected - set(scores))
    if missing:
        raise PluginError(f"policy {name} ({origin}) gave no score for {missing[:3]}")
    for key, value in scores.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise PluginError(f"policy {name} ({origin}) gave {key} a non-finite score {value!r}")
    return {k: float(v) for k, v in scores.items()}
