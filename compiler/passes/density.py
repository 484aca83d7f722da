"""``density``: activation density of every matrix node.

Reads: the graph's MoE layers, the model (weights, if any). Writes: :class:`Density` on every
node with matrices, and on embeddings.

Rules:

1. Dense modules (attention, router, shared experts, dense FFNs, linears, LM head) and
   embeddings compute on every token: density 1.0, source ``structural``.
2. A routed expert's density is the fraction of calibration tokens routed to it; over one
   layer the densities sum to top-k. Counted from the chosen top-k indices: a forward
   pre-hook on a fused experts module sees ``(hidden, top_k_index, top_k_weights)``; for
   per-expert (ModuleList) experts, a hook on the router turns its output (indices and
   weights, or logits -> softmax -> top-k) into the same. The expert's mean routing weight
   (over the tokens routed to it) is recorded too. Hooks are removed afterwards.
3. Calibration text: ``calib`` (a file) or the default corpus' calibration split, at most
   ``calib_tokens`` tokens, in windows of ``seq_len``.
   A checkpoint is run streamed, one leaf module at a time (see
   :mod:`hetmap.compiler.streaming`), when ``stream=on``, or with ``stream=auto`` when its
   files are larger than half of the machine's memory; otherwise it is loaded whole.
4. A model without weights gets, for each expert, the uniform-routing assumption
   ``top_k / E`` (source ``uniform-assumption``); policies that need measured densities refuse it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from hetmap.compiler.annotations import Density
from hetmap.compiler.ir import DENSE_KINDS, Graph, MoeLayer, NodeKind
from hetmap.compiler.passes.base import CompileContext, PassResult
from hetmap.compiler.textdata import batches, load_tokens


class _RoutingCounter:
    def __init__(self, moe: MoeLayer) -> None:
        self.moe = moe
        self.counts = torch.zeros(moe.num_experts, dtype=torch.float64)
        self.weight_sums = torch.zeros(moe.num_experts, dtype=torch.float64)
        self.tokens = 0

    def add(self, index: torch.Tensor, weights: torch.Tensor | None) -> None:
        index = index.reshape(-1, index.shape[-1]).long()
        self.tokens += index.shape[0]
        flat = index.flatten()
        self.counts += torch.bincount(flat, minlength=self.moe.num_experts)[: self.moe.num_experts].double()
        if weights is not None:
            self.weight_sums.index_add_(0, flat, weights.reshape(-1).double())

    def pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
        if index is not None:
            self.add(index, weights)

    def router_hook(self, _module: nn.Module, _args: Any, output: Any) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        index = next((t for t in outputs if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
        if index is not None:
            weights = next((t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()
                            and t.shape == index.shape), None)
            self.add(index, weights)
            return
        logits = outputs[0].float()
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        weights, index = torch.topk(probs, self.moe.top_k, dim=-1)
        self.add(index, weights)


@dataclass(frozen=True)
class DensityPass:
    name: ClassVar[str] = "density"
    description: ClassVar[str] = "activation density per node from calibration tokens"

    calib: str | None = None
    calib_tokens: int = 4096
    seq_len: int = 256
    batch: int = 8
    stream: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> str | None:
        if self.calib_tokens < 2 or self.seq_len < 2 or self.batch < 1:
            return "calib_tokens and seq_len must be at least 2, batch at least 1"
        return None

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult:
        for node in graph:
            if node.kind in DENSE_KINDS or node.kind is NodeKind.EMBEDDING:
                node.annotate(Density(1.0, "structural"))
        if not graph.moe_layers:
            return PassResult(graph, True)
        if not ctx.model.has_weights:
            for layer, moe in graph.moe_layers.items():
                for node in graph.experts(layer):
                    node.annotate(Density(moe.top_k / moe.num_experts, "uniform-assumption"))
            return PassResult(graph, True, ["no weights: expert densities assume uniform routing"])
        counters = self._calibrate(graph, ctx)
        for layer, counter in counters.items():
            if counter.tokens == 0:
                continue
            for node in graph.experts(layer):
                e = node.expert
                count = float(counter.counts[e])
                mean_weight = float(counter.weight_sums[e]) / count if count else 0.0
                node.annotate(Density(count / counter.tokens, "calibration", counter.tokens, mean_weight))
        missing = [layer for layer, c in counters.items() if c.tokens == 0]
        notes = [f"calibrated on {max((c.tokens for c in counters.values()), default=0)} tokens"]
        if missing:
            raise RuntimeError(f"no routing decisions observed in MoE layers {missing}")
        return PassResult(graph, True, notes)

    def _streams(self, ctx: CompileContext) -> bool:
        model = ctx.model
        if self.stream == "off" or model.checkpoint is None or not model.on_meta:
            return False
        if self.stream == "on":
            return True
        size = sum(f.stat().st_size for f in model.checkpoint.glob("*.safetensors"))
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return size > memory // 2

    def _calibrate(self, graph: Graph, ctx: CompileContext) -> dict[int, _RoutingCounter]:
        streamed = self._streams(ctx)
        model = ctx.model.module if streamed else ctx.model.runnable()
        tokens = load_tokens(ctx.model, self.calib, "calib", self.calib_tokens)
        counters = {layer: _RoutingCounter(moe) for layer, moe in graph.moe_layers.items()}
        handles = []
        try:
            for layer, moe in graph.moe_layers.items():
                counter = counters[layer]
                experts = model.get_submodule(moe.experts_module)
                if moe.layout.startswith("fused"):
                    handles.append(experts.register_forward_pre_hook(counter.pre_hook, with_kwargs=True))
                else:
                    router = model.get_submodule(moe.router)
                    handles.append(router.register_forward_hook(counter.router_hook))
            chunks = batches(tokens, self.seq_len, self.batch)
            advance = ctx.progress("calibrating" + (" (streamed)" if streamed else ""), len(chunks))
            if streamed:
                from hetmap.compiler.streaming import run_streamed
                from hetmap.compiler.weights import CheckpointWeights

                gm, wrapped = ctx.model.traced
                assert ctx.model.checkpoint is not None
                run_streamed(gm, CheckpointWeights(ctx.model.checkpoint), chunks, wrapped=wrapped,
                             config=ctx.model.config, advance=advance)
                return counters
            with torch.no_grad():
                for chunk in chunks:
                    model(chunk)
                    advance(1)
        finally:
            for handle in handles:
                handle.remove()
        return counters
