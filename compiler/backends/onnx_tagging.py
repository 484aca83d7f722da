"""Find the ONNX nodes that multiply by a weight matrix and copy hetmap's tags onto them.

Reads an ``onnx_ir`` model as ``torch.onnx.export`` writes it; writes node
``metadata_props`` and renames nothing but initializers (see :func:`strip_prefix`).

Rules:

1. A *weight use* is a ``MatMul`` or ``Gemm`` (default domain, any graph level) whose first
   or second operand is an initializer of rank >= 2 holding a model parameter, directly or
   through up to three ``Transpose``/``Reshape`` nodes (views of it). Buffers and constants the exporter folded (rotary frequencies,
   masks) are not weights.
2. An initializer names its matrix through ``weight_sources`` (parameter name -> matrix key
   and tile). A use whose matrix key is in ``matrix_tags`` gets that dict copied into its
   ``metadata_props``; a tile use also gets ``hetmap.tile`` = JSON ``[r0, r1, c0, c1]``.
3. A use of a parameter the IR lists no matrix for (a 2-D parameter multiplied inside a module
   the IR keeps whole, e.g. a hyper-connection or a Mamba projection) gets the tags in
   ``parameter_tags`` under its parameter name, if any (the caller derives them from the
   node that owns the module, see the onnx emitter's rule 9).
4. Every other weight use is reported as untagged; nothing is guessed.
5. :func:`keeps_weight_transposes` stops the optimizer from folding ``Transpose(weight)`` or
   ``Reshape(weight)`` into an anonymous constant, so each weight keeps its parameter name in
   the graph.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import onnx_ir as ir

from hetmap.compiler.backends.onnx_prepare import WeightSource

TILE_TAG = "hetmap.tile"
#: ops a weight may pass through on its way to a product (views of it), and how many
_VIEW_OPS = frozenset({"Transpose", "Reshape"})
_VIEW_DEPTH = 3
_WEIGHT_OPS = frozenset({"MatMul", "Gemm"})


@dataclass(frozen=True)
class WeightUse:
    node: ir.Node
    initializer: str


@dataclass(frozen=True)
class UntaggedNode:
    """A node that multiplies by a weight matrix which has no entry in ``matrix_tags``."""

    node: str
    op_type: str
    initializer: str
    matrix_key: str | None


@dataclass(frozen=True)
class TaggingResult:
    nodes_by_key: dict[str, tuple[str, ...]]
    untagged: tuple[UntaggedNode, ...]
    tile_nodes: int


def weight_uses(graph: ir.Graph, parameters: Collection[str]) -> Iterator[WeightUse]:
    """Rule 1, over the graph and its subgraphs; ``parameters`` are the parameter names."""
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.domain != "" or node.op_type not in _WEIGHT_OPS:
            continue
        for operand in node.inputs[:2]:
            name = _weight_initializer(operand)
            if name is not None and name in parameters:
                yield WeightUse(node, name)


def tag_weight_nodes(
    model: ir.Model,
    weight_sources: Mapping[str, WeightSource],
    parameters: Collection[str],
    matrix_tags: Mapping[str, Mapping[str, str]],
    parameter_tags: Mapping[str, Mapping[str, str]] | None = None,
) -> TaggingResult:
    """Rules 2 to 4."""
    parameter_tags = parameter_tags or {}
    nodes_by_key: dict[str, list[str]] = {}
    untagged: list[UntaggedNode] = []
    tile_nodes = 0
    for use in weight_uses(model.graph, parameters):
        source = weight_sources.get(use.initializer)
        node_name = use.node.name or ""
        if (source is None or source.key not in matrix_tags) and use.initializer in matrix_tags:
            source = WeightSource(use.initializer)  # a matrix keyed by its parameter's name
        if (source is None or source.key not in matrix_tags) and use.initializer in parameter_tags:
            use.node.metadata_props.update(parameter_tags[use.initializer])
            nodes_by_key.setdefault(use.initializer, []).append(node_name)
            continue
        if source is None or source.key not in matrix_tags:
            key = None if source is None else source.key
            untagged.append(UntaggedNode(node_name, use.node.op_type, use.initializer, key))
            continue
        use.node.metadata_props.update(matrix_tags[source.key])
        if source.tile is not None:
            use.node.metadata_props[TILE_TAG] = json.dumps(list(source.tile))
            tile_nodes += 1
        nodes_by_key.setdefault(source.key, []).append(node_name)
    return TaggingResult(
        {key: tuple(names) for key, names in nodes_by_key.items()}, tuple(untagged), tile_nodes
    )


def keeps_weight_transposes(node: ir.Node) -> bool | None:
    """``should_fold`` for the onnxscript optimizer (rule 5): False keeps the node."""
    is_transpose = node.domain == "" and node.op_type in _VIEW_OPS and bool(node.inputs)
    if is_transpose and _matrix_initializer(node.inputs[0]):
        return False
    return None


def strip_prefix(model: ir.Model, prefix: str) -> None:
    """Rename initializers ``<prefix><name>`` to ``<name>``."""
    for name, value in list(model.graph.initializers.items()):
        if name.startswith(prefix) and name[len(prefix) :] not in model.graph.initializers:
            value.name = name[len(prefix) :]


def _weight_initializer(value: ir.Value | None) -> str | None:
    """The matrix initializer ``value`` is, directly or through a few Transpose / Reshape
    nodes (a grouped projection multiplies by a reshaped view of its weight)."""
    for _ in range(_VIEW_DEPTH + 1):
        if value is None:
            return None
        if _matrix_initializer(value):
            return value.name
        producer = value.producer()
        if producer is None or producer.domain != "" or producer.op_type not in _VIEW_OPS:
            return None
        value = producer.inputs[0] if producer.inputs else None
    return None


def _matrix_initializer(value: ir.Value | None) -> bool:
    if value is None or not value.is_initializer():
        return False
    shape = value.shape if value.shape is not None else getattr(value.const_value, "shape", None)
    return shape is not None and len(shape) >= 2
