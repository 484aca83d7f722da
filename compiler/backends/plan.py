"""Writing and reading compiled plans: ``OUT/plan.json`` and ``OUT/ir.txt``.

Output directories are written atomically: everything goes into a temporary sibling
directory that is renamed into place at the end, so a failed compile leaves no partial OUT.
An existing OUT is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hetmap.common.errors import OutputError
from hetmap.compiler.ir.graph import Node

PLAN_FILE = "plan.json"
IR_FILE = "ir.txt"


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
    if matrices:
        entry["matrices"] = matrices
    return entry


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another -o")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror}") from exc
    try:
        yield staging
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OutputError(f"{path} is not valid JSON (line {exc.lineno}): recompile it") from exc
    return data
