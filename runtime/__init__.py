"""hetmap runtime: simulate a mapped model with analog (AIMC) non-idealities.

``build_simulated_model`` rewrites a model so the chosen linears and experts run on the hetmap
analog tile model (or, for reference, on aihwkit ``AnalogLinear`` modules).
"""

from .analog import AnalogTileStack, DigitalStack, SimulatedLinear
from .experts import SimulatedExperts, experts_layout
from .grouped import RowGroups, grouped_product
from .reference import ReferenceExperts, ReferenceLinear, reference_linear, reference_rpu_config
from .rewrite import BACKENDS, build_simulated_model, module_seed
from .settings import NOISE_MODELS, AnalogSettings

__all__ = [
    "BACKENDS",
    "NOISE_MODELS",
    "AnalogSettings",
    "AnalogTileStack",
    "DigitalStack",
    "ReferenceExperts",
    "ReferenceLinear",
    "RowGroups",
    "SimulatedExperts",
    "SimulatedLinear",
    "build_simulated_model",
    "experts_layout",
    "grouped_product",
    "module_seed",
    "reference_linear",
    "reference_rpu_config",
]
