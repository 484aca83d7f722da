"""hetmap runtime: simulate a mapped model with analog (AIMC) non-idealities.

``build_simulated_model`` rewrites a model so the chosen linears and experts run on the hetmap
analog tile model (or, for reference, on aihwkit ``AnalogLinear`` modules).

Names are imported on first use: the front end reads expert layouts from
:mod:`hetmap.runtime.layouts` without importing aihwkit, which only the simulator needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .analog import AnalogTileStack, DigitalStack, SimulatedLinear  # noqa: F401
    from .experts import SimulatedExperts, experts_layout  # noqa: F401
    from .grouped import RowGroups, grouped_product  # noqa: F401
    from .reference import ReferenceExperts, ReferenceLinear, reference_linear, reference_rpu_config  # noqa: F401
    from .rewrite import BACKENDS, build_simulated_model, module_seed  # noqa: F401
    from .settings import NOISE_MODELS, AnalogSettings  # noqa: F401

_NAMES = {
    "AnalogSettings": "settings",
    "AnalogTileStack": "analog",
    "BACKENDS": "rewrite",
    "DigitalStack": "analog",
    "NOISE_MODELS": "settings",
    "ReferenceExperts": "reference",
    "ReferenceLinear": "reference",
    "RowGroups": "grouped",
    "SimulatedExperts": "experts",
    "SimulatedLinear": "analog",
    "build_simulated_model": "rewrite",
    "experts_layout": "experts",
    "grouped_product": "grouped",
    "module_seed": "rewrite",
    "reference_linear": "reference",
    "reference_rpu_config": "reference",
}

__all__ = sorted(_NAMES)


def require_aihwkit() -> None:
    """A one-line SimulationError, saying how to install it, when aihwkit is missing."""
    import importlib.util

    from hetmap.common.errors import AIHWKIT_MISSING, SimulationError

    if importlib.util.find_spec("aihwkit") is None:
        raise SimulationError(AIHWKIT_MISSING)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'hetmap.runtime' has no attribute {name!r}")
    if _NAMES[name] not in ("settings", "grouped"):
        require_aihwkit()
    value = getattr(importlib.import_module(f"hetmap.runtime.{_NAMES[name]}"), name)
    globals()[name] = value
    return value
