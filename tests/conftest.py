from __future__ import annotations

import os
from pathlib import Path

import pytest

from hetmap.compiler.ir.graph import Graph
from hetmap.compiler.registry import Registries, load_registries

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` (``make test``) each worker computes on one thread: the workers
    already fill the cores, and more threads per worker would only contend."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--timing", action="store_true",
                     help="also run the tests marked timing (wall-clock assertions)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--timing"):
        return
    skip = pytest.mark.skip(reason="wall-clock assertion: run with --timing")
    for item in items:
        if "timing" in item.keywords:
            item.add_marker(skip)
HANDWRITTEN = f"{FIXTURES / 'handwritten.py'}"
TINY = ["olmoe-tiny", "mixtral-tiny", "qwen2-moe-tiny", "deepseek-v2-tiny", "deepseek-v3-tiny"]


@pytest.fixture(scope="session")
def registries() -> Registries:
    return load_registries(plugins=False)


def moe_graph(experts: int = 4, hidden: int = 48, intermediate: int = 40) -> Graph:
    """A hand-built IR of one MoE layer (router, ``experts`` routed experts of gate/up/down)
    behind an attention node: the Before graph of the per-pass text tests."""
    from hetmap.compiler.ir.graph import Graph, Matrix, MoeLayer, Node, NodeKind, WeightRef

    graph = Graph("toy-moe")
    graph.add(Node("x", NodeKind.INPUT))
    attn = tuple(Matrix(r, f"attn.{r}", hidden, hidden, WeightRef(f"attn.{r}.weight"))
                 for r in ("q_proj", "o_proj"))
    graph.add(Node("attn", NodeKind.ATTENTION, "attn", attn, layer=0), ["x"])
    router = Matrix("router", "moe.gate", experts, hidden, WeightRef("moe.gate.weight"))
    graph.add(Node("moe.gate", NodeKind.ROUTER, "moe.gate", (router,), layer=0), ["attn"])
    for e in range(experts):
        mats = tuple(Matrix(role, f"moe.experts.{e}.{role}", out, inp,
                            WeightRef(f"moe.experts.{role}", e))
                     for role, out, inp in (("gate", intermediate, hidden),
                                            ("up", intermediate, hidden),
                                            ("down", hidden, intermediate)))
        graph.add(Node(f"moe.experts.{e}", NodeKind.EXPERT, "moe.experts", mats, layer=0,
                       expert=e), ["attn", "moe.gate"])
    graph.add(Node("output", NodeKind.OUTPUT), [f"moe.experts.{e}" for e in range(experts)])
    graph.moe_layers[0] = MoeLayer(0, "moe", "moe.gate", "moe.experts", "fused", experts, 2)
    return graph


def densities_loaded_and_streamed(checkpoint: Path | str) -> list[float]:
    """The experts' densities of ``checkpoint`` calibrated on the loaded model and streamed
    from its files (256 tokens); asserts they are equal and returns them."""
    from hetmap.compiler.api import compile_model
    from hetmap.compiler.ir.annotations import Density

    densities = {}
    for stream in ("off", "on"):
        plan = compile_model(str(checkpoint), pipeline=f"density{{calib_tokens=256,seq_len=64,"
                                                       f"stream={stream}}}")
        densities[stream] = [n.get(Density).value for n in plan.graph.experts()]
    assert densities["on"] == densities["off"]
    return densities["on"]
