"""The ``ort`` MoE form: one onnxruntime ``com.microsoft.MoE`` node per MoE block that fits.

onnxruntime's MoE operator (CPU kernel, onnxruntime >= 1.22) takes the router's logits,
applies ``softmax``, picks the top ``k`` experts per token (optionally renormalising their
weights to sum 1) and runs each picked expert as ``fc2(swiglu(fc1 x))`` on the routed tokens
only. Its CPU kernel needs the interleaved SwiGLU layout: ``fc1 [E, 2I, H]`` with rows
``gate_0, up_0, gate_1, up_1, ...``; ``fc2 [E, H, I]``. With ``activation_alpha = 1`` and
``activation_beta = 0`` its ``swiglu`` is ``silu(gate) * up``.

Rules:

1. A *block* is the parent module of a routed experts store (``<block>.<experts>``). It
   fits when it returns one tensor, and replacing its forward by ``logits = router(x)``
   (its child with a 2-D ``weight [E, H]`` and optional bias, applied with ``F.linear``)
   then ``MoE(x, logits)`` reproduces its recorded output, with renormalised top-k weights
   or without (whichever reproduces). The store must have a gate, no biases, no identity
   experts and no post-expert norm. A block that does not fit keeps the ``dispatch`` form;
   the reason is reported (the export's ``fallbacks``).
2. The router module is kept under its own name, so its weight keeps its name and its
   ``hetmap.*`` tags. The experts become two stacked initializers,
   ``<experts path>.fc1_experts_weights`` and ``<experts path>.fc2_experts_weights``.
3. The MoE node carries ``hetmap.moe_experts``: a JSON list with one entry per expert,
   ``{"expert": e, "matrices": {role: that matrix's hetmap.* tags}}`` (``hetmap.tiles``
   included, as JSON text), ``hetmap.experts_module`` (the store's path) and ``hetmap.layer``
   where the experts' tags give one.
   Crossbar tiles are not lowered inside the fused operator (``--onnx-tiles`` leaves them
   in this metadata).
4. The PyTorch side is the custom operator ``hetmap::ort_moe`` (the same computation in
   PyTorch), translated to ``com.microsoft.MoE`` by :data:`TRANSLATIONS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnxscript.values import Op, Opset
from torch import nn

from hetmap.runtime.layouts import ExpertLayout, canonical

MOE_EXPERTS_TAG = "hetmap.moe_experts"


def _moe_schema() -> onnx.defs.OpSchema:
    """The part of onnxruntime's MoE schema the export uses (onnx registers none for it)."""
    schema, option = onnx.defs.OpSchema, onnx.defs.OpSchema.FormalParameterOption
    inputs = [schema.FormalParameter(name, "T", param_option=option.Optional
                                     if name.endswith("_bias") else option.Single)
              for name in ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias",
                           "fc2_experts_weights", "fc2_experts_bias")]
    attributes = [schema.Attribute(name, kind, "") for name, kind in (
        ("k", schema.AttrType.INT), ("activation_type", schema.AttrType.STRING),
        ("swiglu_fusion", schema.AttrType.INT), ("normalize_routing_weights", schema.AttrType.INT),
        ("activation_alpha", schema.AttrType.FLOAT), ("activation_beta", schema.AttrType.FLOAT))]
    return schema("MoE", "com.microsoft", 1, inputs=inputs,
                  outputs=[schema.FormalParameter("output", "T")],
                  type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
                  attributes=attributes)


_MOE = Op(Opset("com.microsoft", 1), "MoE", _moe_schema())


@torch.library.custom_op("hetmap::ort_moe", mutates_args=())
def ort_moe(hidden: torch.Tensor, logits: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor,
            k: int, normalize: bool) -> torch.Tensor:
    """softmax top-k routing and interleaved SwiGLU experts, as onnxruntime's MoE computes."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    output = torch.zeros_like(hidden)
    for expert in range(fc1.shape[0]):
        token, slot = torch.where(index == expert)
        fused = F.linear(hidden.index_select(0, token), fc1[expert])
        routed = F.linear(F.silu(fused[:, 0::2]) * fused[:, 1::2], fc2[expert])
        output = output.index_add(0, token, routed * weights[token, slot].unsqueeze(-1).to(routed.dtype))
    return output


@ort_moe.register_fake
def _ort_moe_shape(hidden: torch.Tensor, logits: torch.Tensor, fc1: torch.Tensor,
                   fc2: torch.Tensor, k: int, normalize: bool) -> torch.Tensor:
    return torch.empty_like(hidden)


def _ort_moe_onnx(hidden, logits, fc1, fc2, k: int, normalize: bool):  # type: ignore[no-untyped-def]
    return _MOE(hidden, logits, fc1, None, fc2, k=k, activation_type="swiglu",
                     swiglu_fusion=1, normalize_routing_weights=int(normalize),
                     activation_alpha=1.0, activation_beta=0.0)


#: custom_translation_table entries for ``torch.onnx.export``
TRANSLATIONS = {torch.ops.hetmap.ort_moe.default: _ort_moe_onnx}


class FusedExperts(nn.Module):
    """The stacked ``fc1``/``fc2`` initializers of one experts store (rule 2)."""

    def __init__(self, store: nn.Module, layout: ExpertLayout) -> None:
        super().__init__()
        experts = canonical(store, layout)
        gate, up = experts.weights["gate"], experts.weights["up"]
        interleaved = torch.stack((gate, up), dim=2).reshape(gate.shape[0], -1, gate.shape[2])
        self.fc1_experts_weights = nn.Parameter(interleaved.detach().contiguous(), requires_grad=False)
        self.fc2_experts_weights = nn.Parameter(
            experts.weights["down"].detach().contiguous(), requires_grad=False)


class OrtMoeBlock(nn.Module):
    """Stand-in for a MoE block that fits rule 1: router, then ``hetmap::ort_moe``."""

    def __init__(self, router_name: str, router: nn.Module, experts_name: str,
                 experts: FusedExperts, top_k: int, normalize: bool) -> None:
        super().__init__()
        self.add_module(router_name, router)
        self.add_module(experts_name, experts)
        self.router_name, self.experts_name = router_name, experts_name
        self.top_k, self.normalize = top_k, normalize

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        router = self.get_submodule(self.router_name)
        experts = self.get_submodule(self.experts_name)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = F.linear(hidden, router.get_parameter("weight"), getattr(router, "bias", None))
        output = ort_moe(hidden, logits, experts.fc1_experts_weights,
                         experts.fc2_experts_weights, self.top_k, self.normalize)
        return output.reshape(hidden_states.shape)


def misfit(store: nn.Module, layout: ExpertLayout) -> str | None:
    """Why the store's experts cannot be the MoE operator's (rule 1), None if they can."""
    if layout.call != "routed":
        return f"its experts take {layout.call} inputs, not routed tokens"
    if not layout.has_gate:
        return "its experts have no gate (the operator's CPU kernel needs SwiGLU)"
    if layout.biases:
        return "its experts have biases"
    if layout.identity_experts:
        return "it has identity experts"
    if layout.post_norm:
        return "its experts have a post-expert norm"
    return None


def router_of(block: nn.Module, experts_name: str, num_experts: int,
              hidden: int) -> tuple[str, nn.Module] | None:
    """The block's child with a 2-D ``weight [num_experts, hidden]`` (rule 1)."""
    for name, child in block.named_children():
        weight = child._parameters.get("weight")
        if name != experts_name and weight is not None and tuple(weight.shape) == (num_experts, hidden):
            return name, child
    return None


def tag_moe_nodes(model: ir.Model, stores: Mapping[str, int],
                  matrix_tags: Mapping[str, Mapping[str, str]]) -> dict[str, tuple[str, ...]]:
    """Rule 3 on every MoE node; returns matrix key -> the MoE node's name."""
    by_initializer = {f"{path}.fc1_experts_weights": (path, experts) for path, experts in stores.items()}
    nodes_by_key: dict[str, tuple[str, ...]] = {}
    for node in model.graph:
        if node.domain != "com.microsoft" or node.op_type != "MoE" or len(node.inputs) < 3:
            continue
        fc1 = node.inputs[2]
        if fc1 is None or fc1.name not in by_initializer:
            continue
        path, num_experts = by_initializer[fc1.name]
        entries, layers = [], set()
        for expert in range(num_experts):
            matrices = {}
            for role in ("gate", "up", "down"):
                key = f"{path}.{expert}.{role}"
                if key in matrix_tags:
                    matrices[role] = dict(matrix_tags[key])
                    layers.add(matrix_tags[key].get("hetmap.layer"))
                    nodes_by_key[key] = (node.name or "",)
            entries.append({"expert": expert, "matrices": matrices})
        node.metadata_props[MOE_EXPERTS_TAG] = json.dumps(entries)
        node.metadata_props["hetmap.experts_module"] = path
        if len(layers) == 1 and None not in layers:
            node.metadata_props["hetmap.layer"] = str(layers.pop())
    return nodes_by_key
