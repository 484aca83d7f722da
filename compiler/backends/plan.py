"""plan.json, defined in one place: writing, reading, validating and restoring compiled plans
(``OUT/plan.json`` and ``OUT/ir.txt``).

The format is the JSON Schema ``plan.schema.json`` beside this module (``schema_version``
1), shipped for toolchains; every plan written is valid against it and every plan read is
checked against it first, so a hand-edited or foreign file is refused in one line naming
the first offending field. :func:`restore_annotations` turns a plan's nodes back into the
IR annotations the passes wrote.

Output directories are written atomically: everything goes into a temporary sibling
directory that is renamed into place at the end, so a failed compile leaves no partial OUT.
An existing OUT is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetmap.common.errors import HetmapError, OutputError
from hetmap.compiler.ir.annotations import Placement, analog_shape
from hetmap.compiler.ir.graph import Graph, Node
from hetmap.compiler.ir.hwannotations import AllocationSummary, ArrayLayout, CostSummary

PLAN_FILE = "plan.json"
IR_FILE = "ir.txt"
SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("plan.schema.json")


@functools.cache
def plan_schema() -> dict[str, Any]:
    """The JSON Schema of plan.json."""
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return schema


def validate_plan(data: Any, source: str) -> dict[str, Any]:
    """``data`` if it is a plan this hetmap can read; otherwise a one-line OutputError."""
    import jsonschema

    if not isinstance(data, dict):
        raise OutputError(f"{source} is not a hetmap plan (a JSON {type(data).__name__}, not an "
                          "object); recompile it with 'hetmap compile MODEL -o DIR'")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise OutputError(f"{source} has plan schema version {version!r}, this hetmap reads "
                          f"{SCHEMA_VERSION}; recompile it with this version")
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(plan_schema()).iter_errors(data))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "the top level"
        message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
        raise OutputError(f"{source} is not a valid hetmap plan: at {where}: {message}; "
                          "recompile it rather than editing it by hand")
    return data


def node_json(node: Node) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": node.name, "kind": node.kind.value, "params": node.params}
    if node.module:
        entry["module"] = node.module
    if node.op:
        entry["op"] = node.op
    if node.layer is not None:
        entry["layer"] = node.layer
    if node.expert is not None:
        entry["expert"] = node.expert
    matrices = [{"role": m.role, "key": m.key, "shape": [m.out_features, m.in_features]}
                for m in node.matrices]
    for annotation in node.annotations.values():
        to_json = getattr(annotation, "to_json", None)
        if to_json is not None:
            entry.update(to_json())
        matrix_json = getattr(annotation, "matrix_json", None)
        if matrix_json is not None:
            for index, matrix in enumerate(matrices):
                matrix.update(matrix_json(index))
    placement = node.get(Placement)
    if placement is not None and placement.split:  # the analog part's matrices
        for matrix, m in zip(matrices, node.matrices, strict=True):
            matrix["analog_shape"] = list(analog_shape(m.role, m.shape,
                                                       len(placement.digital_neurons)))
    if matrices:
        entry["matrices"] = matrices
    return entry


#: staging directories being written now; an interrupt handler removes them (see the CLI)
STAGING: set[Path] = set()
#: outputs this process has renamed into place; a signal after that is a late one (see the CLI)
COMMITTED: list[Path] = []


def discard_staging() -> None:
    """Remove every staging directory still being written (called on SIGINT/SIGTERM): each is
    first renamed away, so a writer still running cannot add to a directory left behind."""
    for staging in list(STAGING):
        try:
            trash = staging.with_name(staging.name + ".discarded")
            os.replace(staging, trash)
            shutil.rmtree(trash, ignore_errors=True)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
        STAGING.discard(staging)


def _check_replaceable(out: Path) -> None:
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
        raise OutputError(f"refusing to replace {out} (the current directory, one of its parents "
                          "or the root); choose a new directory for -o")
    if (resolved / ".git").exists() or (resolved / "pyproject.toml").exists():
        raise OutputError(f"refusing to replace {out}: it looks like a source tree, not a hetmap "
                          "output; choose a new directory for -o")


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` when the block succeeds.

    Rules: (1) without ``force`` an existing ``out`` is refused, before the work and again at
    the final rename, which is atomic: of two runs racing for one ``out`` exactly one wins and
    the other says why; (2) with ``force`` an existing hetmap output is replaced (never the
    current directory, a parent of it or a source tree); (3) on any exception or interrupt
    the staging directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another -o")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    if out.exists():
        _check_replaceable(out)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
        STAGING.add(staging)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror}") from exc
    try:
        yield staging
        if out.exists() and force:
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
            os.replace(out, trash / out.name)
            os.rename(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:  # rename onto an existing non-empty directory fails: the race is decided here
                os.rename(staging, out)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise OutputError(f"{out} was created by another run while this one worked; "
                                      "nothing was written: pass --force to replace it or "
                                      "choose another -o") from exc
                raise OutputError(f"cannot create {out}: {exc.strerror}") from exc
        COMMITTED.append(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        STAGING.discard(staging)


# --- the summary: parameter accounting, expert counts, per-layer breakdown, plus whatever
# graph-level annotations (allocation, cost) contribute through ``to_json``.
# ``digital_param_fraction`` counts the parameters of matrix nodes placed digital over all
# parameters of the model (embeddings, norms and other non-matrix parameters appear only in
# the denominator).

FRACTION_DEFINITION = ("parameters of matrix nodes placed digital / all model parameters "
                       "(embeddings and norms count in the denominator only)")


def summarize(graph: Graph) -> dict[str, Any]:
    digital = analog = 0
    layers: dict[int, dict[str, Any]] = {}
    for node in graph.matrix_nodes():
        placement = node.get(Placement)
        if placement is None:
            continue
        on_digital = placement.digital_params(node)
        digital += on_digital
        analog += node.matrix_params - on_digital
    for layer, experts in sorted(graph.experts_by_layer().items()):
        moe = graph.moe_layers[layer]
        placed = [n.get(Placement) for n in experts]
        layers[layer] = {
            "layer": layer,
            "experts": len(experts),
            "top_k": moe.top_k,
            "experts_digital": sum(1 for p in placed if p is not None and not p.analog),
            "expert_params_digital": sum(p.digital_params(n) for n, p in
                                         zip(experts, placed, strict=True) if p is not None),
            "expert_params": sum(n.matrix_params for n in experts),
        }
        split = [p for p in placed if p is not None and p.split]
        if split:
            layers[layer]["experts_split"] = len(split)
            layers[layer]["neurons_digital"] = sum(len(p.digital_neurons) for p in split)
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


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")


def write_plan(path: Path, plan: dict[str, Any]) -> None:
    """plan.json: header fields indented, then one line per node (small and diff-friendly)."""
    header = {k: v for k, v in plan.items() if k != "nodes"}
    text = json.dumps(header, indent=1, default=_json_default)[:-2]
    nodes = ",\n  ".join(json.dumps(n, separators=(",", ":"), default=_json_default)
                         for n in plan.get("nodes", []))
    path.write_text(f'{text},\n "nodes": [\n  {nodes}\n ]\n}}\n')


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def read_plan(out: Path) -> dict[str, Any]:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise OutputError(f"{out} is not a compiled plan directory (no {PLAN_FILE}); "
                          "create one with 'hetmap compile MODEL -o DIR'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OutputError(f"{path} is not valid JSON (line {exc.lineno}): recompile it") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    return validate_plan(data, str(path))


def _annotation_types() -> dict[str, type]:
    from hetmap.compiler.ir import annotations, hwannotations

    kinds: dict[str, type] = {}
    for module in (annotations, hwannotations):
        for name in dir(module):
            value = getattr(module, name)
            if isinstance(value, type) and value.__module__ == module.__name__:
                kinds[name] = value
    return kinds


def _check_node(node: Any, entry: dict[str, Any], source: str) -> None:
    name = node.name
    if entry["kind"] != node.kind.value:
        raise OutputError(f"{source}: node {name!r} is a {entry['kind']} in the plan but a "
                          f"{node.kind.value} in the model; recompile the plan")
    if entry["params"] != node.params:
        raise OutputError(f"{source}: node {name!r} has {entry['params']} parameters in the plan "
                          f"but {node.params} in the model; recompile the plan")
    shapes = [tuple(m["shape"]) for m in entry.get("matrices", [])]
    if shapes != [m.shape for m in node.matrices]:
        raise OutputError(f"{source}: node {name!r} has matrices {shapes} in the plan but "
                          f"{[m.shape for m in node.matrices]} in the model; recompile the plan")


def restore_annotations(graph: Any, data: dict[str, Any], target: Any, passes: Any,
                        source: str) -> None:
    """Check a validated plan against the model's freshly imported IR and put back every
    annotation plan.json records. Any mismatch is a one-line OutputError."""
    from hetmap.common.grid import TileGrid
    from hetmap.compiler.ir.annotations import Density, ExpertScore, Placement, Sensitivity
    from hetmap.compiler.ir.graph import verify
    from hetmap.compiler.ir.hwannotations import ArrayAssignment, Tiling
    from hetmap.compiler.passes.contracts import Fact, Provenance

    entries = {entry["name"]: entry for entry in data["nodes"]}
    if len(entries) != len(data["nodes"]):
        raise OutputError(f"{source} lists a node twice; recompile it")
    extra = sorted(set(entries) - {node.name for node in graph})
    if extra:
        raise OutputError(f"{source} names node {extra[0]!r}, which model {graph.name!r} does not "
                          "have; the plan was compiled for another model: recompile it")
    placed = any("placement" in entry for entry in entries.values())
    rows, cols = target.aimc.rows, target.aimc.cols
    for node in graph:
        entry = entries.get(node.name)
        if entry is None:
            raise OutputError(f"{source} has no node {node.name!r} of model {graph.name!r}; "
                              "recompile the plan")
        _check_node(node, entry, source)
        if "density" in entry:
            node.annotate(Density(entry["density"], entry["density_source"],
                                  mean_routing_weight=entry.get("mean_routing_weight")))
        if any(key in entry for key in ("score", "router_norm", "expected_impact")):
            node.annotate(ExpertScore(entry.get("score"), entry.get("router_norm"),
                                      entry.get("expected_impact")))
        if "sensitivity" in entry:
            node.annotate(Sensitivity(entry["sensitivity"]))
        if "placement" in entry:
            node.annotate(Placement(entry["placement"], entry["reason"],
                                    tuple(entry.get("digital_neurons", ()))))
        elif placed:
            raise OutputError(f"{source}: node {node.name!r} has no placement; recompile the plan")
        matrices = entry.get("matrices", [])
        if any("tile_grid" in m for m in matrices):
            split = len(entry.get("digital_neurons", ()))
            grids = tuple(TileGrid(*analog_shape(m["role"], tuple(m["shape"]), split), rows, cols)
                          for m in matrices)
            for grid, matrix in zip(grids, matrices, strict=True):
                if matrix.get("tile_grid") != [grid.n_row_tiles, grid.n_col_tiles]:
                    raise OutputError(f"{source}: node {node.name!r} {matrix['role']} has tile grid "
                                      f"{matrix.get('tile_grid')}, but {rows}x{cols} tiles of "
                                      f"{matrix['shape']} give {[grid.n_row_tiles, grid.n_col_tiles]}")
            node.annotate(Tiling(grids))
        if any("slots" in m for m in matrices):
            node.annotate(ArrayAssignment(
                tuple(tuple((int(a), int(b)) for a, b in m.get("slots", [])) for m in matrices),
                tuple(tuple((int(a), int(b), int(c)) for a, b, c in m.get("offsets", []))
                      for m in matrices),
                tuple(int(m.get("serial_steps", 1)) for m in matrices)))
    typed = PlanSummary.from_json(data)
    if typed.allocation is not None:
        graph.annotate(typed.allocation)
    if typed.cost is not None:
        graph.annotate(typed.cost)
    kinds = _annotation_types()
    facts = {}
    for kind_name, provider in data.get("provided", {}).items():
        kind = kinds.get(kind_name)
        if kind is None:
            continue
        cls = passes.entries[provider].value if provider in getattr(passes, "entries", {}) else None
        facts[kind] = Fact(provider, frozenset(getattr(cls, "requires", ())))
    graph.annotate(Provenance(facts))
    try:
        verify(graph)
    except HetmapError as exc:
        raise OutputError(f"{source} does not fit model {graph.name!r}: {exc}") from exc


@dataclass(frozen=True)
class LayerSummary:
    """One MoE layer's row of the summary."""

    layer: int
    experts: int
    top_k: int
    experts_digital: int
    expert_params_digital: int
    expert_params: int
    #: neuron-granular placement: analog experts with digital neurons, and those neurons
    experts_split: int = 0
    neurons_digital: int = 0


@dataclass(frozen=True)
class PlanSummary:
    """The typed view of a plan's header that reports print (``hetmap compile``, ``inspect``)."""

    model_name: str
    target_name: str
    pipeline: str
    params_total: int
    params_digital: int
    params_analog: int
    digital_param_fraction: float
    experts_total: int
    experts_digital: int
    moe_layers: int
    layers: tuple[LayerSummary, ...]
    allocation: AllocationSummary | None = None
    cost: CostSummary | None = None
    dtype: str = "float32"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanSummary:
        """From a plan.json (or ``Plan.header()``) already valid against the schema."""
        from hetmap.compiler.algorithms.cost import CostEstimate

        s = data["summary"]
        allocation = None
        if "allocation" in s:
            a, layout = s["allocation"], s["allocation"]["layout"]
            allocation = AllocationSummary(
                chips=a["chips"], arrays_available=a["arrays_available"],
                arrays_used=a["arrays_used"], tiles_used=a["tiles_used"],
                stored_weights=a["stored_weights"], tile_utilization=a["tile_utilization"],
                unpacked_arrays=a["unpacked_arrays"], unpacked_utilization=a["unpacked_utilization"],
                packing=a["packing"], layout=ArrayLayout(layout["rows"], layout["cols"],
                                                         layout["chips"], layout["arrays_per_chip"],
                                                         layout["tiers"]))
        cost = CostSummary(CostEstimate.from_json(s["cost"])) if "cost" in s else None
        return cls(model_name=data["model"]["name"], target_name=data["target"]["name"],
                   pipeline=data["pipeline"], params_total=s["params_total"],
                   params_digital=s["params_digital"], params_analog=s["params_analog"],
                   digital_param_fraction=s["digital_param_fraction"],
                   experts_total=s["experts_total"], experts_digital=s["experts_digital"],
                   moe_layers=s["moe_layers"],
                   layers=tuple(LayerSummary(**{k: row[k] for k in LayerSummary.__dataclass_fields__
                                                if k in row})
                                for row in s["layers"]),
                   allocation=allocation, cost=cost,
                   dtype=str(data.get("options", {}).get("dtype", "float32")))
