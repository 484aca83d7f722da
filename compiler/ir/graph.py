"""hetmap's IR: a data-flow graph of typed nodes over a Hugging Face / PyTorch model.

The IR is deliberately small:

* :class:`Node` -- one compute region of the model (an attention block, a router, one routed
  expert, a dense FFN, the LM head, an elementwise op, ...). Nodes that multiply by weights
  carry :class:`Matrix` entries; a matrix references its weights by state-dict name through a
  :class:`WeightRef`, so nothing is loaded until a pass asks (meta-device models compile
  without memory for weights).
* Typed annotations (see :mod:`hetmap.compiler.ir.annotations`) that passes attach with
  :meth:`Node.annotate` and read with :meth:`Node.get`. There is no free-form ``meta`` dict.
* :class:`Graph` -- nodes in program order plus data-flow edges (networkx stays behind this
  API) and one :class:`MoeLayer` record per MoE block.

``str(graph)`` gives the textual form written to ``ir.txt``; :func:`verify` checks
well-formedness and is run by the pass manager after every pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import networkx as nx

from hetmap.common.errors import VerificationError


class NodeKind(StrEnum):
    """What a node computes. Values are the kebab-case names used in plan.json and ir.txt."""

    INPUT = "input"
    OUTPUT = "output"
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    ROUTER = "router"
    EXPERT = "expert"
    SHARED_EXPERT = "shared-expert"
    DENSE_FFN = "dense-ffn"
    LINEAR = "linear"
    LM_HEAD = "lm-head"
    OPAQUE = "opaque"
    NORM = "norm"
    OP = "op"

    def __str__(self) -> str:
        return self.value


#: Kinds that always compute on every token (activation density 1 by structure).
DENSE_KINDS = frozenset(
    {NodeKind.ATTENTION, NodeKind.ROUTER, NodeKind.SHARED_EXPERT, NodeKind.DENSE_FFN,
     NodeKind.LINEAR, NodeKind.LM_HEAD, NodeKind.OPAQUE}
)


@dataclass(frozen=True)
class WeightRef:
    """Where a matrix's weights live: a state-dict tensor, optionally one expert's slice.

    The loaded matrix is ``t[expert]`` (if ``expert`` is set; of ``t`` viewed as ``[split,
    -1, ...]`` when ``split`` is set, for flat 2-D expert stacks), transposed if
    ``transposed``, then rows ``out_start:out_stop:out_step`` -- always in nn.Linear
    ``[out, in]`` orientation.
    """

    tensor: str
    expert: int | None = None
    transposed: bool = False
    out_start: int | None = None
    out_stop: int | None = None
    out_step: int = 1
    split: int | None = None

    def select(self, full: Any) -> Any:
        """Apply this reference to the full stored tensor (torch or numpy)."""
        if self.split is not None:
            full = full.reshape(self.split, -1, *full.shape[1:])
        t = full[self.expert] if self.expert is not None else full
        if self.transposed:
            t = t.T
        if self.out_start is not None or self.out_stop is not None or self.out_step != 1:
            t = t[self.out_start:self.out_stop:self.out_step]
        return t

    def __str__(self) -> str:
        text = self.tensor
        if self.split is not None:
            text += f".split({self.split})"
        if self.expert is not None:
            text += f"[{self.expert}]"
        if self.transposed:
            text += ".T"
        if self.out_start is not None or self.out_stop is not None or self.out_step != 1:
            step = f":{self.out_step}" if self.out_step != 1 else ""
            text += f"[{self.out_start or 0}:{'' if self.out_stop is None else self.out_stop}{step}]"
        return text


@dataclass(frozen=True)
class Matrix:
    """One weight matrix of a node, in nn.Linear terms: ``y = x @ W.T (+ b)``, W ``[out, in]``.

    ``key`` names the matrix across hetmap's back ends: the nn.Linear module path, or
    ``"<experts module>.<e>.<role>"`` for one expert's matrix in fused storage.
    """

    role: str
    key: str
    out_features: int
    in_features: int
    weight: WeightRef
    bias: WeightRef | None = None

    @property
    def params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


A = TypeVar("A")


class Annotated:
    """Holder of typed annotations: one dataclass instance per annotation type."""

    annotations: dict[type, object]

    def annotate(self, annotation: object) -> None:
        """Attach (or replace) the annotation of ``type(annotation)``."""
        if not dataclasses.is_dataclass(annotation):
            raise TypeError(f"annotations must be dataclass instances, got {type(annotation)!r}")
        self.annotations[type(annotation)] = annotation

    def get(self, kind: type[A]) -> A | None:
        return self.annotations.get(kind)  # type: ignore[return-value]

    def has(self, kind: type) -> bool:
        return kind in self.annotations


@dataclass(eq=False)
class Node(Annotated):
    """One node of the IR. Identity is the (unique) ``name``."""

    name: str
    kind: NodeKind
    module: str | None = None
    matrices: tuple[Matrix, ...] = ()
    layer: int | None = None
    expert: int | None = None
    op: str | None = None
    extra_params: int = 0
    annotations: dict[type, object] = field(default_factory=dict)

    @property
    def params(self) -> int:
        """Parameters of this node's matrices (plus non-matrix parameters, e.g. embeddings)."""
        return sum(m.params for m in self.matrices) + self.extra_params

    @property
    def matrix_params(self) -> int:
        """Parameters of this node's weight matrices (and their biases) only."""
        return sum(m.params for m in self.matrices)

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.kind.value})"


@dataclass(frozen=True)
class MoeLayer:
    """One MoE block: where it lives and how it routes."""

    layer: int
    block: str
    router: str
    experts_module: str
    layout: str
    num_experts: int
    top_k: int
    shared: tuple[str, ...] = ()
    #: router slots beyond ``num_experts`` taken by identity ("zero") experts
    identity_experts: int = 0


class Graph(Annotated):
    """Nodes in program order with data-flow edges, plus the model's MoE layers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._dag: nx.DiGraph = nx.DiGraph()
        self._nodes: dict[str, Node] = {}
        self.moe_layers: dict[int, MoeLayer] = {}
        self.params_total: int = 0
        #: modules the tracer kept whole because torch.fx could not trace them
        self.opaque_modules: tuple[str, ...] = ()
        #: graph-level typed annotations (allocation, cost totals, ...), keyed by type
        self.annotations = {}

    # -- construction ------------------------------------------------------------------
    def add(self, node: Node, inputs: Iterable[str] = ()) -> Node:
        if node.name in self._nodes:
            raise VerificationError(f"duplicate IR node name {node.name!r}")
        self._nodes[node.name] = node
        self._dag.add_node(node.name)
        for source in inputs:
            if source not in self._nodes:
                raise VerificationError(f"node {node.name!r} reads unknown node {source!r}")
            self._dag.add_edge(source, node.name)
        return node

    # -- queries -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def node(self, name: str) -> Node:
        return self._nodes[name]

    def inputs_of(self, name: str) -> list[str]:
        return list(self._dag.predecessors(name))

    def users_of(self, name: str) -> list[str]:
        return list(self._dag.successors(name))

    def edges(self) -> list[tuple[str, str]]:
        return list(self._dag.edges())

    def by_kind(self, *kinds: NodeKind) -> list[Node]:
        return [n for n in self._nodes.values() if n.kind in kinds]

    def experts(self, layer: int | None = None) -> list[Node]:
        return [n for n in self._nodes.values()
                if n.kind is NodeKind.EXPERT and (layer is None or n.layer == layer)]

    def experts_by_layer(self) -> dict[int, list[Node]]:
        groups: dict[int, list[Node]] = {}
        for n in self.experts():
            groups.setdefault(n.layer, []).append(n)  # type: ignore[arg-type]
        return groups

    def matrix_nodes(self) -> list[Node]:
        return [n for n in self._nodes.values() if n.matrices]

    def is_acyclic(self) -> bool:
        return bool(nx.is_directed_acyclic_graph(self._dag))

    def __str__(self) -> str:
        from hetmap.compiler.ir.printer import format_graph

        return format_graph(self)


def verify(graph: Graph) -> None:
    """Raise :class:`VerificationError` if ``graph`` is malformed.

    Rules: (1) the graph is acyclic; (2) every expert node has ``layer`` and ``expert`` and
    belongs to a recorded MoE layer whose experts are numbered 0..E-1 exactly once;
    (3) matrices have positive shapes and node-unique roles; (4) matrix keys are unique;
    (5) every annotation passes its own ``check(node)`` if it defines one.
    """
    if not graph.is_acyclic():
        raise VerificationError(f"graph {graph.name!r} has a cycle")
    keys: set[str] = set()
    for node in graph:
        roles = [m.role for m in node.matrices]
        if len(set(roles)) != len(roles):
            raise VerificationError(f"node {node.name!r} has duplicate matrix roles {roles}")
        for m in node.matrices:
            if m.out_features <= 0 or m.in_features <= 0:
                raise VerificationError(f"node {node.name!r} matrix {m.role} has shape {m.shape}")
            if m.key in keys:
                raise VerificationError(f"matrix key {m.key!r} appears twice")
            keys.add(m.key)
        for annotation in node.annotations.values():
            check = getattr(annotation, "check", None)
            if check is not None:
                check(node)
    for layer, experts in graph.experts_by_layer().items():
        moe = graph.moe_layers.get(layer)
        if moe is None:
            raise VerificationError(f"expert nodes in layer {layer} but no MoE layer recorded")
        numbers = sorted(n.expert for n in experts)  # type: ignore[type-var]
        if numbers != list(range(moe.num_experts)):
            raise VerificationError(
                f"layer {layer}: experts {numbers[:8]}... do not number 0..{moe.num_experts - 1}")
