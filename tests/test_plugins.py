"""Plugins: the example package's entries are discovered and used; broken plugins are
reported with their name and entry point while the rest of hetmap keeps working."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

from hetmap.common.errors import PluginError, VerificationError
from hetmap.compiler.api import compile_model
from hetmap.compiler.cli import main
from hetmap.compiler.ir.annotations import Density, ExpertScore, Placement
from hetmap.compiler.registry import load_registries

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hetmap-plugin-example"
PIPE = "density{calib_tokens=512,seq_len=128},expert-score,place"


def install_fake_dist(root: Path, name: str, entry_points: dict[str, dict[str, str]]) -> None:
    """Make ``name`` an installed distribution for importlib.metadata (a dist-info folder)."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    install_fake_dist(tmp_path, project["name"], project["entry-points"])
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path))


def fake_plugin(tmp_path, monkeypatch, code: str, entry_points: dict[str, dict[str, str]]) -> None:
    monkeypatch.delitem(sys.modules, "fakeplug", raising=False)  # a fresh module per test
    (tmp_path / "fakeplug.py").write_text(code)
    install_fake_dist(tmp_path, "fakeplug", entry_points)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_example_plugin_entries_are_listed(example_plugin, capsys) -> None:
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("frequency-x-norm", "layer-report", "pin-digital"):
        assert name in out and "hetmap-plugin-example" in out
    assert main(["targets"]) == 0
    assert "puma-128" in capsys.readouterr().out


def test_example_plugin_entries_compile(example_plugin) -> None:
    plan = compile_model(
        "olmoe-tiny", target="puma-128", policy="frequency-x-norm", budget=0.25,
        pipeline=f"{PIPE},layer-report,pin-digital{{pattern=*.layers.1.*}},tile,allocate,cost")
    assert plan.target.name == "puma-128" and plan.target.aimc.rows == 128
    for layer in (0,):
        experts = plan.graph.experts(layer)
        product = {n.expert: n.get(Density).value * n.get(ExpertScore).max_norm for n in experts}
        best = set(sorted(product, key=lambda e: (-product[e], e))[:2])
        assert {n.expert for n in experts if not n.get(Placement).analog} == best
    assert all(not n.get(Placement).analog for n in plan.graph if n.name.startswith("model.layers.1."))
    report = plan.summary["layer_report"]
    assert [row["layer"] for row in report] == [0, 1]
    assert 0 < report[0]["density_min"] <= report[0]["density_max"] <= 1


def test_plugin_emitter_works_from_the_cli(example_plugin, tmp_path) -> None:
    out = tmp_path / "out"
    assert main(["compile", "olmoe-tiny", "--policy", "random", "--emit", "placement-csv",
                 "-o", str(out)]) == 0
    rows = (out / "placements.csv").read_text().splitlines()
    plan = json.loads((out / "plan.json").read_text())
    matrix_nodes = [n for n in plan["nodes"] if n.get("matrices")]
    assert rows[0] == "node,kind,layer,expert,placement,params"
    assert len(rows) == 1 + len(matrix_nodes)
    assert {r.split(",")[4] for r in rows[1:]} == {n["placement"] for n in matrix_nodes}


def test_plugin_that_fails_to_import_is_reported(tmp_path, monkeypatch, capsys) -> None:
    fake_plugin(tmp_path, monkeypatch, "raise RuntimeError('kaboom')\n",
                {"hetmap.passes": {"shiny": "fakeplug:Shiny"}})
    registries = load_registries()
    assert len(registries.problems) == 1
    message = str(registries.problems[0])
    assert "fakeplug" in message and "shiny = fakeplug:Shiny" in message and "kaboom" in message
    assert "place" in registries.passes  # the rest keeps working
    assert main(["passes"]) == 0
    assert "warning:" in capsys.readouterr().err
    code = main(["compile", "olmoe-tiny", "--pipeline", "place,shiny", "--policy", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "fakeplug" in err and "kaboom" in err


def test_plugin_with_duplicate_name_is_reported(tmp_path, monkeypatch) -> None:
    code = ("from hetmap.compiler.passes.place import PlacePass\n"
            "class Place(PlacePass):\n    pass\n")
    fake_plugin(tmp_path, monkeypatch, code, {"hetmap.passes": {"place": "fakeplug:Place"}})
    registries = load_registries()
    assert any("duplicate pass name 'place'" in str(p) and "fakeplug" in str(p)
               for p in registries.problems)
    assert registries.passes.entries["place"].origin == "built-in"


def test_policy_naming_missing_expert_is_a_plugin_error(tmp_path, monkeypatch) -> None:
    code = ("class Bad:\n    name = 'bad'\n    description = 'names a ghost'\n    fixed = None\n"
            "    def scores(self, graph, experts, ctx):\n"
            "        return {**{n.name: 1.0 for n in experts}, 'ghost.expert': 2.0}\n")
    fake_plugin(tmp_path, monkeypatch, code, {"hetmap.policies": {"bad": "fakeplug:Bad"}})
    with pytest.raises(PluginError, match=r"policy bad \(plugin fakeplug.*ghost.expert"):
        compile_model("olmoe-tiny", pipeline="place", policy="bad")


def test_pass_leaving_invalid_ir_names_the_plugin(tmp_path, monkeypatch) -> None:
    code = ("from dataclasses import dataclass\nfrom typing import ClassVar\n"
            "from hetmap.compiler.ir.annotations import Density\n"
            "from hetmap.compiler.passes.base import PassResult\n"
            "@dataclass(frozen=True)\nclass Breaker:\n"
            "    name: ClassVar[str] = 'breaker'\n    description: ClassVar[str] = 'breaks'\n"
            "    def run(self, graph, ctx):\n"
            "        next(iter(graph.experts())).annotate(Density(7.0, 'calibration'))\n"
            "        return PassResult(graph, True)\n")
    fake_plugin(tmp_path, monkeypatch, code, {"hetmap.passes": {"breaker": "fakeplug:Breaker"}})
    with pytest.raises(VerificationError, match="after pass breaker from plugin fakeplug.*outside"):
        compile_model("olmoe-tiny", pipeline="place,breaker", policy="none")
