"""Train hetmap's built-in ``demo`` model: a small byte-level OLMoE on the stdlib corpus.

The model is a real Hugging Face MoE architecture (``OlmoeForCausalLM``) shrunk to fit a
laptop: 4 layers, 8 routed experts per layer, top-2 routing, 256 byte tokens. It trains on the
``train`` split of :mod:`hetmap.compiler.data.corpus` with OLMoE's usual router auxiliary loss,
then reports

* eval perplexity on the ``eval`` split against an add-one smoothed byte-bigram baseline
  fitted on ``train`` (the model must beat it clearly), and
* per-layer routing frequencies on the ``calib`` split (the fraction of tokens each expert
  computes on; each layer's row sums to top-k), plus the bytes each expert prefers.

It saves ``config.json`` + ``model.safetensors`` (fp32, ``from_pretrained``-loadable) and a
``TRAINING.md`` into ``--out``. Run from the repository root::

    # the shipped compiler/assets/demo/ (about 16 min on 2 free cores):
    .venv/bin/python examples/train_demo.py --steps 2000 --seed 0 --aux-loss-coef 0.01

The same machinery trains ``demo-c``, a second MoE of another architecture on another kind of
text: ``MixtralForCausalLM`` (softmax over all experts, top-k renormalised) on the
``c-headers`` corpus (CPython's C headers)::

    .venv/bin/python examples/train_demo.py --arch mixtral --corpus c-headers \
        --out compiler/assets/demo-c --steps 1500 --batch-size 16 --seed 0

and ``demo-ds``, a fine-grained MoE of the kind of the paper's second model (DeepSeek-MoE:
many small routed experts, top-6, a shared expert, a dense first layer) as
``DeepseekV2ForCausalLM``, on the ``package-docs`` corpus (the installed packages' METADATA
prose), with a Switch-style load-balancing loss computed here (transformers' DeepSeek-V2 has
none)::

    .venv/bin/python examples/train_demo.py --arch deepseek --corpus package-docs \
        --out compiler/assets/demo-ds --steps 400 --batch-size 16 --seed 0
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
)

from hetmap.compiler.data.corpus import (
    CORPORA,
    bigram_perplexity,
    bytes_to_tokens,
    read_corpus_bytes,
    token_windows,
)

ASSETS_DIR = Path(__file__).resolve().parents[1] / "compiler" / "assets" / "demo"
ARCHITECTURES = ("olmoe", "mixtral", "deepseek")
VOCAB_SIZE = 256
SEQ_LEN = 256
EVAL_BYTES = 1 << 20  # the whole eval split (about 1 MB)
CALIB_BYTES = 1 << 18
PRINTABLE = {9: "\\t", 10: "\\n", 32: "space"}


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one run."""

    steps: int
    seed: int
    batch_size: int = 32
    peak_lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    log_every: int = 50


def demo_config(aux_loss_coef: float = 0.05) -> OlmoeConfig:
    """The demo model's architecture: OLMoE, 4 layers, 8 experts, top-2, byte vocabulary.

    ``aux_loss_coef`` weighs the router's load-balancing loss. It keeps most experts busy
    without forcing uniform routing, but does not guarantee every expert stays in use: the
    shipped ``demo`` weights were trained with OLMoE's own 0.01 and layer 0 expert 6 ended at
    0.01% of tokens; ``demo-c`` used 0.05 and one expert ended at 0.07% (see each TRAINING.md).
    """
    return OlmoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ_LEN,
        router_aux_loss_coef=aux_loss_coef,
        output_router_logits=True,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        dtype="float32",
    )


def mixtral_config(aux_loss_coef: float = 0.05, hidden_size: int = 96) -> MixtralConfig:
    """``demo-c``'s architecture: Mixtral, 4 layers, 8 experts, top-2 renormalised, bytes.

    Mixtral's router takes a softmax over all experts, keeps the top 2 and renormalises their
    weights to sum to one (OLMoE keeps the un-renormalised softmax weights). Hidden 96 keeps
    the fp32 weights under 6 MB.
    """
    return MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ_LEN,
        sliding_window=None,
        router_aux_loss_coef=aux_loss_coef,
        output_router_logits=True,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
        dtype="float32",
    )


def deepseek_config(aux_loss_coef: float = 0.05) -> DeepseekV2Config:
    """``demo-ds``'s architecture: DeepSeek-V2 (MLA attention), 4 layers of which the first is
    dense, 16 routed experts of intermediate 48 with top-6 softmax routing, one shared expert,
    bytes. ``router_aux_loss_coef`` is read by :class:`RouterBalance` (not by transformers)."""
    config = DeepseekV2Config(
        vocab_size=VOCAB_SIZE, hidden_size=96, intermediate_size=256, moe_intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=6,
        first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False,
        q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=24, max_position_embeddings=SEQ_LEN * 2, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
        attn_implementation="eager", dtype="float32",
    )
    config.router_aux_loss_coef = aux_loss_coef
    return config


class RouterBalance:
    """Switch-style load balancing for routers that transformers trains without one:
    ``E * sum_e f_e * P_e`` per MoE layer (``f_e``: the share of top-k slots given to expert
    e, ``P_e``: its mean router probability), averaged over layers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook)
                        for layer in model.model.layers if hasattr(layer.mlp, "experts")]

    def _hook(self, _module: torch.nn.Module, _args: object, output: tuple) -> None:
        logits, _weights, indices = output
        self.captured.append((logits, indices))

    def loss(self) -> torch.Tensor:
        terms = []
        for logits, indices in self.captured:
            experts = logits.shape[-1]
            probs = logits.float().softmax(dim=-1).mean(dim=0)
            share = torch.bincount(indices.reshape(-1), minlength=experts).float()
            share = share / indices.numel()
            terms.append(experts * (share * probs).sum())
        self.captured.clear()
        return torch.stack(terms).mean()


def num_routed_experts(config: object) -> int:
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("config names no routed expert count")


def build_model(arch: str, aux_loss_coef: float) -> torch.nn.Module:
    """A fresh model of the named architecture."""
    if arch == "deepseek":
        return DeepseekV2ForCausalLM(deepseek_config(aux_loss_coef))
    if arch == "mixtral":
        return MixtralForCausalLM(mixtral_config(aux_loss_coef))
    return OlmoeForCausalLM(demo_config(aux_loss_coef))


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.peak_lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def model_perplexity(model: OlmoeForCausalLM, windows: torch.Tensor, batch: int = 64) -> float:
    """Perplexity on [n, L] windows, scoring positions 1..L-1 of each (as the bigram does)."""
    model.eval()
    total_nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start : start + batch]
        logits = model(input_ids=chunk).logits[:, :-1]
        targets = chunk[:, 1:]
        total_nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return math.exp(total_nll / count)


@torch.no_grad()
def routing_counts(model: OlmoeForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """[layers, experts, vocab] counts of tokens routed to each expert, by input byte."""
    config = model.config
    moe_layers = [layer for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    experts = num_routed_experts(config)
    counts = torch.zeros(len(moe_layers), experts, config.vocab_size)
    current = {"tokens": torch.empty(0, dtype=torch.long)}

    def counter(layer: int):  # the experts' pre-hook sees (hidden, top_k_index, top_k_weights)
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            top_k_index = args[1]
            tokens = current["tokens"].unsqueeze(1).expand_as(top_k_index)
            flat = top_k_index.reshape(-1) * config.vocab_size + tokens.reshape(-1)
            counts[layer] += torch.bincount(
                flat, minlength=experts * config.vocab_size
            ).reshape(experts, config.vocab_size).float()

        return hook

    handles = [
        layer.mlp.experts.register_forward_pre_hook(counter(index))
        for index, layer in enumerate(moe_layers)
    ]
    try:
        model.eval()
        for start in range(0, windows.shape[0], 64):
            chunk = windows[start : start + 64]
            current["tokens"] = chunk.reshape(-1)
            model(input_ids=chunk)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def byte_label(token: int) -> str:
    """A readable name for a byte token."""
    if token in PRINTABLE:
        return PRINTABLE[token]
    return repr(chr(token)) if 33 <= token < 127 else f"0x{token:02x}"


def routing_report(counts: torch.Tensor, tokens: int) -> list[str]:
    """Markdown: routing frequency per layer and expert, and each expert's favourite bytes.

    A favourite byte is one the expert receives far more often than its share: ranked by the
    fraction of that byte's occurrences routed to the expert (bytes seen at least 200 times).
    """
    layers, experts, _ = counts.shape
    lines = ["| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " | sum |"]
    lines.append("|---" * (experts + 2) + "|")
    frequency = counts.sum(dim=2) / tokens
    for layer in range(layers):
        cells = " | ".join(f"{value:.3f}" for value in frequency[layer].tolist())
        lines.append(f"| {layer} | {cells} | {frequency[layer].sum().item():.2f} |")
    least = int(frequency.argmin())
    lines += [
        "",
        f"Least-used expert: layer {least // experts} expert {least % experts} "
        f"({frequency.min().item():.2%} of tokens).",
        "",
        "Favourite bytes (share of that byte's occurrences routed to the expert):",
        "",
    ]
    top_k = round(frequency[0].sum().item())  # every token goes to exactly top-k experts
    occurrences = counts[0].sum(dim=0) / top_k
    frequent = occurrences >= 200
    for layer in range(layers):
        parts = []
        for expert in range(experts):
            share = torch.where(frequent, counts[layer, expert] / occurrences.clamp(min=1), 0.0)
            best = torch.topk(share, 3).indices.tolist()
            named = ", ".join(f"{byte_label(b)} {share[b].item():.0%}" for b in best)
            parts.append(f"e{expert}: {named}")
        lines.append(f"- layer {layer}: " + "; ".join(parts))
    return lines


def train(model: OlmoeForCausalLM, train_tokens: torch.Tensor, settings: TrainSettings) -> None:
    """Train in place on random windows drawn by a seeded generator (deterministic order)."""
    generator = torch.Generator().manual_seed(settings.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.peak_lr, betas=(0.9, 0.95),
    )
    offsets_max = train_tokens.numel() - SEQ_LEN
    started = time.perf_counter()
    balance = RouterBalance(model) if model.config.model_type == "deepseek_v2" else None
    model.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        offsets = torch.randint(0, offsets_max, (settings.batch_size,), generator=generator)
        batch = torch.stack([train_tokens[o : o + SEQ_LEN] for o in offsets.tolist()])
        output = model(input_ids=batch, labels=batch)
        if balance is not None:  # transformers computes no balancing loss for this family
            aux = balance.loss()
            output.aux_loss = aux
            output.loss = output.loss + model.config.router_aux_loss_coef * aux
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % settings.log_every == 0 or step == settings.steps - 1:
            elapsed = time.perf_counter() - started
            remaining = elapsed / (step + 1) * (settings.steps - step - 1)
            aux_loss = output.aux_loss.item()
            lm_loss = output.loss.item() - model.config.router_aux_loss_coef * aux_loss
            print(
                f"step {step:5d}/{settings.steps}  lm loss {lm_loss:.3f}  "
                f"aux {aux_loss:.3f}  lr {learning_rate(step, settings):.2e}  "
                f"{elapsed:6.0f}s elapsed, ~{remaining:.0f}s left",
                flush=True,
            )
    if balance is not None:
        for handle in balance.handles:
            handle.remove()
    model.eval()


def save(model: OlmoeForCausalLM, out: Path) -> None:
    """Write config.json + model.safetensors (fp32) into ``out`` and check they reload exactly."""
    model.config.output_router_logits = False
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(Path(staging) / name, out / name)
    reloaded = type(model).from_pretrained(
        out, attn_implementation=model.config._attn_implementation
    )
    probe = torch.randint(0, VOCAB_SIZE, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(model(input_ids=probe).logits, reloaded(input_ids=probe).logits):
            raise RuntimeError(f"weights saved to {out} do not reload exactly")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output directory")
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    parser.add_argument(
        "--aux-loss-coef", type=float, default=0.05, help="router load-balancing loss weight"
    )
    parser.add_argument("--arch", choices=ARCHITECTURES, default="olmoe",
                        help="model architecture (olmoe: demo; mixtral: demo-c; deepseek: demo-ds)")
    parser.add_argument("--corpus", choices=CORPORA, default="stdlib",
                        help="training text (stdlib: Python sources; c-headers: CPython C "
                        "headers; package-docs: installed packages' METADATA prose)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    settings = TrainSettings(
        steps=args.steps, seed=args.seed, batch_size=args.batch_size, peak_lr=args.lr
    )
    corpus = args.corpus
    train_tokens = bytes_to_tokens(read_corpus_bytes("train", corpus=corpus), VOCAB_SIZE)
    eval_windows = token_windows(
        bytes_to_tokens(read_corpus_bytes("eval", EVAL_BYTES, corpus=corpus), VOCAB_SIZE),
        SEQ_LEN,
    )
    calib_windows = token_windows(
        bytes_to_tokens(read_corpus_bytes("calib", CALIB_BYTES, corpus=corpus), VOCAB_SIZE),
        SEQ_LEN,
    )
    bigram = bigram_perplexity(train_tokens, eval_windows, VOCAB_SIZE)
    print(f"train {train_tokens.numel()} bytes, eval {eval_windows.numel()} bytes; "
          f"bigram baseline eval perplexity {bigram:.3f}", flush=True)

    model = build_model(args.arch, args.aux_loss_coef)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} ({args.arch}): {parameters} parameters", flush=True)
    train(model, train_tokens, settings)
    perplexity = model_perplexity(model, eval_windows)
    counts = routing_counts(model, calib_windows)
    save(model, args.out)
    wall = time.perf_counter() - started
    print(f"eval perplexity: model {perplexity:.3f} vs bigram {bigram:.3f}; wall {wall:.0f}s")

    report = routing_report(counts, calib_windows.numel())
    print("\n".join(report))
    write_training_notes(args, settings, model.config, parameters, wall, perplexity, bigram, report)


def write_training_notes(
    args: argparse.Namespace,
    settings: TrainSettings,
    config: OlmoeConfig | MixtralConfig,
    parameters: int,
    wall: float,
    perplexity: float,
    bigram: float,
    report: list[str],
) -> None:
    """Write TRAINING.md next to the weights."""
    size = (args.out / "model.safetensors").stat().st_size
    command = "python examples/train_demo.py " + " ".join(sys.argv[1:])
    experts = num_routed_experts(config)
    moe_note = ""
    if args.arch == "deepseek":
        title = "# hetmap demo-ds model: training record"
        intro = (
            "Byte-level `DeepseekV2ForCausalLM` (transformers; MLA attention, softmax top-6 "
            "routing over 16 fine-grained routed experts, one shared expert, the first layer "
            "dense), trained by `examples/train_demo.py` on the `train` split of the "
            f"`{args.corpus}` corpus (installed packages' METADATA prose; "
            "`hetmap.compiler.data.corpus`), with a Switch-style balancing loss.")
        name = "demo-ds DeepSeek-V2"
        moe_note = (f", first {config.first_k_dense_replace} layer(s) dense (intermediate "
                    f"{config.intermediate_size}), {config.n_shared_experts} shared expert(s)")
    elif args.arch == "mixtral":
        title = "# hetmap demo-c model: training record"
        intro = (
            "Byte-level `MixtralForCausalLM` (transformers; softmax router, top-k weights "
            "renormalised), trained by `examples/train_demo.py` on the `train` split of the "
            "`c-headers` corpus (CPython's C headers; `hetmap.compiler.data.corpus`)."
            if args.corpus == "c-headers" else
            "Byte-level `MixtralForCausalLM` (transformers), trained by "
            f"`examples/train_demo.py` on the `train` split of the {args.corpus} corpus."
        )
        name = "demo-c Mixtral"
    else:
        title = "# hetmap demo model: training record"
        intro = (
            "Byte-level `OlmoeForCausalLM` (transformers), trained by `examples/train_demo.py` "
            f"on the `train` split of the {args.corpus} corpus (`hetmap.compiler.data.corpus`)."
        )
        name = "demo OLMoE"
    lines = [
        title,
        "",
        intro,
        "",
        f"- Command: `{command.strip()}`",
        f"- Wall time: {wall / 60:.1f} min ({wall:.0f} s) on {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average at the "
        f"end {' / '.join(f'{load:.1f}' for load in os.getloadavg())} (1/5/15 min: a load above "
        f"{os.cpu_count()} means the cores were shared and the run was slowed)",
        f"- Steps: {settings.steps}, batch {settings.batch_size} x {SEQ_LEN} bytes, AdamW "
        f"(peak lr {settings.peak_lr}, warm-up {settings.warmup_steps}, cosine to 10%, weight "
        f"decay {settings.weight_decay}), seed {settings.seed}",
        f"- Architecture: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, {experts} routed experts per MoE layer "
        f"(intermediate {getattr(config, 'moe_intermediate_size', config.intermediate_size)})"
        f"{moe_note}, top-{config.num_experts_per_tok}, "
        f"vocabulary {config.vocab_size} (token = byte), router aux loss coef "
        f"{config.router_aux_loss_coef}",
        f"- Parameters: {parameters}; `model.safetensors` {size / 1e6:.2f} MB (fp32)",
        "",
        "## Eval perplexity (eval split, windows of 256 bytes, positions 1-255 scored)",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| {name} | {perplexity:.3f} |",
        f"| byte bigram, add-one smoothed, fitted on train | {bigram:.3f} |",
        "",
        "## Routing frequency on the calib split",
        "",
        "Fraction of calib tokens each expert computes on, per MoE layer (each row sums to "
        f"top-k = {config.num_experts_per_tok}).",
        "",
        *report,
        "",
    ]
    (args.out / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
