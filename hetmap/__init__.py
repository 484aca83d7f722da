"""hetmap: map Mixture-of-Experts transformers onto heterogeneous analog-digital accelerators.

The Python API (the ``hetmap`` CLI is a thin layer over it)::

    import hetmap
    plan = hetmap.compile("demo", policy="activation-frequency", budget=0.25)
    plan.write("out/demo-af", force=True)     # plan.json + ir.txt
    plan.emit_onnx("out/demo-af")             # model.onnx with placement metadata
    result = plan.simulate(seeds=3)           # perplexity all-digital vs mapped
    same = hetmap.load_plan("out/demo-af")    # a plan directory back as a Plan
    hetmap.sweep("demo", policies=["random", "activation-frequency"], budgets=[0.1, 0.25],
                 noise_scales=[1.0], seeds=2, out="out/sweep")

Names are resolved on first use, so ``import hetmap`` stays cheap and the packages below it
(``hetmap.compiler``, ``hetmap.runtime``, ``hetmap.targets``, ``hetmap.common``) can be
imported on their own without cycles.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hetmap.common.errors import HetmapError  # noqa: F401
    from hetmap.compiler.api import Plan, load_plan, version  # noqa: F401
    from hetmap.compiler.api import compile_model as compile  # noqa: F401
    from hetmap.compiler.api import run_sweep as sweep  # noqa: F401
    from hetmap.targets import Target, load_target  # noqa: F401

#: public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "compile": ("hetmap.compiler.api", "compile_model"),
    "load_plan": ("hetmap.compiler.api", "load_plan"),
    "sweep": ("hetmap.compiler.api", "run_sweep"),
    "Plan": ("hetmap.compiler.api", "Plan"),
    "version": ("hetmap.compiler.api", "version"),
    "HetmapError": ("hetmap.common.errors", "HetmapError"),
    "Target": ("hetmap.targets", "Target"),
    "load_target": ("hetmap.targets", "load_target"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'hetmap' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
