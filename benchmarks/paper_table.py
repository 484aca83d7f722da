"""The paper's comparison (arXiv 2603.02633, Table "OLMoE") repeated on hetmap's ``demo`` model.

Placement policies ``max-norm``, ``activation-frequency``, ``activation-weight``,
``router-norm`` and ``random`` at budgets 0.125 and 0.25, plus all-digital, all-analog
(``--dense analog --policy none``) and dense-only digital (``--policy none``), each at
programming-noise scales c = 1.5 and 2.5 over ``--seeds`` seeds. Reports perplexity mean +- std
and the digital parameter fraction. Then, for every expert of ``--sensitivity-layers``, the
measured sensitivity (perplexity increase when only that expert is on noisy AIMC tiles,
mean over seeds) and each score's Spearman rank correlation with it.

Writes ``paper_table.json``, ``paper_table.md`` and ``paper_table.png`` into ``--out`` and
prints the JSON. Run time on 2 CPU cores: a few minutes (see README).

    .venv/bin/python benchmarks/paper_table.py --out benchmarks/results [--seeds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from hetmap.compiler.api import Plan, compile_model
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.evaluation.simulate import analog_part, perplexity, settings_for
from hetmap.compiler.evaluation.sweep import policy_panel
from hetmap.compiler.ir.annotations import Density, ExpertScore
from hetmap.compiler.passes.base import CompileContext
from hetmap.compiler.passes.manager import build_passes, run_pipeline
from hetmap.compiler.passes.pipeline import parse_pipeline
from hetmap.compiler.registry import load_registries
from hetmap.runtime import build_simulated_model

POLICIES = ["max-norm", "activation-frequency", "activation-weight", "router-norm", "random"]
BUDGETS = [0.125, 0.25]
NOISE = [1.5, 2.5]
SCORES = {  # score name -> how to read it off an expert node
    "max-norm": lambda n: n.get(ExpertScore).max_norm,
    "activation-frequency": lambda n: n.get(Density).value,
    "activation-weight": lambda n: n.get(Density).mean_routing_weight,
    "router-norm": lambda n: n.get(ExpertScore).router_norm,
}


def placed(base: Plan, registries: Any, place: str) -> Plan:
    graph = copy.deepcopy(base.graph)
    ctx = CompileContext(model=base.model, target=base.target, registries=registries, seed=0)
    run = run_pipeline(graph, build_passes(parse_pipeline(place), registries.passes), ctx)
    return Plan(run.graph, base.model, base.target, base.pipeline)


def mapped_ppl(model: torch.nn.Module, plan: Plan, windows: list[torch.Tensor], scale: float,
               seeds: int) -> list[float]:
    part = analog_part(plan.graph, model)
    settings = settings_for(plan.target, noise_scale=scale)
    return [perplexity(build_simulated_model(model, part.linears, part.experts, settings, seed=s),
                       windows) for s in range(seeds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--sensitivity-layers", default="all", help="'all' or comma-separated layers")
    parser.add_argument("--sensitivity-scale", type=float, default=2.5)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    registries = load_registries()
    base = compile_model(args.model, pipeline="density,expert-score", registries=registries)
    model = base.model.runnable()
    windows = batches(load_tokens(base.model, None, "eval", args.eval_tokens), 256, 8)
    digital = perplexity(model, windows)
    rows: list[dict[str, Any]] = [{"config": "all digital", "policy": "all", "budget": 1.0,
                                   "digital_fraction": None, "noise_scale": None,
                                   "ppl_mean": digital, "ppl_std": 0.0}]
    configs = [("all analog", "place{policy=none,dense=analog}", "none", 0.0),
               ("dense digital", "place{policy=none}", "none", 0.0)]
    configs += [(f"{p} {b:g}", f"place{{policy={p},budget={b}}}", p, b) for b in BUDGETS for p in POLICIES]
    for name, place, policy, budget in configs:
        plan = placed(base, registries, place)
        fraction = plan.summary["digital_param_fraction"]
        for scale in NOISE:
            values = mapped_ppl(model, plan, windows, scale, args.seeds)
            rows.append({"config": name, "policy": policy, "budget": budget,
                         "digital_fraction": fraction, "noise_scale": scale,
                         "ppl_mean": statistics.fmean(values), "ppl_std": statistics.stdev(values),
                         "ppl": values})
            print(json.dumps(rows[-1]), flush=True)
    rows[0]["digital_fraction"] = placed(base, registries, "place{policy=all}").summary["digital_param_fraction"]
    sensitivity = measure_sensitivity(base, model, windows, digital, args)
    result = {"benchmark": "paper_table", "model": args.model, "seeds": args.seeds,
              "eval_tokens": sum(w.numel() for w in windows), "target": base.target.name,
              "digital_ppl": digital, "rows": rows, "sensitivity": sensitivity,
              "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_table.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "paper_table.md").write_text(markdown(result))
    plot(args.out / "paper_table.png", result)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


def measure_sensitivity(base: Plan, model: torch.nn.Module, windows: list[torch.Tensor],
                        digital: float, args: argparse.Namespace) -> dict[str, Any]:
    layers = sorted(base.graph.moe_layers) if args.sensitivity_layers == "all" else \
        [int(v) for v in args.sensitivity_layers.split(",")]
    settings = settings_for(base.target, noise_scale=args.sensitivity_scale)
    experts, measured = [], []
    for layer in layers:
        moe = base.graph.moe_layers[layer]
        for node in base.graph.experts(layer):
            values = [perplexity(build_simulated_model(model, (), {moe.experts_module: (node.expert,)},
                                                       settings, seed=s), windows)
                      for s in range(args.seeds)]
            experts.append(node)
            measured.append(statistics.fmean(values) - digital)
    correlations: dict[str, Any] = {}
    for score, read in SCORES.items():
        values = [float(read(n)) for n in experts]
        per_layer = {}
        for layer in layers:
            idx = [i for i, n in enumerate(experts) if n.layer == layer]
            per_layer[str(layer)] = float(spearmanr([values[i] for i in idx], [measured[i] for i in idx]).statistic)
        correlations[score] = {"pooled": float(spearmanr(values, measured).statistic),
                               "per_layer": per_layer,
                               "mean_per_layer": statistics.fmean(per_layer.values())}
    return {"noise_scale": args.sensitivity_scale, "layers": layers,
            "experts": [{"layer": n.layer, "expert": n.expert, "ppl_increase": m,
                         **{s: float(r(n)) for s, r in SCORES.items()}}
                        for n, m in zip(experts, measured, strict=True)],
            "spearman": correlations}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Perplexity of `{result['model']}` on {result['eval_tokens']:,} held-out tokens "
             f"(target {result['target']}, {result['seeds']} programming seeds, mean +- std).", "",
             "| configuration | digital params | c = 1.5 | c = 2.5 |", "|---|---:|---:|---:|"]
    by_config: dict[str, dict[Any, dict[str, Any]]] = {}
    for row in result["rows"]:
        by_config.setdefault(row["config"], {})[row["noise_scale"]] = row
    for name, cells in by_config.items():
        first = next(iter(cells.values()))
        fraction = f"{first['digital_fraction']:.1%}" if first["digital_fraction"] is not None else ""
        if None in cells:
            value = f"{cells[None]['ppl_mean']:.3f}"
            lines.append(f"| {name} | {fraction} | {value} | {value} |")
        else:
            lines.append(f"| {name} | {fraction} | " + " | ".join(
                f"{cells[c]['ppl_mean']:.3f} +- {cells[c]['ppl_std']:.3f}" for c in NOISE) + " |")
    sens = result["sensitivity"]
    lines += ["", f"Spearman rank correlation of each score with measured per-expert sensitivity "
              f"(perplexity increase with only that expert on AIMC, c = {sens['noise_scale']}, "
              f"layers {sens['layers']}):", "", "| score | pooled | mean per layer |", "|---|---:|---:|"]
    for score, corr in sens["spearman"].items():
        lines.append(f"| {score} | {corr['pooled']:.2f} | {corr['mean_per_layer']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, scale in zip(axes, NOISE, strict=True):
        for row in result["rows"]:
            if row["config"] in ("all analog", "dense digital") and row["noise_scale"] == scale:
                ax.errorbar([row["digital_fraction"] * 100], [row["ppl_mean"]], yerr=[row["ppl_std"]],
                            marker="s", color="gray", capsize=3)
                ax.annotate(row["config"], (row["digital_fraction"] * 100, row["ppl_mean"]), fontsize=8)
        policy_panel(ax, result["rows"], POLICIES, scale, result["digital_ppl"],
                     f"{result['model']}, noise scale c = {scale}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
