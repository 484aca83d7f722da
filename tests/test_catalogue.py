"""The one-line promise, case by case: every bad input or fault a user can cause, the command,
and the outcome. Each case must end with its exit code, exactly one ``error:`` line saying
what was wrong (the expected words), no traceback, nothing half-written next to the output,
and an existing output untouched.

Categories: option types and ranges, file arguments (missing, a directory, empty, binary,
huge), damaged checkpoints (truncated, bad header, missing shard, wrong shape, NaN), plans
(not JSON, not a plan, another model, edited placements, damaged simulation.json), outputs
(existing, the current directory, a file), options that do not apply, and -- in subprocesses
-- interrupts (SIGINT and SIGTERM at several stages of compile, simulate, sweep and ONNX
export) and concurrent runs into one output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetmap.compiler.cli import main

MODEL = "olmoe-tiny"


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    says: str  # words the error line must contain
    code: int = 2
    setup: Callable[[Path], None] = field(default=lambda _tmp: None)


# --- fixtures on disk, built once per session ------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints (good and damaged), a compiled plan, text files, made once."""
    from hetmap.compiler.frontend.loader import load_model

    root = tmp_path_factory.mktemp("world")
    good = root / "ckpt"
    load_model(MODEL).module.save_pretrained(good)
    tensors = load_file(good / "model.safetensors")

    def variant(name: str, edit: Callable[[Path], None]) -> None:
        target = root / name
        target.mkdir()
        for item in good.iterdir():
            (target / item.name).write_bytes(item.read_bytes())
        edit(target)

    def truncated(d: Path) -> None:
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])

    def bad_header(d: Path) -> None:
        (d / "model.safetensors").write_bytes(b"\xff" * 64)

    def missing_shard(d: Path) -> None:
        f = d / "model.safetensors"
        f.rename(d / "model-00001-of-00002.safetensors")
        weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors}
        weight_map[next(iter(weight_map))] = "model-00002-of-00002.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    def wrong_shape(d: Path) -> None:
        edited = dict(tensors)
        key = next(k for k in edited if "experts" in k and "down" in k)
        edited[key] = torch.zeros(edited[key].shape[0] + 3, *edited[key].shape[1:])
        save_file(edited, d / "model.safetensors", metadata={"format": "pt"})

    def nan(d: Path) -> None:
        edited = dict(tensors)
        key = next(k for k in edited if "experts" in k and "up" in k)
        edited[key] = edited[key].clone()
        edited[key].view(-1)[5] = float("nan")
        save_file(edited, d / "model.safetensors", metadata={"format": "pt"})

    def no_config(d: Path) -> None:
        (d / "config.json").unlink()

    for name, edit in (("truncated", truncated), ("bad-header", bad_header),
                       ("missing-shard", missing_shard), ("wrong-shape", wrong_shape),
                       ("nan", nan), ("no-config", no_config)):
        variant(name, edit)
    assert main(["compile", MODEL, "--policy", "random", "-o", str(root / "plan")]) == 0
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (root / "a-dir").mkdir()
    (root / "a-file").write_text("not a directory\n")
    with open(root / "huge.txt", "wb") as handle:  # sparse: 8 GB on paper, nothing on disk
        handle.truncate(8 << 30)
    (root / "bad.toml").write_text("name = 'x'\n[aimc\n")
    return root


def _plan_variant(world: Path, tmp: Path, edit: Callable[[dict], object]) -> str:
    data = json.loads((world / "plan" / "plan.json").read_text())
    target = tmp / "edited-plan"
    target.mkdir(exist_ok=True)
    (target / "plan.json").write_text(json.dumps(edit(data)))
    return str(target)


def _set_placement(data: dict) -> dict:
    next(n for n in data["nodes"] if n["kind"] == "expert")["placement"] = "gpu"
    return data


def _drop_node(data: dict) -> dict:
    data["nodes"] = [n for n in data["nodes"] if n["name"] != "model.layers.0.mlp.experts.2"]
    return data


def _other_model(data: dict) -> dict:
    data["model"]["spec"] = "mixtral-tiny"
    return data


CASES = [
    # option types and ranges
    Case("budget-range", ["compile", MODEL, "--budget", "1.5"], "budget must be a fraction in [0, 1]"),
    Case("budget-type", ["compile", MODEL, "--budget", "lots"], "'lots' is not a valid float"),
    Case("dense-threshold", ["compile", MODEL, "--dense-threshold", "2"], "dense_threshold must be in [0, 1]"),
    Case("calib-tokens", ["compile", MODEL, "--calib-tokens", "1"], "calib_tokens and seq_len must be at least 2"),
    Case("chips", ["compile", MODEL, "--chips", "-3"], "chips must be a positive number"),
    Case("budget-scope", ["compile", MODEL, "--budget-scope", "world"], "'world' is not one of"),
    Case("policy", ["compile", MODEL, "--policy", "nope"], "nope"),
    Case("target", ["compile", MODEL, "--target", "nope-512"], "unknown target 'nope-512'"),
    Case("pipeline-syntax", ["compile", MODEL, "--pipeline", "density{calib_tokens=8"], "pipeline"),
    Case("pipeline-pass", ["compile", MODEL, "--pipeline", "density,shiny"], "shiny"),
    Case("pipeline-contract", ["compile", MODEL, "--pipeline", "place,cost"], "cost needs"),
    Case("seeds", ["simulate", MODEL, "--seeds", "0"], "0 is not in the range x>=1"),
    Case("eval-tokens", ["simulate", MODEL, "--eval-tokens", "0"], "0 is not in the range x>=2"),
    Case("device", ["simulate", MODEL, "--device", "gpu7"], "'gpu7' is not a torch device"),
    Case("device-cuda", ["simulate", MODEL, "--device", "cuda:7"], "cuda:7"),
    Case("sweep-seeds", ["sweep", MODEL, "-o", "{tmp}/sw", "--seeds", "0"], "0 is not in the range x>=1"),
    Case("sweep-workers", ["sweep", MODEL, "-o", "{tmp}/sw", "--workers", "-1"], "-1 is not in the range x>=0"),
    Case("sweep-budgets", ["sweep", MODEL, "-o", "{tmp}/sw", "--budgets", "0.1,x"], "budgets"),
    Case("unknown-option", ["compile", MODEL, "--bogus"], "No such option '--bogus'"),
    # file arguments
    Case("model-missing", ["compile", "{tmp}/nowhere"], "nowhere"),
    Case("model-no-config", ["compile", "{world}/no-config"], "no config.json"),
    Case("model-a-file", ["compile", "{world}/a-file"], "is a file, not a checkpoint directory"),
    Case("calib-missing", ["compile", MODEL, "--calib", "{tmp}/none.txt"], "does not exist"),
    Case("calib-dir", ["compile", MODEL, "--calib", "{world}/a-dir"], "is a directory, not a file"),
    Case("calib-empty", ["compile", MODEL, "--calib", "{world}/empty.txt"], "is empty"),
    Case("calib-binary", ["compile", MODEL, "--calib", "{world}/binary.txt"], "looks binary"),
    Case("calib-huge", ["compile", MODEL, "--calib", "{world}/huge.txt", "--calib-tokens", "64"],
         "looks binary"),
    Case("eval-missing", ["simulate", MODEL, "--eval", "{tmp}/none.txt"], "does not exist"),
    Case("target-file-missing", ["compile", MODEL, "--target", "{tmp}/none.toml"], "none.toml"),
    Case("target-file-bad", ["compile", MODEL, "--target", "{world}/bad.toml"], "bad.toml"),
    # damaged checkpoints: each names the file or the tensor
    Case("ckpt-truncated", ["compile", "{world}/truncated"], "truncated/model.safetensors is damaged"),
    Case("ckpt-bad-header", ["compile", "{world}/bad-header"], "bad-header/model.safetensors is damaged"),
    Case("ckpt-missing-shard", ["compile", "{world}/missing-shard"],
         "shard model-00002-of-00002.safetensors named by model.safetensors.index.json is missing"),
    Case("ckpt-wrong-shape", ["compile", "{world}/wrong-shape"], "does not match its config"),
    Case("ckpt-nan", ["compile", "{world}/nan"], "holds NaN values"),
    Case("ckpt-nan-no-density", ["compile", "{world}/nan", "--pipeline",
                                 "expert-score,place{policy=router-norm}"], "holds NaN or Inf"),
    # plans
    Case("plan-not-json", ["simulate", "{tmp}/bad-plan"], "is not valid JSON",
         setup=lambda tmp: ((tmp / "bad-plan").mkdir(), (tmp / "bad-plan" / "plan.json").write_text("{"))),
    Case("plan-a-list", ["inspect", "{tmp}/list-plan"], "is not a hetmap plan (a JSON list",
         setup=lambda tmp: ((tmp / "list-plan").mkdir(), (tmp / "list-plan" / "plan.json").write_text("[]"))),
    Case("plan-not-a-plan", ["inspect", "{edited:model-string}"], "at model: 'olmoe-tiny' is not of type 'object'"),
    Case("plan-gpu", ["simulate", "{edited:gpu}"], "'gpu' is not one of"),
    Case("plan-missing-node", ["simulate", "{edited:drop}"], "has no node 'model.layers.0.mlp.experts.2'"),
    Case("plan-other-model", ["simulate", "{edited:other}"], "was compiled for model"),
    Case("inspect-damaged-simulation", ["inspect", "{tmp}/plan-copy"], "simulation.json is not readable JSON"),
    Case("inspect-wrong-simulation", ["inspect", "{tmp}/plan-copy2"], "'eval_tokens' is missing"),
    Case("inspect-not-a-dir", ["inspect", "{tmp}/nowhere"], "is not a compiled plan directory"),
    # outputs
    Case("out-exists", ["compile", MODEL, "-o", "{world}/plan"], "already exists; pass --force"),
    Case("out-is-file", ["compile", MODEL, "-o", "{world}/a-file", "--force"], "exists and is not a directory"),
    Case("out-cwd", ["compile", MODEL, "-o", ".", "--force"], "refusing to replace ."),
    Case("dump-ir-file", ["compile", MODEL, "--dump-ir", "{world}/a-file"], "--dump-ir"),
    # options that do not apply
    Case("simulate-plan-policy", ["simulate", "{world}/plan", "--policy", "random", "--budget", "0.9"],
         "--policy, --budget do not apply to a compiled plan directory"),
    Case("simulate-plan-out", ["simulate", "{world}/plan", "-o", "{tmp}/other"], "--out does not apply"),
    Case("onnx-tiles-alone", ["compile", MODEL, "--onnx-tiles"], "--onnx-tiles only apply with --emit onnx"),
    Case("emit-unknown", ["compile", MODEL, "--emit", "verilog", "-o", "{tmp}/v"], "unknown emitter 'verilog'"),
    Case("emit-no-out", ["compile", MODEL, "--emit", "onnx"], "--emit onnx needs -o OUT"),
]


def _copy_plan(world: Path, target: Path, simulation: str) -> None:
    target.mkdir()
    for item in (world / "plan").iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    (target / "simulation.json").write_text(simulation)


def _expand(arg: str, world: Path, tmp: Path) -> str:
    edits = {"gpu": _set_placement, "drop": _drop_node, "other": _other_model,
             "model-string": lambda d: {**d, "model": "olmoe-tiny"}}
    if arg.startswith("{edited:"):
        return _plan_variant(world, tmp, edits[arg[8:-1]])
    return arg.replace("{world}", str(world)).replace("{tmp}", str(tmp))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case: Case, world: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    case.setup(tmp_path)
    _copy_plan(world, tmp_path / "plan-copy", "{not json")
    _copy_plan(world, tmp_path / "plan-copy2", json.dumps({"seeds": [0]}))
    plan_before = _snapshot(world / "plan")
    argv = [_expand(a, world, tmp_path) for a in case.argv]
    monkeypatch.chdir(tmp_path)
    siblings_before = set(os.listdir(world)) | set(os.listdir(tmp_path))
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == case.code, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert case.says in errors[0], errors[0]
    # nothing half-written: no staging directories, no new outputs; the plan untouched
    after = set(os.listdir(world)) | set(os.listdir(tmp_path))
    assert not {name for name in after - siblings_before if name.startswith(".")}, after
    assert _snapshot(world / "plan") == plan_before


# --- interrupts and concurrency (subprocesses of the installed console script) ---------------

HETMAP = str(Path(sys.executable).with_name("hetmap"))


def _run_and_signal(argv: list[str], delay: float, signum: int, cwd: Path) -> tuple[int | None, str]:
    proc = subprocess.Popen([HETMAP, *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signum)
    _out, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_export_prints_only_hetmap_lines(tmp_path: Path) -> None:
    """Third-party notes (torch.onnx's registration warnings, which importing torch would turn
    back on) stay off stderr: what is left is hetmap's own summary."""
    proc = subprocess.run([HETMAP, "compile", "tiny:olmoe", "--emit", "onnx", "-o", "out"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert [line.split(":")[0].split(" ")[0] for line in lines] == ["onnx", "wrote"], lines


INTERRUPTS = [
    ("compile-load", ["compile", "demo", "-o", "out"], 1.5),
    ("compile-calibrate", ["compile", "demo", "-o", "out"], 3.5),
    ("export", ["compile", "demo", "--emit", "onnx", "-o", "out"], 16.0),
    ("simulate", ["simulate", "demo", "--eval-tokens", "4096", "--seeds", "3", "-o", "out"], 12.0),
    ("sweep", ["sweep", "olmoe-tiny", "--policies", "random,max-norm", "--budgets", "0.25",
               "--noise-scales", "1.5", "--seeds", "3", "--eval-tokens", "8192", "-o", "out"], 8.0),
]


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(("stage", "argv", "delay"), INTERRUPTS, ids=[i[0] for i in INTERRUPTS])
def test_interrupt_at_any_stage_leaves_nothing(stage: str, argv: list[str], delay: float,
                                               signum: int, tmp_path: Path) -> None:
    code, err = _run_and_signal(argv, delay, signum, tmp_path)
    leftovers = sorted(os.listdir(tmp_path))
    if code == 0:  # finished before the signal (a fast machine): the output is whole
        written = {p.name for p in (tmp_path / "out").iterdir()}
        assert {"plan.json"} <= written or {"sweep.csv", "sweep.json"} <= written, written
        return
    assert code == (130 if signum == signal.SIGINT else 143), err
    assert [line for line in err.splitlines() if line.strip()][-1] == "error: interrupted"
    assert "Traceback" not in err
    # nothing half-written: no output at all, or (the signal came after the final rename, while
    # the summary printed) the whole output; never a hidden staging directory. An interrupted
    # sweep keeps the journal of its finished points (whole JSON lines) for --resume, and says so
    journal = ".out.sweep-progress.jsonl"
    if stage == "sweep" and journal in leftovers:
        leftovers.remove(journal)
        records = [json.loads(line) for line in (tmp_path / journal).read_text().splitlines()]
        assert records and all(set(r) == {"key", "ppl"} for r in records), records
        assert f"{len(records)} finished sweep point(s) kept" in err and "--resume" in err, err
    assert leftovers in ([], ["out"]), leftovers
    if leftovers:
        written = {p.name for p in (tmp_path / "out").iterdir()}
        assert {"plan.json"} <= written or {"sweep.csv", "sweep.json"} <= written, written


@pytest.mark.slow
@pytest.mark.serial
def test_concurrent_runs_into_one_output(tmp_path: Path) -> None:
    argv = [HETMAP, "compile", MODEL, "--emit", "onnx", "-o", "out"]
    procs = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _err in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert ("already exists" in loser) or ("created by another run" in loser), loser
    assert "Traceback" not in loser
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (tmp_path / "out" / "model.onnx").is_file()
    json.loads((tmp_path / "out" / "plan.json").read_text())


def test_a_signal_during_the_plan_modules_import_is_an_interrupt(monkeypatch) -> None:
    """The 20-interrupt sweep once hit this: the signal handler read ``COMMITTED`` of a
    half-imported module and died with a traceback instead of ``error: interrupted``."""
    import types

    from hetmap.compiler.launch import output_committed

    name = "hetmap.compiler.backends.plan"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # importing: no names yet
    assert output_committed() is False
    committed = types.ModuleType(name)
    committed.COMMITTED = True  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, committed)
    assert output_committed() is True
