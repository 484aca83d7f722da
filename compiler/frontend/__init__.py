"""Front end: load a model, trace it with an MoE-aware torch.fx tracer, lower it to the IR."""

from __future__ import annotations

from hetmap.compiler.frontend.loader import LoadedModel, load_model
from hetmap.compiler.frontend.lower import lower
from hetmap.compiler.frontend.moe import find_moe_blocks
from hetmap.compiler.frontend.tracer import trace
from hetmap.compiler.ir import Graph, verify


def import_model(model: LoadedModel) -> Graph:
    """Trace ``model`` and lower it to a verified IR graph."""
    blocks = find_moe_blocks(model.module, model.config)
    gm, wrapped = trace(model.module, blocks)
    model.traced = (gm, wrapped)
    graph = lower(gm, model.module, blocks, name=model.name, wrapped=wrapped,
                  vocab_size=model.vocab_size)
    verify(graph)
    return graph


__all__ = ["LoadedModel", "import_model", "load_model"]
