"""hetmap's exception hierarchy: one root, specific subclasses.

Every error a user can cause derives from :class:`HetmapError`. The CLI prints
``error: <message>`` on one line and exits with status 2 for these; anything else is a bug
and shows a traceback. Messages say what was wrong, where, and what to do about it.
"""

from __future__ import annotations


class HetmapError(Exception):
    """Root of all hetmap errors a user can cause or fix."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of ``error``'s message (its type's name if it has none): what
    a one-line message quotes of a library's error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class ModelLoadError(HetmapError):
    """A model name, checkpoint directory or factory could not be resolved or loaded."""


class TraceError(HetmapError):
    """torch.fx could not trace a module (message names the module path and a hint)."""


class NoMoeError(TraceError):
    """No MoE block was found in a model (and dense-only mapping was not asked for)."""


class PipelineError(HetmapError):
    """A malformed pipeline string, or an unknown pass or pass option."""


class RegistryError(HetmapError):
    """An unknown or duplicate name in a registry (passes, policies, targets, emitters)."""


class PluginError(RegistryError):
    """A third-party plugin failed to import or returned something invalid."""


class PassError(HetmapError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class VerificationError(HetmapError):
    """The IR is malformed (raised by the verifier, usually after a pass)."""


class MissingDataError(HetmapError):
    """A pass or policy needs weights or calibration data the model does not have
    (e.g. a meta-device model)."""


class TargetError(HetmapError):
    """A target description is invalid (message names the field) or unknown."""


class CapacityError(HetmapError):
    """The mapping needs more crossbar arrays than the target has."""


class OutputError(HetmapError):
    """An output location is unusable (exists without --force, not writable, ...)."""


class SimulationError(HetmapError):
    """A plan cannot be simulated as asked (bad settings, missing weights, ...)."""


class EmitError(HetmapError):
    """A back end cannot emit the plan (e.g. ONNX for a model without weights)."""


#: why aihwkit is not a declared dependency, and how to install it (README "Install")
AIHWKIT_MISSING = (
    "the analog simulator needs aihwkit 1.1.0, which is not installed: run "
    "'pip install --no-deps aihwkit==1.1.0' (its declared dependencies pull a torchvision "
    "that breaks transformers beside the CPU torch; 'make venv' does this for you)")
