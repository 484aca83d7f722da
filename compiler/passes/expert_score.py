"""``expert-score``: the paper's maximum-neuron-norm score, the router-norm score and each
expert's expected output-error impact under the target's programming noise.

Reads: expert and router matrices (weights streamed one tensor at a time from a checkpoint,
or views of a live module's parameters); :class:`Density` and :class:`InputMoments` (from
``density``) for rule 3; the target's analog settings. Writes: :class:`ExpertScore` on every
expert node.

Rules:

1. ``score(e) = prod over the expert's matrices of the largest L2 norm of one neuron``;
   neurons of ``gate``/``up`` (and any other input-side matrix) are rows of W ``[out, in]``,
   neurons of ``down`` are columns (the hidden unit's output weights). Experts without a gate
   use up and down only.
2. ``router_norm(e)`` = L2 norm of row e of the router weight.
3. ``expected_impact(e) = density(e) * sum over the expert's matrices W of
   sum_ij sigma_ij^2 E[x_j^2]``: the expected squared output error the expert adds per token
   when it runs on AIMC tiles. ``x`` is the matrix's input over the calibration tokens routed
   to the expert (for ``down``: ``act(gate x) * (up x)``); ``sigma_ij^2`` is the mean squared
   programming error of weight ``ij`` in weight units, from aihwkit's noise model at the
   target's settings (model, ``prog_noise_scale``, tile size) after the runtime's per-tile
   abs-max scaling and device-pair conversion (see :mod:`hetmap.compiler.algorithms.expert_score`). Computed
   only when every expert of a layer has a calibration density and input moments (``density``
   ran first); a note says when it was not. With ``granularity=neuron`` an expert
   of gate/up/down matrices also gets each intermediate neuron's marginal impact
   (``neuron_impact``: how much the expected error of its analog part falls when that neuron
   goes digital, the range effect included; (3) in
   :mod:`hetmap.compiler.algorithms.expert_score`), the score of ``place{granularity=neuron}``.
4. A model without weights gets no scores (a note says so); policies needing them refuse.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from hetmap.common.errors import MissingDataError
from hetmap.compiler.algorithms.expert_score import expert_expected_impact
from hetmap.compiler.data.weights import WeightStore
from hetmap.compiler.ir.annotations import (
    Density,
    ExpertScore,
    InputMoments,
    intermediate_width,
)
from hetmap.compiler.ir.graph import Graph, Matrix, Node
from hetmap.compiler.passes.base import CompileContext, PassResult

_READ_AHEAD = 4  # experts whose weights are read ahead of the one being scored
_READERS = 2  # threads reading them


def max_neuron_norm(weight: torch.Tensor, matrix: Matrix) -> float:
    """Largest L2 norm of one neuron: rows of W [out, in], columns for ``down``.

    (Squared sums, then one square root of the maximum: twice as fast as ``norm(dim)``.)
    """
    dim = 0 if matrix.role == "down" else 1
    return float(weight.square().sum(dim=dim).max().sqrt())


def load_matrix(store: WeightStore, node: Node, matrix: Matrix, check_finite: bool = True
                ) -> torch.Tensor:
    """``matrix``'s weights, refused in one line when their shape is not the IR's (a
    checkpoint that does not match its config), naming the tensor and its file; and when
    they hold NaN or Inf (``check_finite=False``: the caller checks, see :func:`_max_norm`)."""
    weight = store.load(matrix.weight)
    if tuple(weight.shape) != matrix.shape:
        where = getattr(store, "where", {}).get(matrix.weight.tensor)
        raise MissingDataError(
            f"tensor {matrix.weight.tensor!r}{f' in {where}' if where else ''} gives "
            f"{node.name} {matrix.role} the shape {tuple(weight.shape)}, but the model's config "
            f"makes it {matrix.shape}: the checkpoint does not match its config.json")
    if check_finite:
        _check_finite(store, node, matrix, weight)
    return weight


def _check_finite(store: WeightStore, node: Node, matrix: Matrix, weight: torch.Tensor) -> None:
    if not bool(torch.isfinite(weight).all()):
        where = getattr(store, "where", {}).get(matrix.weight.tensor)
        raise MissingDataError(
            f"tensor {matrix.weight.tensor!r}{f' in {where}' if where else ''} holds NaN or Inf "
            f"values ({node.name} {matrix.role}): the checkpoint is damaged")


def expert_max_norm(node: Node, store: WeightStore) -> float:
    return _max_norm(node, {m.role: load_matrix(store, node, m) for m in node.matrices})


def _max_norm(node: Node, weights: dict[str, torch.Tensor],
              store: WeightStore | None = None) -> float:
    """The product of the matrices' largest neuron norms. With ``store``, the weights were
    loaded unchecked: a NaN or Inf makes a norm non-finite, and only then is the matrix
    checked element by element (a finite matrix can overflow the squares)."""
    score = 1.0
    for matrix in node.matrices:
        norm = max_neuron_norm(weights[matrix.role], matrix)
        if store is not None and not math.isfinite(norm):
            _check_finite(store, node, matrix, weights[matrix.role])
        score *= norm
    return score


def _prefetched(nodes: list[Node], load: Callable[[Node], dict[str, torch.Tensor]],
                ahead: int = _READ_AHEAD) -> Iterator[tuple[Node, dict[str, torch.Tensor]]]:
    """Each node with its loaded weights; the next ``ahead`` nodes' reads run in worker
    threads while the caller computes on the current one (reads and compute overlap, and
    several reads are in flight for the disk)."""
    if not nodes:
        return
    with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="hetmap-read") as pool:
        pending = deque(pool.submit(load, node) for node in nodes[:ahead])
        for index, node in enumerate(nodes):
            weights = pending.popleft().result()
            if index + ahead < len(nodes):
                pending.append(pool.submit(load, nodes[index + ahead]))
            yield node, weights


def _impact_inputs(node: Node) -> tuple[float, InputMoments] | None:
    """(calibration density, input moments) of an expert, if rule 3 can use them."""
    density, moments = node.get(Density), node.get(InputMoments)
    if density is None or density.source != "calibration" or moments is None:
        return None
    if {m.role for m in node.matrices} - set(moments.second_moments):
        return None
    return density.value, moments


@dataclass(frozen=True)
class ExpertScorePass:
    name: ClassVar[str] = "expert-score"
    description: ClassVar[str] = "max-neuron-norm, router-norm and expected-impact score per expert"
    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = (ExpertScore,)

    #: ``neuron``: also every neuron's marginal impact (the score of neuron-granular placement;
    #: ``--granularity neuron`` sets it here and in ``place``)
    granularity: Literal["expert", "neuron"] = "expert"

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        if not graph.moe_layers:
            return PassResult(graph, False)
        if not ctx.model.has_weights:
            return PassResult(graph, False, ["no weights: expert scores not computed"])
        store = ctx.model.weights()
        layers = graph.experts_by_layer()
        advance = ctx.progress("scoring experts", sum(len(v) for v in layers.values()))
        noise: tuple[Any, Any] | None = None
        without_impact = []
        for layer, experts in layers.items():
            router = graph.node(graph.moe_layers[layer].router)
            router_rows = store.load(router.matrices[0].weight).norm(dim=1)
            inputs = {node.name: _impact_inputs(node) for node in experts}
            if any(value is None for value in inputs.values()):
                without_impact.append(layer)
            elif noise is None:
                noise = self._noise(ctx)
            def load(node: Node) -> dict[str, torch.Tensor]:
                return {m.role: load_matrix(store, node, m, check_finite=False)
                        for m in node.matrices}

            for node, weights in _prefetched(experts, load):
                max_norm = _max_norm(node, weights, store)  # checks finiteness first
                impact_inputs = inputs[node.name] if layer not in without_impact else None
                impact, per_neuron = None, None
                if impact_inputs is not None and noise is not None:
                    density, moments = impact_inputs
                    impact, per_neuron = expert_expected_impact(
                        density, weights, moments.second_moments, *noise,
                        neurons=self.granularity == "neuron" and intermediate_width(node) is not None)
                node.annotate(ExpertScore(
                    max_norm=max_norm, router_norm=float(router_rows[node.expert]),
                    expected_impact=impact, neuron_impact=per_neuron))
                advance(1)
        notes = []
        if without_impact:
            where = "" if len(without_impact) == len(layers) else f" in layers {without_impact}"
            notes.append(f"no expected impact{where} (needs density, with moments, first)")
        return PassResult(graph, True, notes)

    @staticmethod
    def _noise(ctx: CompileContext) -> tuple[Any, Any]:
        """The runtime's analog settings and aihwkit noise model for the target."""
        from hetmap.runtime import require_aihwkit

        require_aihwkit()
        from hetmap.runtime.programming import make_noise_model
        from hetmap.runtime.settings import settings_for

        settings = settings_for(ctx.target)
        return settings, make_noise_model(settings)

