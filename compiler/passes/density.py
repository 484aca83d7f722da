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
   (over the tokens routed to it) is recorded too, and per layer the co-activation counts
   (tokens routed to both experts i and j) as a graph-level :class:`Coactivation`. Hooks are
   removed afterwards.
3. Calibration text: ``calib`` (a file) or the default corpus' calibration split, at most
   ``calib_tokens`` tokens, in windows of ``seq_len``.
   A checkpoint is run streamed, one leaf module at a time (see
   :mod:`hetmap.compiler.streaming`), when ``stream=on``, or with ``stream=auto`` when its
   files are larger than half of the machine's memory; otherwise it is loaded whole.
4. A model without weights gets, for each expert, the uniform-routing assumption
   ``top_k / E`` (source ``uniform-assumption``); policies that need measured densities refuse it.
5. With ``moments=true`` (the default) each routed expert also gets :class:`InputMoments`:
   ``E[x_j^2]`` of each of its matrices' inputs over the tokens routed to it. Fused experts:
   the experts module's pre-hook takes the routed tokens' hidden states (input of gate and up)
   and computes the down projection's input ``act(gate x) * (up x)`` from the module's own
   weights (its ``_apply_gate`` where it has one). Per-expert (ModuleList) experts: a pre-hook
   on every expert linear; when a linear sees every token of the batch (dense dispatch) only
   the rows routed to its expert (by the router hook of rule 2) are counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hetmap.compiler.annotations import Coactivation, Density, InputMoments
from hetmap.compiler.ir import DENSE_KINDS, Graph, MoeLayer, Node, NodeKind
from hetmap.compiler.passes.base import CompileContext, PassResult
from hetmap.compiler.textdata import batches, load_tokens


class _RoutingCounter:
    def __init__(self, moe: MoeLayer) -> None:
        self.moe = moe
        self.counts = torch.zeros(moe.num_experts, dtype=torch.float64)
        self.weight_sums = torch.zeros(moe.num_experts, dtype=torch.float64)
        #: tokens routed to both experts i and j (diagonal: to i)
        self.coactivation = torch.zeros(moe.num_experts, moe.num_experts, dtype=torch.float64)
        self.tokens = 0
        #: the last batch's routing ``[T, k]`` (read by the per-expert moment hooks)
        self.last_index: torch.Tensor | None = None

    def add(self, index: torch.Tensor, weights: torch.Tensor | None) -> None:
        index = index.reshape(-1, index.shape[-1]).long()
        self.last_index = index
        self.tokens += index.shape[0]
        flat = index.flatten()
        self.counts += torch.bincount(flat, minlength=self.moe.num_experts)[: self.moe.num_experts].double()
        if weights is not None:
            self.weight_sums.index_add_(0, flat, weights.reshape(-1).double())
        routed = torch.zeros(index.shape[0], self.moe.num_experts, dtype=torch.float64)
        routed.scatter_(1, index.clamp(max=self.moe.num_experts - 1), 1.0)
        self.coactivation += routed.T @ routed

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


class _MomentSums:
    """Running sums of squared inputs ``[E, in]`` and row counts, per input stream."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}

    def add(self, stream: str, experts: torch.Tensor, inputs: torch.Tensor) -> None:
        squared = inputs.detach().reshape(-1, inputs.shape[-1]).double().square().cpu()
        experts = experts.cpu()
        if stream not in self.sums:
            self.sums[stream] = torch.zeros(self.num_experts, squared.shape[1],
                                            dtype=torch.float64)
            self.rows[stream] = torch.zeros(self.num_experts, dtype=torch.float64)
        self.sums[stream].index_add_(0, experts, squared)
        self.rows[stream].index_add_(0, experts, torch.ones(experts.shape, dtype=torch.float64))

    def moments(self, expert: int, streams: dict[str, str]) -> InputMoments:
        """The expert's moments; ``streams`` maps matrix roles to the stream they read."""
        rows = {stream: float(count[expert]) for stream, count in self.rows.items()}
        means = {stream: (total[expert] / max(rows[stream], 1.0)).numpy()
                 for stream, total in self.sums.items()}
        return InputMoments({role: means[stream] for role, stream in streams.items()
                             if stream in means}, int(max(rows.values(), default=0.0)))


def _gating(module: nn.Module, gated: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from a fused experts module's (gate_)up projection to the down projection's
    input: its ``_apply_gate`` (custom or transformers' default ``act(gate) * up``), else
    ``act_fn(gate) * up`` (``act_fn(up)`` without a gate); None if it has neither."""
    apply_gate = getattr(module, "_apply_gate", None)
    act_fn = getattr(module, "act_fn", None)
    if gated and callable(apply_gate):
        return apply_gate
    if not callable(act_fn):
        return None
    if not gated:
        return act_fn

    def gate_times_up(projected: torch.Tensor) -> torch.Tensor:
        gate, up = projected.chunk(2, dim=-1)
        return act_fn(gate) * up
    return gate_times_up


def _intermediate(module: nn.Module, inputs: torch.Tensor, experts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(experts, act(gate x) * (up x))`` of a fused experts module for routed rows ``inputs``
    (rows reordered by expert), from the module's weights; None if it has no activation."""
    gate_up = getattr(module, "gate_up_proj", None)
    weights = gate_up if gate_up is not None else getattr(module, "up_proj", None)
    gating = _gating(module, gate_up is not None)
    if not isinstance(weights, torch.Tensor) or gating is None:
        return None
    bias = getattr(module, "gate_up_proj_bias" if gate_up is not None else "up_proj_bias", None)
    transposed = bool(getattr(module, "is_transposed", False))
    order = torch.argsort(experts, stable=True)
    present, counts = torch.unique_consecutive(experts[order], return_counts=True)
    parts = []
    for expert, rows in zip(present.tolist(), inputs[order].split(counts.tolist()), strict=True):
        projected = rows @ (weights[expert] if transposed else weights[expert].T)
        if isinstance(bias, torch.Tensor):
            projected = projected + bias[expert]
        parts.append(gating(projected))
    return experts[order], torch.cat(parts)


class _MomentCollector:
    """Rule 5: forward pre-hooks that add the routed tokens' squared inputs to sums."""

    def __init__(self, moe: MoeLayer, counter: _RoutingCounter, experts: list[Node]) -> None:
        self.moe = moe
        self.counter = counter
        self.experts = experts
        self.sums = _MomentSums(moe.num_experts)
        roles = [m.role for m in experts[0].matrices]
        #: matrix role -> input stream; gate and up of fused experts share the hidden states
        self.streams = ({role: "down" if role == "down" else "hidden" for role in roles}
                        if moe.layout.startswith("fused") else {role: role for role in roles})

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        if self.moe.layout.startswith("fused"):
            module = model.get_submodule(self.moe.experts_module)
            return [module.register_forward_pre_hook(self.fused_hook, with_kwargs=True)]
        return [model.get_submodule(m.key).register_forward_pre_hook(
                    partial(self.linear_hook, node.expert, m.role))
                for node in self.experts for m in node.matrices]

    def fused_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        if hidden is None or index is None:
            return
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1).long()
        token = torch.arange(hidden.shape[0], device=hidden.device)
        token = token.repeat_interleave(index.shape[1])
        experts = index.reshape(-1)
        routed = (experts >= 0) & (experts < self.moe.num_experts)  # drop sentinel indices
        token, experts = token[routed], experts[routed]
        inputs = hidden[token]
        self.sums.add("hidden", experts, inputs)
        intermediate = _intermediate(module, inputs, experts)
        if intermediate is not None:
            self.sums.add("down", *intermediate)

    def linear_hook(self, expert: int, role: str, _module: nn.Module, args: tuple[Any, ...]
                    ) -> None:
        inputs = args[0].reshape(-1, args[0].shape[-1])
        routing = self.counter.last_index
        if routing is not None and routing.shape[0] == inputs.shape[0]:
            inputs = inputs[(routing.to(inputs.device) == expert).any(dim=-1)]
        self.sums.add(role, torch.full((inputs.shape[0],), expert), inputs)


@dataclass(frozen=True)
class DensityPass:
    name: ClassVar[str] = "density"
    description: ClassVar[str] = "activation density per node from calibration tokens"

    calib: str | None = None
    calib_tokens: int = 4096
    seq_len: int = 256
    batch: int = 8
    stream: Literal["auto", "on", "off"] = "auto"
    moments: bool = True

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
        counters, collectors = self._calibrate(graph, ctx)
        for layer, counter in counters.items():
            if counter.tokens == 0:
                continue
            for node in graph.experts(layer):
                e = node.expert
                assert e is not None
                count = float(counter.counts[e])
                mean_weight = float(counter.weight_sums[e]) / count if count else 0.0
                node.annotate(Density(count / counter.tokens, "calibration", counter.tokens, mean_weight))
                if layer in collectors and collectors[layer].sums.sums:
                    node.annotate(collectors[layer].sums.moments(e, collectors[layer].streams))
        graph.annotate(Coactivation({layer: c.coactivation.numpy() for layer, c in counters.items()
                                     if c.tokens}))
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

    def _calibrate(self, graph: Graph, ctx: CompileContext
                   ) -> tuple[dict[int, _RoutingCounter], dict[int, _MomentCollector]]:
        streamed = self._streams(ctx)
        model = ctx.model.module if streamed else ctx.model.runnable()
        tokens = load_tokens(ctx.model, self.calib, "calib", self.calib_tokens)
        counters = {layer: _RoutingCounter(moe) for layer, moe in graph.moe_layers.items()}
        collectors = {layer: _MomentCollector(moe, counters[layer], graph.experts(layer))
                      for layer, moe in graph.moe_layers.items()} if self.moments else {}
        handles: list[RemovableHandle] = []
        try:
            for collector in collectors.values():
                handles.extend(collector.attach(model))
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
                return counters, collectors
            with torch.no_grad():
                for chunk in chunks:
                    model(chunk)
                    advance(1)
        finally:
            for handle in handles:
                handle.remove()
        return counters, collectors
