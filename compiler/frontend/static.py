"""Trace-time values for Python control flow that depends on input ranks only.

torch.fx cannot branch on a traced value or iterate over one. Many model forwards do both on
properties that are the same for every input of the same rank: ``if position_ids.ndim == 3``,
``reshape(*input_ids.shape, n, d)``. Such a condition or iteration is resolved once, at trace
time, by running the partial graph on an example input; the graph stays valid for every input
of the example's ranks. Rules:

1. A value is *static* when it depends on the graph inputs only through ``ndim``, ``dim()``,
   ``dtype``, ``device`` (and ``len``, or iteration, of a shape): never through a size or a
   tensor's data. Constants (parameters, buffers, configs) are static.
2. ``bool(value)`` is resolved only for a static value; ``iter(value)`` for a value whose
   length is static (a shape, a constant slice of a shape, or a static sequence), yielding
   traced items (``shape[i]``, not the example's sizes).
3. Anything else is :class:`NotStatic`: the caller keeps fx's error (and its fallbacks).
4. Values are computed incrementally (each graph node once), on the example input's device
   (``meta`` for a model without weights).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

#: attributes and methods whose result depends on a tensor's rank, dtype or device only
_RANK_ATTRIBUTES = frozenset({"ndim", "dtype", "device", "is_cuda", "is_meta", "layout"})
_RANK_METHODS = frozenset({"dim", "ndimension", "is_floating_point", "is_complex", "get_device"})
#: attributes and methods giving a tuple whose length is the rank
_SHAPE_ATTRIBUTES = frozenset({"shape"})
_SHAPE_METHODS = frozenset({"size"})


class NotStatic(Exception):
    """A value that depends on input sizes or data (or cannot be computed at trace time)."""


class StaticValues:
    """Example values of a graph under construction, and which of them are static."""

    def __init__(self, root: nn.Module, graph: fx.Graph, example_inputs: Sequence[Any]) -> None:
        self.interpreter = fx.Interpreter(root, garbage_collect_values=False, graph=graph)
        self.interpreter.args_iter = iter(example_inputs)
        self.graph = graph
        self.static: dict[fx.Node, bool] = {}

    def value(self, node: fx.Node) -> Any:
        """The example value of ``node``, computing the nodes before it that are not yet."""
        env = self.interpreter.env
        for pending in self.graph.nodes:
            if pending not in env:
                try:
                    with torch.no_grad():
                        env[pending] = self.interpreter.run_node(pending)
                except Exception as exc:  # noqa: BLE001 - the model's own code: any error
                    raise NotStatic(f"cannot compute {pending.name}: {exc}") from exc
            if pending is node:
                break
        return env[node]

    def is_static(self, node: fx.Node) -> bool:
        """Rule 1."""
        known = self.static.get(node)
        if known is not None:
            return known
        if node.op == "placeholder":
            result = False
        elif node.op == "get_attr":
            result = True
        elif _reads_rank(node):
            result = True
        else:
            result = all(self.is_static(arg) for arg in node.all_input_nodes)
        self.static[node] = result
        return result

    def has_static_length(self, node: fx.Node) -> bool:
        if _reads_shape(node) or self.is_static(node):
            return True
        if node.op == "call_function" and node.target is operator.getitem:
            sequence, index = node.args
            return (isinstance(sequence, fx.Node) and _reads_shape(sequence)
                    and isinstance(index, slice) and not _has_nodes(index))
        return False

    def resolve_bool(self, node: fx.Node) -> bool:
        """Rule 2, conditions."""
        if not self.is_static(node):
            raise NotStatic(f"{node.name} depends on input sizes or data")
        return bool(self.value(node))

    def length(self, node: fx.Node) -> int:
        """Rule 2, iteration: the number of items ``node`` yields."""
        if not self.has_static_length(node):
            raise NotStatic(f"the length of {node.name} depends on input sizes or data")
        value = self.value(node)
        if not isinstance(value, tuple | list | torch.Size):
            raise NotStatic(f"{node.name} is a {type(value).__name__}, not a sequence")
        return len(value)


def _reads_rank(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _RANK_ATTRIBUTES
    return node.op == "call_method" and node.target in _RANK_METHODS


def _reads_shape(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRIBUTES
    return node.op == "call_method" and node.target in _SHAPE_METHODS and len(node.args) == 1


def _has_nodes(index: slice) -> bool:
    return any(isinstance(v, fx.Node) for v in (index.start, index.stop, index.step))
