"""ONNX export of every expert layout hetmap reads, Jamba's Mamba scan and DeepSeek-V3.2's ties.

Tiny random-weight models (hidden 64, 8 experts, top-2, vocabulary 512) exported with
``export_onnx`` directly (no hetmap front end): onnx.checker passes, onnxruntime equals
PyTorch within 1e-4 on two input shapes, and every expert matrix (and bias) has its own
initializer and its ``hetmap.*`` tags; one expert matrix per model is lowered to tiles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from hetmap.common.errors import EmitError
from hetmap.compiler.backends.onnx_export import ExportReport, export_onnx
from hetmap.compiler.backends.onnx_scan import selective_scan

VOCAB, HIDDEN, EXPERTS, TOP_K = 512, 64, 8, 2
EXAMPLE_SHAPE = (2, 7)
CHECK_SHAPES = [(1, 5), (3, 11)]
TOLERANCE = 1e-4
TILED_EXPERT = 1  # expert whose up matrix is lowered to tiles


# ---------------------------------------------------------------- models


def _zoo(family: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from hetmap.compiler.frontend.zoo import ZOO

    config = ZOO[family].make_config()
    if family == "dbrx":  # transformers 5.24 reads these although its config does not set them
        config.attn_config.rope_theta = 10000.0
        config.attn_config.clip_qkv = 8.0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases start at zero, which the ONNX optimizer folds away
        for name, parameter in model.named_parameters():
            if name.endswith("_bias"):
                parameter.normal_(0.0, 0.1)
    return model


class Step3p7LM(nn.Module):
    """Step-3.7's text model (no causal-LM class in transformers) with an LM head; its experts
    clamp gate and up in a custom ``_apply_gate`` (bound 0.05 here, so the clamp is active)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
        from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

        config = Step3p7TextConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
            n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=16,
            share_expert_dim=32, mlp_layer_types=["sparse", "sparse"], swiglu_limits=[0.05, 0.05], sliding_window=64)
        torch.manual_seed(0)
        self.model = Step3p7TextModel(config).eval()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids=input_ids).last_hidden_state)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "olmoe": lambda: _zoo("olmoe"),  # fused [E, 2I, H]
    "gpt_oss": lambda: _zoo("gpt_oss"),  # transposed, interleaved, biases, clamped SwiGLU
    "llama4": lambda: _zoo("llama4"),  # transposed, dense-input call
    "longcat_flash": lambda: _zoo("longcat_flash"),  # identity (zero) experts
    "dbrx": lambda: _zoo("dbrx"),  # flat 2-D stacks w1/v1/w2
    "nemotron_h": lambda: _zoo("nemotron_h"),  # gate-less up_proj/down_proj
    "aria": lambda: _zoo("aria"),  # transposed, concatenated
    "step3p7": Step3p7LM,  # custom _apply_gate
}


def experts_stores(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Experts module path -> its expert roles, found by name (independent of the exporter)."""
    stores = {}
    for path, module in model.named_modules():
        if path.endswith(".experts") and not path.endswith("shared_experts"):
            gate_less = "up_proj" in module._parameters and "gate_up_proj" not in module._parameters
            stores[path] = ("up", "down") if gate_less else ("gate", "up", "down")
    return stores


def expert_keys(model: nn.Module) -> list[str]:
    return [f"{path}.{e}.{role}" for path, roles in experts_stores(model).items()
            for e in range(EXPERTS) for role in roles]


def matrix_tags(model: nn.Module) -> dict[str, dict[str, str]]:
    """Tags for every 2-D-weight module (linears, routers) and every expert matrix."""
    linear = [path for path, module in model.named_modules()
              if isinstance(module._parameters.get("weight"), torch.Tensor)
              and module._parameters["weight"].dim() == 2 and not isinstance(module, nn.Embedding)]
    tags = {key: {"hetmap.node": key, "hetmap.placement": "digital", "hetmap.matrix": "weight"}
            for key in linear}
    for key in expert_keys(model):
        path, _, role = key.rpartition(".")
        tags[key] = {"hetmap.node": key, "hetmap.placement": "aimc-tile", "hetmap.matrix": role,
                     "hetmap.expert": path.rpartition(".")[2]}
    return tags


def tile_grid(in_features: int, out_features: int) -> list[tuple[int, int, int, int]]:
    """2 x 2 uneven tiles (rows = inputs, cols = outputs)."""
    row_cut, col_cut = in_features // 3, out_features // 2
    return [(r0, r1, c0, c1) for c0, c1 in ((0, col_cut), (col_cut, out_features))
            for r0, r1 in ((0, row_cut), (row_cut, in_features))]


class Exported:
    def __init__(self, name: str, model: nn.Module, report: ExportReport,
                 tags: dict[str, dict[str, str]], tiled: str) -> None:
        self.name, self.model, self.report, self.tags, self.tiled = name, model, report, tags, tiled
        self.proto = onnx.load(str(report.path))


@pytest.fixture(scope="module", params=[(name, form) for name in MODELS
                                         for form in ("static", "dispatch")],
                ids=lambda param: "-".join(param))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """One export per family and MoE form (15-40 s each on 2 cores)."""
    name, form = request.param
    model = MODELS[name]()
    tags = matrix_tags(model)
    first_store = next(iter(experts_stores(model)))
    tiled = f"{first_store}.{TILED_EXPERT}.up"
    in_features = HIDDEN if name != "nemotron_h" else _input_width(model, first_store)
    out_features = _up_width(model, first_store)
    example = torch.randint(0, VOCAB, EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(1))
    report = export_onnx(
        model, tmp_path_factory.mktemp(name) / "model.onnx", matrix_tags=tags,
        model_props={"hetmap.version": "test"}, example_input=example,
        tile_ranges={tiled: tile_grid(in_features, out_features)}, moe_form=form)
    return Exported(name, model, report, tags, tiled)


def _input_width(model: nn.Module, store: str) -> int:
    return int(model.get_submodule(store).down_proj.shape[1])


def _up_width(model: nn.Module, store: str) -> int:
    """Intermediate size of the experts in ``store``, from any stored tensor."""
    module = model.get_submodule(store)
    down = getattr(module, "down_proj", None)
    if isinstance(down, torch.Tensor):
        hidden = _input_width(model, store) if "up_proj" in module._parameters else HIDDEN
        return int(down.shape[2] if down.shape[1] == hidden else down.shape[1])
    return int(module.mlp.w1.shape[0]) // EXPERTS  # DBRX: [E * I, H]


# ---------------------------------------------------------------- checks


@pytest.mark.slow
def test_checker_and_onnxruntime_match_pytorch(exported: Exported) -> None:
    onnx.checker.check_model(exported.proto, full_check=True)
    assert exported.report.max_difference is not None
    assert exported.report.max_difference <= TOLERANCE
    session = ort.InferenceSession(str(exported.report.path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    for shape in CHECK_SHAPES:
        input_ids = torch.randint(0, VOCAB, shape, generator=generator)
        with torch.no_grad():
            output = exported.model(input_ids)
        expected = getattr(output, "logits", output).numpy()
        (actual,) = session.run(None, {"input_ids": input_ids.numpy()})
        np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_every_expert_matrix_has_initializer_and_tags(exported: Exported) -> None:
    report = exported.report
    assert list(report.swapped_experts) == list(experts_stores(exported.model))
    assert not report.untagged_nodes and not report.missing_keys
    initializers = {init.name for init in exported.proto.graph.initializer}
    tagged: dict[str, list[dict[str, str]]] = {}
    for node in exported.proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props if p.key.startswith("hetmap.")}
        if props:
            tagged.setdefault(props["hetmap.node"], []).append(props)
    has_bias = exported.name == "gpt_oss"
    for key in expert_keys(exported.model):
        if key == exported.tiled:
            assert {f"{key}.tiles.{i}" for i in range(4)} <= initializers
        else:
            assert f"{key}.weight" in initializers, key
        assert (f"{key}.bias" in initializers) == has_bias, key
        found = tagged.get(key)
        assert found, f"{key}: no tagged node"
        expected = exported.tags[key]
        assert all({k: v for k, v in t.items() if k != "hetmap.tile"} == expected for t in found)


@pytest.mark.slow
def test_tiled_expert_matrix(exported: Exported) -> None:
    tiles = [json.loads(props.value) for node in exported.proto.graph.node
             for props in node.metadata_props if props.key == "hetmap.tile"]
    assert len(tiles) == exported.report.tile_nodes == 4
    assert exported.report.tiled_keys == (exported.tiled,)


@pytest.mark.slow
def test_caller_model_is_untouched(exported: Exported) -> None:
    fresh = MODELS[exported.name]()
    assert [type(m) for m in fresh.modules()] == [type(m) for m in exported.model.modules()]
    expected, actual = fresh.state_dict(), exported.model.state_dict()
    assert list(expected) == list(actual)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


# ---------------------------------------------------------------- post-expert norm (hand-made)


def test_post_expert_norm_store(tmp_path: Path) -> None:
    """A transformers-decorated store with ``has_post_expert_norm``; exported per expert."""
    report = export_onnx(PostNormLM(), tmp_path / "m.onnx", matrix_tags={}, model_props={})
    assert report.swapped_experts == ("experts",)
    names = {init.name for init in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert {"experts.0.gate.weight", "experts.3.down.weight", "experts.post_expert_norm.weight"} <= names
    assert report.max_difference is not None and report.max_difference < TOLERANCE


class PostNormLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.integrations.moe import use_experts_implementation

        @use_experts_implementation(has_post_expert_norm=True)
        class NormedExperts(nn.Module):
            def __init__(self, config: object) -> None:
                super().__init__()
                self.gate_up_proj = nn.Parameter(torch.randn(4, 32, 24) * 0.2)
                self.down_proj = nn.Parameter(torch.randn(4, 24, 16) * 0.2)
                self.act_fn = nn.SiLU()
                self.post_expert_norm = nn.LayerNorm(24)

            def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
                        ) -> torch.Tensor:
                out = torch.zeros_like(hidden)
                for e in range(4):
                    gate, up = nn.functional.linear(hidden, self.gate_up_proj[e]).chunk(2, dim=-1)
                    expert = self.post_expert_norm(
                        nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e]))
                    out = out + expert * (weights * (index == e)).sum(-1, keepdim=True)
                return out

        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 24)
        self.gate = nn.Linear(24, 4, bias=False)
        self.experts = NormedExperts(SimpleNamespace(_experts_implementation="eager"))
        self.head = nn.Linear(24, 64)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids).reshape(-1, 24)
        weights, index = torch.topk(self.gate(hidden).softmax(-1), 2, dim=-1)
        out = hidden + self.experts(hidden, index, weights)
        return self.head(out).reshape(*input_ids.shape, 64)


# ---------------------------------------------------------------- Jamba, DeepSeek-V3.2


def test_selective_scan_equals_the_reference_loop() -> None:
    from transformers.models.jamba.modeling_jamba import mamba_selective_scan

    generator = torch.Generator().manual_seed(0)
    batch, inner, state, length = 2, 6, 4, 9
    x, dt, z = (torch.randn(batch, inner, length, generator=generator) for _ in range(3))
    b, c = (torch.randn(batch, state, length, generator=generator) for _ in range(2))
    a = -torch.rand(inner, state, generator=generator)
    d, bias = torch.rand(inner, generator=generator), torch.randn(inner, generator=generator)
    args = (x, dt, a, b, c, d, z, bias, True, True)
    (expected, expected_state), (actual, actual_state) = mamba_selective_scan(*args), selective_scan(*args)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_state, expected_state)


@pytest.mark.slow
def test_jamba_mamba_layers_export_with_dynamic_sequence(tmp_path: Path) -> None:
    """The Mamba scan loop becomes one ONNX Scan; sequence length stays dynamic."""
    model = _zoo("jamba")
    report = export_onnx(model, tmp_path / "jamba.onnx", matrix_tags=matrix_tags(model),
                         model_props={})
    assert not report.untagged_nodes and not report.missing_keys
    proto = onnx.load(str(report.path))
    mambas = [p for p, m in model.named_modules() if type(m).__name__ == "JambaMambaMixer"]
    assert sum(node.op_type == "Scan" for node in proto.graph.node) == len(mambas) > 0
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    for shape in CHECK_SHAPES:
        input_ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = model(input_ids).logits.numpy()
        (actual,) = session.run(None, {"input_ids": input_ids.numpy()})
        np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_deepseek_v32_indexer_ties_are_reported(tmp_path: Path) -> None:
    """torch.topk and ONNX TopK break the indexer's ties differently: export fails in one line
    naming the difference and the indexer, and leaves no file."""
    model = _zoo("deepseek_v32")
    ties = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    with pytest.raises(EmitError) as error:
        export_onnx(model, tmp_path / "ds.onnx", matrix_tags={}, model_props={},
                    example_input=ties)
    message = str(error.value)
    assert "\n" not in message and "onnxruntime's logits differ from PyTorch's by" in message
    assert "self_attn.indexer" in message and "top-k ties" in message
    assert not list(tmp_path.iterdir())
