"""Count the FLOPs and bytes of an ONNX graph for one input shape, sparse expert dispatch included.

Reads an ONNX model (as the ONNX back end writes it: every value's shape recorded, symbolic
dimensions as expressions of the input dimensions such as ``sequence*batch``); writes nothing.

Rules:

1. FLOPs are those of the products: ``MatMul`` (``2 * prod(output shape) * K``), ``Gemm``
   (``2 * M * N * K``) and onnxruntime's ``com.microsoft.MoE`` (rule 4). Element-wise,
   normalisation and softmax operators are not counted (a few percent of a transformer's).
   Nodes inside subgraphs (a Mamba ``Scan``) are not counted.
2. Shapes are those the exporter recorded, else those of onnxruntime's symbolic shape
   inference; symbolic dimensions are evaluated with the given input dimensions (``batch``,
   ``sequence``). A product whose shape stays unknown is listed in ``uncounted``. A data-dependent dimension -- the count of a ``NonZero`` -- takes its
   *expected* value: for ``NonZero(Equal(indices, e))`` where ``indices`` come from a
   ``TopK`` over ``E`` router slots (sparse dispatch: the tokens that chose expert ``e``),
   ``numel(indices) / E``, i.e. ``tokens * top_k / E`` under uniform routing; summed over a
   layer's experts that is exactly ``tokens * top_k`` routed rows. Any other ``NonZero``
   takes its upper bound, ``numel(input)``, and is listed in ``upper_bounds``.
3. Bytes: every initializer once (the weights a forward pass reads) plus the activations
   each product reads and writes (expected sizes, rule 2), at their element types' sizes.
4. A ``com.microsoft.MoE`` node: each of ``tokens`` rows runs ``k`` experts (attribute
   ``k``), each expert's FLOPs being ``2 *`` the sizes of its fc1, fc2 (and fc3) matrices.
5. ``expert_flops`` are the FLOPs of nodes tagged ``hetmap.expert`` and of MoE nodes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import sympy

#: functions the exporter writes in symbolic dimensions; other names are symbols
_FUNCTIONS = ("Max", "Min", "floor", "ceiling", "Mod")
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"})


@dataclass(frozen=True)
class GraphCost:
    """FLOPs and bytes of one forward pass of a graph on ``tokens`` tokens (module rules)."""

    tokens: int
    flops: float
    expert_flops: float
    weight_bytes: int
    activation_bytes: float
    upper_bounds: tuple[str, ...] = field(default=())
    """NonZero nodes counted at their upper bound (rule 2)."""
    uncounted: tuple[str, ...] = field(default=())
    """Product nodes whose shapes could not be determined (rule 2), not counted."""

    @property
    def flops_per_token(self) -> float:
        return self.flops / self.tokens

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes

    def to_json(self) -> dict[str, object]:
        return {"tokens": self.tokens, "flops": self.flops, "expert_flops": self.expert_flops,
                "flops_per_token": self.flops_per_token, "weight_bytes": self.weight_bytes,
                "activation_bytes": self.activation_bytes, "upper_bounds": list(self.upper_bounds),
                "uncounted": list(self.uncounted)}


def count_cost(model: onnx.ModelProto | Path | str, dims: Mapping[str, int]) -> GraphCost:
    """Rules 1-5 for ``model`` with its input dimensions ``dims`` (e.g. batch and sequence)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return _Counter(model, dims).count()


class _Counter:
    def __init__(self, model: onnx.ModelProto, dims: Mapping[str, int]) -> None:
        self.model = model
        self.graph = graph = model.graph
        self.inferred: dict[str, onnx.TypeProto] | None = None
        self.values: dict[str, onnx.TypeProto] = {
            v.name: v.type for v in (*graph.input, *graph.value_info, *graph.output)}
        self.initializers = {i.name: i for i in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.bindings: dict[sympy.Symbol, int] = {sympy.Symbol(k): v for k, v in dims.items()}
        self.upper_bounds: list[str] = []
        self.uncounted: list[str] = []
        self.parsed: dict[str, sympy.Expr] = {}
        self.tokens = int(np.prod([int(v) for v in dims.values()])) if dims else 1
        for node in graph.node:
            self._bind_data_dependent(node)

    def count(self) -> GraphCost:
        flops = expert_flops = activation_bytes = 0.0
        for node in self.graph.node:
            node_flops, moved = self._product(node)
            if not node_flops:
                continue
            flops += node_flops
            activation_bytes += moved
            tags = {p.key for p in node.metadata_props}
            if "hetmap.expert" in tags or node.op_type == "MoE":
                expert_flops += node_flops
        weight_bytes = sum(_numel(list(i.dims)) * _itemsize(i.data_type)
                           for i in self.graph.initializer)
        return GraphCost(self.tokens, flops, expert_flops, int(weight_bytes), activation_bytes,
                         tuple(self.upper_bounds), tuple(self.uncounted))

    # -- shapes ------------------------------------------------------------------------
    def _parse(self, text: str) -> sympy.Expr:
        if text not in self.parsed:
            names = {name: sympy.Symbol(name) for name in re.findall(r"[A-Za-z_]\w*", text)}
            names.update({name: getattr(sympy, name) for name in _FUNCTIONS if name in names})
            self.parsed[text] = sympy.sympify(text, locals=names)
        return self.parsed[text]

    def shape(self, name: str) -> list[float] | None:
        """The value's shape with ``dims`` bound (rule 2); None if a dimension is unknown."""
        if name in self.initializers:
            return [float(d) for d in self.initializers[name].dims]
        shape = self._evaluated(self.values.get(name))
        if shape is None and name in self._inferred():
            shape = self._evaluated(self._inferred()[name])
        return shape

    def _evaluated(self, value: onnx.TypeProto | None) -> list[float] | None:
        if value is None or not value.tensor_type.HasField("shape"):
            return None
        dims = [self._dim(d) for d in value.tensor_type.shape.dim]
        return None if any(d is None for d in dims) else dims  # type: ignore[return-value]

    def _dim(self, dim: onnx.TensorShapeProto.Dimension) -> float | None:
        if dim.HasField("dim_value"):
            return float(dim.dim_value)
        if not dim.dim_param:
            return None
        value = self._parse(dim.dim_param).subs(self.bindings)
        return None if value.free_symbols else float(value)

    def _inferred(self) -> dict[str, onnx.TypeProto]:
        """Rule 2's fallback: onnxruntime's symbolic shape inference, run once if needed."""
        if self.inferred is None:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            copy = onnx.ModelProto()
            copy.CopyFrom(self.model)
            del copy.graph.value_info[:]
            try:
                inferred = SymbolicShapeInference.infer_shapes(copy, auto_merge=True)
            except Exception:  # noqa: BLE001 - any failure leaves those shapes unknown
                self.inferred = {}
            else:
                self.inferred = {v.name: v.type for v in inferred.graph.value_info}
        return self.inferred

    def itemsize(self, name: str) -> int:
        if name in self.initializers:
            return _itemsize(self.initializers[name].data_type)
        value = self.values.get(name)
        return _itemsize(value.tensor_type.elem_type) if value is not None else 4

    def _bind_data_dependent(self, node: onnx.NodeProto) -> None:
        """Rule 2: a new bare symbol in an output's shape, traced back to a ``NonZero``."""
        for output in node.output:
            value = self.values.get(output)
            if value is None or not value.tensor_type.HasField("shape"):
                continue
            for dim in value.tensor_type.shape.dim:
                if not dim.dim_param or not dim.dim_param.isidentifier():
                    continue
                symbol = self._parse(dim.dim_param)
                if symbol in self.bindings:
                    continue
                nonzero = self._nonzero_above(node)
                if nonzero is not None:
                    self.bindings[symbol] = self._expected_count(nonzero)  # type: ignore[assignment]

    def _nonzero_above(self, node: onnx.NodeProto, depth: int = 8) -> onnx.NodeProto | None:
        """The nearest ``NonZero`` among the node and its ancestors (``depth`` levels)."""
        frontier = [node]
        for _ in range(depth):
            for candidate in frontier:
                if candidate.op_type == "NonZero":
                    return candidate
            frontier = [self.producers[i] for n in frontier for i in n.input if i in self.producers]
        return None

    def _expected_count(self, nonzero: onnx.NodeProto) -> float:
        expected = self._expected_routed(nonzero.input[0])
        if expected is not None:
            return expected
        if nonzero.name not in self.upper_bounds:
            self.upper_bounds.append(nonzero.name)
        input_shape = self.shape(nonzero.input[0])
        return float(np.prod(input_shape)) if input_shape is not None else 0.0

    def _expected_routed(self, mask: str) -> float | None:
        """Rule 2: ``numel(indices) / E`` for ``Equal(TopK indices, e)``, else None."""
        equal = self.producers.get(mask)
        if equal is None or equal.op_type != "Equal":
            return None
        for operand in equal.input:
            source = self._passed_from(operand)
            topk = self.producers.get(source)
            if topk is None or topk.op_type != "TopK" or topk.output[1] != source:
                continue
            indices, scores = self.shape(source), self.shape(topk.input[0])
            if indices is None or scores is None:
                return None
            return float(np.prod(indices)) / scores[-1]
        return None

    def _passed_from(self, name: str) -> str:
        """The value ``name`` was passed through from (rule 2's pass-through operators)."""
        node = self.producers.get(name)
        while node is not None and node.op_type in _PASS_THROUGH:
            name = node.input[0]
            node = self.producers.get(name)
        return name

    # -- products ----------------------------------------------------------------------
    def _product(self, node: onnx.NodeProto) -> tuple[float, float]:
        """(FLOPs, activation bytes) of a product node; (0, 0) for any other node."""
        if node.op_type == "MoE" and node.domain == "com.microsoft":
            return self._moe(node)
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            return 0.0, 0.0
        a, b, out = self.shape(node.input[0]), self.shape(node.input[1]), self.shape(node.output[0])
        if a is None or b is None or out is None:
            self.uncounted.append(node.name)
            return 0.0, 0.0
        if node.op_type == "MatMul":
            inner = a[-1]
        else:
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            inner = a[0] if trans_a else a[-1]
        flops = 2.0 * float(np.prod(out)) * inner
        moved = sum(float(np.prod(s)) * self.itemsize(n) for s, n in (
            (a, node.input[0]), (b, node.input[1]), (out, node.output[0]))
            if n not in self.initializers and not self._is_weight(n))
        return flops, moved

    def _is_weight(self, name: str) -> bool:
        producer = self.producers.get(name)
        return (producer is not None and producer.op_type == "Transpose"
                and producer.input[0] in self.initializers)

    def _moe(self, node: onnx.NodeProto) -> tuple[float, float]:
        hidden = self.shape(node.input[0])
        if hidden is None:
            return 0.0, 0.0
        rows = float(np.prod(hidden[:-1]))
        top_k = next((x.i for x in node.attribute if x.name == "k"), 1)
        weights = [node.input[i] for i in (2, 4, 6) if len(node.input) > i and node.input[i]]
        shapes = [shape for w in weights if (shape := self.shape(w)) is not None]
        per_expert = sum(float(np.prod(shape[1:])) for shape in shapes)
        moved = 2 * rows * hidden[-1] * self.itemsize(node.input[0])
        return 2.0 * rows * top_k * per_expert, moved


def _numel(dims: list[int]) -> int:
    return int(np.prod(dims)) if dims else 1


def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4
