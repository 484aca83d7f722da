"""The README's performance table is what ``benchmarks/performance_table.py`` renders from the
recorded benchmark results (no figure in it is typed by hand)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "performance_table", ROOT / "benchmarks" / "performance_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_rendered_from_the_results() -> None:
    script = _script()
    readme = (ROOT / "README.md").read_text()
    start = readme.index(script.README_BEGIN)
    end = readme.index(script.README_END) + len(script.README_END)
    assert readme[start:end] == script.render(), (
        "README's performance table is stale: run benchmarks/performance_table.py --readme")


def test_a_row_follows_its_file(tmp_path: Path) -> None:
    """A changed figure in a results file changes the table; a missing file says how to make
    it."""
    script = _script()
    for name in ("sensitivity_speed.json", "programming_speed.json"):
        (tmp_path / name).write_text((ROOT / "benchmarks" / "results" / name).read_text())
    data = json.loads((tmp_path / "sensitivity_speed.json").read_text())
    data["speedup"] = 12.3
    (tmp_path / "sensitivity_speed.json").write_text(json.dumps(data))
    table = script.render(tmp_path)
    assert "12.3x faster than rerunning" in table
    assert "not measured yet (no `benchmarks/results/sim_memory.json`)" in table
