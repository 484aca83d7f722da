"""The textual form of the IR (``ir.txt``), one node per line, e.g.::

    graph olmoe-tiny params=1234 moe_layers=2
      %model.layers.0.mlp.experts.3 = expert[model.layers.0.mlp.experts] (%model.layers.0.mlp.gate)
          layer=0 expert=3 gate:16x32 up:16x32 down:32x16 | density=0.250 @aimc-tile
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hetmap.compiler.ir.graph import Graph, Node


def format_node(graph: Graph, node: Node) -> str:
    head = f"%{node.name} = {node.kind.value}"
    if node.op:
        head += f"<{node.op}>"
    if node.module and node.module != node.name:
        head += f"[{node.module}]"
    inputs = ", ".join(f"%{name}" for name in graph.inputs_of(node.name))
    head += f" ({inputs})"
    details: list[str] = []
    if node.layer is not None:
        details.append(f"layer={node.layer}")
    if node.expert is not None:
        details.append(f"expert={node.expert}")
    details.extend(f"{m.role}:{m.out_features}x{m.in_features}" for m in node.matrices)
    notes = [a.brief() for a in node.annotations.values() if hasattr(a, "brief")]
    text = head
    if details:
        text += " " + " ".join(details)
    notes = [n for n in notes if n]
    if notes:
        text += " | " + " ".join(notes)
    return text


def format_graph(graph: Graph) -> str:
    lines = [f"graph {graph.name} params={graph.params_total} moe_layers={len(graph.moe_layers)} {{"]
    for layer, moe in sorted(graph.moe_layers.items()):
        lines.append(f"  # moe layer {layer}: {moe.block} experts={moe.num_experts} top_k={moe.top_k} "
                     f"layout={moe.layout}")
    lines.extend("  " + format_node(graph, node) for node in graph)
    lines.append("}")
    return "\n".join(lines) + "\n"
