"""Evidence for choosing a placement policy: gap recovered on three trained MoEs of different kinds.

Models: ``demo`` (OLMoE architecture, Python stdlib text), ``demo-c`` (Mixtral architecture
with renormalised top-k routing, CPython C headers) and ``demo-ds`` (fine-grained DeepSeek-V2:
16 experts top-6, a shared expert, a dense first layer; installed packages' METADATA prose). Each is calibrated and evaluated on its own
kind of text: the ``calib`` / ``eval`` splits of its corpus (:mod:`hetmap.compiler.data.corpus`)
are written to temporary files and passed as ``calib`` / the evaluation text.

For every policy in :data:`POLICIES` (``NAME@neuron``: neuron-granular placement at the same
digital parameter count, see ``place{granularity=neuron}``), budgets 0.125 and 0.25 and
programming-noise scales
c = 1.5 and 2.5, over ``--seeds`` programming seeds, the benchmark reports the **share of the
all-analog-to-digital perplexity gap the policy recovers**::

    recovered = (ppl_all_analog - ppl_policy) / (ppl_all_analog - ppl_digital)

per seed (all-analog = ``place{policy=none,dense=analog}``, same seed), then mean +- std over
seeds, and the mean over all models, budgets and scales per policy. 1 = as good as all
digital, 0 = no better than all analog.

How each piece is computed, once per model (per noise scale where it depends on it):

* ``density`` + ``expert-score`` on the model's calibration text (``calib_tokens`` tokens);
* the ``sensitivity`` pass (what the ``measured`` policy ranks by) on the calibration text at
  each evaluated noise scale, with programming seeds 1000.. (disjoint from the evaluation's
  0..seeds-1, so ``measured`` never sees the noise draws it is judged on);
* ``random`` is placed once per programming seed (placement seed = programming seed), every
  other policy once;
* digital perplexity once; all-analog once per noise scale and seed.

Then the reference sensitivity: for every expert, the eval-text perplexity increase with only
that expert on AIMC tiles at c = ``--sensitivity-scale`` (mean over ``--sensitivity-seeds``
seeds 2000..), as in ``paper_table.py``; and each policy's score's Spearman rank correlation
with it, per layer (and their mean, and pooled over layers). The ``random`` score is one
seeded draw (seed 0), a sanity check that should correlate near 0.

Writes ``policy_evidence.{json,md,png}`` into ``--out`` and prints the JSON.

    .venv/bin/python benchmarks/policy_evidence.py --out benchmarks/results [--seeds 8]

Defaults: 8 programming seeds, 8,192 eval tokens, 4,096 calibration tokens, the sensitivity
pass with 8 seeds on 4,096 tokens, the reference sensitivity with 5 seeds at c = 2.5. Run time
on 2 shared CPU cores: 5-12 min (the markdown states it). ``--replot`` rewrites the markdown
and plot from an existing JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from hetmap.compiler.api import Plan, compile_model
from hetmap.compiler.data import corpus
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.evaluation.simulate import analog_part, perplexity, settings_for
from hetmap.compiler.evaluation.sweep import split_policy
from hetmap.compiler.passes.base import CompileContext
from hetmap.compiler.passes.manager import build_passes, run_pipeline
from hetmap.compiler.passes.pipeline import parse_pipeline
from hetmap.compiler.registry import load_registries
from hetmap.runtime import build_simulated_model

#: model name -> the corpus it was trained on (its calibration and evaluation text)
MODELS = {"demo": "stdlib", "demo-c": "c-headers", "demo-ds": "package-docs"}
POLICIES = ["max-norm", "activation-frequency", "activation-weight", "router-norm", "random",
            "expected-impact", "measured", "expected-impact@neuron", "random@neuron"]
#: the policies that rank whole experts (their scores are correlated with the sensitivity)
EXPERT_POLICIES = [p for p in POLICIES if "@" not in p]
BUDGETS = [0.125, 0.25]
NOISE = [1.5, 2.5]
SENSITIVITY_PASS_SEED = 1000
REFERENCE_SEED = 2000


def run_passes(graph: Any, base: Plan, registries: Any, text: str, seed: int = 0,
               options: dict[str, Any] | None = None) -> Any:
    """Run pipeline ``text`` on a copy of ``graph``; returns the new graph."""
    ctx = CompileContext(model=base.model, target=base.target, registries=registries, seed=seed)
    passes = build_passes(parse_pipeline(text), registries.passes, options or {})
    return run_pipeline(copy.deepcopy(graph), passes, ctx).graph


def mapped_ppl(model: torch.nn.Module, base: Plan, graph: Any, windows: list[torch.Tensor],
               scale: float, seed: int) -> float:
    part = analog_part(graph, model)
    settings = settings_for(base.target, noise_scale=scale)
    return perplexity(part.build(model, settings, seed), windows)


def write_split_text(directory: Path, corpus_name: str, split: str, max_bytes: int) -> Path:
    path = directory / f"{corpus_name}-{split}.txt"
    path.write_bytes(corpus.read_corpus_bytes(split, max_bytes, corpus=corpus_name))
    return path


def policy_scores(graph: Any, base: Plan, registries: Any, policy: str) -> dict[str, float]:
    """The scores ``policy`` ranks by, for every expert (per layer, as ``place`` asks)."""
    ctx = CompileContext(model=base.model, target=base.target, registries=registries, seed=0)
    instance = registries.policies.get(policy)()
    scores: dict[str, float] = {}
    for experts in graph.experts_by_layer().values():
        scores.update({k: float(v) for k, v in instance.scores(graph, experts, ctx).items()})
    return scores


def evaluate_model(name: str, args: argparse.Namespace, registries: Any,
                   workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    corpus_name = MODELS[name]
    calib_file = write_split_text(workdir, corpus_name, "calib", args.calib_tokens * 2)
    eval_file = write_split_text(workdir, corpus_name, "eval", args.eval_tokens)
    base = compile_model(name, pipeline="density,expert-score", registries=registries,
                         calib=str(calib_file), calib_tokens=args.calib_tokens,
                         granularity="neuron")
    model = base.model.runnable()
    windows = batches(load_tokens(base.model, eval_file, "eval", args.eval_tokens), 256, 8)
    eval_tokens = int(sum(w.numel() for w in windows))
    digital = perplexity(model, windows)
    log(f"[{name}] {type(model).__name__}, corpus {corpus_name}, {eval_tokens} eval tokens, "
        f"digital ppl {digital:.4f}")

    seeds = list(range(args.seeds))
    configs: dict[str, Any] = {}
    graphs: dict[float, Any] = {}
    for scale in NOISE:
        t0 = time.perf_counter()
        graph = run_passes(base.graph, base, registries, "sensitivity",
                           seed=SENSITIVITY_PASS_SEED,
                           options={"calib": str(calib_file), "noise_scale": scale,
                                    "tokens": args.pass_tokens, "seeds": args.pass_seeds})
        graphs[scale] = graph
        log(f"[{name}] sensitivity pass at c={scale}: {time.perf_counter() - t0:.0f} s")
        analog_graph = run_passes(graph, base, registries, "place{policy=none,dense=analog}")
        all_analog = [mapped_ppl(model, base, analog_graph, windows, scale, s) for s in seeds]
        configs[f"all-analog c={scale}"] = {"noise_scale": scale, "ppl": all_analog}
        log(f"[{name}] c={scale} all analog {statistics.fmean(all_analog):.4f}")
        dense_graph = run_passes(graph, base, registries, "place{policy=none}")
        dense = [mapped_ppl(model, base, dense_graph, windows, scale, s) for s in seeds]
        dense_recovered = [(a - p) / (a - digital) for a, p in zip(all_analog, dense, strict=True)]
        configs[f"dense-digital c={scale}"] = {
            "policy": None, "noise_scale": scale, "ppl": dense, "recovered": dense_recovered,
            "recovered_mean": statistics.fmean(dense_recovered),
            "recovered_std": statistics.stdev(dense_recovered) if len(seeds) > 1 else 0.0}
        log(f"[{name}] c={scale} dense digital {statistics.fmean(dense):.4f} recovered "
            f"{statistics.fmean(dense_recovered):+.3f}")
        for budget in BUDGETS:
            for policy in POLICIES:
                policy_name, granularity = split_policy(policy)
                place = f"place{{policy={policy_name},budget={budget},granularity={granularity}}}"
                if policy_name == "random":
                    ppls = [mapped_ppl(model, base, run_passes(graph, base, registries, place,
                                                               seed=s), windows, scale, s)
                            for s in seeds]
                else:
                    placed = run_passes(graph, base, registries, place)
                    ppls = [mapped_ppl(model, base, placed, windows, scale, s) for s in seeds]
                recovered = [(a - p) / (a - digital) for a, p in zip(all_analog, ppls, strict=True)]
                # the share of the expert-only gap (dense-digital -> digital) the experts recover
                expert_share = [(d - p) / (d - digital) for d, p in zip(dense, ppls, strict=True)]
                configs[f"{policy} {budget:g} c={scale}"] = {
                    "expert_gap_recovered": expert_share,
                    "expert_gap_recovered_mean": statistics.fmean(expert_share),
                    "policy": policy, "budget": budget, "noise_scale": scale, "ppl": ppls,
                    "ppl_mean": statistics.fmean(ppls), "recovered": recovered,
                    "recovered_mean": statistics.fmean(recovered),
                    "recovered_std": statistics.stdev(recovered) if len(recovered) > 1 else 0.0}
                log(f"[{name}] c={scale} {policy:20s} {budget:<5g} ppl "
                    f"{statistics.fmean(ppls):.4f} recovered "
                    f"{statistics.fmean(recovered):+.3f}")
    reference = reference_sensitivity(base, model, windows, digital, args)
    log(f"[{name}] reference sensitivity measured")
    score_graph = graphs[args.sensitivity_scale] if args.sensitivity_scale in graphs else graphs[NOISE[-1]]
    correlations = {}
    for policy in EXPERT_POLICIES:
        scores = policy_scores(score_graph, base, registries, policy)
        per_layer = {}
        for layer, entries in reference["by_layer"].items():
            xs = [scores[e["node"]] for e in entries]
            ys = [e["ppl_increase"] for e in entries]
            rho = spearmanr(xs, ys).statistic
            per_layer[layer] = None if rho is None or math.isnan(rho) else float(rho)
        pooled_x = [scores[e["node"]] for es in reference["by_layer"].values() for e in es]
        pooled_y = [e["ppl_increase"] for es in reference["by_layer"].values() for e in es]
        valid = [v for v in per_layer.values() if v is not None]
        correlations[policy] = {"per_layer": per_layer,
                                "mean_per_layer": statistics.fmean(valid) if valid else None,
                                "pooled": float(spearmanr(pooled_x, pooled_y).statistic)}
        for es in reference["by_layer"].values():
            for e in es:
                e.setdefault("scores", {})[policy] = scores[e["node"]]
    return {"model": name, "architecture": type(model).__name__, "corpus": corpus_name,
            "eval_tokens": eval_tokens, "calib_tokens": args.calib_tokens,
            "target": base.target.name, "digital_ppl": digital, "configs": configs,
            "reference_sensitivity": reference, "spearman": correlations,
            "seconds": time.perf_counter() - started}


def reference_sensitivity(base: Plan, model: torch.nn.Module, windows: list[torch.Tensor],
                          digital: float, args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_for(base.target, noise_scale=args.sensitivity_scale)
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for layer in sorted(base.graph.moe_layers):
        moe = base.graph.moe_layers[layer]
        for node in base.graph.experts(layer):
            if moe.layout.startswith("fused"):
                linears, fused = (), {moe.experts_module: (node.expert,)}
            else:
                linears, fused = tuple(m.key for m in node.matrices), {}
            values = [perplexity(build_simulated_model(model, linears, fused, settings,
                                                       seed=REFERENCE_SEED + s), windows)
                      for s in range(args.sensitivity_seeds)]
            by_layer.setdefault(str(layer), []).append(
                {"node": node.name, "expert": node.expert,
                 "ppl_increase": statistics.fmean(values) - digital})
    return {"noise_scale": args.sensitivity_scale, "seeds": args.sensitivity_seeds,
            "by_layer": by_layer}


def summarize(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Per policy: mean recovered share per model and over all; mean Spearman over all."""
    summary: dict[str, Any] = {}
    for policy in POLICIES:
        entry: dict[str, Any] = {"by_model": {}, "by_setting": {}}
        overall = []
        for result in models:
            cells = [c for c in result["configs"].values() if c.get("policy") == policy]
            values = [c["recovered_mean"] for c in cells]
            entry["by_model"][result["model"]] = statistics.fmean(values)
            overall += values
        for budget in BUDGETS:
            for scale in NOISE:
                key = f"{budget:g} c={scale}"
                entry["by_setting"][key] = statistics.fmean(
                    r["configs"][f"{policy} {budget:g} c={scale}"]["recovered_mean"] for r in models)
        entry["recovered_mean"] = statistics.fmean(overall)
        entry["expert_gap_recovered_mean"] = statistics.fmean(
            c["expert_gap_recovered_mean"] for r in models for c in r["configs"].values()
            if c.get("policy") == policy)
        rhos = [r["spearman"][policy]["mean_per_layer"] for r in models
                if policy in r["spearman"] and r["spearman"][policy]["mean_per_layer"] is not None]
        entry["spearman_mean_per_layer"] = statistics.fmean(rhos) if rhos else None
        summary[policy] = entry
    ranked = sorted(POLICIES, key=lambda p: -summary[p]["recovered_mean"])
    return {"policies": summary, "ranking": ranked, "best": ranked[0]}


def log(message: str) -> None:
    print(message, flush=True)


def replot(path: Path) -> None:
    """Rewrite the markdown and plot next to an existing ``policy_evidence.json``."""
    result = json.loads(path.read_text())
    (path.parent / "policy_evidence.md").write_text(markdown(result))
    plot(path.parent / "policy_evidence.png", result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", type=int, default=8, help="programming seeds")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--pass-seeds", type=int, default=8, help="seeds of the sensitivity pass")
    parser.add_argument("--pass-tokens", type=int, default=4096,
                        help="calibration tokens of the sensitivity pass")
    parser.add_argument("--sensitivity-scale", type=float, default=2.5)
    parser.add_argument("--sensitivity-seeds", type=int, default=5)
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite the markdown and plot from OUT/policy_evidence.json")
    args = parser.parse_args()
    if args.replot:
        replot(args.out / "policy_evidence.json")
        return
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    registries = load_registries()
    with tempfile.TemporaryDirectory() as workdir:
        models = [evaluate_model(name, args, registries, Path(workdir))
                  for name in args.models.split(",")]
    result = {"benchmark": "policy_evidence", "policies": POLICIES, "budgets": BUDGETS,
              "noise_scales": NOISE, "seeds": args.seeds, "eval_tokens": args.eval_tokens,
              "calib_tokens": args.calib_tokens, "sensitivity_pass_seeds": args.pass_seeds,
              "sensitivity_pass_tokens": args.pass_tokens,
              "models": models, "summary": summarize(models),
              "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "policy_evidence.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "policy_evidence.md").write_text(markdown(result))
    plot(args.out / "policy_evidence.png", result)
    print(json.dumps(result, indent=1))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def head_to_head(result: dict[str, Any], first: str, second: str) -> str:
    """How far apart two policies are: paired per-seed differences of the recovered share."""
    diffs, same, cells = [], 0, 0
    for r in result["models"]:
        for b in BUDGETS:
            for c in NOISE:
                one = r["configs"][f"{first} {b:g} c={c}"]
                two = r["configs"][f"{second} {b:g} c={c}"]
                cells += 1
                same += one["ppl"] == two["ppl"]
                diffs += [x - y for x, y in zip(one["recovered"], two["recovered"], strict=True)]
    mean = statistics.fmean(diffs)
    error = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return (f"Against the runner-up {second}: paired difference {mean:+.4f} +- {error:.4f} "
            f"(standard error over {len(diffs)} seed x setting pairs); the two place the same "
            f"experts in {same} of {cells} settings.")


def markdown(result: dict[str, Any]) -> str:
    models = result["models"]
    summary = result["summary"]["policies"]
    settings = [(b, c) for b in BUDGETS for c in NOISE]
    lines = [
        "Share of the all-analog-to-digital perplexity gap each placement policy recovers, "
        "`(ppl_all_analog - ppl_policy) / (ppl_all_analog - ppl_digital)` per programming seed, "
        f"mean +- std over {result['seeds']} seeds (target aimc-512; 1 = all-digital quality, "
        "0 = all-analog).",
        "",
    ]
    for r in models:
        aa = {c: r["configs"][f"all-analog c={c}"]["ppl"] for c in NOISE}
        lines.append(
            f"- `{r['model']}`: {r['architecture']} on {r['corpus']} text; {r['eval_tokens']:,} "
            f"eval tokens, calibration on {r['calib_tokens']:,} tokens of its calib split; "
            f"digital ppl {r['digital_ppl']:.3f}, all analog "
            + ", ".join(f"{statistics.fmean(v):.3f} (c = {c})" for c, v in aa.items())
            + f"; {r['seconds']:.0f} s")
    lines += ["", "| policy | " + " | ".join(
        f"{r['model']} {b:g} c={c}" for r in models for b, c in settings)
        + " | mean, all models |", "|---" + "|---:" * (len(models) * len(settings) + 1) + "|"]
    ranked = result["summary"]["ranking"]
    for policy in ranked:
        cells = []
        for r in models:
            for b, c in settings:
                cell = r["configs"][f"{policy} {b:g} c={c}"]
                cells.append(f"{cell['recovered_mean']:.2f} +- {cell['recovered_std']:.2f}")
        lines.append(f"| {policy} | " + " | ".join(cells)
                     + f" | **{summary[policy]['recovered_mean']:.3f}** |")
    cells = []
    for r in models:
        for _b, c in settings:
            cell = r["configs"][f"dense-digital c={c}"]
            cells.append(f"{cell['recovered_mean']:.2f} +- {cell['recovered_std']:.2f}")
    lines.append("| *dense digital, no expert (reference)* | " + " | ".join(cells) + " | |")
    lines += ["", "Most of the gap is the dense modules' (attention, LM head, routers: digital "
              "under every policy); the experts' own part, `(ppl_dense_digital - ppl_policy) / "
              "(ppl_dense_digital - ppl_digital)`, mean over all models, budgets and noise "
              "scales: " + ", ".join(
                  f"{p} {summary[p]['expert_gap_recovered_mean']:.3f}" for p in ranked) + "."]
    lines += ["", f"Best on average across all models: **{result['summary']['best']}**. "
              + head_to_head(result, ranked[0], ranked[1]), ""]
    if "expected-impact@neuron" in summary and "expected-impact" in summary:
        lines += ["Neuron-granular against whole-expert placement (expected-impact, same digital "
                  "parameters): " + head_to_head(result, "expected-impact@neuron",
                                                 "expected-impact").replace(
                      "Against the runner-up expected-impact: ", ""), ""]
    sens = models[0]["reference_sensitivity"]
    lines += [
        "Spearman rank correlation of each policy's score with the measured per-expert "
        f"sensitivity (eval perplexity increase with only that expert on AIMC, c = "
        f"{sens['noise_scale']}, {sens['seeds']} seeds), mean over layers (per layer in "
        f"brackets); `measured` is the `sensitivity` pass's score ({result['sensitivity_pass_seeds']}"
        f" seeds, {result['sensitivity_pass_tokens']:,} calibration tokens, other seeds), "
        "`random` one seeded draw:", "",
        "| score | " + " | ".join(f"{r['model']}" for r in models) + " | mean |",
        "|---" + "|---" * len(models) + "|---:|"]
    for policy in [p for p in ranked if p in EXPERT_POLICIES]:
        cells = []
        for r in models:
            corr = r["spearman"][policy]
            layers = ", ".join(_fmt(v) for v in corr["per_layer"].values())
            cells.append(f"{_fmt(corr['mean_per_layer'])} [{layers}]")
        lines.append(f"| {policy} | " + " | ".join(cells)
                     + f" | {_fmt(summary[policy]['spearman_mean_per_layer'])} |")
    lines += ["", f"Run time: {result['seconds'] / 60:.1f} min "
              f"({result['seconds']:.0f} s) on 2 shared CPU cores "
              "(`benchmarks/policy_evidence.py`).", ""]
    return "\n".join(lines)


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    settings = [(b, c) for b in BUDGETS for c in NOISE]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    width = 0.8 / len(POLICIES)
    for ax, r in zip(axes[0], models, strict=True):
        for i, policy in enumerate(POLICIES):
            cells = [r["configs"][f"{policy} {b:g} c={c}"] for b, c in settings]
            xs = [j + (i - (len(POLICIES) - 1) / 2) * width for j in range(len(settings))]
            ax.bar(xs, [c["recovered_mean"] for c in cells], width,
                   yerr=[c["recovered_std"] for c in cells], capsize=2, label=policy)
        dense = [r["configs"][f"dense-digital c={c}"]["recovered_mean"] for _b, c in settings]
        for j, value in enumerate(dense):
            ax.hlines(value, j - 0.45, j + 0.45, colors="black", linestyles="dashed", linewidth=1,
                      label="dense digital only" if j == 0 else None)
        ax.set_ylim(bottom=max(0.0, min(dense) - 0.1), top=1.0)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels([f"budget {b:g}\nc = {c}" for b, c in settings])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("share of analog-digital gap recovered")
        ax.set_title(f"{r['model']} ({r['architecture']}, {r['corpus']})")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
