"""``expert-score``: the paper's maximum-neuron-norm score and the router-norm score.

Reads: expert and router matrices (weights streamed one tensor at a time from a checkpoint,
or views of a live module's parameters). Writes: :class:`ExpertScore` on every expert node.

Rules:

1. ``score(e) = prod over the expert's matrices of the largest L2 norm of one neuron``;
   neurons of ``gate``/``up`` (and any other input-side matrix) are rows of W ``[out, in]``,
   neurons of ``down`` are columns (the hidden unit's output weights). Experts without a gate
   use up and down only.
2. ``router_norm(e)`` = L2 norm of row e of the router weight.
3. A model without weights gets no scores (a note says so); policies needing them refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hetmap.compiler.annotations import ExpertScore
from hetmap.compiler.ir import Graph, Matrix, Node
from hetmap.compiler.passes.base import CompileContext, PassResult
from hetmap.compiler.weights import WeightStore


def max_neuron_norm(weight: torch.Tensor, matrix: Matrix) -> float:
    """Largest L2 norm of one neuron: rows of W [out, in], columns for ``down``.

    (Squared sums, then one square root of the maximum: twice as fast as ``norm(dim)``.)
    """
    dim = 0 if matrix.role == "down" else 1
    return float(weight.square().sum(dim=dim).max().sqrt())


def expert_max_norm(node: Node, store: WeightStore) -> float:
    score = 1.0
    for matrix in node.matrices:
        score *= max_neuron_norm(store.load(matrix.weight), matrix)
    return score


@dataclass(frozen=True)
class ExpertScorePass:
    name: ClassVar[str] = "expert-score"
    description: ClassVar[str] = "max-neuron-norm and router-norm score per routed expert"

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        if not graph.moe_layers:
            return PassResult(graph, False)
        if not ctx.model.has_weights:
            return PassResult(graph, False, ["no weights: expert scores not computed"])
        store = ctx.model.weights()
        layers = graph.experts_by_layer()
        advance = ctx.progress("scoring experts", sum(len(v) for v in layers.values()))
        for layer, experts in layers.items():
            router = graph.node(graph.moe_layers[layer].router)
            router_rows = store.load(router.matrices[0].weight).norm(dim=1)
            for node in experts:
                node.annotate(ExpertScore(max_norm=expert_max_norm(node, store),
                                          router_norm=float(router_rows[node.expert])))
                advance(1)
        return PassResult(graph, True)
