"""The trade-off study: perplexity against digital parameter fraction for several placement
policies, budgets and noise scales, over programming seeds.

Rules:

1. Calibration and expert scores are computed once; each (policy, budget) re-runs ``place``
   and the hardware passes on that annotated IR.
2. Every (policy, budget, noise scale, seed) point is independent: it runs serially, in local
   worker processes (``workers``), or as Ray tasks (``ray``: an address, or ``"local"`` for a
   local instance). Each point fixes torch to one thread, so all three give identical numbers.
3. Every point carries its plan's energy and latency per token from the cost model (the
   ``cost`` pass's summary; absent when the pipeline has no ``cost``).
4. Outputs: ``sweep.csv`` (one row per point, with energy and latency per token),
   ``sweep.json`` (points, per-configuration mean and std, digital perplexity and energy,
   settings), ``sweep.png`` (perplexity against digital parameter fraction, one line per
   policy, error bars over seeds, one panel per noise scale) and ``pareto.png`` (perplexity
   against energy per token, Pareto-optimal points marked; see
   :mod:`hetmap.compiler.evaluation.plots`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hetmap.common.errors import SimulationError


@dataclass(frozen=True)
class SweepPoint:
    """One simulation job: everything a worker needs, as plain data."""

    model: str
    policy: str
    budget: float
    noise_scale: float
    seed: int
    digital_fraction: float
    linears: tuple[str, ...]
    experts: tuple[tuple[str, tuple[int, ...]], ...]
    settings: tuple[tuple[str, Any], ...]
    eval_file: str | None
    eval_tokens: int
    seq_len: int
    energy_per_token_j: float | None = None
    latency_per_token_s: float | None = None
    digital_energy_per_token_j: float | None = None
    #: split experts: (experts module, ((expert, digital neurons), ...)), ...
    split: tuple[tuple[str, tuple[tuple[int, tuple[int, ...]], ...]], ...] = ()
    #: --programming: resident, per-batch, or auto (decided by the process that simulates the
    #: point, from its free memory)
    programming: str = "auto"


_WORKER_STATE: dict[str, Any] = {}  # one model per worker process (see rule 2)


def evaluate_point(point: SweepPoint) -> float:
    """Perplexity of one point, single-threaded (works in any process)."""
    import torch

    from hetmap.compiler.data.textdata import batches, load_tokens
    from hetmap.compiler.evaluation.simulate import AnalogPart, perplexity, programming_mode
    from hetmap.compiler.frontend import load_model
    from hetmap.runtime import AnalogSettings, build_simulated_model

    torch.set_num_threads(1)
    key = f"{point.model}|{point.eval_file}|{point.eval_tokens}|{point.seq_len}"
    if _WORKER_STATE.get("key") != key:
        loaded = load_model(point.model)
        model = loaded.runnable()
        tokens = load_tokens(loaded, point.eval_file, "eval", point.eval_tokens)
        _WORKER_STATE.update(key=key, model=model, windows=batches(tokens, point.seq_len, 8))
    split = {path: dict(v) for path, v in point.split}
    part = AnalogPart(point.linears, dict(point.experts), split=split)
    mode, _reason = programming_mode(point.programming, part, _WORKER_STATE["model"], "cpu", False)
    settings = dataclasses.replace(AnalogSettings.from_dict(dict(point.settings)), programming=mode)
    simulated = build_simulated_model(_WORKER_STATE["model"], point.linears, dict(point.experts),
                                      settings, seed=point.seed, digital_neurons=split)
    return perplexity(simulated, _WORKER_STATE["windows"])


GRANULARITIES = ("expert", "neuron")


def split_policy(label: str, default: str = "expert") -> tuple[str, str]:
    """``NAME@GRANULARITY`` -> (name, granularity); a plain name takes ``default``."""
    name, _, unit = label.partition("@")
    unit = unit or default
    if unit not in GRANULARITIES:
        raise SimulationError(f"policy {label!r}: granularity must be one of "
                              f"{', '.join(GRANULARITIES)}, e.g. expected-impact@neuron")
    return name, unit


def point_key(point: SweepPoint) -> str:
    """A stable name for a point: the hash of everything it is computed from."""
    text = json.dumps(dataclasses.asdict(point), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class SweepProgress:
    """Finished points of one sweep, appended to a JSON-lines file as each completes (flushed
    and synced), so that an interrupted sweep loses at most the points in flight.

    Rules: (1) the file lives beside OUT (``.OUT.sweep-progress.jsonl``), outside the staging
    directory an interrupt removes; (2) a record is ``{"key": point_key, "ppl": value}``; a
    torn last line (the process died mid-write) is ignored; (3) the file is created with the
    first finished point (an interrupt before that leaves nothing); (4) ``--resume`` reuses
    the records whose key matches a point of the sweep being run; (5) the file is removed
    once the sweep's outputs are in place; (6) while a sweep runs, :func:`kept_on_interrupt`
    names the file and its record count, so that the interrupt handler can say what was kept.
    """

    def __init__(self, out: Path) -> None:
        out = Path(out)
        self.path = out.resolve().parent / f".{out.name}.sweep-progress.jsonl"
        self._handle: Any = None
        self._keep = False
        self.recorded = 0

    def load(self) -> dict[str, float]:
        done: dict[str, float] = {}
        if not self.path.is_file():
            return done
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                done[str(record["key"])] = float(record["ppl"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn last line
        return done

    def start(self, keep: bool) -> None:
        if not keep:
            self.path.unlink(missing_ok=True)
        self.recorded = len(self.load()) if keep else 0
        _ACTIVE.append(self)

    def record(self, key: str, ppl: float) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a")
        self._handle.write(json.dumps({"key": key, "ppl": ppl}) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.recorded += 1

    def finish(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        if self in _ACTIVE:  # only now is nothing kept: until the output is in place, an
            _ACTIVE.remove(self)  # interrupt must still say where the finished points are

    def close(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()


_ACTIVE: list[SweepProgress] = []


def kept_on_interrupt() -> list[str]:
    """One line per running sweep whose finished points are on disk (for the interrupt
    handler: what was kept and how to continue)."""
    return [f"note: {p.recorded} finished sweep point(s) kept in {p.path}; rerun the same "
            "command with --resume to continue" for p in list(_ACTIVE) if p.recorded]


def run_points(points: list[SweepPoint], *, workers: int = 0, ray: str | None = None,
               progress: Callable[[str, int], Callable[[int], None]] | None = None,
               done: dict[str, float] | None = None,
               record: Callable[[str, float], None] | None = None) -> list[float]:
    """Perplexity of every point, in order. Points whose key is in ``done`` are not computed
    again; every computed point is passed to ``record`` as soon as it finishes."""
    done = done or {}
    keys = [point_key(p) for p in points]
    todo = [i for i, key in enumerate(keys) if key not in done]
    results: list[float] = [done.get(key, 0.0) for key in keys]
    advance = (progress or (lambda _d, _t: (lambda _n: None)))("sweep points", len(todo))

    def finished(index: int, value: float) -> None:
        results[index] = value
        if record is not None:
            record(keys[index], value)
        advance(1)

    pending = [points[i] for i in todo]
    if ray is not None:
        _run_ray(pending, ray, lambda i, value: finished(todo[i], value))
        return results
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for index, value in zip(todo, pool.map(evaluate_point, pending), strict=True):
                finished(index, value)
        return results
    for index, point in zip(todo, pending, strict=True):
        finished(index, evaluate_point(point))
    return results


def _run_ray(points: list[SweepPoint], address: str,
             finished: Callable[[int, float], None]) -> list[float]:
    """Run ``points`` as Ray tasks; ``finished(i, ppl)`` is called as each one returns."""
    try:
        import ray
    except ImportError as exc:
        raise SimulationError("--ray needs Ray: pip install 'hetmap[ray]'") from exc
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    try:
        task = ray.remote(num_cpus=1)(evaluate_point)
        pending = {task.remote(p): i for i, p in enumerate(points)}
        results: list[float] = [0.0] * len(points)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = float(ray.get(ref))
                finished(index, results[index])
        return results
    finally:
        if started:
            ray.shutdown()


def summarize_points(points: list[SweepPoint], ppl: list[float]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float, float], list[tuple[SweepPoint, float]]] = {}
    for point, value in zip(points, ppl, strict=True):
        groups.setdefault((point.policy, point.budget, point.noise_scale), []).append((point, value))
    rows = []
    for (policy, budget, noise), members in groups.items():
        values = [v for _, v in members]
        first = members[0][0]
        rows.append({"policy": policy, "budget": budget, "noise_scale": noise,
                     "digital_fraction": first.digital_fraction, "seeds": len(values),
                     "ppl_mean": statistics.fmean(values),
                     "ppl_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "energy_per_token_j": first.energy_per_token_j,
                     "latency_per_token_s": first.latency_per_token_s})
    return rows


def write_outputs(directory: Path, points: list[SweepPoint], ppl: list[float],
                  summary: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    import json

    from hetmap.compiler.evaluation.plots import plot_pareto

    fields = ["policy", "budget", "noise_scale", "seed", "digital_fraction", "ppl",
              "energy_per_token_j", "latency_per_token_s"]
    with open(directory / "sweep.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for point, value in zip(points, ppl, strict=True):
            writer.writerow([point.policy, point.budget, point.noise_scale, point.seed,
                             f"{point.digital_fraction:.6f}", f"{value:.6f}",
                             _number(point.energy_per_token_j), _number(point.latency_per_token_s)])
    kept = ("policy", "budget", "noise_scale", "seed", "digital_fraction", "energy_per_token_j",
            "latency_per_token_s")
    digital_energy = points[0].digital_energy_per_token_j if points else None
    data = {**extra, "digital_energy_per_token_j": digital_energy,
            "points": [{**{k: v for k, v in asdict(p).items() if k in kept}, "ppl": v}
                       for p, v in zip(points, ppl, strict=True)],
            "summary": summary}
    (directory / "sweep.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(directory / "sweep.png", summary, extra.get("digital_ppl"))
    plot_pareto(directory / "pareto.png", summary, extra.get("digital_ppl"), digital_energy)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6e}"


def policy_panel(ax: Any, rows: list[dict[str, Any]], policies: list[str], scale: float,
                 digital_ppl: float | None, title: str) -> None:
    """One panel: perplexity against digital parameter share, a line per policy, error bars
    over seeds (rows carry policy, noise_scale, digital_fraction, ppl_mean, ppl_std)."""
    for policy in policies:
        line = sorted((r for r in rows if r["policy"] == policy and r["noise_scale"] == scale),
                      key=lambda r: r["digital_fraction"])
        ax.errorbar([r["digital_fraction"] * 100 for r in line], [r["ppl_mean"] for r in line],
                    yerr=[r["ppl_std"] for r in line], marker="o", capsize=3, label=policy)
    if digital_ppl is not None:
        ax.axhline(digital_ppl, color="black", linestyle="--", linewidth=1, label="all digital")
    ax.set_xlabel("digital parameters (% of model)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot(path: Path, summary: list[dict[str, Any]], digital_ppl: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({row["noise_scale"] for row in summary})
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4), squeeze=False)
    policies = sorted({row["policy"] for row in summary})
    for ax, scale in zip(axes[0], scales, strict=True):
        policy_panel(ax, summary, policies, scale, digital_ppl, f"noise scale c = {scale}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SimulationError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise SimulationError(f"{what} is empty")
    return values


def parse_names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def sweep_points(model: str, plans: Iterable[tuple[str, float, Any]], noise_scales: list[float],
                 seeds: int, seed: int, settings_for: Callable[[float], Any],
                 eval_file: str | None, eval_tokens: int, seq_len: int,
                 programming: str = "auto") -> list[SweepPoint]:
    from hetmap.compiler.evaluation.simulate import analog_part

    points = []
    for policy, budget, plan in plans:
        part = analog_part(plan.graph, plan.model.runnable())
        summary = plan.summary
        fraction = summary["digital_param_fraction"]
        cost = {"energy_per_token_j": summary.get("energy_per_token_j"),
                "latency_per_token_s": summary.get("latency_per_token_s"),
                "digital_energy_per_token_j": summary.get("digital_energy_per_token_j")}
        split = tuple((path, tuple(sorted(v.items()))) for path, v in sorted(part.split.items()))
        for scale in noise_scales:
            settings = tuple(sorted(settings_for(scale).to_dict().items()))
            for index in range(seeds):
                points.append(SweepPoint(model, policy, budget, scale, seed + index, fraction,
                                         part.linears, tuple(sorted(part.experts.items())),
                                         settings, eval_file, eval_tokens, seq_len, **cost,
                                         split=split, programming=programming))
    return points
