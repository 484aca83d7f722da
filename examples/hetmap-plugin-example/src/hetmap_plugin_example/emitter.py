"""Example emitter: ``placements.csv``, one row per matrix node (``--emit placement-csv``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from hetmap.compiler.ir.annotations import Placement


def emit_placement_csv(plan: Any, out_dir: Path) -> list[Path]:
    """Write ``out_dir/placements.csv``: node, kind, layer, expert, placement, parameters."""
    path = Path(out_dir) / "placements.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["node", "kind", "layer", "expert", "placement", "params"])
        for node in plan.graph.matrix_nodes():
            placement = node.get(Placement)
            writer.writerow([node.name, node.kind.value, node.layer, node.expert,
                             placement.target if placement else "", node.matrix_params])
    return [path]
