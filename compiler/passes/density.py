"""``density``: activation density of every matrix node.

Reads: the graph's MoE layers, the model (weights, if any). Writes: :class:`Density` on every
node with matrices, and on embeddings.

Rules:

1. Dense modules (attention, router, shared experts, dense FFNs, linears, LM head) and
   embeddings compute on every token: density 1.0, source ``structural``.
2. A routed expert's density is the fraction of calibration tokens routed to it; over one
   layer the densities sum to top-k (less what goes to identity experts). Counted from the
   chosen top-k indices: a forward pre-hook on a stacked experts module (any layout but
   ``modulelist``) called ``routed`` sees ``(hidden, top_k_index, top_k_weights)``; otherwise
   a hook on the router turns its output into the same: integer indices (and weights of
   their shape); for ``dense-input`` experts (Llama 4) the routing scores ``[T, slots]``
   that are zero where an expert is not chosen; else logits -> softmax -> top-k. Indices
   outside the experts with weights (identity experts, sentinels) count for no expert. A
   token counts once for an expert its top-k names twice (DeepSeek-V4's hash routing can);
   its weights for that expert add up. The
   expert's mean routing weight (over the tokens routed to it) is recorded too, and per
   layer the co-activation counts (tokens routed to both experts i and j) as a graph-level
   :class:`Coactivation`. Hooks are removed afterwards. A layer that saw no routing
   decision is an error naming it, never a zero density.
3. Calibration text: ``calib`` (a file) or the default corpus' calibration split, at most
   ``calib_tokens`` tokens, in windows of ``seq_len``.
   A checkpoint is run streamed, one leaf module at a time (see
   :mod:`hetmap.compiler.data.streaming`), when ``stream=on``, or with ``stream=auto`` when its
   files are larger than half of the machine's memory; otherwise it is loaded whole.
4. A model without weights gets, for each expert, the uniform-routing assumption
   ``top_k / E`` (source ``uniform-assumption``); policies that need measured densities refuse it.
5. With ``moments=true`` (the default) each routed expert also gets :class:`InputMoments`:
   ``E[x_j^2]`` of each of its matrices' inputs over the tokens routed to it. Stacked
   experts: the experts module's pre-hook takes the routed tokens' rows of its input (input
   of gate and up; for ``dense-input`` experts the rows of the chosen experts' blocks, already
   scaled by the routing score) and computes the down projection's input from the module's
   canonical weights and gating (:func:`hetmap.runtime.layouts.canonical`: biases, transposed
   or interleaved storage, custom ``_apply_gate``, gate-less experts). Per-expert
   (ModuleList) experts: a pre-hook on every expert linear; when a linear sees every token of
   the batch (dense dispatch) only the rows routed to its expert (by the router hook of
   rule 2) are counted.
6. Per-expert (ModuleList) experts called on their routed rows only: the rows each expert's
   first matrix computes on are counted too, and they are its density (they include what the
   router hook cannot see: capacity limits that drop tokens, as Switch Transformers').
   Experts that compute on more rows per token than the layer's top-k are an error: the
   model does not dispatch as its router routes (transformers' NLLB-MoE sends every token
   to experts 0 and 1 only), and no density can describe it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hetmap.common.errors import PassError
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.ir.annotations import Coactivation, Density, InputMoments, Traced
from hetmap.compiler.ir.graph import DENSE_KINDS, Graph, MoeLayer, Node, NodeKind
from hetmap.compiler.passes.base import CompileContext, PassResult
from hetmap.runtime.layouts import CanonicalExperts, ExpertLayout, canonical, sized_stacks


class _RoutingCounter:
    def __init__(self, moe: MoeLayer, layout: ExpertLayout | None = None) -> None:
        self.moe = moe
        #: experts that never see indices (Llama 4): count from the router's scores
        self.dense_input = layout is not None and layout.call == "dense-input"
        self.counts = torch.zeros(moe.num_experts, dtype=torch.float64)
        self.weight_sums = torch.zeros(moe.num_experts, dtype=torch.float64)
        #: tokens routed to both experts i and j (diagonal: to i)
        self.coactivation = torch.zeros(moe.num_experts, moe.num_experts, dtype=torch.float64)
        self.tokens = 0
        #: the last batch's routing ``[T, k]`` (read by the moment hooks)
        self.last_index: torch.Tensor | None = None

    def add(self, index: torch.Tensor, weights: torch.Tensor | None) -> None:
        experts = self.moe.num_experts
        index = index.reshape(-1, index.shape[-1]).long().cpu()
        self.last_index = index
        self.tokens += index.shape[0]
        valid = (index >= 0) & (index < experts)  # not identity experts or sentinels
        if weights is not None:
            chosen = weights.detach().reshape(index.shape).cpu()[valid]
            self.weight_sums.index_add_(0, index[valid], chosen.double())
        routed = torch.zeros(index.shape[0], experts + 1, dtype=torch.float64)
        routed.scatter_(1, torch.where(valid, index, experts), 1.0)  # an expert once per token
        routed = routed[:, :experts]
        self.counts += routed.sum(dim=0)
        self.coactivation += routed.T @ routed

    def pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
        if index is not None:
            self.add(index, weights)

    def router_hook(self, _module: nn.Module, _args: Any, output: Any) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
        index = next((t for t in tensors if not t.is_floating_point()), None)
        if index is not None:
            weights = next((t for t in tensors if t.is_floating_point() and t.shape == index.shape),
                           None)
            self.add(index, weights)
            return
        if self.dense_input:
            self._add_scores(tensors)
            return
        logits = tensors[0].float()
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        weights, index = torch.topk(probs, self.moe.top_k, dim=-1)
        self.add(index, weights)

    def _add_scores(self, tensors: list[torch.Tensor]) -> None:
        """Routing scores ``[T, slots]``, zero where an expert is not chosen (Llama 4)."""
        top_k = self.moe.top_k
        for scores in tensors:
            if not scores.is_floating_point() or scores.shape[-1] < self.moe.num_experts:
                continue
            scores = scores.detach().reshape(-1, scores.shape[-1])
            if scores.shape[0] and int(scores.ne(0).sum(-1).max()) > top_k:
                continue
            weights, index = torch.topk(scores, top_k, dim=-1)
            self.add(torch.where(weights != 0, index, -1), weights)
            return
        raise PassError(
            f"MoE layer {self.moe.layer}: router {self.moe.router!r} returns no routing scores "
            f"[tokens, experts] with at most top-k ({top_k}) nonzero per token, which its "
            f"dense-input experts {self.moe.experts_module!r} need to count routing")


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


def _down_inputs(experts: CanonicalExperts, inputs: torch.Tensor, expert: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts, down's input)`` of routed rows ``inputs`` (reordered by expert), computed from
    the canonical weights, biases and gating of the experts module."""
    order = torch.argsort(expert, stable=True)
    present, counts = torch.unique_consecutive(expert[order], return_counts=True)
    parts = []
    for e, rows in zip(present.tolist(), inputs[order].split(counts.tolist()), strict=True):
        projected = {role: nn.functional.linear(rows, experts.weights[role][e],
                                                experts.biases[role][e] if role in experts.biases
                                                else None)
                     for role in experts.layout.roles if role != "down"}
        parts.append(experts.activation(projected.get("gate"), projected["up"]))
    return expert[order], torch.cat(parts)


class _MomentCollector:
    """Rule 5: forward pre-hooks that add the routed tokens' squared inputs to sums."""

    def __init__(self, moe: MoeLayer, counter: _RoutingCounter, experts: list[Node],
                 layout: ExpertLayout | None) -> None:
        self.moe = moe
        self.counter = counter
        self.experts = experts
        self.layout = layout  # None: per-expert (ModuleList) experts
        self.sums = _MomentSums(moe.num_experts)
        roles = [m.role for m in experts[0].matrices]
        #: matrix role -> input stream; gate and up of stacked experts share the hidden states
        self.streams = ({role: "down" if role == "down" else "hidden" for role in roles}
                        if layout is not None else {role: role for role in roles})

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        if self.layout is not None and self.layout.call == "sizes":
            inner, outer = sized_stacks(self.layout)
            block = self.moe.experts_module
            return [model.get_submodule(f"{block}.{child}").register_forward_pre_hook(
                        partial(self.sized_hook, stream))
                    for child, stream in ((inner, "hidden"), (outer, "down"))]
        if self.layout is not None:
            module = model.get_submodule(self.moe.experts_module)
            return [module.register_forward_pre_hook(self.stacked_hook, with_kwargs=True)]
        return [model.get_submodule(m.key).register_forward_pre_hook(
                    partial(self.linear_hook, node.expert, m.role))
                for node in self.experts for m in node.matrices]

    def _routed_rows(self, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows of hidden, their experts)`` for every routed (token, expert) pair."""
        assert self.layout is not None
        if self.layout.call == "dense-input":  # block e of T rows is expert e's input
            index = self.counter.last_index
            if index is None or hidden.shape[0] % index.shape[0]:
                return None
            tokens = index.shape[0]
        else:
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            if index is None:
                return None
            tokens = hidden.shape[0]
            index = index.reshape(tokens, -1)
        index = index.long().to(hidden.device)
        token = torch.arange(tokens, device=hidden.device).repeat_interleave(index.shape[1])
        expert = index.reshape(-1)
        experts = self.moe.num_experts
        routed = (expert >= 0) & (expert < experts)  # drop identity, sentinels
        pairs = torch.unique(token[routed] * experts + expert[routed])  # each pair once
        token, expert = pairs // experts, pairs % experts
        rows = expert * tokens + token if self.layout.call == "dense-input" else token
        return rows, expert

    def stacked_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None or self.layout is None:
            return
        hidden = hidden.reshape(-1, hidden.shape[-1])
        routed = self._routed_rows(hidden, args, kwargs)
        if routed is None:
            return
        rows, expert = routed
        inputs = hidden[rows]
        self.sums.add("hidden", expert, inputs)
        self.sums.add("down", *_down_inputs(canonical(module, self.layout), inputs, expert))

    def sized_hook(self, stream: str, _module: nn.Module, args: tuple[Any, ...]) -> None:
        """A stack of a ``sizes`` layout: rows sorted by expert, then rows per expert."""
        if len(args) < 2 or not isinstance(args[0], torch.Tensor):
            return
        inputs = args[0].reshape(-1, args[0].shape[-1])
        sizes = torch.as_tensor(list(args[1]), dtype=torch.long)
        if int(sizes.sum()) != inputs.shape[0] or sizes.numel() != self.moe.num_experts:
            return
        self.sums.add(stream, torch.repeat_interleave(torch.arange(sizes.numel()), sizes), inputs)

    def linear_hook(self, expert: int, role: str, _module: nn.Module, args: tuple[Any, ...]
                    ) -> None:
        inputs = args[0].reshape(-1, args[0].shape[-1])
        routing = self.counter.last_index
        if routing is not None and routing.shape[0] == inputs.shape[0]:
            inputs = inputs[(routing.to(inputs.device) == expert).any(dim=-1)]
        self.sums.add(role, torch.full((inputs.shape[0],), expert), inputs)


class _DispatchCheck:
    """Rule 6: the rows each per-expert module actually computes on."""

    def __init__(self, moe: MoeLayer, experts: list[Node]) -> None:
        self.moe = moe
        self.first = {node.expert: node.matrices[0].key for node in experts
                      if node.expert is not None and node.matrices}
        self.rows = torch.zeros(moe.num_experts, dtype=torch.float64)

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return [model.get_submodule(key).register_forward_pre_hook(partial(self.hook, expert))
                for expert, key in self.first.items()]

    def hook(self, expert: int, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.rows[expert] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

    def settle(self, counter: _RoutingCounter) -> None:
        """Replace the router's counts by the rows computed, or refuse the layer."""
        tokens = counter.tokens
        if not tokens or len(self.first) != self.moe.num_experts or not self.rows.any() \
                or bool((self.rows == tokens).all()):
            return  # not observed, or dense dispatch: every expert sees every token
        per_token = float(self.rows.sum()) / tokens
        if per_token > self.moe.top_k + 1e-9:
            raise PassError(
                f"MoE layer {self.moe.layer}: its experts ({self.moe.experts_module!r}) compute "
                f"on {per_token:.2f} rows per token, more than the top-{self.moe.top_k} its router "
                "chooses: the model does not dispatch tokens the way its router routes them, so "
                "no routing density describes it")
        counter.counts = self.rows.clone()


def _layout(model: nn.Module, moe: MoeLayer) -> ExpertLayout | None:
    """The storage layout of a stacked experts module (read on shapes: meta models too)."""
    if moe.layout == "modulelist":
        return None
    from hetmap.runtime.experts import routed_layout

    return routed_layout(model.get_submodule(moe.experts_module), moe.experts_module,
                         model.get_submodule(moe.router))


@dataclass(frozen=True)
class DensityPass:
    name: ClassVar[str] = "density"
    description: ClassVar[str] = "activation density per node from calibration tokens"
    requires: ClassVar[tuple[type, ...]] = ()
    provides: ClassVar[tuple[type, ...]] = (Density, InputMoments, Coactivation)

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
            graph.annotate(Coactivation({}))
            return PassResult(graph, True)
        if not ctx.model.has_weights:
            for layer, moe in graph.moe_layers.items():
                for node in graph.experts(layer):
                    node.annotate(Density(moe.top_k / moe.num_experts, "uniform-assumption"))
            graph.annotate(Coactivation({}))
            return PassResult(graph, True, ["no weights: expert densities assume uniform routing"])
        counters, collectors, dispatch = self._calibrate(graph, ctx)
        for layer, check in dispatch.items():
            check.settle(counters[layer])
        missing = [f"{layer} ({graph.moe_layers[layer].experts_module})"
                   for layer, counter in counters.items() if counter.tokens == 0]
        if missing:
            raise PassError(f"no routing decisions observed in MoE layer(s) {', '.join(missing)} "
                            "on the calibration tokens: their router or experts were never called "
                            "in a way hetmap can count")
        for layer, counter in counters.items():
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
        used = max((c.tokens for c in counters.values()), default=0)
        if used < self.calib_tokens:
            ctx.log(f"warning: calibrated on {used} tokens, fewer than calib_tokens="
                    f"{self.calib_tokens}: the calibration text is shorter (plan.json records "
                    "calib_tokens_used)")
        notes = [f"calibrated on {used} tokens"]
        return PassResult(graph, True, notes)

    def _streams(self, ctx: CompileContext) -> bool:
        from hetmap.compiler.data.streaming import streams

        return streams(ctx.model, self.stream)

    def _calibrate(self, graph: Graph, ctx: CompileContext
                   ) -> tuple[dict[int, _RoutingCounter], dict[int, _MomentCollector],
                              dict[int, _DispatchCheck]]:
        streamed = self._streams(ctx)
        model = ctx.model.module if streamed else ctx.model.runnable()
        tokens = load_tokens(ctx.model, self.calib, "calib", self.calib_tokens)
        layouts = {layer: _layout(model, moe) for layer, moe in graph.moe_layers.items()}
        counters = {layer: _RoutingCounter(moe, layouts[layer])
                    for layer, moe in graph.moe_layers.items()}
        collectors = {layer: _MomentCollector(moe, counters[layer], graph.experts(layer),
                                              layouts[layer])
                      for layer, moe in graph.moe_layers.items()} if self.moments else {}
        dispatch = {layer: _DispatchCheck(moe, graph.experts(layer))
                    for layer, moe in graph.moe_layers.items() if layouts[layer] is None}
        handles: list[RemovableHandle] = []
        try:
            for collector in collectors.values():
                handles.extend(collector.attach(model))
            for check in dispatch.values():
                handles.extend(check.attach(model))
            for layer, moe in graph.moe_layers.items():
                counter = counters[layer]
                layout = layouts[layer]
                if layout is not None and layout.call == "routed":
                    experts = model.get_submodule(moe.experts_module)
                    handles.append(experts.register_forward_pre_hook(counter.pre_hook,
                                                                     with_kwargs=True))
                else:
                    router = model.get_submodule(moe.router)
                    handles.append(router.register_forward_hook(counter.router_hook))
            chunks = batches(tokens, self.seq_len, self.batch)
            advance = ctx.progress("calibrating" + (" (streamed)" if streamed else ""), len(chunks))
            if streamed:
                from hetmap.compiler.data.streaming import run_streamed
                from hetmap.compiler.data.weights import CheckpointWeights

                traced = graph.get(Traced)
                if traced is None:
                    raise PassError("streamed calibration needs the traced model, which the "
                                    "front end records on the graph; import the model again")
                gm, wrapped = traced.module, traced.wrapped
                assert ctx.model.checkpoint is not None
                run_streamed(gm, CheckpointWeights(ctx.model.checkpoint), chunks, wrapped=wrapped,
                             config=ctx.model.config, advance=advance)
                return counters, collectors, dispatch
            with torch.no_grad():
                for chunk in chunks:
                    model(chunk)
                    advance(1)
        finally:
            for handle in handles:
                handle.remove()
        return counters, collectors, dispatch
