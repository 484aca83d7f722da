"""Programming noise: time to program a stack of expert matrices against ``torch.randn`` of
the same number of weights.

Programs ``--experts`` matrices of ``--out x --in`` (default: 8 OLMoE-1B-7B gate/up blocks,
2048 x 1024, 16.8 M weights) onto 512 x 512 tiles with the default target's
device model (PCM, c = 1.5), side by side in one process, taking turns: (a) ``torch.randn``
of that many weights, and of the two and four normal samples per weight that hetmap's PCM
model draws without and with drift, (b) hetmap's programming (a few tiles per noise-model
call, :func:`program_in_chunks`), (c) the same with a drift step (1 h, read noise, GDC), (d)
(c) with aihwkit's own noise-model code per chunk (hetmap's way before its in-place drift
step), (e) aihwkit's noise model called on all tiles at once (hetmap's way before
chunking), and (f) (b) and (c) with ``kernels="compiled"`` (the samples drawn inside the
compiled programming kernels). Prints the median times and their ratios to (a) and to the draws as JSON
(``--output`` also writes it to a file).

    .venv/bin/python benchmarks/programming_speed.py --output benchmarks/results/programming_speed.json
    .venv/bin/python benchmarks/programming_speed.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
from report import emit

from hetmap.runtime import AnalogSettings
from hetmap.runtime import programming as programming_module
from hetmap.runtime.programming import make_noise_model, program_in_chunks, program_matrices


def _timed(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", type=int, default=2048)
    parser.add_argument("--in", dest="inputs", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1 << 18, help="weights per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-one-call", action="store_true",
                        help="leave out (d), aihwkit on all tiles at once (slow, memory heavy)")
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    weights = torch.randn(args.experts, args.out, args.inputs, device=device)
    settings = AnalogSettings(noise_scale=1.5)
    drifting = dataclasses.replace(settings, drift_time=3600.0)
    model, drift_model = make_noise_model(settings), make_noise_model(drifting)
    # kernels=compiled: the samples drawn inside the compiled programming kernels
    compiled = dataclasses.replace(settings, kernels="compiled")
    compiled_drifting = dataclasses.replace(drifting, kernels="compiled")

    def one_call() -> object:
        with mock.patch.object(programming_module, "_is_plain_pcm", lambda _model: False):
            return program_matrices(weights, 512, 512, settings, model)

    def aihwkit_drift_chunks() -> object:
        with mock.patch.object(programming_module, "_is_plain_pcm", lambda _model: False):
            return program_in_chunks(weights, drifting, drift_model, args.chunk)

    steps: dict[str, Callable[[], object]] = {
        "randn": lambda: torch.randn(weights.shape, device=device),
        # The normal samples each model draws per weight: 2 (PCM), 4 (PCM with drift).
        "randn_x2": lambda: torch.randn((2, *weights.shape), device=device),
        "randn_x4": lambda: torch.randn((4, *weights.shape), device=device),
        "hetmap": lambda: program_in_chunks(weights, settings, model, args.chunk),
        "hetmap_drift": lambda: program_in_chunks(weights, drifting, drift_model, args.chunk),
        "hetmap_compiled": lambda: program_in_chunks(weights, compiled, model, args.chunk),
        "hetmap_drift_compiled": lambda: program_in_chunks(weights, compiled_drifting,
                                                           drift_model, args.chunk),
        "aihwkit_drift_chunks": aihwkit_drift_chunks,
    }
    if not args.skip_one_call:
        steps["aihwkit_one_call"] = one_call
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(_timed(step, device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "device": str(device), "threads": torch.get_num_threads(),
        "weights": weights.numel(), "shape": list(weights.shape), "tile": "512x512",
        "chunk_weights": args.chunk, "noise": "pcm, c = 1.5 (drift: 1 h, read noise, GDC)",
        "seconds": {name: round(value, 4) for name, value in medians.items()},
        "ratio_to_randn": {name: round(value / medians["randn"], 2)
                           for name, value in medians.items()},
        # Each model against torch.randn of the normal samples it draws.
        "ratio_to_randn_of_its_samples": {
            "hetmap": round(medians["hetmap"] / medians["randn_x2"], 2),
            "hetmap_drift": round(medians["hetmap_drift"] / medians["randn_x4"], 2),
            "hetmap_compiled": round(medians["hetmap_compiled"] / medians["randn_x2"], 2),
            "hetmap_drift_compiled": round(
                medians["hetmap_drift_compiled"] / medians["randn_x4"], 2),
        },
    }
    emit(report, args.output, indent=2)


if __name__ == "__main__":
    main()
