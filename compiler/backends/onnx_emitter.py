"""The ``onnx`` emitter: ``OUT/model.onnx`` with hetmap's placement metadata.

Reads a compiled plan (placements, tilings, array assignments) and its model's weights;
writes ``model.onnx`` through :func:`~hetmap.compiler.backends.onnx_export.export_onnx`.

Rules:

1. Every ONNX node that multiplies by a weight matrix of the IR carries ``hetmap.node``,
   ``hetmap.placement``; analog ones ``hetmap.tiles`` (JSON list of
   ``{"rows": [r0, r1], "cols": [c0, c1], "array": slot, "chip": c, "array_in_chip": a,
   "tier": t}``, rows indexing the matrix's inputs and cols its outputs); experts also
   ``hetmap.layer`` and ``hetmap.expert``; every tagged node ``hetmap.matrix`` (its role).
2. The model carries ``hetmap.target`` (target JSON), ``hetmap.plan`` (the plan summary JSON)
   and ``hetmap.version``.
3. ``tiles=True`` lowers every analog matrix to one MatMul per crossbar tile, each tagged
   ``hetmap.tile`` too.
4. A weight-consuming node without a tag, or a tagged matrix missing from the graph, is an
   :class:`EmitError`: a toolchain must be able to read every placement off the graph.
5. A model without weights (meta device) cannot be emitted: one-line :class:`EmitError`.
6. ``moe`` picks the MoE form (``static``, ``dispatch``, ``ort``; default
   :data:`DEFAULT_MOE_FORM`, see the README's "For toolchain authors");
   ``external_data=True`` writes the weights to ``model.onnx.data``.
7. ``onnx_summary.json`` beside ``model.onnx`` records the form, the layers that fell back
   from ``ort`` to ``dispatch`` and why, the largest difference from PyTorch on the example
   input, and the graph's FLOPs and bytes (:mod:`~hetmap.compiler.backends.onnx_flops`) for
   one sequence of :data:`COST_SEQUENCE` tokens; :func:`summary_line` is its one-line form.
9. A 2-D parameter the IR has no matrix for but the graph multiplies by (inside a module the
   IR keeps whole: hyper-connections, Mamba projections, relative-position tables) is tagged
   with the IR node whose module holds it (the longest module path that is a prefix of the
   parameter's name), ``hetmap.placement`` = ``digital`` (the simulator runs such products
   digitally: they are no analog matrix) and ``hetmap.matrix`` = the parameter's name
   within that module. A parameter no IR node holds stays untagged (rule 4).
8. A split expert (neuron-granular placement) exports as two parts
   (:class:`~hetmap.compiler.backends.onnx_experts.SplitExpertMLP`) whose outputs are added:
   its analog neurons' matrices (tagged as the matrix, ``hetmap.part`` = ``analog-neurons``,
   their tiles those of the smaller matrices) and its digital neurons' (initializers
   ``<store>.<e>.digital.<role>.weight``, ``hetmap.placement`` = ``digital``, ``hetmap.part``
   = ``digital-neurons``); ``hetmap.neurons`` lists each part's neurons (indices into the
   expert's intermediate dimension). Only stacked experts stores are split (else EmitError).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hetmap.common.errors import EmitError, MissingDataError
from hetmap.compiler.ir.annotations import DIGITAL, NEURON_CONSUMER, Placement
from hetmap.compiler.ir.graph import Node, NodeKind
from hetmap.compiler.ir.hwannotations import ArrayAssignment, Tiling

if TYPE_CHECKING:
    from hetmap.compiler.api import Plan

ONNX_FILE = "model.onnx"
SUMMARY_FILE = "onnx_summary.json"
DEFAULT_MOE_FORM = "dispatch"
COST_SEQUENCE = 128


def _tiles_json(node: Node, index: int, target: Any) -> list[dict[str, Any]]:
    tiling = node.get(Tiling)
    if tiling is None:
        return []
    grid = tiling.grids[index]
    assignment = node.get(ArrayAssignment)
    slots = assignment.slots(index) if assignment is not None else [None] * grid.count
    aimc = target.aimc
    sites = None
    tiles = []
    for (r0, r1, c0, c1), slot in zip(grid.ranges().tolist(), slots, strict=True):
        entry: dict[str, Any] = {"rows": [r0, r1], "cols": [c0, c1]}
        if slot is not None:
            sites = sites or aimc.arrays_per_chip * _chips(target)
            site = slot % sites
            entry.update(array=slot, chip=site // aimc.arrays_per_chip,
                         array_in_chip=site % aimc.arrays_per_chip, tier=slot // sites)
        tiles.append(entry)
    return tiles


def _chips(target: Any) -> int:
    return int(target._allocated_chips or target.aimc.chips)


def matrix_tags(plan: Plan) -> dict[str, dict[str, str]]:
    """Per matrix key, the metadata its ONNX nodes get (rule 1)."""
    chips = plan.summary.get("allocation", {}).get("chips")
    tags: dict[str, dict[str, str]] = {}
    for node in plan.graph.matrix_nodes():
        placement = node.get(Placement)
        if placement is None:
            raise EmitError(f"node {node.name} has no placement: run the place pass before emitting")
        for index, matrix in enumerate(node.matrices):
            entry = {"hetmap.node": node.name, "hetmap.placement": placement.target,
                     "hetmap.matrix": matrix.role}
            if placement.analog:
                entry["hetmap.tiles"] = json.dumps(_tiles_json(node, index, _Allocated(plan.target, chips)))
            if node.kind is NodeKind.EXPERT:
                entry["hetmap.layer"] = str(node.layer)
                entry["hetmap.expert"] = str(node.expert)
            tags[matrix.key] = entry
            if placement.split:  # rule 8
                digital = set(placement.digital_neurons)
                width = matrix.in_features if matrix.role == NEURON_CONSUMER else matrix.out_features
                entry["hetmap.part"] = "analog-neurons"
                entry["hetmap.neurons"] = json.dumps([j for j in range(width) if j not in digital])
                tags[digital_key(matrix.key)] = {
                    **{k: v for k, v in entry.items() if k != "hetmap.tiles"},
                    "hetmap.placement": DIGITAL, "hetmap.part": "digital-neurons",
                    "hetmap.neurons": json.dumps(sorted(digital))}
    return tags


def parameter_tags(plan: Plan, model: Any) -> dict[str, dict[str, str]]:
    """Rule 9: tags for the 2-D parameters no IR matrix names, from the node holding them."""
    listed = {m.weight.tensor for n in plan.graph.matrix_nodes() for m in n.matrices}
    owners = sorted(((n.module, n) for n in plan.graph if n.module),
                    key=lambda item: -len(item[0]))
    tags: dict[str, dict[str, str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.dim() < 2 or name in listed:
            continue
        owner = next((node for module, node in owners if name.startswith(f"{module}.")), None)
        if owner is None:
            continue
        tags[name] = {"hetmap.node": owner.name, "hetmap.placement": DIGITAL,
                      "hetmap.matrix": name[len(owner.module or "") + 1:]}
    return tags


def digital_key(key: str) -> str:
    """The matrix key of the digital part of a split expert's matrix ``<store>.<e>.<role>``."""
    prefix, _, role = key.rpartition(".")
    return f"{prefix}.digital.{role}"


def split_experts(plan: Plan) -> dict[str, dict[int, tuple[int, ...]]]:
    """Experts store path -> split expert -> its digital neurons (rule 8)."""
    stacked = {m.experts_module for m in plan.graph.moe_layers.values() if m.layout != "modulelist"}
    split: dict[str, dict[int, tuple[int, ...]]] = {}
    for node in plan.graph.experts():
        placement = node.get(Placement)
        if placement is None or not placement.split:
            continue
        if node.module not in stacked or node.expert is None:
            raise EmitError(f"{node.name} is split by neuron, but its experts are separate "
                            "nn.Linear modules, which the ONNX back end does not split yet; "
                            "compile it with --granularity expert")
        split.setdefault(node.module, {})[node.expert] = placement.digital_neurons
    return split


class _Allocated:
    """The target with the chip count the allocation actually used (``--chips auto``)."""

    def __init__(self, target: Any, chips: int | None) -> None:
        self.aimc = target.aimc
        self._allocated_chips = chips


def tile_ranges(plan: Plan) -> dict[str, list[tuple[int, int, int, int]]]:
    ranges: dict[str, list[tuple[int, int, int, int]]] = {}
    for node in plan.graph.matrix_nodes():
        tiling = node.get(Tiling)
        if tiling is None:
            continue
        for matrix, grid in zip(node.matrices, tiling.grids, strict=True):
            ranges[matrix.key] = [tuple(r) for r in grid.ranges().tolist()]  # type: ignore[misc]
    return ranges


def emit_onnx(plan: Plan, out_dir: Path, *, tiles: bool = False, moe: str | None = None,
              external_data: bool = False) -> list[Path]:
    """Write ``out_dir/model.onnx`` and its summary for ``plan`` (module rules 1-7)."""
    from hetmap.compiler.api import version
    from hetmap.compiler.backends.onnx_export import export_onnx

    try:
        model = plan.model.runnable()
    except MissingDataError as exc:
        raise EmitError(f"cannot emit ONNX for {plan.model.name!r}: it has no weights (meta "
                        "device); emit a tiny config, 'demo' or a checkpoint, or use plan.json "
                        "for structure-only results") from exc
    summary = plan.summary
    props = {"hetmap.target": json.dumps(plan.target.to_json()),
             "hetmap.plan": json.dumps({k: v for k, v in summary.items() if k != "cost"}),
             "hetmap.version": version()}
    path = Path(out_dir) / ONNX_FILE
    report = export_onnx(model, path, matrix_tags=matrix_tags(plan), model_props=props,
                         tile_ranges=tile_ranges(plan) if tiles else None,
                         example_input=plan.model.example_input,
                         moe_form=moe or DEFAULT_MOE_FORM, external_data=external_data,
                         split_experts=split_experts(plan),
                         parameter_tags=parameter_tags(plan, model))
    if report.untagged_nodes:
        first = report.untagged_nodes[0]
        raise EmitError(f"{len(report.untagged_nodes)} weight-consuming ONNX node(s) have no IR "
                        f"matrix, e.g. {first}; the IR misses a matrix of this model")
    if report.missing_keys:
        raise EmitError(f"IR matrices missing from the ONNX graph: {', '.join(report.missing_keys[:3])}")
    _write_summary(report, Path(out_dir) / SUMMARY_FILE)  # a side file: not in the list
    written = [path]
    if report.external_data is not None:
        written.append(report.external_data)
    return written


def _write_summary(report: Any, path: Path) -> Path:
    """Rule 7."""
    from hetmap.compiler.backends.onnx_flops import count_cost

    cost = count_cost(report.path, {"batch": 1, "sequence": COST_SEQUENCE})
    summary = {"moe_form": report.moe_form, "fallbacks": dict(report.fallbacks),
               "max_difference": report.max_difference,
               "external_data": None if report.external_data is None else report.external_data.name,
               "cost": cost.to_json()}
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


def summary_line(out_dir: Path) -> str:
    """Rule 7's summary in one line, for the CLI."""
    summary = json.loads((Path(out_dir) / SUMMARY_FILE).read_text())
    cost = summary["cost"]
    line = (f"onnx: {summary['moe_form']} MoE form, {cost['flops_per_token']:.4g} FLOPs/token "
            f"({cost['expert_flops'] / max(cost['flops'], 1):.0%} in experts; "
            f"{cost['tokens']}-token sequence), weights {cost['weight_bytes'] / 1e6:.3g} MB")
    if summary["fallbacks"]:
        line += f"; {len(summary['fallbacks'])} MoE block(s) fell back to dispatch (see {SUMMARY_FILE})"
    return line
