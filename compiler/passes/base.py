"""The pass contract.

A pass is a frozen dataclass with a kebab-case ``name``, a one-line ``description``, its
options as typed fields (parsed from pipeline text such as ``place{policy=max-norm}``), and
``run(graph, ctx) -> PassResult``, and its contract: ``requires`` and ``provides``, the
annotation types it reads and writes (:mod:`hetmap.compiler.passes.contracts`). Passes hand
each other nothing but typed annotations on the graph; the pass manager checks the contracts
and verifies the IR after every pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from hetmap.compiler.ir.graph import Graph

if TYPE_CHECKING:
    from hetmap.compiler.frontend.loader import LoadedModel
    from hetmap.compiler.registry import Registries
    from hetmap.targets import Target


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed, and short notes."""

    graph: Graph
    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class CompileContext:
    """Everything a pass may consult besides the graph."""

    model: LoadedModel
    target: Target
    registries: Registries
    seed: int = 0
    #: called with (description, total) and returns a callable advancing by n; no-op default
    progress: Callable[[str, int], Callable[[int], None]] = lambda _d, _t: (lambda _n: None)
    log: Callable[[str], None] = lambda _m: None


@runtime_checkable
class Pass(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]
    requires: ClassVar[tuple[type, ...]]
    provides: ClassVar[tuple[type, ...]]

    def run(self, graph: Graph, ctx: CompileContext) -> PassResult: ...
