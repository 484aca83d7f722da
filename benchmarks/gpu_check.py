"""The GPU check of simulation and evaluation (issue: real checkpoints at real size).

Runs on a machine with a CUDA device (``--device cpu`` only smoke-tests this script):

1. ``hetmap simulate demo`` with ``--device DEVICE`` in float32 and bfloat16, resident and
   per-batch programming, 3 seeds: perplexities (bf16 against fp32: within 1% digital and 2%
   mapped, as on the CPU) and wall time; and in float32 with ``--kernels compiled`` (Triton
   kernels that draw their own noise: the mapped-minus-digital gap within a factor 2.5 of
   eager's, as the CPU test asks);
2. ``hetmap eval demo`` on the local test task (tests/fixtures/lmeval) in bfloat16, 3 seeds:
   digital and mapped accuracy;
3. peak device memory (``torch.cuda.max_memory_allocated`` above the model) of the digital
   forward, of ``simulate`` with resident tiles and with per-batch programming, on a randomly
   initialised OLMoE with OLMoE-1B-7B widths and ``--layers`` layers (16: the full model's
   size, 13.8 GB in bf16) on ``--tokens`` tokens, every routed expert analog; ratios to the
   digital forward (the issue's bound for per-batch: 1.15x).

Prints JSON; ``--output`` also writes it (benchmarks/results/gpu_check.json).

Usage: ``python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.json``
(about 5 minutes on an H200; ``--layers 4`` for a GPU with less than 40 GB).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import emit

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lmeval"


def _hetmap(*args: str) -> tuple[dict[str, Any], float]:
    """Run the CLI; its JSON result (the file it wrote) and the wall time."""
    start = time.perf_counter()
    # (not from the checkout's root, whose hetmap/ folder would shadow an installed package)
    proc = subprocess.run([sys.executable, "-m", "hetmap.compiler.cli", *args],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(), check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"error: hetmap {' '.join(args)} failed: "
                 f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    out = Path(args[args.index("-o") + 1])
    name = "eval.json" if args[0] == "eval" else "simulation.json"
    return json.loads((out / name).read_text()), seconds


def cli_runs(device: str, eval_tokens: int) -> dict[str, Any]:
    """Items 1 and 2."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hetmap-gpu-check-") as scratch:
        for dtype in ("float32", "bfloat16"):
            for programming in ("resident", "per-batch"):
                name = f"simulate_{dtype}_{programming}"
                data, seconds = _hetmap(
                    "simulate", "demo", "--device", device, "--dtype", dtype, "--seeds", "3",
                    "--eval-tokens", str(eval_tokens), "--programming", programming,
                    "-o", f"{scratch}/{name}")
                results[name] = {"digital_ppl": data["digital_ppl"],
                                 "mapped_ppl_mean": data["mapped_ppl_mean"],
                                 "mapped_ppl_std": data["mapped_ppl_std"],
                                 "seconds": round(seconds, 1)}
        data, seconds = _hetmap(
            "simulate", "demo", "--device", device, "--seeds", "3", "--kernels", "compiled",
            "--eval-tokens", str(eval_tokens), "-o", f"{scratch}/compiled")
        results["simulate_float32_compiled"] = {"digital_ppl": data["digital_ppl"],
                                                "mapped_ppl_mean": data["mapped_ppl_mean"],
                                                "mapped_ppl_std": data["mapped_ppl_std"],
                                                "seconds": round(seconds, 1)}
        if importlib.util.find_spec("lm_eval") is None:  # a device image without lm-eval
            results["eval_bfloat16"] = "not run: lm-eval is not installed here"
        else:
            data, seconds = _hetmap(
                "eval", "demo", "--tasks", "python_continuation", "--include-path", str(TASKS),
                "--device", device, "--dtype", "bfloat16", "--seeds", "3", "-o", f"{scratch}/eval")
            results["eval_bfloat16"] = {"average": data["average"], "seconds": round(seconds, 1)}
    full = results["simulate_float32_resident"]
    half = results["simulate_bfloat16_resident"]
    results["bf16_vs_fp32"] = {
        "digital_rel": abs(half["digital_ppl"] / full["digital_ppl"] - 1),
        "mapped_rel": abs(half["mapped_ppl_mean"] / full["mapped_ppl_mean"] - 1),
        "within_1_and_2_percent": abs(half["digital_ppl"] / full["digital_ppl"] - 1) < 0.01
        and abs(half["mapped_ppl_mean"] / full["mapped_ppl_mean"] - 1) < 0.02}
    compiled = results["simulate_float32_compiled"]
    gaps = [run["mapped_ppl_mean"] - run["digital_ppl"] for run in (compiled, full)]
    results["compiled_gap_over_eager_gap"] = gaps[0] / gaps[1] if gaps[1] else None
    results["compiled_gap_within_2_5x"] = bool(gaps[1] > 0 and 0.4 < gaps[0] / gaps[1] < 2.5)
    for dtype in ("float32", "bfloat16"):
        lazy, resident = (results[f"simulate_{dtype}_{m}"] for m in ("per-batch", "resident"))
        results[f"per_batch_equals_resident_{dtype}"] = abs(
            lazy["mapped_ppl_mean"] / resident["mapped_ppl_mean"] - 1) < 1e-4
    return results


def memory_runs(device: str, layers: int, tokens: int) -> dict[str, Any]:
    """Item 3, in this process (peak statistics reset between the modes)."""
    import dataclasses

    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from hetmap.runtime import AnalogSettings, build_simulated_model

    config = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64,
                         num_experts_per_tok=8, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)
    torch.manual_seed(0)
    with torch.device(device):
        model = OlmoeForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    experts = {f"model.layers.{i}.mlp.experts": range(64) for i in range(layers)}
    report: dict[str, Any] = {"layers": layers, "tokens": tokens, "weights_gb": weights / 1e9}
    cuda = device.startswith("cuda")
    for mode in ("digital", "resident", "per-batch"):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.no_grad():
            if mode == "digital":
                model(ids)
            else:
                settings = dataclasses.replace(AnalogSettings(noise_scale=1.5), programming=mode)
                simulated = build_simulated_model(model, set(), experts, settings, seed=0)
                simulated(ids)
                del simulated
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base + weights
            report[f"{mode}_peak_gb"] = peak / 1e9
        report[f"{mode}_seconds"] = round(time.perf_counter() - start, 2)
    if cuda:
        for mode in ("resident", "per-batch"):
            report[f"{mode}_ratio"] = report[f"{mode}_peak_gb"] / report["digital_peak_gb"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; this check needs a GPU (--device cpu smoke-tests "
                 "the script)")
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else "cpu", "cli": cli_runs(args.device, args.eval_tokens),
              "memory": memory_runs(args.device, args.layers, args.tokens)}
    emit(report, args.output, indent=1)


if __name__ == "__main__":
    main()
