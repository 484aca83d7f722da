"""plan.json's ``summary``: parameter accounting, expert counts, per-layer breakdown, plus
whatever graph-level annotations (allocation, cost) contribute through ``to_json``.

``digital_param_fraction`` counts the parameters of matrix nodes placed digital over all
parameters of the model (embeddings, norms and other non-matrix parameters appear only in
the denominator).
"""

from __future__ import annotations

from typing import Any

from hetmap.compiler.ir.annotations import Placement
from hetmap.compiler.ir.graph import Graph

FRACTION_DEFINITION = ("parameters of matrix nodes placed digital / all model parameters "
                       "(embeddings and norms count in the denominator only)")


def summarize(graph: Graph) -> dict[str, Any]:
    digital = analog = 0
    layers: dict[int, dict[str, Any]] = {}
    for node in graph.matrix_nodes():
        placement = node.get(Placement)
        if placement is None:
            continue
        if placement.analog:
            analog += node.matrix_params
        else:
            digital += node.matrix_params
    for layer, experts in sorted(graph.experts_by_layer().items()):
        moe = graph.moe_layers[layer]
        placed = [n.get(Placement) for n in experts]
        layers[layer] = {
            "layer": layer,
            "experts": len(experts),
            "top_k": moe.top_k,
            "experts_digital": sum(1 for p in placed if p is not None and not p.analog),
            "expert_params_digital": sum(n.matrix_params for n, p in zip(experts, placed, strict=True)
                                         if p is not None and not p.analog),
            "expert_params": sum(n.matrix_params for n in experts),
        }
    experts_all = graph.experts()
    summary: dict[str, Any] = {
        "nodes": len(graph),
        "moe_layers": len(graph.moe_layers),
        "params_total": graph.params_total,
        "params_digital": digital,
        "params_analog": analog,
        "digital_param_fraction": digital / graph.params_total if graph.params_total else 0.0,
        "digital_param_fraction_counts": FRACTION_DEFINITION,
        "experts_total": len(experts_all),
        "experts_digital": sum(v["experts_digital"] for v in layers.values()),
        "layers": list(layers.values()),
    }
    for annotation in graph.annotations.values():
        to_json = getattr(annotation, "to_json", None)
        if to_json is not None:
            summary.update(to_json())
    return summary
