"""Overhead of simulating analog experts: digital vs hetmap tile model vs aihwkit backend.

Builds a randomly initialized OLMoE (default: hidden 256, 4 layers, 8 experts top-2,
intermediate 512, 256 tokens), makes every expert analog (attention and router stay digital)
with the hetmap backend (without and with output noise, the latter also with the periphery
compiled: ``kernels="compiled"``) and with the aihwkit backend, and prints JSON with the median
forward time of each (same input, one process, the models taking turns), the ratios to
digital, and the weight memory of each model (parameters and buffers, plus aihwkit's tile
tensors); ``--output`` also writes it to a file. Targets: hetmap <= 1.5x digital
time and weight memory, several times faster than aihwkit. Timing uses one CPU thread by
default: on shared cores multi-threaded timings swing by 10x or more.

Usage: ``python benchmarks/simulator_overhead.py [--device cuda] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from report import emit
from torch import nn
from transformers import OlmoeConfig, OlmoeForCausalLM

from hetmap.runtime import AnalogSettings, build_simulated_model


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model holds (parameters, buffers, tile weights)."""
    seen: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    for module in model.modules():  # aihwkit keeps some tile state outside parameters/buffers
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen[value.data_ptr()] = value.numel() * value.element_size()
    return sum(seen.values())


def median_forward_seconds(
    models: dict[str, nn.Module], input_ids: torch.Tensor, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median forward time of each model; the models take turns, so load swings hit all."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(input_ids)  # warm-up (compiles the compiled periphery)
            model(input_ids)
        for _ in range(repeats):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(input_ids)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def noise_ns_per_sample(device: torch.device, repeats: int) -> dict[str, float]:
    """Output noise alone, on one tile output ``[512, 1024]``: nanoseconds per sample of
    ``OutputNoise.add_round_`` (noise added and the ADC's rounding), eager (``torch.randn``)
    and compiled (hash and quantile table in one kernel), and of the rounding alone."""
    from hetmap.runtime.fused import OutputNoise

    outputs = torch.randn(512, 1024, device=device) * 10.0
    steps = {"eager": OutputNoise(0, device, compiled=False),
             "compiled": OutputNoise(0, device, compiled=True)}
    runs = {name: (lambda n=noise: n.add_round_(outputs, 0.4, True)) for name, noise in steps.items()}
    runs["rounding_only"] = outputs.round_
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(10):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) / 10 / outputs.numel() * 1e9)
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--tile", type=int, default=512, help="crossbar rows = cols")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", help="also write the JSON here, e.g. "
                        "benchmarks/results/simulator_overhead.json")
    parser.add_argument("--skip-aihwkit", action="store_true")
    parser.add_argument("--skip-compiled", action="store_true",
                        help="leave out the torch.compile periphery (kernels=compiled)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1 gives stable numbers on shared cores)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = OlmoeConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        vocab_size=1024,
        max_position_embeddings=max(args.tokens, 64),
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
    )
    digital = OlmoeForCausalLM(config).eval().to(device)
    input_ids = torch.randint(0, config.vocab_size, (1, args.tokens), device=device)
    experts = {
        name: list(range(args.experts))
        for name, _ in digital.named_modules()
        if name.endswith("mlp.experts")
    }
    # The paper's setting (8-bit DAC/ADC, PCM programming noise at c = 1.5), plus drift to
    # one hour with GDC; a second hetmap run adds output noise (random numbers per output).
    settings = AnalogSettings(rows=args.tile, cols=args.tile, noise_scale=1.5, drift_time=3600.0)
    noisy_settings = dataclasses.replace(settings, out_noise=0.04)
    variants = [("hetmap", settings), ("hetmap_out_noise", noisy_settings)]
    if not args.skip_compiled:  # the periphery fused by torch.compile (compiles on warm-up)
        variants.append(("hetmap_out_noise_compiled",
                         dataclasses.replace(noisy_settings, kernels="compiled")))
    models = {"digital": digital}
    build_seconds = {}
    for name, analog in variants:
        start = time.perf_counter()
        models[name] = build_simulated_model(digital, set(), experts, analog, seed=0)
        build_seconds[name] = time.perf_counter() - start
    aihwkit_error = None
    if not args.skip_aihwkit:
        start = time.perf_counter()
        try:
            reference = build_simulated_model(
                digital, set(), experts, settings, seed=0, backend="aihwkit"
            )
            with torch.inference_mode():
                reference(input_ids)
        except Exception as error:  # report aihwkit's failure, still time the others
            aihwkit_error = f"{type(error).__name__}: {error}"
        else:
            models["aihwkit"] = reference
            build_seconds["aihwkit"] = time.perf_counter() - start

    seconds = median_forward_seconds(models, input_ids, args.repeats, device)
    memory = {name: tensor_bytes(model) for name, model in models.items()}
    expert_memory = {
        name: sum(tensor_bytes(module) for path, module in model.named_modules() if path in experts)
        for name, model in models.items()
    }
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "config": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "experts": args.experts,
            "top_k": args.top_k,
            "tokens": args.tokens,
            "tile": f"{settings.rows}x{settings.cols}",
            "analog": "all experts",
            "settings": settings.to_dict(),
        },
        "forward_ms": {name: round(value * 1e3, 2) for name, value in seconds.items()},
        "time_ratio_to_digital": {
            name: round(value / seconds["digital"], 3) for name, value in seconds.items()
        },
        "weight_mib": {name: round(value / 2**20, 2) for name, value in memory.items()},
        "weight_ratio_to_digital": {
            name: round(value / memory["digital"], 3) for name, value in memory.items()
        },
        "expert_weight_mib": {
            name: round(value / 2**20, 2) for name, value in expert_memory.items()
        },
        "build_s": {name: round(value, 2) for name, value in build_seconds.items()},
    }
    if not args.skip_compiled:
        report["output_noise_ns_per_sample"] = noise_ns_per_sample(device, args.repeats)
    if "aihwkit" in seconds:
        report["hetmap_speedup_over_aihwkit"] = round(seconds["aihwkit"] / seconds["hetmap"], 2)
    if aihwkit_error:
        report["aihwkit_error"] = aihwkit_error
    emit(report, args.output, indent=2)


if __name__ == "__main__":
    main()
