"""One OLMoE-sized MoE layer on a GPU: digital experts against hetmap's analog tile model,
eager and with the periphery compiled (``kernels="compiled"``: torch.compile, Triton on a GPU).

Layer: hidden 2048, 64 experts of intermediate 1024, top-8, 2,048 tokens (OLMoE-1B-7B),
transformers' own ``OlmoeExperts`` (grouped_mm) as the digital reference; every expert analog
on 512 x 512 tiles with the paper's settings (8-bit DAC/ADC, PCM programming noise c = 1.5),
without and with output noise (0.04). For each dtype (fp32, bf16) the variants take turns;
the JSON gives median forward times, ratios to digital, the relative difference between
compiled and eager outputs with output and programming noise off (same arithmetic; they must
agree within float tolerance; with noise the two draw different samples), and peak memory. Goal (issue 18): <= 1.20x digital.

    python benchmarks/gpu_layer.py --output benchmarks/results/gpu_layer.json      # on a GPU
    python benchmarks/gpu_layer.py --device cpu --hidden 256 --intermediate 128 \\
        --experts 8 --tokens 256 --dtypes fp32                                      # smoke test

The first compiled call of each dtype compiles (a minute or so); warm-up runs absorb it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from report import emit
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from hetmap.runtime import AnalogSettings, SimulatedExperts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(calls: dict[str, Callable[[], torch.Tensor]], repeats: int,
                    device: torch.device) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():  # warm-up (compiles)
            call()
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                _synchronize(device)
                start = time.perf_counter()
                call()
                _synchronize(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _relative(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    return float((outputs.float() - reference.float()).norm() / reference.float().norm())


def measure(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict:
    config = OlmoeConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_experts=args.experts, num_experts_per_tok=args.top_k)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    experts = OlmoeExperts(config)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0.0, 0.02)
    experts = experts.to(device=device, dtype=dtype).eval()
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    router = torch.randn(args.tokens, args.experts, device=device).softmax(dim=-1)
    top_k_weights, top_k_index = router.topk(args.top_k, dim=-1)
    top_k_weights = top_k_weights.to(dtype)
    base = AnalogSettings(noise_scale=1.5)
    variants = {
        "analog": base,
        "analog_out_noise": dataclasses.replace(base, out_noise=0.04),
        "analog_compiled": dataclasses.replace(base, kernels="compiled"),
        "analog_out_noise_compiled": dataclasses.replace(base, out_noise=0.04,
                                                         kernels="compiled"),
    }
    modules: dict[str, torch.nn.Module] = {"digital": experts}
    start = time.perf_counter()
    for name, settings in variants.items():
        modules[name] = SimulatedExperts(experts, range(args.experts), settings, seed=0)
    build_s = (time.perf_counter() - start) / len(variants)

    def call(module: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: module(hidden, top_k_index, top_k_weights)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _median_seconds({name: call(module) for name, module in modules.items()},
                              args.repeats, device)
    with torch.inference_mode():
        outputs = {name: call(module)() for name, module in modules.items()}
        # kernels=compiled draws its programming noise inside its kernels (other samples than
        # eager's): the periphery's arithmetic is compared without programming noise.
        exact = dataclasses.replace(base, noise_scale=0.0)
        for name, settings in (("exact", exact),
                               ("exact_compiled", dataclasses.replace(exact, kernels="compiled"))):
            outputs[name] = call(SimulatedExperts(experts, range(args.experts), settings,
                                                  seed=0))()
    return {
        "forward_ms": {name: round(value * 1e3, 3) for name, value in seconds.items()},
        "time_ratio_to_digital": {name: round(value / seconds["digital"], 3)
                                  for name, value in seconds.items()},
        "compiled_vs_eager_relative_difference": _relative(outputs["exact_compiled"],
                                                           outputs["exact"]),
        "analog_vs_digital_relative_error": _relative(outputs["analog"], outputs["digital"]),
        "build_s_per_variant": round(build_s, 2),
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if device.type == "cuda" else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output")
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "layer": {"hidden": args.hidden, "intermediate": args.intermediate,
                  "experts": args.experts, "top_k": args.top_k, "tokens": args.tokens},
        "settings": "512x512 tiles, 8-bit DAC/ADC, PCM c = 1.5, out_noise 0 / 0.04",
        "torch": torch.__version__,
        "dtypes": {name: measure(args, DTYPES[name], device)
                   for name in args.dtypes.split(",")},
    }
    emit(report, args.output, indent=2)


if __name__ == "__main__":
    main()
