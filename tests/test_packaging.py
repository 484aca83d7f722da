"""A regular (non-editable) install carries the package mapping, targets and the demo model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("hetmap-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("hetmap/compiler/cli.py", "hetmap/runtime/rewrite.py",
                     "hetmap/targets/aimc-512.toml", "hetmap/compiler/assets/demo/model.safetensors",
                     "hetmap/compiler/assets/corpus_split.json", "hetmap/__init__.py",
                     "hetmap/common/grid.py", "hetmap/compiler/backends/plan.schema.json"):
        assert required in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    site = str(tmp_path / "site")
    code = ("import hetmap, hetmap.compiler, hetmap.runtime, hetmap.targets\n"
            "print(hetmap.compile.__name__, hetmap.load_plan.__name__)\n"
            "from hetmap.targets import load_target\n"
            f"assert hetmap.compiler.__file__.startswith({site!r}), hetmap.compiler.__file__\n"
            "print(load_target('hermes-256').aimc.rows)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path / "site")},
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["compile_model", "load_plan", "256"]
