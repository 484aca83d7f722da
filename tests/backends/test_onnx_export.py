"""ONNX export core: numerics vs PyTorch, tags read back, static MoE form, atomic writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetmap.common.errors import EmitError
from hetmap.compiler.backends import onnx_export as onnx_export_module
from hetmap.compiler.backends.onnx_export import ExportReport, export_onnx

VOCAB, HIDDEN, EXPERTS, TOP_K = 64, 32, 4, 2
EXAMPLE_SHAPE = (3, 7)  # 21 tokens: no weight may have a dimension of this size
CHECK_SHAPES = [(2, 5), (1, 9)]
MODEL_PROPS = {"hetmap.version": "test", "hetmap.target": "toy"}
TOLERANCE = 1e-4


# ---------------------------------------------------------------- models


def _hf(config_class: type, **fields: object) -> nn.Module:
    from transformers import AutoModelForCausalLM

    defaults: dict[str, object] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    config = config_class(**{**defaults, **fields})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def olmoe() -> nn.Module:
    from transformers import OlmoeConfig

    return _hf(OlmoeConfig, intermediate_size=16, num_experts=EXPERTS, num_experts_per_tok=TOP_K)


def mixtral() -> nn.Module:
    from transformers import MixtralConfig

    return _hf(
        MixtralConfig, intermediate_size=16, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K
    )


def qwen2_moe() -> nn.Module:
    from transformers import Qwen2MoeConfig

    return _hf(
        Qwen2MoeConfig,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )


def _deepseek_fields() -> dict[str, object]:
    return {
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "n_routed_experts": EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": TOP_K,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
        "num_key_value_heads": 4,  # multi-head latent attention: one KV head per query head
    }


def deepseek_v2() -> nn.Module:
    from transformers import DeepseekV2Config

    return _hf(DeepseekV2Config, **_deepseek_fields())


def deepseek_v3() -> nn.Module:
    from transformers import DeepseekV3Config

    return _hf(
        DeepseekV3Config, first_k_dense_replace=1, n_group=2, topk_group=1, **_deepseek_fields()
    )


def llama_tied() -> nn.Module:
    from transformers import LlamaConfig

    return _hf(LlamaConfig, intermediate_size=48, tie_word_embeddings=True)


class ExpertMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(HIDDEN, 16, bias=False)
        self.w2 = nn.Linear(16, HIDDEN, bias=False)
        self.w3 = nn.Linear(HIDDEN, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _route(gate: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights, index = torch.topk(F.softmax(gate(x), dim=-1), TOP_K, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), index


class SparseLoopMoE(nn.Module):
    """Mixtral-4.x style: torch.where per expert + index_add_ (exported as written)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(ExpertMLP() for _ in range(EXPERTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = _route(self.gate, x)
        out = torch.zeros_like(x)
        mask = F.one_hot(index, EXPERTS).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return out


class ExpertList(nn.ModuleList):
    """Container called as experts(hidden, top_k_index, top_k_weights); Python branch on data."""

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            out[token] += expert(x[token]) * weights[token, slot, None]
        return out


class ContainerMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = ExpertList(ExpertMLP() for _ in range(EXPERTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = _route(self.gate, x)
        return self.experts(x, index, weights)


class DenseWhereMoE(nn.Module):
    """Dense dispatch with torch.where on routing weights (exported as written)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(ExpertMLP() for _ in range(EXPERTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = _route(self.gate, x)
        zeros = torch.zeros(x.shape[0], EXPERTS, dtype=x.dtype, device=x.device)
        routing = zeros.scatter(1, index, weights)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + torch.where(routing[:, e : e + 1] > 0, expert(x) * routing[:, e : e + 1], 0)
        return out


class HandWrittenLM(nn.Module):
    """Plain module: input_ids -> logits tensor, one layer of each hand-written MoE form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([SparseLoopMoE(), ContainerMoE(), DenseWhereMoE()])
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        flat = hidden.reshape(-1, HIDDEN)
        for layer in self.layers:
            flat = flat + layer(flat)
        return self.head(flat).reshape(*input_ids.shape, VOCAB)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "olmoe": olmoe,
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "deepseek_v2": deepseek_v2,
    "deepseek_v3": deepseek_v3,
    "llama_tied": llama_tied,
    "hand_written": HandWrittenLM,
}

# ---------------------------------------------------------------- keys, tags, tiles


def matrix_keys(model: nn.Module) -> list[str]:
    """nn.Linear paths, routers (2-D weight, not embeddings) and fused expert matrices."""
    keys = []
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            keys.append(path)
        fused = module._parameters.get("gate_up_proj")
        if fused is not None:
            keys += [
                f"{path}.{e}.{r}" for e in range(fused.shape[0]) for r in ("gate", "up", "down")
            ]
    return keys


def tags_for(keys: list[str]) -> dict[str, dict[str, str]]:
    return {
        key: {
            "hetmap.node": key,
            "hetmap.placement": "aimc-tile" if ".experts." in key else "digital",
        }
        for key in keys
    }


def grid(in_features: int, out_features: int) -> list[tuple[int, int, int, int]]:
    """Uneven 2 x 2 tiles (rows = inputs, cols = outputs)."""
    row_cut, col_cut = in_features // 3, out_features - out_features // 4
    return [
        (r0, r1, c0, c1)
        for c0, c1 in ((0, col_cut), (col_cut, out_features))
        for r0, r1 in ((0, row_cut), (row_cut, in_features))
    ]


def tiles_for(model: nn.Module, keys: list[str]) -> dict[str, list[tuple[int, int, int, int]]]:
    """Tile the LM head, the first attention/MLP linear and one expert matrix."""
    chosen = [keys[0], next(k for k in keys if "head" in k)]
    chosen += [k for k in keys if k.endswith((".1.down", ".1.w2"))][:1]
    tiles = {}
    for key in chosen:
        in_features, out_features = _matrix_shape(model, key)
        tiles[key] = grid(in_features, out_features)
    return tiles


def _matrix_shape(model: nn.Module, key: str) -> tuple[int, int]:
    path, _, role = key.rpartition(".")
    if role in ("gate", "up", "down") and path.rpartition(".")[2].isdigit():
        experts = model.get_submodule(path.rpartition(".")[0])
        if hasattr(experts, "down_proj") and experts.down_proj.dim() == 3:
            hidden, intermediate = experts.down_proj.shape[1:]
            return (intermediate, hidden) if role == "down" else (hidden, intermediate)
    out_features, in_features = model.get_submodule(key).weight.shape
    return in_features, out_features


# ---------------------------------------------------------------- exports (once per case)


class Exported:
    def __init__(
        self, name: str, model: nn.Module, report: ExportReport, tags: dict, tiles: dict
    ) -> None:
        self.name, self.model, self.report, self.tags, self.tiles = name, model, report, tags, tiles
        self.proto = onnx.load(str(report.path))


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """One export per model (~5 s each): three matrices tile-lowered, all others plain."""
    name = request.param
    model = MODELS[name]()
    keys = matrix_keys(model)
    tags, tiles = tags_for(keys), tiles_for(model, keys)
    path = tmp_path_factory.mktemp(name) / "model.onnx"
    generator = torch.Generator().manual_seed(1)
    example = torch.randint(0, VOCAB, EXAMPLE_SHAPE, generator=generator)
    report = export_onnx(
        model,
        path,
        matrix_tags=tags,
        model_props=MODEL_PROPS,
        tile_ranges=tiles,
        example_input=example,
    )
    return Exported(name, model, report, tags, tiles)


def _logits(model: nn.Module, input_ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        output = model(input_ids)
    return getattr(output, "logits", output).numpy()


def test_onnxruntime_matches_pytorch(exported: Exported) -> None:
    session = ort.InferenceSession(str(exported.report.path), providers=["CPUExecutionProvider"])
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    assert (graph_input.name, graph_input.type, graph_input.shape) == (
        "input_ids",
        "tensor(int64)",
        ["batch", "sequence"],
    )
    assert (graph_output.name, graph_output.shape) == ("logits", ["batch", "sequence", VOCAB])
    generator = torch.Generator().manual_seed(2)
    for shape in CHECK_SHAPES:
        input_ids = torch.randint(0, VOCAB, shape, generator=generator)
        (actual,) = session.run(None, {"input_ids": input_ids.numpy()})
        np.testing.assert_allclose(actual, _logits(exported.model, input_ids), atol=TOLERANCE)


def test_metadata_reads_back(exported: Exported) -> None:
    model_props = {p.key: p.value for p in exported.proto.metadata_props}
    assert model_props == {**MODEL_PROPS, "hetmap.moe_form": "static"}  # export_onnx's default
    tile_nodes = 0
    for node in exported.proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props if p.key.startswith("hetmap.")}
        if not props:
            continue
        tile = props.pop("hetmap.tile", None)
        key = props["hetmap.node"]
        assert props == exported.tags[key]
        if tile is not None:
            tile_nodes += 1
            assert tuple(json.loads(tile)) in exported.tiles[key]
    assert tile_nodes == exported.report.tile_nodes == sum(map(len, exported.tiles.values()))


def test_every_weight_node_is_tagged(exported: Exported) -> None:
    graph = exported.proto.graph
    initializers = {init.name: init for init in graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose"}
    weight_nodes = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for operand in node.input[:2]:
            name = transposed.get(operand, operand)
            is_parameter = name.endswith(".weight") or ".tiles." in name
            if is_parameter and name in initializers and len(initializers[name].dims) >= 2:
                weight_nodes += 1
                key = name.rsplit(".tiles.", 1)[0].removesuffix(".weight")
                props = {p.key: p.value for p in node.metadata_props}
                assert props.get("hetmap.node") == key, node.name
    report = exported.report
    assert weight_nodes > 0 and not report.untagged_nodes and not report.missing_keys
    assert set(report.tagged_keys) == set(exported.tags)
    assert sorted(report.tiled_keys) == sorted(exported.tiles)


def test_static_moe_form(exported: Exported) -> None:
    onnx.checker.check_model(str(exported.report.path), full_check=True)
    graph = exported.proto.graph
    tokens = EXAMPLE_SHAPE[0] * EXAMPLE_SHAPE[1]
    expert_matrix_size = HIDDEN * 16
    for init in graph.initializer:
        stacked = len(init.dims) >= 3 and np.prod(init.dims) >= expert_matrix_size
        assert not stacked, f"{init.name} {list(init.dims)}: fused weight left in graph"
        assert not init.dims or init.dims[0] not in (tokens, EXAMPLE_SHAPE[1]), init.name
    embeddings = {i.name for i in graph.initializer if "embed" in i.name}
    big = {i.name for i in graph.initializer if len(i.dims) >= 2} - embeddings
    gathered = {n.input[0] for n in graph.node if n.op_type.startswith("Gather")}
    assert not big & gathered, "a weight matrix is gathered per token"
    expert_keys = [k for k in exported.tags if ".experts." in k]
    for key in expert_keys:  # each expert matrix is its own node(s)
        assert exported.report.nodes_by_key[key]


def test_experts_swapped_to_static_form(exported: Exported) -> None:
    fused = [p for p, m in exported.model.named_modules() if "gate_up_proj" in m._parameters]
    expected = ["layers.1.experts"] if exported.name == "hand_written" else fused
    assert list(exported.report.swapped_experts) == expected


def test_caller_model_is_untouched(exported: Exported) -> None:
    fresh = MODELS[exported.name]()
    assert [type(m) for m in fresh.modules()] == [type(m) for m in exported.model.modules()]
    expected, actual = fresh.state_dict(), exported.model.state_dict()
    assert list(expected) == list(actual)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


# ---------------------------------------------------------------- edge cases (one small model)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: the matrix key is still "head"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.embed(input_ids))))


def test_hooks_and_training_mode_do_not_leak(tmp_path: Path) -> None:
    model = Tiny().train()
    handle = model.proj.register_forward_hook(lambda module, args, output: output + 100.0)
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path, matrix_tags=tags_for(["proj", "head"]), model_props={})
    assert model.training and model.proj.training and len(model.proj._forward_hooks) == 1
    handle.remove()
    input_ids = torch.randint(0, VOCAB, (2, 4))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input_ids": input_ids.numpy()})
    np.testing.assert_allclose(actual, _logits(model.eval(), input_ids), atol=TOLERANCE)


def test_external_data_when_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export_module, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    path = tmp_path / "tiny.onnx"
    report = export_onnx(Tiny(), path, matrix_tags={}, model_props={})
    assert report.external_data == tmp_path / "tiny.onnx.data" and report.external_data.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"tiny.onnx", "tiny.onnx.data"}
    assert {u.matrix_key for u in report.untagged_nodes} == {"proj", "head"}
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "tiles, message",
    [
        ({"proj": [(0, 16, 0, 32)]}, "row ranges"),
        ({"proj": [(0, 32, 0, 16), (0, 32, 8, 32)]}, "column ranges"),
        ({"proj": [(0, 40, 0, 32)]}, "outside"),
        ({"embed": [(0, 32, 0, 64)]}, "not a linear matrix"),
    ],
)
def test_bad_tiles_fail_without_writing(tmp_path: Path, tiles: dict, message: str) -> None:
    with pytest.raises(EmitError, match=message):
        export_onnx(Tiny(), tmp_path / "t.onnx", matrix_tags={}, model_props={}, tile_ranges=tiles)
    assert not list(tmp_path.iterdir())


class SquareExperts(nn.Module):
    """Fused experts without layout flags whose width equals the hidden size: down_proj
    [E, H, H] could be either orientation, so the layout is ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 2 * HIDDEN, HIDDEN) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, HIDDEN) * 0.1)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(EXPERTS):
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            routed = (weights * (index == e)).sum(-1, keepdim=True)
            out = out + F.linear(self.act_fn(gate) * up, self.down_proj[e]) * routed
        return out


class SquareMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = SquareExperts()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids).reshape(-1, HIDDEN)
        weights, index = _route(self.gate, x)
        return self.experts(x, index, weights).reshape(*input_ids.shape, HIDDEN)


def test_ambiguous_expert_layout_is_an_emit_error(tmp_path: Path) -> None:
    with pytest.raises(EmitError, match="'experts' .*cannot tell the orientation of down_proj"):
        export_onnx(SquareMoE(), tmp_path / "m.onnx", matrix_tags={}, model_props={})
    assert not list(tmp_path.iterdir())


def test_unreadable_expert_stacks_are_an_emit_error(tmp_path: Path) -> None:
    model = SquareMoE()
    model.experts.is_transposed = False  # orientation given, but gate_up_proj is 3 I wide
    model.experts.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 3 * HIDDEN, HIDDEN))
    model.experts.forward = lambda x, index, weights: x  # type: ignore[method-assign]
    with pytest.raises(EmitError, match="match no expert layout"):
        export_onnx(model, tmp_path / "m.onnx", matrix_tags={}, model_props={})
    assert not list(tmp_path.iterdir())


class BranchingMoE(nn.Module):
    """Python branch on tensor data inside the block itself: not exportable as written."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(ExpertMLP() for _ in range(EXPERTS))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids).reshape(-1, HIDDEN)
        weights, index = _route(self.gate, x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel() > 0:
                out[token] += expert(x[token]) * weights[token, slot, None]
        return out.reshape(*input_ids.shape, HIDDEN)


def test_untraceable_hand_written_moe_is_an_emit_error(tmp_path: Path) -> None:
    with pytest.raises(EmitError, match="could not trace BranchingMoE"):
        export_onnx(BranchingMoE(), tmp_path / "b.onnx", matrix_tags={}, model_props={})
    assert not list(tmp_path.iterdir())


class _NormWithTinyEpsilon(nn.Module):
    """An RMS norm with epsilon 1e-8 (MuseSpark's post-expert norm) on rows whose mean square
    (1e-10) is below it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.embed(input_ids) * 1e-5
        return rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-8)


@pytest.mark.parametrize("guarded", [True, False])
def test_optimizer_keeps_a_tiny_epsilon(guarded: bool, tmp_path: Path) -> None:
    """onnxscript's ``x + 0 -> x`` matches constants within 1e-8 of zero, so it drops an
    epsilon of 1e-8 (MuseSpark's logits moved by 0.02); hetmap's optimizer run leaves the
    no-op arithmetic rules out."""
    import onnx_ir as ir
    from onnxscript.optimizer import optimize_ir

    model = _NormWithTinyEpsilon().eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    exported = torch.onnx.export(model, (ids,), dynamo=True, optimize=False, verbose=False,
                                 input_names=["input_ids"], output_names=["logits"])
    graph = ir.serde.deserialize_model(exported.model_proto)
    if guarded:
        onnx_export_module._optimize(graph, set())
    else:
        optimize_ir(graph)
    ir.save(graph, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"input_ids": ids.numpy()})
    difference = float(np.abs(actual - model(ids).detach().numpy()).max())
    assert difference < 1e-5 if guarded else difference > 1e-2
