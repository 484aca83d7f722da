"""Front end: every built-in tiny config, a full-size meta config, hand-written and dense
models and a saved checkpoint lower to the expected IR; traced outputs equal eager ones."""

from __future__ import annotations

import pytest
import torch
from conftest import HANDWRITTEN, TINY

from hetmap.common.errors import ModelLoadError, NoMoeError, TraceError
from hetmap.compiler.frontend import import_model, load_model
from hetmap.compiler.frontend.moe import find_moe_blocks
from hetmap.compiler.frontend.tracer import trace
from hetmap.compiler.ir.graph import NodeKind

EXPECTED = {  # model -> (MoE layers, experts per layer, expert (gate/up out, in), shared-experts)
    "olmoe-tiny": (2, 8, (32, 64), 0),
    "mixtral-tiny": (2, 8, (32, 64), 0),
    "qwen2-moe-tiny": (2, 8, (32, 64), 2),
    "deepseek-v2-tiny": (2, 8, (32, 64), 2),
    "deepseek-v3-tiny": (2, 8, (32, 64), 2),
}


@pytest.mark.parametrize("name", TINY)
def test_tiny_configs_lower_to_expected_ir(name: str) -> None:
    graph = import_model(load_model(name))
    layers, experts, gate_shape, shared = EXPECTED[name]
    assert len(graph.moe_layers) == layers
    for nodes in graph.experts_by_layer().values():
        assert [n.expert for n in nodes] == list(range(experts))
        for node in nodes:
            assert [m.role for m in node.matrices] == ["gate", "up", "down"]
            assert node.matrices[0].shape == gate_shape
            assert node.matrices[2].shape == gate_shape[::-1]
    assert len(graph.by_kind(NodeKind.SHARED_EXPERT)) == shared
    assert len(graph.by_kind(NodeKind.ROUTER)) == layers
    assert len(graph.by_kind(NodeKind.LM_HEAD)) == 1
    assert len(graph.by_kind(NodeKind.EMBEDDING)) == 1
    attention = graph.by_kind(NodeKind.ATTENTION)
    assert attention and all(n.matrices for n in attention)
    if name.startswith("deepseek"):  # first layer dense
        assert [n.layer for n in graph.by_kind(NodeKind.DENSE_FFN)] == [0]


@pytest.mark.parametrize("name", TINY)
def test_traced_output_equals_eager_on_two_shapes(name: str) -> None:
    loaded = load_model(name)
    gm, _, _ = trace(loaded.module, find_moe_blocks(loaded.module, loaded.config))
    for shape in [(1, 7), (2, 13)]:
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(gm(ids), loaded.module(input_ids=ids).logits, rtol=0, atol=0)


def test_full_size_meta_config_compiles_structure_only() -> None:
    loaded = load_model("olmoe-1b-7b")
    assert loaded.on_meta and not loaded.has_weights
    graph = import_model(loaded)
    assert len(graph.moe_layers) == 16
    assert len(graph.experts()) == 16 * 64
    expert = graph.experts()[0]
    assert [m.shape for m in expert.matrices] == [(1024, 2048), (1024, 2048), (2048, 1024)]
    assert graph.moe_layers[0].top_k == 8


def test_handwritten_modulelist_moe() -> None:
    loaded = load_model(f"{HANDWRITTEN}:moe")
    graph = import_model(loaded)
    assert {m.layout for m in graph.moe_layers.values()} == {"modulelist"}
    assert len(graph.experts()) == 16
    expert = graph.node("layers.1.mlp.experts.3")
    assert [m.key for m in expert.matrices] == [
        "layers.1.mlp.experts.3.gate_proj", "layers.1.mlp.experts.3.up_proj",
        "layers.1.mlp.experts.3.down_proj"]
    router = graph.node("layers.1.mlp.router")
    assert router.kind is NodeKind.ROUTER and router.matrices[0].bias is not None
    assert graph.moe_layers[1].top_k == 2


def test_dense_model_is_refused_unless_allowed() -> None:
    with pytest.raises(NoMoeError, match="no MoE block found in 'dense'.*--allow-dense"):
        import_model(load_model(f"{HANDWRITTEN}:dense"))
    graph = import_model(load_model(f"{HANDWRITTEN}:dense"), allow_dense=True)
    assert not graph.moe_layers and not graph.experts()
    ffns = graph.by_kind(NodeKind.DENSE_FFN)  # Sequential(Linear, GELU, Linear) is one FFN
    assert [n.layer for n in ffns] == [0, 1]
    assert [m.shape for m in ffns[0].matrices] == [(16, 32), (32, 16)]
    assert len(graph.by_kind(NodeKind.LM_HEAD)) == 1


def test_saved_checkpoint_compiles_from_directory(tmp_path) -> None:
    loaded = load_model("qwen2-moe-tiny")
    loaded.module.save_pretrained(tmp_path)
    from_dir = load_model(str(tmp_path))
    assert from_dir.source == "checkpoint" and from_dir.on_meta and from_dir.has_weights
    graph = import_model(from_dir)
    assert len(graph.experts()) == 16
    model = from_dir.runnable()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded.module(ids).logits)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no callable 'missing'"):
        load_model(f"{HANDWRITTEN}:missing")
    with pytest.raises(NoMoeError, match="no MoE block found"):
        import_model(load_model(f"{HANDWRITTEN}:untraceable"))
    with pytest.raises(TraceError, match=r"cannot trace the model's forward \(Branchy\).*Hint"):
        import_model(load_model(f"{HANDWRITTEN}:untraceable"), allow_dense=True)
    # an untraceable module below the root holds no MoE block: it is kept whole
    graph = import_model(load_model(f"{HANDWRITTEN}:nested_untraceable"), allow_dense=True)
    assert graph.opaque_modules == ("inner",)
    assert [m.key for n in graph.by_kind(NodeKind.OPAQUE) for m in n.matrices] == ["inner.proj"]


def test_untraceable_module_is_kept_whole_and_nested_router_found() -> None:
    loaded = load_model(f"{HANDWRITTEN}:untraceable_mixer")
    graph = import_model(loaded)
    assert graph.opaque_modules == ("layers.0.mixer", "layers.1.mixer")
    assert [m.router for m in graph.moe_layers.values()] == ["layers.0.mlp.router.wg",
                                                              "layers.1.mlp.router.wg"]
    assert len(graph.experts()) == 16
    mixers = graph.by_kind(NodeKind.OPAQUE)
    assert [n.name for n in mixers] == ["layers.0.mixer", "layers.1.mixer"]
    assert [m.key for m in mixers[0].matrices] == ["layers.0.mixer.mix"]
    gm, _, _ = trace(loaded.module, find_moe_blocks(loaded.module))
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(gm(ids), loaded.module(ids), rtol=0, atol=0)


def test_control_flow_on_ranks_and_constant_sizes_is_resolved_at_trace_time() -> None:
    loaded = load_model(f"{HANDWRITTEN}:shape_branching")
    graph = import_model(loaded)
    assert len(graph.moe_layers) == 2 and len(graph.experts()) == 16
    gm, _, opaque = trace(loaded.module, find_moe_blocks(loaded.module), loaded.example_input)
    assert not opaque
    for shape in [(1, 3), (3, 11)]:  # neither the example's shape (2, 8) nor each other's
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(gm(ids), loaded.module(ids), rtol=0, atol=0)
    with pytest.raises(TraceError, match="cannot trace the model's forward"):
        trace(loaded.module, find_moe_blocks(loaded.module))  # no example input: unresolved
    with pytest.raises(TraceError, match="size below 2"):  # torch fixes sizes 0 and 1
        trace(loaded.module, find_moe_blocks(loaded.module), torch.zeros(1, 8, dtype=torch.long))


def test_control_flow_on_a_sequence_length_stays_a_one_line_error() -> None:
    with pytest.raises(TraceError, match=r"depends on input sizes") as caught:
        import_model(load_model(f"{HANDWRITTEN}:size_branching"))
    assert "\n" not in str(caught.value)


def test_unmappable_moe_layouts_fail_naming_the_layout() -> None:
    with pytest.raises(NoMoeError, match=r"single-neuron experts as rows of embeddings "
                                         r"'down_embed', 'up_embed'"):
        import_model(load_model("tiny:doge"))
    graph = import_model(load_model("tiny:doge"), allow_dense=True)
    assert not graph.moe_layers


def test_a_module_called_twice_is_lowered_once() -> None:
    loaded = load_model(f"{HANDWRITTEN}:looped")
    graph = import_model(loaded)
    assert len(graph.experts()) == 16  # the looped layer's experts once
    again = graph.node("layers.1.mlp#1")
    assert again.kind is NodeKind.OP and again.op == "repeat" and not again.matrices
    assert graph.inputs_of("layers.1.mlp#1") and graph.users_of("layers.1.mlp#1")
    assert graph.node("layers.1.norm#1").op == "repeat"


def test_a_decoder_layer_that_is_the_moe_block_keeps_attention_and_norms_apart() -> None:
    graph = import_model(load_model("tiny:gemma4"))  # router and experts beside self_attn
    for layer, moe in graph.moe_layers.items():
        assert moe.block == f"model.layers.{layer}"
        assert moe.shared == (f"model.layers.{layer}.mlp",)
        assert graph.node(f"model.layers.{layer}.self_attn").kind is NodeKind.ATTENTION
        assert graph.node(f"model.layers.{layer}.input_layernorm").kind is NodeKind.NORM
        assert moe.top_k == 2
