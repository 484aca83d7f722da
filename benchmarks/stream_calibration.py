"""Streamed calibration (``density{stream=on}``) against loading the whole checkpoint
(``stream=off``): wall time and peak memory, as JSON.

Uses the sharded checkpoint that ``benchmarks/stream_scores.py`` creates (OLMoE layout,
random weights, 16 layers x 64 experts, ~6.7 GB); each mode runs in its own process so peak
RSS is its own. Routing counts of both modes must be identical (checked).

    .venv/bin/python benchmarks/stream_calibration.py --dir /tmp/hetmap-stream-ckpt [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from hetmap.compiler.api import compile_model
from hetmap.compiler.ir.annotations import Density
directory, mode, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
plan = compile_model(directory, pipeline=f"density{{calib_tokens={tokens},seq_len={tokens},stream={mode},moments=false}}")
print(json.dumps({"mode": mode, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "densities": [n.get(Density).value for n in plan.graph.experts()]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hetmap-stream-ckpt"))
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    if not (args.dir / "config.json").exists():
        sys.exit(f"{args.dir} has no checkpoint: run benchmarks/stream_scores.py --dir {args.dir} first")
    runs = {}
    for mode in ("on", "off"):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.dir), mode, str(args.tokens)],
                              capture_output=True, text=True, check=True)
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    print(json.dumps({
        "benchmark": "stream_calibration", "checkpoint_gb": size / 1e9, "tokens": args.tokens,
        "streamed_s": runs["on"]["seconds"], "in_memory_s": runs["off"]["seconds"],
        "streamed_peak_rss_mb": runs["on"]["peak_rss_mb"],
        "in_memory_peak_rss_mb": runs["off"]["peak_rss_mb"],
        "largest_leaf_mb": 64 * 3 * 512 * 1024 * 4 / 2**20,
        "identical_densities": runs["on"]["densities"] == runs["off"]["densities"],
    }, indent=1))


if __name__ == "__main__":
    main()
