"""Built-in passes. Each lives in its own module; :func:`builtin_passes` lists them."""

from __future__ import annotations

from typing import Any


def builtin_passes() -> list[type[Any]]:
    from hetmap.compiler.passes.density import DensityPass
    from hetmap.compiler.passes.expert_score import ExpertScorePass
    from hetmap.compiler.passes.place import PlacePass

    passes: list[type[Any]] = [DensityPass, ExpertScorePass, PlacePass]
    try:
        from hetmap.compiler.passes.hardware import AllocatePass, CostPass, TilePass
    except ImportError:  # pragma: no cover - during bring-up only
        return passes
    return [*passes, TilePass, AllocatePass, CostPass]
