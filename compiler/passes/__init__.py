"""Built-in passes. Each lives in its own module; :func:`builtin_passes` lists them."""

from __future__ import annotations

from typing import Any


def builtin_passes() -> list[type[Any]]:
    from hetmap.compiler.passes.allocate import AllocatePass
    from hetmap.compiler.passes.cost import CostPass
    from hetmap.compiler.passes.density import DensityPass
    from hetmap.compiler.passes.expert_score import ExpertScorePass
    from hetmap.compiler.passes.place import PlacePass
    from hetmap.compiler.passes.sensitivity import SensitivityPass
    from hetmap.compiler.passes.tile import TilePass

    return [DensityPass, ExpertScorePass, SensitivityPass, PlacePass, TilePass, AllocatePass,
            CostPass]
