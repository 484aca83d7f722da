"""The measured check on the closed-form neuron score (issue: neuron-granular placement).

The neuron score (``hetmap.compiler.algorithms.expert_score``, (3)) orders each expert's
intermediate neurons by the range they set on the tiles and predicts, in closed form, the
expected squared output error of the expert's analog part after the first ``k`` chunks of
that order go digital (16 chunks). This benchmark measures the same curve: for a sample of
experts (the ``--experts`` densest of each MoE layer), it simulates the model with only that
expert on tiles, split so that its first ``k`` chunks run digitally (``digital_neurons``), and
records the increase of the mean next-token loss over the all-digital model on held-out
tokens, averaged over ``--seeds`` programming seeds, for ``k`` = 0, 2, 4, ..., 14 (16: all
digital, 0 by definition).

Reports, per model and noise scale: the Spearman and Pearson correlations between the
predicted error (density x closed form) and the measured loss increase over all (expert, k)
points; per expert, the share of its k = 0 figure that the first half of its chunks removes,
predicted and measured (the "range effect" the score relies on), and their mean over experts.

Usage: ``python benchmarks/neuron_score_check.py --output benchmarks/results/neuron_score_check.json``
(demo, c = 2.5, 2 experts per layer, 3 seeds, 2,048 tokens: under a minute on 2 cores; the
recorded run: ``--models demo,demo-c,demo-ds --seeds 8 --eval-tokens 8192``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import emit

from hetmap.compiler.algorithms.expert_score import (
    NEURON_STEPS,
    _analog_part_error,
    neuron_order,
)
from hetmap.compiler.api import compile_model
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.data.weights import ModuleWeights
from hetmap.compiler.evaluation.simulate import analog_part, perplexity
from hetmap.compiler.ir.annotations import Density, InputMoments
from hetmap.compiler.passes.expert_score import load_matrix
from hetmap.runtime import build_simulated_model
from hetmap.runtime.programming import make_noise_model
from hetmap.runtime.settings import settings_for

POINTS = range(0, NEURON_STEPS, 2)


def _mean_nll(model: Any, windows: list[torch.Tensor]) -> float:
    return math.log(perplexity(model, windows))


def check(model_name: str, scale: float, per_layer: int, seeds: int, tokens: int
          ) -> dict[str, Any]:
    plan = compile_model(model_name, calib_tokens=4096)
    model = plan.model.runnable()
    windows = batches(load_tokens(plan.model, None, "eval", tokens), 256, 8)
    settings = settings_for(plan.target, noise_scale=scale)
    noise_model = make_noise_model(settings)
    part = analog_part(plan.graph, model)
    store = ModuleWeights(model)
    digital = _mean_nll(model, windows)
    rows: list[dict[str, Any]] = []
    for layer, experts in plan.graph.experts_by_layer().items():
        chosen = sorted(experts, key=lambda n: -n.get(Density).value)[:per_layer]
        for node in chosen:
            assert node.module is not None and node.expert is not None
            matrices = {m.role: load_matrix(store, node, m) for m in node.matrices}
            moments = node.get(InputMoments).second_moments
            order = neuron_order(matrices)
            width = int(order.numel())
            chunk = -(-width // NEURON_STEPS)
            density = node.get(Density).value
            for k in POINTS:
                digital_set = sorted(order[:k * chunk].tolist())
                keep = order[k * chunk:].sort().values
                predicted = density * _analog_part_error(matrices, moments, keep, settings,
                                                         noise_model)
                losses = []
                for seed in range(seeds):
                    simulated = build_simulated_model(
                        model, [], {node.module: [node.expert]}, settings, seed=seed,
                        layouts={node.module: part.layouts[node.module]},
                        digital_neurons={node.module: {node.expert: digital_set}}
                        if digital_set else None)
                    losses.append(_mean_nll(simulated, windows) - digital)
                rows.append({"layer": layer, "expert": node.expert, "k": k,
                             "predicted": predicted, "measured": float(np.mean(losses)),
                             "measured_sem": float(np.std(losses, ddof=1) / math.sqrt(seeds))
                             if seeds > 1 else 0.0})
    return _summary(model_name, scale, seeds, tokens, rows)


def _summary(model_name: str, scale: float, seeds: int, tokens: int,
             rows: list[dict[str, Any]]) -> dict[str, Any]:
    from scipy.stats import pearsonr, spearmanr

    predicted = np.array([r["predicted"] for r in rows])
    measured = np.array([r["measured"] for r in rows])
    halves = []
    for key in sorted({(r["layer"], r["expert"]) for r in rows}):
        curve = {r["k"]: r for r in rows if (r["layer"], r["expert"]) == key}
        first, half = curve[0], curve[NEURON_STEPS // 2]
        if first["measured"] > 0 and first["predicted"] > 0:
            halves.append({"layer": key[0], "expert": key[1],
                           "predicted_share_removed": 1 - half["predicted"] / first["predicted"],
                           "measured_share_removed": 1 - half["measured"] / first["measured"]})
    return {"model": model_name, "noise_scale": scale, "seeds": seeds, "eval_tokens": tokens,
            "points": len(rows),
            "spearman": float(spearmanr(predicted, measured).statistic),
            "pearson": float(pearsonr(predicted, measured).statistic),
            "half_of_chunks_removes": {
                "predicted_mean": float(np.mean([h["predicted_share_removed"] for h in halves]))
                if halves else None,
                "measured_mean": float(np.mean([h["measured_share_removed"] for h in halves]))
                if halves else None,
                "per_expert": halves},
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo")
    parser.add_argument("--noise-scale", type=float, default=2.5)
    parser.add_argument("--experts", type=int, default=2, help="densest experts per layer")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    results = [check(name, args.noise_scale, args.experts, args.seeds, args.eval_tokens)
               for name in args.models.split(",")]
    emit({"benchmark": "neuron_score_check", "seconds": round(time.perf_counter() - start, 1),
          "results": results}, args.output)


if __name__ == "__main__":
    main()
