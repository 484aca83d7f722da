"""The ``sensitivity`` pass: replayed runs against full reruns of a simulated model copy.

On ``demo`` (4 MoE layers x 8 experts), measures side by side in one process, taking turns:
(a) the full-rerun path (a simulated copy of the whole model per expert and seed, the pass's
way before replaying: :func:`full_rerun_increase`), (b) the pass itself (replaying the recorded
baseline, running only the layers after each expert's own). Reports median times, their
ratio, the largest score difference, and the pass's own run-time estimate (printed before the
runs start) against its measured run time, as JSON (``--output`` also writes it to a file).
(c) the pass with ``--replicas`` perturbed experts per forward (the GPU's batching, timed on
this device too), with its largest score difference from (b).

    .venv/bin/python benchmarks/sensitivity_speed.py --output benchmarks/results/sensitivity_speed.json
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch
from report import emit

from hetmap.compiler.api import compile_model
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.frontend import load_model
from hetmap.compiler.ir.annotations import Sensitivity
from hetmap.compiler.passes.sensitivity import _mean_nll, full_rerun_increase
from hetmap.runtime.settings import settings_for


def full_reruns(loaded, plan, tokens: int, seq_len: int, batch: int) -> dict[str, float]:
    model = loaded.runnable()
    windows = batches(load_tokens(loaded, None, "calib", tokens), seq_len, batch)
    settings = settings_for(plan.target)
    baseline = _mean_nll(model, windows)
    return {node.name: full_rerun_increase(model, plan.graph.moe_layers[node.layer], node,
                                           settings, 0, windows, baseline)
            for node in plan.graph.experts()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=8,
                        help="perturbed experts per forward in (c)")
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    pipeline = f"sensitivity{{tokens={args.tokens},seq_len={args.seq_len},batch={args.batch}}}"
    times: dict[str, list[float]] = {"full_rerun": [], "replayed": [],
                                     f"replayed_replicas_{args.replicas}": []}
    batched_pipeline = pipeline.replace("}", f",replicas={args.replicas}}}")
    batched_worst = 0.0
    estimates: list[tuple[float, float]] = []
    worst = 0.0
    for _ in range(args.repeats):
        messages: list[str] = []
        start = time.perf_counter()
        plan = compile_model(loaded, pipeline=pipeline, log=messages.append)
        times["replayed"].append(time.perf_counter() - start)
        estimate = float(re.search(r"estimated ([\d.]+) s", messages[0]).group(1))
        took = float(re.search(r"took ([\d.]+) s", plan.timings[0].notes[0]).group(1))
        estimates.append((estimate, took))
        start = time.perf_counter()
        reference = full_reruns(loaded, plan, args.tokens, args.seq_len, args.batch)
        times["full_rerun"].append(time.perf_counter() - start)
        scores = {n.name: n.get(Sensitivity).loss_increase for n in plan.graph.experts()}
        worst = max(worst, max(abs(scores[name] - reference[name]) for name in reference))
        start = time.perf_counter()
        batched = compile_model(loaded, pipeline=batched_pipeline)
        times[f"replayed_replicas_{args.replicas}"].append(time.perf_counter() - start)
        batched_worst = max(batched_worst, max(
            abs(n.get(Sensitivity).loss_increase - scores[n.name]) for n in batched.graph.experts()))
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "model": args.model, "tokens": args.tokens, "experts": len(plan.graph.experts()),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "seconds": {name: round(value, 3) for name, value in medians.items()},
        "speedup": round(medians["full_rerun"] / medians["replayed"], 2),
        "max_score_difference_nats": worst,
        "replicas": args.replicas,
        "replicas_speedup_over_one": round(
            medians["replayed"] / medians[f"replayed_replicas_{args.replicas}"], 2),
        "replicas_max_score_difference_nats": batched_worst,
        "largest_score_nats": max(abs(v) for v in reference.values()),
        "estimate_s_vs_took_s": [[round(e, 2), round(t, 2)] for e, t in estimates],
        "estimate_error": round(max(abs(e / t - 1.0) for e, t in estimates), 3),
    }
    emit(report, args.output, indent=2)


if __name__ == "__main__":
    main()
