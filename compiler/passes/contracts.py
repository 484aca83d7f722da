"""Pass contracts: what each pass requires and provides, checked by the pass manager.

A pass declares two class attributes, tuples of annotation types:

* ``requires``: annotations it reads and cannot do without (``cost`` needs :class:`Tiling`);
* ``provides``: annotations it writes.

The manager keeps a :class:`Provenance` on the graph: for every provided annotation type,
the pass that provided it and what that pass required. Rules:

1. Before a pipeline runs, and again before each pass, every required type must have been
   provided by an earlier pass (or be present on the graph it started from); otherwise the
   pipeline is refused in one line naming the pass that provides it ("cost needs Tiling,
   which tile provides: add tile before cost").
2. When a pass provides a type, every type derived from it (provided by a pass that required
   it, transitively) becomes stale and is no longer available: ``allocate,tile,cost`` is
   refused because ``tile`` re-tiled after ``allocate`` placed the old tiles.
3. After a pass runs, every graph-level type it provides (``scope = "graph"``) must be on the
   graph, and it must not have written an annotation type it did not declare.

A pass that declares neither attribute (an older plugin) is run unchecked; its outputs are not
tracked, so a pass that requires them reports them missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hetmap.common.errors import PassError, PipelineError
from hetmap.compiler.ir.graph import Graph


@dataclass(frozen=True)
class Fact:
    """One provided annotation type: who provided it and from what."""

    provider: str
    derived_from: frozenset[type] = frozenset()


@dataclass(frozen=True, eq=False)
class Provenance:
    """Graph-level: for every annotation type passes provided, which pass provided it."""

    scope: ClassVar[str] = "graph"
    facts: Mapping[type, Fact] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {}

    def providers(self) -> dict[str, str]:
        """Annotation type name -> providing pass (for plan.json)."""
        return {kind.__name__: fact.provider for kind, fact in self.facts.items()}


def declared(pass_: Any) -> bool:
    return hasattr(pass_, "requires") or hasattr(pass_, "provides")


def requires_of(pass_: Any) -> tuple[type, ...]:
    return tuple(getattr(pass_, "requires", ()))


def provides_of(pass_: Any) -> tuple[type, ...]:
    return tuple(getattr(pass_, "provides", ()))


def present_types(graph: Graph) -> set[type]:
    """Annotation types on the graph or on any of its nodes."""
    kinds = set(graph.annotations)
    for node in graph:
        kinds.update(node.annotations)
    kinds.discard(Provenance)
    return kinds


def initial_facts(graph: Graph) -> dict[type, Fact]:
    """What a pipeline may rely on before its first pass."""
    provenance = graph.get(Provenance)
    if provenance is not None:
        return dict(provenance.facts)
    return {kind: Fact("the input graph") for kind in present_types(graph)}


def _name(kind: type) -> str:
    return kind.__name__


class Checker:
    """Walks a pipeline's contracts; ``providers`` maps a type to the passes that provide it."""

    def __init__(self, facts: dict[type, Fact], providers: Mapping[type, Iterable[str]]):
        self.facts = facts
        self.providers = providers
        #: stale type -> (its old provider, the pass that made it stale)
        self.stale: dict[type, tuple[str, str]] = {}

    def check(self, pass_: Any) -> None:
        """Rule 1: raise a one-line PipelineError when ``pass_`` lacks a required type."""
        for kind in requires_of(pass_):
            if kind in self.facts:
                continue
            name = pass_.name
            if kind in self.stale:
                old, newer = self.stale[kind]
                raise PipelineError(
                    f"{name} needs {_name(kind)}, but {newer} ran after {old} and made it stale: "
                    f"run {old} again after {newer}")
            makers = sorted(self.providers.get(kind, ()))
            if makers:
                raise PipelineError(
                    f"{name} needs {_name(kind)}, which {' or '.join(makers)} provides: add "
                    f"{makers[0]} before {name} in the pipeline")
            raise PipelineError(f"{name} needs {_name(kind)}, which no registered pass provides")

    def record(self, pass_: Any) -> None:
        """Rule 2: ``pass_`` ran; its types are fresh, what derived from them is stale."""
        provided = set(provides_of(pass_))
        if not provided:
            return
        changed = set(provided)
        while True:
            derived = {kind for kind, fact in self.facts.items()
                       if kind not in provided and fact.derived_from & changed}
            if not derived:
                break
            for kind in derived:
                self.stale[kind] = (self.facts.pop(kind).provider, pass_.name)
            changed |= derived
        inputs = frozenset(requires_of(pass_))
        for kind in provided:
            self.facts[kind] = Fact(pass_.name, inputs)
            self.stale.pop(kind, None)


def check_pipeline(passes: Iterable[Any], graph: Graph,
                   providers: Mapping[type, Iterable[str]]) -> None:
    """Rule 1 and 2 over a whole pipeline before anything runs."""
    checker = Checker(initial_facts(graph), providers)
    for pass_ in passes:
        checker.check(pass_)
        checker.record(pass_)


def check_outputs(pass_: Any, graph: Graph, before: set[type], label: str) -> None:
    """Rule 3, after ``pass_`` ran (``before``: the types present before it)."""
    if not declared(pass_):
        return
    provided = set(provides_of(pass_))
    for kind in provided:
        if getattr(kind, "scope", "node") == "graph" and graph.get(kind) is None:
            raise PassError(f"{label} declares that it provides {_name(kind)} but did not "
                            "write it on the graph")
    undeclared = sorted(_name(k) for k in present_types(graph) - before - provided)
    if undeclared:
        raise PassError(f"{label} wrote {', '.join(undeclared)} without declaring it in its "
                        "`provides`")


def providers_in(registry: Any) -> dict[type, list[str]]:
    """Annotation type -> names of the registered passes that provide it."""
    found: dict[type, list[str]] = {}
    entries = getattr(registry, "entries", {}) if registry is not None else {}
    for name, entry in entries.items():
        value = getattr(entry, "value", None)
        for kind in getattr(value, "provides", ()) or ():
            found.setdefault(kind, []).append(name)
    return found
