"""Programming weight matrices onto crossbar tiles with aihwkit's device noise models.

Reads matrices ``[E, out, in]`` and :class:`AnalogSettings`; returns the tile weights (in the
normalized units the crossbar holds) and the digital output scale of every (matrix, input tile,
output column). The physics is aihwkit's: hetmap only arranges the tensors so that one call
covers many tiles.

1. Each fixed-size tile is divided by ``abs-max / omega`` (per tile, or per tile column with
   ``weight_scaling_columnwise``), as aihwkit's ``apply_weight_scaling`` does per tile; the
   factor becomes the tile's digital output scale.
2. Programming noise: ``noise_model.apply_programming_noise`` on the normalized tiles, with
   the model's programming-noise scale set to ``noise_scale`` (for the PCM model with its
   single device pair and no drift step, the same arithmetic in place, without the drift
   coefficients aihwkit draws but would not use: :func:`_pcm_programming`). Callers program a
   few whole tiles per call (:func:`program_in_chunks`). With a device-pair converter
   (abs-max maps to ``g_max``: PCM, Hermes, state-independent) one call covers all tiles:
   every tile's abs-max is ``omega``, so this equals converting each tile on its own as
   aihwkit does; cells outside the matrix are zeroed again. Other converters (the single
   device of ``reram-cmo`` maps min..max) are called tile by tile.
3. Drift: ``noise_model.apply_drift_noise`` to ``drift_time``; aihwkit re-converts each
   tile's programmed weights, which the all-tiles call matches by normalizing every tile by
   its programmed abs-max first. For the plain PCM model, steps 2 and 3 are the same
   arithmetic in place (:func:`_pcm_drift`), with four normal samples per weight where
   aihwkit draws six of which each weight uses four (tested equal to aihwkit's given its
   six draws, and in distribution with its own).
4. Global drift compensation, per tile: ``mean|W_programmed| / mean|W_drifted|`` (the quantity
   aihwkit's ``GlobalDriftCompensation`` reads out, taken here from the conductances directly,
   i.e. without periphery noise in the read-out), folded into the output scale.
5. ``kernels="compiled"`` (plain PCM only): steps 1-4 of a chunk run as one compiled function
   (:func:`_pcm_tiles_counter`: C++ on the CPU, Triton on a GPU) that draws its normal samples
   inside (:func:`hetmap.runtime.fused.normal_pair`, keys from the seeded generator, one set
   per call) instead of reading ``torch.randn``'s: the same arithmetic and distributions,
   other samples than ``kernels="eager"`` for a seed (tested equal to the same function
   uncompiled, and in distribution with aihwkit's). Other noise models run as with
   ``"eager"``.

The noise models draw from torch's global generator; :func:`seeded` forks and seeds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from aihwkit.inference import (
    PCMLikeNoiseModel,
    ReRamCMONoiseModel,
    ReRamWan2022NoiseModel,
    StateIndependentNoiseModel,
)
from aihwkit.inference.converter.conductance import (
    _ZERO_CLIP,
    NPairConductanceConverter,
    SinglePairConductanceConverter,
)
from aihwkit.inference.noise.base import BaseNoiseModel
from aihwkit.inference.noise.hermes import HermesNoiseModel

from hetmap.common.errors import SimulationError

from . import fused
from .settings import AnalogSettings

# Converters whose mapping of a tile depends only on its abs-max (see _noise_all_tiles).
_ABS_MAX_CONVERTERS = (SinglePairConductanceConverter, NPairConductanceConverter)
# aihwkit HermesNoiseModel's characterized g_max (uS) by devices per weight.
_HERMES_G_MAX = {1: 10.35, 2: 20.7}
# aihwkit GlobalDriftCompensation.readout clamps the read-out at this value.
_GDC_READOUT_MIN = 1e-4


def make_noise_model(settings: AnalogSettings) -> BaseNoiseModel:
    """The aihwkit noise model named by ``settings.noise_model``, scaled by ``noise_scale``,
    with the model's other parameters from ``settings.noise_params`` (settings rule 13)."""
    params = settings.noise_kwargs()
    read_scale = float(params.pop("read_noise_scale", 1.0)) if settings.read_noise else 0.0
    params.pop("read_noise_scale", None)
    # aihwkit's PCM/Hermes constructors drop a given prog_coeff_g_max_reference: set it after.
    reference = params.pop("prog_coeff_g_max_reference", None)
    name = settings.noise_model
    if name == "hermes" and "g_max" in params:  # aihwkit asserts it with a misleading message
        devices = int(params.get("num_devices", 2))
        limit = _HERMES_G_MAX[devices]
        if float(params["g_max"]) > limit:
            raise SimulationError(f"noise model 'hermes' is characterized up to g_max {limit} uS "
                                  f"with {devices} device(s) per weight; got {params['g_max']}")
    classes: dict[str, Any] = {"pcm": PCMLikeNoiseModel, "hermes": HermesNoiseModel,
                               "reram-cmo": ReRamCMONoiseModel,
                               "state-independent": StateIndependentNoiseModel}
    try:
        if name in classes:
            model = classes[name](prog_noise_scale=settings.noise_scale,
                                  read_noise_scale=read_scale, **params)
        elif name == "reram":
            # One scale for programming and the accumulated noise; the model has no read noise.
            model = ReRamWan2022NoiseModel(noise_scale=settings.noise_scale, **params)
            if settings.drifts and settings.drift_time not in model.coeff_dic:
                times = ", ".join(f"{time:g}" for time in model.coeff_dic)
                raise SimulationError(
                    f"noise model 'reram' is fitted at drift_time {times} s only; "
                    f"got {settings.drift_time}"
                )
        else:
            raise SimulationError(f"unknown noise model {name!r}")
    except (TypeError, ValueError, AssertionError) as error:
        raise SimulationError(f"noise model {name!r} cannot be built with the target's "
                              f"parameters {params}: {error}") from None
    if reference is not None:
        model.prog_coeff_g_max_reference = float(reference)
    asked = params.get("acceptance_range")
    if name == "reram-cmo" and asked is not None and asked != model.acceptance_range:
        # aihwkit would silently use its narrowest fitted range instead
        fitted = ", ".join(f"{key:g}" for key in sorted(model.coeff_dict))
        raise SimulationError(f"noise model 'reram-cmo' is fitted at acceptance_range {fitted} "
                              f"only; got {asked:g}")
    return model


def derive_seed(seed: int, label: str) -> int:
    """An independent seed for the part ``label`` of something seeded with ``seed``."""
    digest = hashlib.sha256(f"{seed}/{label}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's global generators forked and seeded (restored afterwards)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        with warnings.catch_warnings():
            # aihwkit's Hermes model indexes with a list of masks (deprecated in torch).
            warnings.filterwarnings(
                "ignore", message="Using a non-tuple sequence", category=UserWarning
            )
            yield


def program_matrices(
    weights: torch.Tensor,
    rows: int,
    cols: int,
    settings: AnalogSettings,
    noise_model: BaseNoiseModel | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Program matrices ``weights [E, out, in]`` onto ``rows x cols`` tiles each.

    Returns ``(tile_weights [E, out, in], out_scales [E, in_tiles, out])``: an input tile's
    slice times ``tile_weights``, times ``out_scales``, is that tile's contribution. Runs on
    the generator state the caller set (see :func:`seeded`).
    """
    num, out_features, in_features = weights.shape
    in_tiles = -(-in_features // rows)
    if settings.ideal:
        ones = weights.new_ones(num, in_tiles, out_features)
        return weights.detach().clone(), ones
    # A matrix smaller than a tile fills part of one tile: pad only to its own size.
    rows, cols = min(rows, in_features), min(cols, out_features)
    out_tiles = -(-out_features // cols)
    work_dtype = torch.promote_types(weights.dtype, torch.float32)
    shape = (num, out_tiles * cols, in_tiles * rows)
    inside_tiled: torch.Tensor | None = None  # which cells hold weights (None: all)
    if shape == tuple(weights.shape) and weights.dtype == work_dtype:
        padded = weights.detach()
    else:
        padded = weights.new_zeros(shape, dtype=work_dtype)
        padded[:, :out_features, :in_features] = weights.detach()
        inside = torch.zeros_like(padded)
        inside[:, :out_features, :in_features] = 1.0
        inside_tiled = inside.view(num, out_tiles, cols, in_tiles, rows)
    tiled = padded.view(num, out_tiles, cols, in_tiles, rows)

    if settings.kernels == "compiled" and noise_model is not None and _is_plain_pcm(noise_model) \
            and (settings.programs_noise or settings.drifts):  # rule 5: one compiled call
        drift = (_drift_constants(noise_model, float(settings.drift_time or 0.0))
                 if settings.drifts else None)
        keys = fused.program_keys(4 if drift is None else 8, tiled.device)
        tiled, scales_ = fused.compiled(_pcm_tiles_counter)(
            tiled, inside_tiled, keys, float(settings.weight_scaling_omega),
            settings.weight_scaling_columnwise, _pcm_constants(noise_model), drift,
            settings.gdc)
        return _tile_results(tiled, scales_, weights, shape, cols)

    reduce_dims = (4,) if settings.weight_scaling_columnwise else (2, 4)
    mapping = _abs_max(tiled, reduce_dims) / settings.weight_scaling_omega
    mapping.masked_fill_(mapping == 0.0, 1.0)
    tiled = tiled / mapping
    gdc = tiled.new_ones(num, out_tiles, 1, in_tiles, 1)

    if settings.programs_noise or settings.drifts:
        if noise_model is None:
            raise SimulationError("programming noise or drift needs a noise model")
        if isinstance(noise_model.g_converter, _ABS_MAX_CONVERTERS):
            programmed, drifted = _noise_all_tiles(tiled, inside_tiled, noise_model, settings)
        else:
            sizes = (out_features, in_features)
            programmed, drifted = _noise_tile_by_tile(tiled, sizes, noise_model, settings)
        tiled = programmed
        if drifted is not None:
            if settings.gdc:
                gdc = _tile_mean_abs(programmed, inside_tiled) / _tile_mean_abs(
                    drifted, inside_tiled
                )
            tiled = drifted

    return _tile_results(tiled, mapping * gdc, weights, shape, cols)


def _tile_results(tiled: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor,
                  shape: tuple[int, int, int], cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`program_matrices`' results from the programmed tiles ``[E, out tiles, cols, in
    tiles, rows]`` and their output scales ``[E, out tiles, 1 or cols, in tiles, 1]``."""
    num, out_features, in_features = weights.shape
    _, out_tiles, _, in_tiles, _ = tiled.shape
    tile_weights = tiled.reshape(shape)[:, :out_features, :in_features]
    expanded = scales.expand(num, out_tiles, cols, in_tiles, 1)
    out_scales = expanded.permute(0, 3, 4, 1, 2).reshape(num, in_tiles, out_tiles * cols)
    return (
        tile_weights.to(weights.dtype).contiguous(),
        out_scales[..., :out_features].to(weights.dtype).contiguous(),
    )


def program_in_chunks(
    weights: torch.Tensor,
    settings: AnalogSettings,
    noise_model: BaseNoiseModel | None,
    chunk_elements: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`program_matrices` on ``weights [E, out, in]`` a few whole tiles at a time:
    about ``chunk_elements`` weights per call (whole rows of column tiles of one matrix, or
    whole matrices), so that the noise model's temporaries stay in the CPU's cache; the
    results go straight into the returned tensors (``out``: given ones, e.g. views of a
    larger stack). Weights of a reduced dtype are converted chunk by chunk: programming and
    the results are float32 (at least), and no float32 copy of ``weights`` is made. Each
    chunk holds whole tiles, so every tile is programmed as on its own (rule 2's abs-max
    argument holds per chunk)."""
    num, out_features, in_features = weights.shape
    in_tiles = -(-in_features // settings.rows)
    rows = min(settings.rows, in_features)
    work = torch.promote_types(weights.dtype, torch.float32)
    if out is None:
        tile_weights = weights.new_empty(weights.shape, dtype=work)
        out_scales = weights.new_empty(num, in_tiles, out_features, dtype=work)
    else:
        tile_weights, out_scales = out
    matrices, out_step, in_step = chunk_cut(out_features, in_features, settings, chunk_elements)
    for first in range(0, num, matrices):
        last = min(num, first + matrices)
        for start in range(0, out_features, out_step):
            stop = min(out_features, start + out_step)
            for low in range(0, in_features, in_step):
                high = min(in_features, low + in_step)
                programmed, scales = program_matrices(
                    weights[first:last, start:stop, low:high].to(work), settings.rows,
                    settings.cols, settings, noise_model)
                tile_weights[first:last, start:stop, low:high] = programmed
                out_scales[first:last, low // rows:-(-high // rows), start:stop] = scales
    return tile_weights, out_scales


def chunk_cut(out_features: int, in_features: int, settings: AnalogSettings,
              chunk_elements: int) -> tuple[int, int, int]:
    """How :func:`program_in_chunks` cuts matrices ``[out, in]``: ``(matrices, out_step,
    in_step)``, whole matrices per chunk (1 unless a chunk holds whole matrices), and the rows
    and columns of one chunk of a matrix (whole tiles)."""
    cols, rows = min(settings.cols, out_features), min(settings.rows, in_features)
    in_step = min(in_features, max(1, chunk_elements // max(1, cols * rows)) * rows)
    column_rows = max(1, chunk_elements // max(1, cols * in_step))
    out_step = min(out_features, column_rows * cols)
    whole = out_step >= out_features and in_step >= in_features
    matrices = max(1, chunk_elements // max(1, out_features * in_features)) if whole else 1
    return matrices, out_step, in_step


def _noise_all_tiles(
    tiled: torch.Tensor, inside: torch.Tensor | None, noise_model: BaseNoiseModel, settings: AnalogSettings
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 2-3 with one noise-model call for all tiles ``[E, out tiles, cols, in tiles,
    rows]`` (valid for converters that map a tile by its abs-max, which step 1 made equal)."""
    if _is_plain_pcm(noise_model):
        if settings.drifts:
            return _pcm_drift(tiled, inside, noise_model, float(settings.drift_time or 0.0))
        programmed = _pcm_programming(tiled, noise_model)
        return (programmed if inside is None else programmed.mul_(inside)), None
    programmed, drift_params = noise_model.apply_programming_noise(tiled)
    if inside is not None:
        programmed = programmed * inside
    if not settings.drifts:
        return programmed, None
    tile_max = _abs_max(programmed, (2, 4))
    tile_max.masked_fill_(tile_max == 0.0, 1.0)
    drifted = noise_model.apply_drift_noise(
        programmed / tile_max, drift_params, float(settings.drift_time or 0.0)
    )
    drifted = drifted * tile_max
    return programmed, (drifted if inside is None else drifted.mul_(inside))


def _is_plain_pcm(noise_model: BaseNoiseModel) -> bool:
    converter = noise_model.g_converter
    return (type(noise_model) is PCMLikeNoiseModel and len(noise_model.prog_coeff) == 3
            and type(converter) is SinglePairConductanceConverter and converter.g_min == 0)


def _pcm_constants(noise_model: Any) -> tuple[float, float, float, float, float]:
    """``(g_max, converter g_max, c0, c1, c2)`` of a plain PCM model: the programming-noise
    polynomial's coefficients scaled as aihwkit scales them (``g_max / reference * scale``)."""
    g_max = float(noise_model.g_max)
    unit = g_max / float(noise_model.prog_coeff_g_max_reference) * float(
        noise_model.prog_noise_scale)
    c0, c1, c2 = (float(coeff) * unit for coeff in noise_model.prog_coeff)
    return g_max, float(noise_model.g_converter.g_max), c0, c1, c2


def _pcm_programming(weights: torch.Tensor, noise_model: BaseNoiseModel) -> torch.Tensor:
    """aihwkit's ``PCMLikeNoiseModel.apply_programming_noise`` with its single-pair converter
    (``g_min = 0``), without the drift coefficients it also draws (unused without a drift
    step). A weight ``w`` maps to ``g = |w| * ratio`` on one device and 0 on the other; each
    device gets ``clamp(g + c * sigma(g) * n, 0)``, ``n`` standard normal, so the idle one gets
    ``clamp(c * sigma(0) * n, 0)``; the weight read back is their difference (sign of ``w``)
    over ``ratio``. Two normal samples per weight, drawn with ``torch.randn``'s generator in
    one call (``kernels="compiled"`` draws them inside its kernel: :func:`_pcm_tiles_counter`)."""
    g_max, top, c0, c1, c2 = _pcm_constants(noise_model)
    active = weights.abs()
    ratio = top / max(float(active.max()), _ZERO_CLIP)
    noise = torch.empty((2, *weights.shape), dtype=weights.dtype, device=weights.device)
    noise.normal_()
    return _pcm_programmed(weights, active, noise[0], noise[1], ratio, g_max, c0, c1, c2)


def _pcm_programmed(weights: torch.Tensor, active: torch.Tensor, active_noise: torch.Tensor,
                    idle_noise: torch.Tensor, ratio: Any, g_max: float, c0: float, c1: float,
                    c2: float) -> torch.Tensor:
    """:func:`_pcm_programming`'s arithmetic given ``|weights|`` (``active``) and its two
    draws, in weight units (``sigma(g) / ratio`` as a polynomial in ``|w|``), in place
    (``active`` and ``idle_noise`` included)."""
    sigma = torch.mul(active, c2 * ratio / g_max**2).add_(c1 / g_max).mul_(active)
    sigma.add_(c0 / ratio)
    active.addcmul_(sigma, active_noise).clamp_(min=0.0)
    idle = idle_noise.mul_(c0 / ratio).clamp_(min=0.0)
    sign = torch.ones_like(weights).copysign_(weights)  # +-1, also for w = 0
    return active.sub_(idle).mul_(sign)


def _pcm_drift(
    tiled: torch.Tensor,
    inside: torch.Tensor | None,
    noise_model: BaseNoiseModel,
    drift_time: float,
    draws: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 for the plain PCM model (:func:`_is_plain_pcm`) with a drift step: aihwkit's
    ``apply_programming_noise``, the per-tile renormalisation of :func:`_noise_all_tiles`
    and ``apply_drift_noise``, on all tiles ``[E, out tiles, cols, in tiles, rows]`` at
    once. Returns ``(programmed, drifted)``.

    aihwkit draws six standard normal tensors in this order: programming noise and drift
    coefficient of the positive device, the same of the negative device, then read noise of
    each device. ``draws`` takes those six (the test against aihwkit passes them). Without
    ``draws``, four are drawn: after programming each weight is re-converted onto one device
    pair with only the device of its programmed sign non-zero, and an idle device reads
    exactly 0 whatever its coefficient and read noise. So each weight uses one drift
    coefficient and one read-noise sample, of one device, and both devices may share one
    sample of each: the same distribution as aihwkit's, two thirds of its draws.
    (``kernels="compiled"`` draws the four inside its kernel: :func:`_pcm_tiles_counter`.)"""
    g_max, top, c0, c1, c2 = _pcm_constants(noise_model)
    ratio = top / max(float(_abs_max(tiled)), _ZERO_CLIP)
    drift = _drift_constants(noise_model, drift_time)
    if draws is None:
        noise = torch.empty((4, *tiled.shape), dtype=tiled.dtype, device=tiled.device)
        noise.normal_()
        nu, read = noise[2], noise[3]  # one view each: _pick tells shared draws by identity
        draws = (noise[0], nu, noise[1], nu, read, read)
    prog_plus, nu_plus, prog_minus, nu_minus, read_plus, read_minus = draws
    programmed = _drift_programmed(tiled, prog_plus, prog_minus, ratio, g_max, top, c0, c1, c2)
    if inside is not None:
        programmed.mul_(inside)
    tile_max = _abs_max(programmed, (2, 4))
    tile_max.masked_fill_(tile_max == 0.0, 1.0)
    # The device each weight is re-converted onto: that of its programmed sign. Its nu and
    # read noise are that device's (selected only where the two devices have separate draws).
    separate = nu_plus is not nu_minus or read_plus is not read_minus
    positive = programmed > 0.0 if separate else None
    drifted = _drifted(tiled, programmed, tile_max, _pick(positive, nu_plus, nu_minus),
                       _pick(positive, read_plus, read_minus), ratio, *drift)
    return programmed, (drifted if inside is None else drifted.mul_(inside))


def _drift_programmed(tiled: torch.Tensor, prog_plus: torch.Tensor, prog_minus: torch.Tensor,
                      ratio: Any, g_max: float, top: float, c0: float, c1: float, c2: float
                      ) -> torch.Tensor:
    """:func:`_pcm_drift`'s programming step: both devices of every weight programmed
    (``apply_programming_noise_to_conductance``, the variance polynomial in ``g``), the
    weight read back as their difference over ``ratio``."""

    def programmed_device(conductance: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        sigma = torch.mul(conductance, c2 / g_max**2).add_(c1 / g_max).mul_(conductance)
        sigma.add_(c0)
        return sigma.mul_(normal).add_(conductance).clamp_(min=0.0)

    plus = torch.mul(tiled, ratio).clamp_(min=0.0, max=top)
    minus = torch.mul(tiled, -ratio).clamp_(min=0.0, max=top)
    programmed = programmed_device(plus, prog_plus).sub_(programmed_device(minus, prog_minus))
    return programmed.div_(ratio)


class _DriftConstants(NamedTuple):
    """The numbers :func:`_drifted` needs besides tensors and the programming's ratio."""

    g_max: float
    top: float  # the converter's g_max
    drift_scale: float
    log_decay: float  # -ln((drift_time + t_0) / t_0)
    read_scale: float  # sqrt(ln((t + t_read) / (2 t_read))) * read_noise_scale


def _drift_constants(noise_model: Any, drift_time: float) -> _DriftConstants:
    """The plain PCM model's drift numbers for ``drift_time`` seconds."""
    g_max, top = float(noise_model.g_max), float(noise_model.g_converter.g_max)
    time = drift_time + float(noise_model.t_0)
    t_read = float(noise_model.t_read)
    return _DriftConstants(
        g_max, top, float(noise_model.drift_scale), -math.log(time / float(noise_model.t_0)),
        math.sqrt(math.log((time + t_read) / (2 * t_read))) * float(noise_model.read_noise_scale))


def _drifted(tiled: torch.Tensor, programmed: torch.Tensor, tile_max: torch.Tensor,
             nu_normal: torch.Tensor, read_normal: torch.Tensor, ratio: Any, g_max: float,
             top: float, drift_scale: float, log_decay: float, read_scale: float
             ) -> torch.Tensor:
    """:func:`_pcm_drift`'s drift step on the programmed tiles, given the normal samples of
    each weight's drift coefficient and read noise.

    Each tile is re-converted from ``programmed / tile_max``: its abs-max is exactly 1 (or the
    tile is all zero), so the conversion's ratio is the converter's ``g_max`` (``top``)."""
    sign = torch.sign(programmed)
    # generate_drift_coefficients: nu of the device at the conductance programming targeted
    target = torch.mul(tiled, sign).mul_(ratio).clamp_(min=0.0, max=top)
    log = target.div_(g_max).clamp_(min=_ZERO_CLIP).log_()
    sigma = torch.mul(log, -0.0125).sub_(0.0059).clamp_(min=0.008, max=0.045)
    nu = log.mul_(-0.0155).add_(0.0244).clamp_(min=0.049, max=0.1)
    nu.addcmul_(sigma, nu_normal).abs_().mul_(drift_scale)
    del sigma

    active = programmed / tile_max
    active.abs_().mul_(top).clamp_(max=top)  # the conductance of the non-zero device
    drifted = active.clone()
    if log_decay != 0.0:
        drifted.mul_(nu.mul_(log_decay).exp_())
    del nu
    # (g / g_max) ** 0.65 as exp(0.65 log(...)): two vectorised passes instead of pow's one
    # slow one.
    spread = active.div_(g_max).log_().mul_(0.65).exp_().clamp_(min=1e-3).reciprocal_()
    spread.mul_(0.0088).clamp_(max=0.2).mul_(read_scale)
    spread.mul_(read_normal).mul_(drifted)
    drifted.add_(spread).clamp_(min=0.0)
    return drifted.mul_(sign).mul_(tile_max / top)


def _pcm_tiles_counter(tiled: torch.Tensor, inside: torch.Tensor | None, keys: torch.Tensor,
                       omega: float, columnwise: bool,
                       constants: tuple[float, float, float, float, float],
                       drift: _DriftConstants | None, gdc: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule 5: steps 1-4 for the plain PCM model with ``kernels="compiled"``, as one function
    for ``torch.compile`` (the per-tile reductions fused with the arithmetic, no sample in
    memory): the arithmetic of :func:`_pcm_programming` or :func:`_pcm_drift` with its normal
    samples from :func:`hetmap.runtime.fused.normal_pair` (``keys[:4]`` programming,
    ``keys[4:]`` drift coefficient and read noise). Returns the programmed (drifted) tiles
    and their output scales (abs-max mapping, times GDC)."""
    g_max, top, c0, c1, c2 = constants
    mapping = _abs_max(tiled, (4,) if columnwise else (2, 4)) / omega
    mapping = torch.where(mapping == 0.0, 1.0, mapping)
    tiled = tiled / mapping
    ratio = top / _abs_max(tiled).clamp(min=_ZERO_CLIP)
    first, second = fused.normal_pair(tiled.shape, keys[:4], tiled.dtype)
    if drift is None:
        programmed = _pcm_programmed(tiled, tiled.abs(), first, second, ratio, g_max, c0, c1, c2)
        return (programmed if inside is None else programmed * inside), mapping
    programmed = _drift_programmed(tiled, first, second, ratio, g_max, top, c0, c1, c2)
    if inside is not None:
        programmed = programmed * inside
    tile_max = _abs_max(programmed, (2, 4))
    tile_max = torch.where(tile_max == 0.0, 1.0, tile_max)
    nu_normal, read_normal = fused.normal_pair(tiled.shape, keys[4:], tiled.dtype)
    drifted = _drifted(tiled, programmed, tile_max, nu_normal, read_normal, ratio, *drift)
    if inside is not None:
        drifted = drifted * inside
    if gdc:
        mapping = mapping * (_tile_mean_abs(programmed, inside) / _tile_mean_abs(drifted, inside))
    return drifted, mapping


def _pick(positive: torch.Tensor | None, plus: torch.Tensor, minus: torch.Tensor
          ) -> torch.Tensor:
    """``plus`` where ``positive``, else ``minus`` (``plus`` itself when they are one tensor:
    ``positive`` is then None)."""
    return plus if positive is None else torch.where(positive, plus, minus)


def _noise_tile_by_tile(
    tiled: torch.Tensor,
    sizes: tuple[int, int],
    noise_model: BaseNoiseModel,
    settings: AnalogSettings,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 2-3 one tile at a time, as aihwkit does (any conductance converter)."""
    num, out_tiles, cols, in_tiles, rows = tiled.shape
    programmed = torch.zeros_like(tiled)
    drifted = torch.zeros_like(tiled) if settings.drifts else None
    for index in range(num):
        for out_tile in range(out_tiles):
            used_cols = min(cols, sizes[0] - out_tile * cols)
            for in_tile in range(in_tiles):
                used_rows = min(rows, sizes[1] - in_tile * rows)
                cell = (index, out_tile, slice(0, used_cols), in_tile, slice(0, used_rows))
                tile_programmed, drift_params = noise_model.apply_programming_noise(tiled[cell])
                programmed[cell] = tile_programmed
                if drifted is not None:
                    drifted[cell] = noise_model.apply_drift_noise(
                        tile_programmed, drift_params, float(settings.drift_time or 0.0)
                    )
    return programmed, drifted


def _abs_max(values: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """``values.abs().amax(dims, keepdim=True)`` (all dims: a scalar) from the largest and
    smallest value, without an ``abs`` temporary."""
    if dims is None:
        low, high = torch.aminmax(values)
        return torch.maximum(high, low.neg())
    return torch.maximum(values.amax(dim=dims, keepdim=True),
                         values.amin(dim=dims, keepdim=True).neg_())


def _tile_mean_abs(tiled: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
    """aihwkit's global drift read-out (mean abs output of a one-hot read) of every tile."""
    total = tiled.abs().sum(dim=(2, 4), keepdim=True)
    if inside is None:
        return (total / (tiled.shape[2] * tiled.shape[4])).clamp(min=_GDC_READOUT_MIN)
    count = inside.sum(dim=(2, 4), keepdim=True).clamp(min=1.0)
    return (total / count).clamp(min=_GDC_READOUT_MIN)
