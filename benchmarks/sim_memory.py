"""Peak memory of simulation against the digital forward, at OLMoE-1B-7B layer widths.

Builds a randomly initialised OLMoE with full OLMoE-1B-7B layer widths (hidden 2048, 64
experts of 1024, top-8, vocabulary 50304) and ``--layers`` decoder layers in ``--dtype``, and
measures, each in a fresh subprocess, the peak resident memory (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` after the model is built) above the process's memory after its
imports:

1. ``digital``: the model's forward on ``--tokens`` tokens (weights plus activations);
2. ``simulate``: what ``hetmap simulate`` holds for one seed -- the digital model, every
   routed expert on simulated tiles (``build_simulated_model``: the rest of the model shared
   with the digital one), and its forward on the same tokens;
3. ``simulate_deepcopy``: the same, with the rest of the model deep-copied as hetmap did
   before the simulated model shared it (for comparison in one run).

Prints JSON (``--output`` also writes it): each peak in GB, ratios to ``digital``, the
weight bytes of the model and of the analog tiles. The issue's target is ``simulate`` <= 1.15x
``digital``.

Usage: ``python benchmarks/sim_memory.py [--layers 2] [--dtype bfloat16] [--tokens 512]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("digital", "simulate", "simulate_deepcopy")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(mode: str, layers: int, dtype_name: str, tokens: int) -> dict[str, Any]:
    """One mode, in this process."""
    import gc

    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from hetmap.runtime import AnalogSettings, build_simulated_model

    torch.set_num_threads(2)
    base = _rss_kb("VmRSS")
    dtype = getattr(torch, dtype_name)
    config = OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_experts=64,
                         num_experts_per_tok=8, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=50304)
    torch.manual_seed(0)
    model = OlmoeForCausalLM._from_config(config, dtype=dtype).eval()
    gc.collect()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    experts = {f"model.layers.{i}.mlp.experts": range(64) for i in range(layers)}
    settings = AnalogSettings(noise_scale=1.5)
    _reset_peak()
    tile_bytes = 0
    with torch.no_grad():
        if mode == "digital":
            model(ids)
        else:
            simulated = build_simulated_model(model, set(), experts, settings, seed=0)
            if mode == "simulate_deepcopy":  # the rest deep-copied, as before sharing
                memo: dict[int, Any] = {id(simulated.get_submodule(p)): simulated.get_submodule(p)
                                        for p in experts}
                simulated = copy.deepcopy(simulated, memo)
            tile_bytes = sum(b.numel() * b.element_size() for p in experts
                             for b in simulated.get_submodule(p).buffers())
            simulated(ids)
    peak = _rss_kb("VmHWM")
    return {"mode": mode, "peak_gb": (peak - base) / 1e6, "weights_gb": weights / 1e9,
            "tile_gb": tile_bytes / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one subprocess
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.layers, args.dtype, args.tokens)))
        return
    results = {}
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--layers",
                               str(args.layers), "--dtype", args.dtype, "--tokens",
                               str(args.tokens)], capture_output=True, text=True, cwd=ROOT,
                              check=False)
        if proc.returncode:
            sys.exit(f"error: mode {mode} failed: {proc.stderr.strip().splitlines()[-1]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    digital = results["digital"]["peak_gb"]
    report = {"layers": args.layers, "dtype": args.dtype, "tokens": args.tokens,
              "widths": "hidden 2048, 64 experts x 1024, top-8 (OLMoE-1B-7B)",
              "weights_gb": results["digital"]["weights_gb"],
              "tile_gb": results["simulate"]["tile_gb"],
              "peak_gb": {m: round(r["peak_gb"], 3) for m, r in results.items()},
              "ratio_to_digital": {m: round(r["peak_gb"] / digital, 3) for m, r in results.items()},
              "target": "simulate <= 1.15x digital"}
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
