"""Settings of the simulated analog in-memory-computing (AIMC) tiles.

:class:`AnalogSettings` holds everything the simulator needs to know about a crossbar tile and
its periphery. Field meanings follow aihwkit's ``TorchInferenceRPUConfig`` (``forward`` IO
parameters, ``mapping`` parameters, ``noise_model``, ``drift_compensation``) so that the hetmap
tile model and the aihwkit reference backend can be configured from the same object:

1. ``rows`` x ``cols``: inputs x outputs of one crossbar tile (aihwkit ``mapping.max_input_size``
   and ``max_output_size``; hetmap cuts fixed-size tiles, aihwkit near-equal ones).
2. ``dac_bits`` / ``adc_bits``: input / output resolution; ``n`` bits mean aihwkit's
   ``inp_res = 1 / (2**n - 2)`` (levels symmetric around zero). ``None`` turns quantization off.
3. ``inp_bound`` / ``out_bound``: clipping range of the (normalized) inputs and the outputs.
4. ``noise_management="abs-max"``: each token's input slice is divided by its abs-max before
   the DAC and the output multiplied back (aihwkit ``NoiseManagementType.ABS_MAX``).
5. ``bound_management="iterative"``: if any output of a tile clips, the tile's inputs are
   scaled down by 2, 4, ... and the product repeated (aihwkit ``BoundManagementType.ITERATIVE``).
6. ``out_noise``: std of additive Gaussian output noise, in units of the normalized output.
7. ``weight_scaling_omega``: each tile's weights are divided by ``abs-max / omega`` and the
   factor is applied digitally at the output (aihwkit ``mapping.weight_scaling_omega``); the
   bare aihwkit default 0.0 (no scaling) would make ``out_bound`` and ``out_noise`` depend on
   the weights' magnitude, so hetmap defaults to 1.0 as aihwkit's inference examples do.
8. ``noise_model`` / ``noise_scale``: aihwkit noise model by name; ``noise_scale`` multiplies its
   programming-noise sigma (the paper's c). 0 turns programming noise off.
9. ``drift_time`` (seconds after programming, ``None`` = no drift step), ``gdc`` (global drift
   compensation), ``read_noise`` (the model's accumulated 1/f read noise, applied in the drift
   step as aihwkit does; without a drift step there is no read noise).
10. ``ideal=True`` turns every non-ideality off: the tiled product is exact.
11. ``kernels``: how the periphery's element-wise steps and the PCM programming run:
    ``"eager"`` (PyTorch ops, noise from ``torch.randn``) or ``"compiled"`` (fused by
    ``torch.compile``: C++ on the CPU, Triton on a GPU; the first call compiles, tens of
    seconds). The same arithmetic up to float contraction, but ``"compiled"`` draws its
    output and programming noise inside its kernels from a counter-based generator
    (:mod:`hetmap.runtime.fused`, rules 1 and 6): the same distributions, other samples for
    a seed than ``"eager"``.
12. ``programming``: when the tiles are programmed, not what they hold: ``"resident"``
    (once, when the simulated model is built; the programmed tiles stay in memory, float32
    beside the model's own weights) or ``"per-batch"`` (at every forward, a few experts at a
    time, from the model's own weights, each group dropped once its rows are computed: the
    simulated model costs no tile memory, and every forward pays the programming again).
    Both draw the same programming noise for a seed (same generator stream, same order);
    output noise is drawn per call and differs between them.
13. ``noise_params``: the noise model's other keyword arguments (a target's
    ``[aimc.noise.params]`` without its programming-noise scale, which is ``noise_scale``):
    ``prog_coeff``, ``g_max``, ``t_0``, ``t_read``, ``drift_scale``, ``read_noise_scale``,
    ``num_devices``, ... as the model takes them. Held as sorted ``(name, value)`` pairs (lists
    as tuples) so that settings stay hashable; given as a table and written as one.
    ``read_noise=False`` turns read noise off whatever ``read_noise_scale`` says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hetmap.common.errors import SimulationError
from hetmap.common.noise import NOISE_MODELS

NOISE_MANAGEMENT = ("abs-max", "none")
BOUND_MANAGEMENT = ("iterative", "none")
KERNELS = ("eager", "compiled")
PROGRAMMING = ("resident", "per-batch")
#: the noise-model parameter that ``noise_scale`` is, where it is not ``prog_noise_scale``
SCALE_PARAMETER = {"reram": "noise_scale"}

# aihwkit IOParameters defaults that bound the iterative bound management.
MAX_BM_FACTOR = 1000.0
MAX_BM_RES = 0.25


@dataclass(frozen=True)
class AnalogSettings:
    """Crossbar tile geometry, periphery and device noise of the simulated AIMC tiles."""

    rows: int = 512
    cols: int = 512
    dac_bits: int | None = 8
    adc_bits: int | None = 8
    inp_bound: float = 1.0
    out_bound: float = 12.0
    noise_management: str = "abs-max"
    bound_management: str = "iterative"
    out_noise: float = 0.0
    weight_scaling_omega: float = 1.0
    weight_scaling_columnwise: bool = False
    noise_model: str = "pcm"
    noise_scale: float = 1.0
    drift_time: float | None = None
    gdc: bool = True
    read_noise: bool = True
    ideal: bool = False
    kernels: str = "eager"
    programming: str = "resident"
    noise_params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_params", _frozen_params(self.noise_params))
        for name, valid, wanted in _RULES:
            value = getattr(self, name)
            if not valid(value):
                raise SimulationError(f"analog setting {name!r} must be {wanted}, got {value!r}")
        _check_choice("noise_model", self.noise_model, NOISE_MODELS)
        _check_choice("noise_management", self.noise_management, NOISE_MANAGEMENT)
        _check_choice("bound_management", self.bound_management, BOUND_MANAGEMENT)
        _check_choice("kernels", self.kernels, KERNELS)
        _check_choice("programming", self.programming, PROGRAMMING)
        for name in ("weight_scaling_columnwise", "gdc", "read_noise", "ideal"):
            if not isinstance(getattr(self, name), bool):
                raise SimulationError(
                    f"analog setting {name!r} must be true or false, got {getattr(self, name)!r}"
                )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AnalogSettings:
        """Build settings from a plain dict (e.g. a hardware target's ``[analog]`` table).

        Keys are the field names; ``-`` may be written for ``_``. Unknown keys are an error.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise SimulationError(
                    f"unknown analog setting {key!r}; known settings: {', '.join(sorted(known))}"
                )
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (inverse of :meth:`from_dict`)."""
        data = dataclasses.asdict(self)
        data["noise_params"] = self.noise_kwargs()
        return data

    def noise_kwargs(self) -> dict[str, Any]:
        """Rule 13's parameters as keyword arguments (tuples as lists)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in self.noise_params}

    @property
    def inp_res(self) -> float:
        """aihwkit ``forward.inp_res``: DAC step as a fraction of the full range (0 = off)."""
        return 0.0 if self.ideal or self.dac_bits is None else 1.0 / (2**self.dac_bits - 2)

    @property
    def out_res(self) -> float:
        """aihwkit ``forward.out_res``: ADC step as a fraction of the full range (0 = off)."""
        return 0.0 if self.ideal or self.adc_bits is None else 1.0 / (2**self.adc_bits - 2)

    @property
    def programs_noise(self) -> bool:
        """Whether programming adds device noise."""
        return not self.ideal and self.noise_scale > 0

    @property
    def drifts(self) -> bool:
        """Whether a drift (and read-noise) step follows programming."""
        return not self.ideal and self.drift_time is not None

    @property
    def max_bound_reduction(self) -> float:
        """Largest input down-scaling the iterative bound management tries (aihwkit's rule)."""
        inp_step = self.inp_res * 2.0 * self.inp_bound
        limit = MAX_BM_FACTOR
        if inp_step > 0:
            limit = min(limit, MAX_BM_RES / inp_step)
        return limit


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("rows", lambda v: _is_int(v) and v > 0, "a positive int"),
    ("cols", lambda v: _is_int(v) and v > 0, "a positive int"),
    ("dac_bits", lambda v: v is None or (_is_int(v) and v >= 2), "an int >= 2 or none"),
    ("adc_bits", lambda v: v is None or (_is_int(v) and v >= 2), "an int >= 2 or none"),
    ("inp_bound", lambda v: _is_number(v) and v > 0, "a positive number"),
    ("out_bound", lambda v: _is_number(v) and v > 0, "a positive number"),
    ("weight_scaling_omega", lambda v: _is_number(v) and v > 0, "a positive number"),
    ("out_noise", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    ("noise_scale", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    ("drift_time", lambda v: v is None or (_is_number(v) and v >= 0), "seconds >= 0 or none"),
)


def _frozen_params(params: Any) -> tuple[tuple[str, Any], ...]:
    """Rule 13: a table (or pairs) of noise-model parameters as sorted, hashable pairs."""
    def frozen(value: Any) -> Any:
        return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value

    try:
        items = params.items() if isinstance(params, Mapping) else params
        pairs = [(str(name), frozen(value)) for name, value in items]
    except (TypeError, ValueError):
        raise SimulationError(f"analog setting 'noise_params' must be a table of noise-model "
                              f"parameters, got {params!r}") from None
    return tuple(sorted(pairs))


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SimulationError(
            f"analog setting {name!r} must be one of {', '.join(choices)}; got {value!r}"
        )


def settings_for(target: Any, *, noise_scale: float | None = None, drift_time: float | None = None,
                 ideal: bool = False, programming: str = "resident",
                 kernels: str = "eager") -> AnalogSettings:
    """The analog settings a target's AIMC spec describes (duck-typed: any object with the
    ``aimc`` fields of :class:`hetmap.targets.Target`)."""
    aimc = target.aimc
    params = dict(aimc.noise.params)
    # the programming-noise scale is noise_scale (rule 8); the rest goes to the model (rule 13)
    scale = params.pop(SCALE_PARAMETER.get(aimc.noise.model, "prog_noise_scale"), 1.0)
    return AnalogSettings(
        rows=aimc.rows, cols=aimc.cols, dac_bits=aimc.dac_bits, adc_bits=aimc.adc_bits,
        out_noise=aimc.out_noise, noise_model=aimc.noise.model,
        noise_scale=float(scale if noise_scale is None else noise_scale),
        drift_time=drift_time, ideal=ideal, programming=programming, kernels=kernels,
        noise_params=tuple(params.items()))
