"""Hardware targets: descriptions of heterogeneous analog-digital accelerators.

Built-in presets are the ``*.toml`` files in this folder (see :func:`builtin_targets`);
:func:`load_target` takes a preset name or a path to a TOML file.
"""

from hetmap.targets.capability import MATMUL_KINDS, aimc_supports
from hetmap.targets.loader import (
    DEFAULT_TARGET,
    NOISE_PARAMETERS,
    builtin_targets,
    load_target,
    load_target_file,
    target_from_dict,
)
from hetmap.targets.model import NOISE_MODELS, AimcSpec, DigitalSpec, NoiseSpec, Target

__all__ = [
    "DEFAULT_TARGET",
    "MATMUL_KINDS",
    "NOISE_MODELS",
    "NOISE_PARAMETERS",
    "AimcSpec",
    "DigitalSpec",
    "NoiseSpec",
    "Target",
    "aimc_supports",
    "builtin_targets",
    "load_target",
    "load_target_file",
    "target_from_dict",
]
