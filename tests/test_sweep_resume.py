"""Interrupted sweeps resume without recomputing finished points, to the same sweep.csv."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetmap.common.errors import OutputError
from hetmap.compiler.api import run_sweep
from hetmap.compiler.evaluation import sweep as sweeping

SMALL = dict(policies=["random", "max-norm"], budgets=[0.25], noise_scales=[1.5], seeds=2,
             eval_tokens=512, calib_tokens=256)


class _Killed(BaseException):
    """Stands in for a signal: not an Exception, so nothing on the way catches it."""


def test_resume_reuses_finished_points_and_matches(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run_sweep("olmoe-tiny", out=tmp_path / "whole", **SMALL)
    whole = (tmp_path / "whole" / "sweep.csv").read_text()

    real = sweeping.evaluate_point
    calls: list[str] = []

    def dies_after_two(point: sweeping.SweepPoint) -> float:
        if len(calls) == 2:
            raise _Killed
        calls.append(sweeping.point_key(point))
        return real(point)

    monkeypatch.setattr(sweeping, "evaluate_point", dies_after_two)
    with pytest.raises(_Killed):
        run_sweep("olmoe-tiny", out=tmp_path / "cut", **SMALL)
    assert not (tmp_path / "cut").exists()
    progress = sweeping.SweepProgress(tmp_path / "cut")
    assert set(progress.load()) == set(calls)  # both finished points were recorded
    with pytest.raises(OutputError, match="pass --resume to continue it"):
        run_sweep("olmoe-tiny", out=tmp_path / "cut", **SMALL)

    recomputed: list[str] = []

    def counting(point: sweeping.SweepPoint) -> float:
        recomputed.append(sweeping.point_key(point))
        return real(point)

    monkeypatch.setattr(sweeping, "evaluate_point", counting)
    result = run_sweep("olmoe-tiny", out=tmp_path / "cut", resume=True, **SMALL)
    assert result["resumed_points"] == 2
    assert len(recomputed) == 2 and not set(recomputed) & set(calls)
    assert (tmp_path / "cut" / "sweep.csv").read_text() == whole
    assert not progress.path.exists()


def test_torn_last_record_is_ignored(tmp_path: Path) -> None:
    progress = sweeping.SweepProgress(tmp_path / "out")
    progress.path.write_text('{"key": "a", "ppl": 1.5}\n{"key": "b", "pp')
    assert progress.load() == {"a": 1.5}


@pytest.mark.slow
@pytest.mark.serial
def test_twenty_random_interrupts_then_the_same_csv(tmp_path: Path) -> None:
    """3 policies x 2 budgets x 3 seeds, SIGINT at 20 random moments, resumed each time."""
    hetmap = str(Path(sys.executable).with_name("hetmap"))
    args = ["sweep", "olmoe-tiny", "--policies", "random,max-norm,router-norm",
            "--budgets", "0.125,0.25", "--noise-scales", "1.5", "--seeds", "3",
            "--eval-tokens", "2048", "--calib-tokens", "256"]
    total = 3 * 2 * 3
    # a first run warms the caches (imports, files): the runs timed and cut below are warm
    subprocess.run([hetmap, *args, "-o", "warm"], cwd=tmp_path, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(tmp_path / "warm")
    # the uninterrupted run, timed: S until its first point is recorded, T to the end
    progress_file = tmp_path / ".whole.sweep-progress.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen([hetmap, *args, "-o", "whole"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while proc.poll() is None:
        if first is None and progress_file.is_file() and progress_file.stat().st_size:
            first = time.perf_counter() - start
        time.sleep(0.05)
    assert proc.returncode == 0
    whole_time = time.perf_counter() - start
    startup = first if first is not None else whole_time / 2
    rng = random.Random(0)
    interrupted = 0
    cut_progress = sweeping.SweepProgress(tmp_path / "cut")
    for attempt in range(21):
        argv = [hetmap, *args, "-o", "cut", *(["--resume"] if attempt else [])]
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if interrupted < 20:  # a random moment: in start-up or within the work left
            left = (whole_time - startup) * (1 - len(cut_progress.load()) / total)
            # (stay well inside: a resumed run has less to do than the timed one)
            time.sleep(rng.uniform(0.3, 0.9) * startup + rng.uniform(0.0, 0.6) * left)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        assert proc.returncode == 130, err
        interrupted += 1
        assert not (tmp_path / "cut").exists()
    assert interrupted == 20, (whole_time, startup)
    assert (tmp_path / "cut" / "sweep.csv").read_text() == \
        (tmp_path / "whole" / "sweep.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "whole"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["workers", "ray"])
def test_resume_in_parallel_modes_matches_serial(mode: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run_sweep("olmoe-tiny", out=tmp_path / "serial", **SMALL)
    # an interrupted run: one point finished and recorded, then the process died
    points_done = {}
    real_record = sweeping.SweepProgress.record

    def record_then_die(self: sweeping.SweepProgress, key: str, ppl: float) -> None:
        real_record(self, key, ppl)
        points_done[key] = ppl
        raise _Killed

    monkeypatch.setattr(sweeping.SweepProgress, "record", record_then_die)
    with pytest.raises(_Killed):
        run_sweep("olmoe-tiny", out=tmp_path / "par", **SMALL)
    monkeypatch.setattr(sweeping.SweepProgress, "record", real_record)
    options = {"workers": 2} if mode == "workers" else {"ray": "local"}
    result = run_sweep("olmoe-tiny", out=tmp_path / "par", resume=True, **SMALL, **options)
    assert result["resumed_points"] == 1
    assert (tmp_path / "par" / "sweep.csv").read_text() == \
        (tmp_path / "serial" / "sweep.csv").read_text()


def test_sweep_programs_tiles_per_batch_as_asked(tmp_path: Path) -> None:
    """--programming per-batch in a sweep: the same tiles for a seed as resident ones, so the
    same perplexities (olmoe-tiny on the default target has no output noise); sweep.json says
    which was asked; a value outside the choices is one error before any work."""
    import json

    from hetmap.common.errors import SimulationError

    values = {}
    for mode in ("resident", "per-batch"):
        run_sweep("olmoe-tiny", out=tmp_path / mode, programming=mode, **SMALL)
        report = json.loads((tmp_path / mode / "sweep.json").read_text())
        assert report["programming"] == mode
        values[mode] = [p["ppl"] for p in report["points"]]
    assert values["per-batch"] == pytest.approx(values["resident"], rel=1e-5)
    with pytest.raises(SimulationError, match="--programming must be one of"):
        run_sweep("olmoe-tiny", out=tmp_path / "bad", programming="sometimes", **SMALL)
    assert not (tmp_path / "bad").exists()
