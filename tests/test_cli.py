"""CLI: outputs, atomic writing, and one-line errors with non-zero exit for user mistakes."""

from __future__ import annotations

import json

import pytest
from conftest import HANDWRITTEN

from hetmap.compiler.cli import main

FAST = ["--calib-tokens", "256"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compile_writes_plan_and_ir(tmp_path, capsys) -> None:
    out = tmp_path / "plan"
    code, stdout, _ = run(capsys, "compile", "olmoe-tiny", "-o", str(out), *FAST)
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert {"model", "target", "pipeline", "summary", "nodes"} <= set(plan)
    assert plan["pipeline"].startswith("density,expert-score,place")
    names = {n["name"] for n in plan["nodes"]}
    assert "model.layers.1.mlp.experts.7" in names
    assert all({"name", "kind", "params", "placement", "reason"} <= set(n) for n in plan["nodes"])
    assert (out / "ir.txt").read_text().startswith("graph olmoe-tiny")
    code, stdout, _ = run(capsys, "inspect", str(out))
    assert code == 0 and "olmoe-tiny" in stdout and "layer" in stdout


def test_existing_output_needs_force(tmp_path, capsys) -> None:
    out = tmp_path / "plan"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compile", "olmoe-tiny", "-o", str(out), *FAST)
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    code, _, _ = run(capsys, "compile", "olmoe-tiny", "-o", str(out), "--force", *FAST)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "plan.json").exists()


def test_failed_compile_leaves_no_output(tmp_path, capsys) -> None:
    out = tmp_path / "plan"
    code, _, err = run(capsys, "compile", "olmoe-1b-7b", "-o", str(out), "--policy", "max-norm")
    assert code == 2 and "max-norm" in err and "weight-free policies" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["compile", "nope"], "unknown model 'nope'"),
    (["compile", "olmoe-tiny", "--pipeline", "density,place{policy=x"], "unclosed"),
    (["compile", "olmoe-tiny", "--pipeline", "density,frobnicate"], "unknown pass 'frobnicate'"),
    (["compile", "olmoe-tiny", "--pipeline", "place{bogus=1}"], "has no option 'bogus'"),
    (["compile", "olmoe-tiny", "--pipeline", "place{budget=lots}"], "budget='lots'"),
    (["compile", "olmoe-tiny", "--budget", "2"], "budget must be a fraction"),
    (["compile", "olmoe-tiny", "--policy", "nosuch"], "unknown policy 'nosuch'"),
    (["compile", f"{HANDWRITTEN}:untraceable", "--allow-dense"],
     "cannot trace the model's forward (Branchy)"),
    (["compile", f"{HANDWRITTEN}:dense"], "no MoE block found in 'dense'"),
    (["compile", "README.md"], "is a file, not a checkpoint directory"),
    (["inspect", "/nonexistent/dir"], "not a compiled plan directory"),
])
def test_user_errors_are_one_line(capsys, args: list[str], message: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_not_a_checkpoint_directory(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "compile", str(tmp_path))
    assert code == 2 and "no config.json" in err


def test_listing_commands(capsys) -> None:
    code, stdout, _ = run(capsys, "passes")
    assert code == 0
    for name in ("density", "expert-score", "place", "max-norm", "activation-frequency", "random"):
        assert name in stdout
    code, stdout, _ = run(capsys, "targets")
    assert code == 0 and "aimc-512" in stdout and "hermes-256" in stdout
    code, stdout, _ = run(capsys, "models")
    assert code == 0 and "deepseek-v3" in stdout


@pytest.mark.parametrize("args, message", [
    (["compile", "olmoe-tiny", "--budget-scope", "nope"], "Invalid value for '--budget-scope'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["compile"], "Missing argument 'MODEL'"),
    (["compile", "olmoe-tiny", "--emit", "onnx"], "--emit onnx needs -o OUT"),
    (["compile", "olmoe-tiny", "--target", "/nonexistent.toml"], "no such target file"),
])
def test_usage_errors_are_one_line(capsys, args: list[str], message: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
