"""onnxruntime latency per token and file size of the ONNX back end's three MoE forms.

Builds one randomly initialised OLMoE layer at OLMoE-1B-7B's widths (hidden 2048, 64 experts
of intermediate 1024, top-8; 16 heads; a 1,024-token vocabulary so the LM head stays small),
exports it in the ``static``, ``dispatch`` and ``ort`` forms (weights in external data;
each export's peak resident memory above the memory held before it, Linux only), and times
onnxruntime (CPU execution provider, ``--threads`` intra-op threads) on a single-token input
(decode-like) and on a ``--sequence``-token prefill, the forms taking turns so load swings
hit all of them. Also records each file's size, its largest difference from
PyTorch on the export's example input, and its FLOPs per token from
:func:`hetmap.compiler.backends.onnx_flops.count_cost`. Writes
``benchmarks/results/onnx_forms.json``.

Usage: ``python benchmarks/onnx_forms.py [--threads 1] [--sequence 128] [--repeats 5]``
(about 6 minutes on 2 shared CPU cores; 5 GB of disk in a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from hetmap.compiler.backends.onnx_export import MOE_FORMS, export_onnx
from hetmap.compiler.backends.onnx_flops import count_cost

RESULTS = Path(__file__).parent / "results" / "onnx_forms.json"
WIDTHS = {"hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64,
          "num_experts_per_tok": 8, "num_attention_heads": 16, "num_key_value_heads": 16}


def olmoe_layer() -> OlmoeForCausalLM:
    config = OlmoeConfig(vocab_size=1024, num_hidden_layers=1, max_position_embeddings=4096,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None, **WIDTHS)
    torch.manual_seed(0)
    return OlmoeForCausalLM(config).eval()


def expert_tags(model: OlmoeForCausalLM) -> dict[str, dict[str, str]]:
    """The tags the onnx emitter gives expert matrices (what the FLOP counter reads)."""
    experts = "model.layers.0.mlp.experts"
    return {f"{experts}.{e}.{role}": {"hetmap.node": f"{experts}.{e}", "hetmap.matrix": role,
                                        "hetmap.placement": "aimc-tile", "hetmap.layer": "0",
                                        "hetmap.expert": str(e)}
            for e in range(model.config.num_experts) for role in ("gate", "up", "down")}


def rss_bytes(field: str) -> int | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc (Linux), else None."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith(field + ":")), None)
    return None if line is None else int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    """Start a new ``VmHWM`` measurement (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def median_seconds(sessions: dict[str, ort.InferenceSession], input_ids: np.ndarray,
                   repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {form: [] for form in sessions}
    for session in sessions.values():
        session.run(None, {"input_ids": input_ids})  # warm-up
    for _ in range(repeats):
        for form, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"input_ids": input_ids})
            times[form].append(time.perf_counter() - start)
    return {form: statistics.median(values) for form, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = olmoe_layer()
    example = torch.randint(0, 1024, (2, 8), generator=torch.Generator().manual_seed(1))
    result: dict[str, object] = {
        "model": {"kind": "OlmoeForCausalLM, 1 layer, random weights", **WIDTHS,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())},
        "threads": args.threads, "sequence": args.sequence, "repeats": args.repeats,
        "onnxruntime": ort.__version__, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "forms": {},
    }
    forms: dict[str, dict[str, object]] = {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="onnx_forms.") as scratch:
        paths = {}
        for form in MOE_FORMS:
            path = paths[form] = Path(scratch) / form / "model.onnx"
            path.parent.mkdir()
            resident = rss_bytes("VmRSS")
            reset_peak_rss()
            start = time.perf_counter()
            report = export_onnx(model, path, matrix_tags=expert_tags(model), model_props={},
                                 example_input=example, moe_form=form, external_data=True)
            seconds = round(time.perf_counter() - start, 1)
            peak = rss_bytes("VmHWM")
            cost = count_cost(path, {"batch": 1, "sequence": args.sequence})
            forms[form] = {"export_seconds": seconds,
                           "export_peak_rss_above_model_bytes":
                               None if peak is None or resident is None else peak - resident,
                           "file_bytes": file_bytes(path),
                           "max_difference_vs_pytorch": report.max_difference,
                           "fallbacks": dict(report.fallbacks),
                           "flops_per_token": cost.flops_per_token,
                           "expert_flops_per_token": cost.expert_flops / cost.tokens}
            print(f"exported {form}: {forms[form]}", flush=True)
        sessions = {form: ort.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
                    for form, path in paths.items()}
        rng = np.random.default_rng(0)
        for name, shape in (("decode_1_token", (1, 1)), ("prefill", (1, args.sequence))):
            input_ids = rng.integers(0, 1024, shape).astype(np.int64)
            seconds = median_seconds(sessions, input_ids, args.repeats)
            for form, value in seconds.items():
                forms[form][f"{name}_seconds_per_token"] = value / input_ids.size
        del sessions
    result["forms"] = forms
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
