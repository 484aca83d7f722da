"""Streaming ``expert-score`` on a multi-GB sharded checkpoint: throughput against a plain
read of the same safetensors files, and peak memory, as JSON.

Creates (once, in --dir) an OLMoE-layout checkpoint with random weights written by
``save_pretrained`` in shards (per-expert keys on disk, as Hugging Face writes them), then in
separate processes: (a) reads every tensor of every shard once, (b) runs hetmap's
``expert-score`` pass on the checkpoint directory (the model itself is never instantiated) and
takes the pass's own time (the front end's tracing before it is reported apart).
Two conditions, each with (a) and (b) alternating ``--repeats`` times and their medians
compared: warm (one plain read first fills the page cache) and cold (the page cache dropped
before every run, where ``/proc/sys/vm/drop_caches`` is writable: the files come from disk).

    .venv/bin/python benchmarks/stream_scores.py --dir /tmp/hetmap-stream-ckpt --layers 16 \
        --output benchmarks/results/stream_scores.json   (16 layers: 6.7 GB in 16 shards)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from report import emit

MAKE = r"""
import sys, torch, transformers
out, layers = sys.argv[1], int(sys.argv[2])
config = transformers.OlmoeConfig(vocab_size=4096, hidden_size=1024, intermediate_size=512,
    num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, num_experts=64,
    num_experts_per_tok=8)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config)
model.save_pretrained(out, max_shard_size="500MB")
"""

READ = r"""
import json, resource, sys, time
from pathlib import Path
from safetensors import safe_open
start = time.perf_counter(); total = 0
for file in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(file), "pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)  # memory-mapped: sum() touches every byte
            tensor.sum()
            total += tensor.numel() * tensor.element_size()
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": total,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SCORE = r"""
import json, resource, sys, time
from hetmap.compiler.api import compile_model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
plan = compile_model(sys.argv[1], pipeline="expert-score")
total = time.perf_counter() - start
seconds = next(t.seconds for t in plan.timings if t.name == "expert-score")
print(json.dumps({"seconds": seconds, "compile_s": total, "experts": plan.summary["experts_total"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_imports_mb": base}))
"""


def child(code: str, *args: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          check=True)
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hetmap-stream-ckpt"))
    parser.add_argument("--layers", type=int, default=16, help="16 layers: 6.7 GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if not (args.dir / "config.json").exists():
        child(MAKE, str(args.dir), str(args.layers))
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    largest_tensor = 64 * 2 * 512 * 1024 * 4  # fused gate_up of one layer, the biggest in memory
    report: dict[str, Any] = {
        "benchmark": "stream_scores", "checkpoint_gb": size / 1e9,
        "shards": len(list(args.dir.glob("*.safetensors"))),
        "largest_model_tensor_mb": largest_tensor / 2**20, "repeats": args.repeats,
        "target": "expert-score >= 0.9x the plain-read throughput"}
    report["warm"] = _side_by_side(args.dir, size, args.repeats, cold=False)
    if _can_drop_caches():
        report["cold"] = _side_by_side(args.dir, size, args.repeats, cold=True)
    else:
        report["cold"] = "not measured: /proc/sys/vm/drop_caches is not writable here"
    emit(report, args.output)


def _can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def _side_by_side(directory: Path, size: int, repeats: int, cold: bool) -> dict[str, Any]:
    """(a) and (b) alternating, from a warm page cache (after one plain read) or a cold one
    (dropped before every run: the files come from the disk)."""
    if not cold:
        child(READ, str(directory))
    reads, scores = [], []
    for _ in range(repeats):
        for code, runs in ((READ, reads), (SCORE, scores)):
            if cold:
                _drop_caches()
            runs.append(child(code, str(directory)))
    read, score = _median(reads), _median(scores)
    return {
        "plain_read_s": read["seconds"], "expert_score_s": score["seconds"],
        "throughput_ratio_score_vs_read": read["seconds"] / score["seconds"],
        "plain_read_gb_per_s": size / 1e9 / read["seconds"],
        "expert_score_gb_per_s": size / 1e9 / score["seconds"],
        "peak_rss_mb_plain_read": read["peak_rss_mb"],
        "peak_rss_mb_expert_score": score["peak_rss_mb"],
        "rss_after_imports_mb": score["rss_after_imports_mb"],
        "plain_read_s_all": [r["seconds"] for r in reads],
        "expert_score_s_all": [r["seconds"] for r in scores],
        # the front end (meta model, trace, IR) before the pass, not part of the streaming
        "compile_with_front_end_s_all": [r["compile_s"] for r in scores]}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


if __name__ == "__main__":
    main()
