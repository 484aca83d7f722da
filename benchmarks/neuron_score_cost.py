"""What neuron-granular scoring costs at full layer widths, against whole-expert scoring.

Builds a randomly initialised OLMoE with OLMoE-1B-7B layer widths (hidden 2048, 64 experts of
1024, top-8) and ``--layers`` layers, calibrates it once (``density``, ``--calib-tokens``),
then times ``expert-score`` (the closed-form expected impact) at ``granularity=expert`` and at
``granularity=neuron`` on the same calibrated graph, alternating, ``--repeats`` times each,
and prints JSON (``--output`` also writes it): the median seconds of each, their ratio, and the
per-layer cost extrapolated to OLMoE-1B-7B's 16 layers (the pass is layer by layer, so its
time is linear in layers). ``--reference FILE`` also times, taking turns with the others, the
pass with the closed form of another version of ``compiler/algorithms/expert_score.py``
(e.g. ``git show REV:compiler/algorithms/expert_score.py > old.py``), and reports the speedup
and the largest relative difference of the scores.

Usage: ``python benchmarks/neuron_score_cost.py [--layers 2] [--repeats 3] [--reference old.py
--reference-label 'the version of REV']``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from report import emit
from transformers import OlmoeConfig, OlmoeForCausalLM

from hetmap.compiler.api import compile_model
from hetmap.compiler.frontend.loader import LoadedModel
from hetmap.compiler.ir.annotations import ExpertScore
from hetmap.compiler.passes import expert_score as score_pass
from hetmap.compiler.passes.base import CompileContext
from hetmap.compiler.passes.expert_score import ExpertScorePass
from hetmap.compiler.registry import load_registries
from hetmap.targets import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-tokens", type=int, default=1024)
    parser.add_argument("--reference", type=Path,
                        help="another version of compiler/algorithms/expert_score.py to time")
    parser.add_argument("--reference-label", default=None,
                        help="what --reference is, for the report (e.g. 'the version of b71eb71')")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64,
                         num_experts_per_tok=8, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)
    torch.manual_seed(0)
    module = OlmoeForCausalLM(config).eval()
    loaded = LoadedModel(spec="olmoe-widths", name="olmoe-widths", source="module",
                         module=module, config=config)
    plan = compile_model(loaded, pipeline=f"density{{calib_tokens={args.calib_tokens},"
                                          "seq_len=256,batch=4}")
    ctx = CompileContext(model=loaded, target=load_target("aimc-512"),
                         registries=load_registries(plugins=False))
    runs = {"expert": ("expert", None), "neuron": ("neuron", None)}
    if args.reference:
        spec = importlib.util.spec_from_file_location("reference_expert_score", args.reference)
        assert spec is not None and spec.loader is not None
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
        runs["expert_reference"] = ("expert", reference)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    scores: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name, (granularity, module) in runs.items():
            patch: Any = nullcontext() if module is None else mock.patch.object(
                score_pass, "expert_expected_impact", module.expert_expected_impact)
            with patch:
                start = time.perf_counter()
                ExpertScorePass(granularity=granularity).run(plan.graph, ctx)
                seconds[name].append(time.perf_counter() - start)
            scores[name] = {node.name: node.get(ExpertScore).expected_impact
                            for node in plan.graph.experts()}
    median = {g: statistics.median(s) for g, s in seconds.items()}
    report = {
        "widths": "hidden 2048, 64 experts x 1024, top-8 (OLMoE-1B-7B)", "layers": args.layers,
        "experts": len(plan.graph.experts()), "threads": 2, "repeats": args.repeats,
        "median_seconds": {g: round(v, 3) for g, v in median.items()},
        "ratio_neuron_to_expert": round(median["neuron"] / median["expert"], 2),
        "extrapolated_16_layers_seconds": {g: round(v / args.layers * 16, 1)
                                           for g, v in median.items()},
    }
    if args.reference:
        report["reference"] = args.reference_label or args.reference.name
        report["speedup_over_reference"] = round(median["expert_reference"] / median["expert"], 2)
        report["largest_relative_score_difference"] = max(
            abs(scores["expert"][name] - value) / max(abs(value), 1e-300)
            for name, value in scores["expert_reference"].items())
    emit(report, args.output, indent=1)


if __name__ == "__main__":
    main()
