"""The pass manager: checks the pipeline's contracts (:mod:`hetmap.compiler.passes.contracts`)
before anything runs and around every pass, verifies the IR after every pass, times each pass,
optionally dumps the IR after each, and names the failing pass (and what ran before) on error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetmap.common.errors import HetmapError, PassError, VerificationError
from hetmap.compiler.ir.graph import Graph, verify
from hetmap.compiler.passes.base import CompileContext, PassResult
from hetmap.compiler.passes.contracts import (
    Checker,
    Provenance,
    check_outputs,
    initial_facts,
    present_types,
    providers_in,
)
from hetmap.compiler.passes.pipeline import PassSpec, instantiate


@dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class PipelineRun:
    graph: Graph
    timings: list[PassTiming]


def build_passes(specs: list[PassSpec], registry: Any, overrides: dict[str, Any] | None = None
                 ) -> list[Any]:
    """Instantiate passes; ``overrides`` fill options a spec does not set (CLI flags)."""
    from hetmap.compiler.passes.pipeline import option_types

    passes = []
    for spec in specs:
        cls = registry.get(spec.name)
        options: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            if value is not None and key in option_types(cls):
                options[key] = value
        options.update(spec.options)
        passes.append(instantiate(cls, options, spec.name))
    return passes


def _described(pass_: Any, ctx: CompileContext | None) -> str:
    """``pass NAME`` plus its plugin origin when it does not come with hetmap."""
    registries = getattr(ctx, "registries", None)
    entry = registries.passes.entries.get(pass_.name) if registries is not None else None
    if entry is not None and entry.origin != "built-in":
        return f"pass {pass_.name} from {entry.origin}"
    return f"pass {pass_.name}"


def check_contracts(graph: Graph | None, passes: list[Any], ctx: Any) -> None:
    """Refuse, in one line, a pipeline whose passes cannot get what they require (``graph``:
    what it starts from; None: a freshly imported model). ``ctx``: anything with the
    ``registries`` whose passes may provide a missing type."""
    registry = getattr(getattr(ctx, "registries", None), "passes", None)
    checker = Checker(initial_facts(graph) if graph is not None else {}, providers_in(registry))
    for pass_ in passes:
        checker.check(pass_)
        checker.record(pass_)


def run_pipeline(graph: Graph, passes: list[Any], ctx: CompileContext | None, *,
                 dump_dir: Path | None = None,
                 on_pass: Callable[[PassTiming], None] | None = None) -> PipelineRun:
    timings: list[PassTiming] = []
    verify(graph)
    check_contracts(graph, passes, ctx)
    registry = getattr(getattr(ctx, "registries", None), "passes", None)
    checker = Checker(initial_facts(graph), providers_in(registry))
    for index, pass_ in enumerate(passes):
        ran = ", ".join(t.name for t in timings) or "nothing"
        checker.check(pass_)  # plugin passes may have changed what the graph holds
        before = present_types(graph)
        start = time.perf_counter()
        try:
            result = pass_.run(graph, ctx)
        except HetmapError as exc:
            exc.args = (f"{_described(pass_, ctx)}: {exc}",)
            raise
        except Exception as exc:
            raise PassError(f"{_described(pass_, ctx)} crashed (after: {ran}): "
                            f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(result, PassResult):
            raise PassError(f"{_described(pass_, ctx)} returned {type(result).__name__}, "
                            "not a PassResult")
        check_outputs(pass_, result.graph, before, _described(pass_, ctx))
        checker.record(pass_)
        result.graph.annotate(Provenance(dict(checker.facts)))
        try:
            verify(result.graph)
        except VerificationError as exc:
            raise VerificationError(
                f"IR invalid after {_described(pass_, ctx)} (after: {ran}): {exc}") from exc
        graph = result.graph
        timing = PassTiming(pass_.name, time.perf_counter() - start, result.modified, result.notes)
        timings.append(timing)
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)
            (dump_dir / f"{index + 1:02d}-{pass_.name}.txt").write_text(str(graph))
        if on_pass is not None:
            on_pass(timing)
    return PipelineRun(graph, timings)
