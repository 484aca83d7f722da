"""Front end: load a model, trace it with an MoE-aware torch.fx tracer, lower it to the IR."""

from __future__ import annotations

from hetmap.common.errors import NoMoeError
from hetmap.compiler.frontend.loader import LoadedModel, load_model
from hetmap.compiler.frontend.lower import lower
from hetmap.compiler.frontend.moe import find_moe_blocks, unmappable_moe
from hetmap.compiler.frontend.tracer import trace
from hetmap.compiler.ir.annotations import Traced
from hetmap.compiler.ir.graph import Graph, verify


def import_model(model: LoadedModel, *, allow_dense: bool = False) -> Graph:
    """Trace ``model`` and lower it to a verified IR graph.

    A model in which no MoE block is found is an error (an undetected MoE would otherwise be
    mapped as a dense model without a word) unless ``allow_dense`` is set.
    """
    blocks = find_moe_blocks(model.module, model.config)
    if not blocks and not allow_dense:
        unmappable = unmappable_moe(model.module)
        if unmappable is not None:
            raise NoMoeError(f"no MoE block hetmap can map in {model.name!r}: {unmappable} "
                             "(--allow-dense maps the model with the dense rule only)")
        raise NoMoeError(
            f"no MoE block found in {model.name!r}: looked for a module holding routed experts "
            "(3-D expert tensors, flat expert stacks, or a ModuleList of MLPs) beside a router "
            "(a module with a 2-D weight [experts, hidden]); pass --allow-dense to map it with "
            "the dense rule only")
    gm, wrapped, opaque = trace(model.module, blocks, model.example_input)
    graph = lower(gm, model.module, blocks, name=model.name, wrapped=wrapped,
                  vocab_size=model.vocab_size, opaque=opaque)
    graph.annotate(Traced(gm, wrapped))
    verify(graph)
    return graph


__all__ = ["LoadedModel", "import_model", "load_model"]
