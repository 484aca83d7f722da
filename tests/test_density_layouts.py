"""The density pass on expert layouts beyond the default fused one: routing counts and input
moments against a direct computation from the stored tensors.

Tiny random models from ``compiler.frontend.zoo`` (hidden 64, 8 experts, top-2, vocabulary
512), calibrated on 512 tokens of the default corpus; each check hooks the model itself and
recomputes what the pass should have recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from hetmap.common.errors import PassError
from hetmap.compiler.api import Plan, compile_model
from hetmap.compiler.data.textdata import batches, load_tokens
from hetmap.compiler.frontend.zoo import ZOO
from hetmap.compiler.ir.annotations import Density, InputMoments

CALIB = "density{calib_tokens=512,seq_len=128}"
Tensor = torch.Tensor


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dbrx_down_input(m: nn.Module, x: Tensor, e: int) -> Tensor:
    shape = (-1, m.ffn_hidden_size, m.hidden_size)
    gate, up = m.mlp.w1.view(shape)[e], m.mlp.v1.view(shape)[e]
    return m.mlp.activation_fn(x @ gate.T) * (x @ up.T)


def _chunked(m: nn.Module, projected: Tensor) -> Tensor:
    gate, up = projected.chunk(2, dim=-1)
    return m.act_fn(gate) * up


#: family -> down's input for rows ``x`` of expert ``e``, straight from the stored tensors
DOWN_INPUT: dict[str, Callable[[nn.Module, Tensor, int], Tensor]] = {
    "gpt_oss": lambda m, x, e: m._apply_gate(x @ m.gate_up_proj[e] + m.gate_up_proj_bias[e]),
    "llama4": lambda m, x, e: _chunked(m, x @ m.gate_up_proj[e]),
    "longcat_flash": lambda m, x, e: _chunked(m, F.linear(x, m.gate_up_proj[e])),
    "nemotron_h": lambda m, x, e: m.act_fn(F.linear(x, m.up_proj[e])),
    "dbrx": _dbrx_down_input,
}


@cache
def compiled(family: str) -> Plan:
    torch.manual_seed(0)
    config = ZOO[family].make_config()
    if family == "gpt_oss":
        config.swiglu_limit = 0.1  # the clamp of its custom gate really clamps
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return compile_model(model, pipeline=CALIB)


def _observed(plan: Plan) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per batch of the calibration run, for the first MoE layer: the experts' inputs as rows
    of (token, routed slot), the routing indices [T, k] and weights [T, k]."""
    moe = plan.graph.moe_layers[min(plan.graph.moe_layers)]
    model = plan.model.module
    experts, router = model.get_submodule(moe.experts_module), model.get_submodule(moe.router)
    inputs: list[Tensor] = []
    index: list[Tensor] = []
    weights: list[Tensor] = []

    def experts_hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        hidden = args[0].reshape(-1, args[0].shape[-1])
        if len(args) == 1:  # dense input: block e holds expert e's rows, scaled by its score
            hidden = hidden.view(-1, index[-1].shape[0], hidden.shape[-1]).transpose(0, 1)
            inputs.append(hidden.gather(1, index[-1][..., None].expand(-1, -1, hidden.shape[-1])))
            return
        inputs.append(hidden[:, None].expand(-1, args[1].shape[-1], -1))
        index.append(args[1].reshape(hidden.shape[0], -1))
        weights.append(args[2].reshape(hidden.shape[0], -1))

    def router_hook(_module: nn.Module, _args: object, output: tuple[Tensor, ...]) -> None:
        scores = output[0]  # Llama4Router: (scores [T, E], zero where not chosen; logits)
        top, chosen = torch.topk(scores, moe.top_k, dim=-1)
        index.append(chosen)
        weights.append(top)

    handles = [experts.register_forward_pre_hook(experts_hook)]
    if moe.layout.endswith("dense-input"):
        handles.append(router.register_forward_hook(router_hook))
    with torch.no_grad():
        for chunk in batches(load_tokens(plan.model, None, "calib", 512), 128, 8):
            model(chunk)
    for handle in handles:
        handle.remove()
    return inputs, index, weights


@pytest.mark.parametrize("family", sorted(DOWN_INPUT))
def test_routing_counts_and_moments_match_a_direct_computation(family: str) -> None:
    plan = compiled(family)
    layer = min(plan.graph.moe_layers)
    moe = plan.graph.moe_layers[layer]
    experts = plan.model.module.get_submodule(moe.experts_module)
    inputs, index, weights = (torch.cat(part) for part in _observed(plan))
    tokens = index.shape[0]
    nodes = plan.graph.experts(layer)
    densities = [node.get(Density) for node in nodes]
    assert all(d.source == "calibration" and d.tokens == tokens for d in densities)
    identity_share = float((index >= moe.num_experts).sum()) / tokens
    assert sum(d.value for d in densities) + identity_share == pytest.approx(moe.top_k)
    for node, density in zip(nodes, densities, strict=True):
        e = node.expert
        routed = index == e
        assert density.value == pytest.approx(float(routed.sum()) / tokens)
        if routed.any():
            assert density.mean_routing_weight == pytest.approx(float(weights[routed].mean()))
        rows = inputs[routed].double()
        moments = node.get(InputMoments)
        assert moments.tokens == rows.shape[0]
        if not rows.shape[0]:
            continue
        first = "gate" if "gate" in moments.second_moments else "up"
        torch.testing.assert_close(torch.from_numpy(moments.second_moments[first]),
                                   (rows**2).mean(0), rtol=1e-5, atol=1e-12)
        with torch.no_grad():
            down_input = DOWN_INPUT[family](experts, inputs[routed], e).double()
        torch.testing.assert_close(torch.from_numpy(moments.second_moments["down"]),
                                   (down_input**2).mean(0), rtol=1e-4, atol=1e-12)


def test_dense_input_counts_top_k_per_token_from_the_router() -> None:
    """Llama 4's experts never see indices: the counts come from the router's scores."""
    plan = compiled("llama4")
    for layer, moe in plan.graph.moe_layers.items():
        densities = [node.get(Density) for node in plan.graph.experts(layer)]
        assert sum(d.value for d in densities) == pytest.approx(moe.top_k)
        assert all(0.0 < d.mean_routing_weight < 1.0 for d in densities if d.value)


class _SilentRouter(nn.Module):
    """A top-k router whose output hides the routing (dense scores, no zeros)."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.inner = router
        self.weight = router.weight

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        scores, logits = self.inner(hidden_states)
        return logits, logits


def test_unreadable_dense_input_routing_is_an_error_naming_the_layer() -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ZOO["llama4"].make_config()).eval()
    for layer in model.model.layers:
        if hasattr(layer.feed_forward, "router"):
            layer.feed_forward.router = _SilentRouter(layer.feed_forward.router)
            moe_router = layer.feed_forward.router
    assert moe_router is not None
    with pytest.raises(PassError, match=r"MoE layer 1: router .*feed_forward\.router"):
        compile_model(model, pipeline=CALIB)
