"""``cost``: energy and latency per token of the mapping and of all-digital execution.

Requires: :class:`Placement`, :class:`Density`, :class:`Tiling`, :class:`AllocationSummary`
(with the serial steps of tiered targets on each :class:`ArrayAssignment`). Provides:
:class:`CostSummary` on the graph. An analog node without tiles is an error, never priced at
zero. The model and its assumptions
are in :mod:`hetmap.compiler.algorithms.cost`; expert up/gate and down matrices are costed as
dependent stages. A split expert (neuron-granular placement) is costed as its analog part
(the tiles of its smaller matrices) plus its digital part (the digital neurons' rows of
gate/up and columns of down) plus one digital addition per output of down (the two parts'
partial sums). A module called again (a looped layer: ``repeat`` nodes) is costed once per
call, each call in its own stages after the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hetmap.common.errors import PassError
from hetmap.compiler.algorithms.cost import estimate_cost
from hetmap.compiler.ir.annotations import (
    AIMC,
    DIGITAL,
    NEURON_CONSUMER,
    Density,
    Placement,
    analog_shape,
)
from hetmap.compiler.ir.graph import Graph
from hetmap.compiler.ir.hwannotations import (
    AllocationSummary,
    ArrayAssignment,
    CostSummary,
    Tiling,
)
from hetmap.compiler.passes.base import CompileContext, PassResult


def _calls(graph: Graph) -> dict[str, int]:
    """Matrix node -> how many times a token runs it: once, plus once per ``repeat`` node of
    its module or a module containing it (a module called again, e.g. a looped layer, is
    lowered once; see hetmap.compiler.frontend.lower rule 6)."""
    repeated = [n.module for n in graph if n.op == "repeat" and n.module]
    if not repeated:
        return {}
    calls = {}
    for node in graph.matrix_nodes():
        module = node.module or ""
        extra = sum(1 for path in repeated if module == path or module.startswith(f"{path}."))
        if extra:
            calls[node.name] = 1 + extra
    return calls


@dataclass(frozen=True)
class CostPass:
    name: ClassVar[str] = "cost"
    description: ClassVar[str] = "energy and latency per token versus all-digital"
    requires: ClassVar[tuple[type, ...]] = (Placement, Density, Tiling, AllocationSummary)
    provides: ClassVar[tuple[type, ...]] = (CostSummary,)

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        kinds, outs, ins, density, placement, layer, tiles, stage = [], [], [], [], [], [], [], []
        steps, adds = [], []
        calls = _calls(graph)
        for node in graph.matrix_nodes():
            where = node.get(Placement)
            if where is None:
                continue
            d = node.get(Density)
            tiling = node.get(Tiling)
            arrays = node.get(ArrayAssignment)
            if where.analog and (tiling is None or arrays is None):
                raise PassError(f"analog node {node.name} has no "
                                f"{'tiles' if tiling is None else 'arrays'}; a pass after "
                                "tile/allocate changed the placement: run tile,allocate again")
            if d is None:
                raise PassError(f"node {node.name} has no density; run density before cost")
            split = len(where.digital_neurons)
            for m_index, matrix in enumerate(node.matrices):
                parts = [(where.target, analog_shape(matrix.role, matrix.shape, split))]
                if split:  # the digital neurons' part, and the digital sum of the two parts
                    full_out, full_in = matrix.shape
                    parts.append((DIGITAL, (full_out, split) if matrix.role == NEURON_CONSUMER
                                  else (split, full_in)))
                for rep, (part, (out_features, in_features)) in enumerate(
                        p for _ in range(calls.get(node.name, 1)) for p in parts):
                    analog = part == AIMC
                    kinds.append(node.kind.value)
                    outs.append(out_features)
                    ins.append(in_features)
                    density.append(d.value)
                    placement.append(part)
                    layer.append(-1 if node.layer is None else node.layer)
                    tiles.append(tiling.grids[m_index].count if analog and tiling is not None
                                 else 0)
                    # a further call of the module (a looped layer) runs after the first
                    stage.append((1 if matrix.role in ("down", "o_proj") else 0)
                                 + 2 * (rep // len(parts)))
                    steps.append(arrays.steps(m_index) if analog and arrays is not None else 1)
                    adds.append(out_features if split and analog and matrix.role ==
                                NEURON_CONSUMER else 0)
        if not kinds:
            raise PassError("no placed matrix nodes to cost; run place before cost")
        estimate = estimate_cost(ctx.target, kind=kinds, out_features=np.asarray(outs),
                                 in_features=np.asarray(ins), density=np.asarray(density),
                                 placement=placement, layer=np.asarray(layer),
                                 tiles=np.asarray(tiles), serial_steps=np.asarray(steps),
                                 stage=np.asarray(stage), adds=np.asarray(adds))
        graph.annotate(CostSummary(estimate))
        return PassResult(graph, True, [f"energy {estimate.energy_ratio:.2f}x, latency "
                                        f"{estimate.latency_ratio:.2f}x all-digital"])
