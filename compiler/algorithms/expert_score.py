"""Expected output error of a matrix on AIMC tiles, in closed form from aihwkit's noise model.

A matrix ``W [out, in]`` programmed with noise becomes ``W + D``; for an input ``x`` the output
error is ``D x``. With the weights' errors independent of each other and of the input,

    E ||D x||^2 = sum_ij sigma_ij^2 E[x_j^2]          (1)

where ``sigma_ij^2 = E[D_ij^2]`` is the mean squared programming error of weight ``ij`` in
weight units and ``E[x_j^2]`` the input's second moment (over the calibration tokens). (1)
drops the cross terms ``sum_{j != k} E[D_ij] E[D_ik] E[x_j x_k]``, which the small clamping bias
below makes nonzero only for correlated inputs.

``sigma_ij^2`` follows the runtime's mapping (:mod:`hetmap.runtime.programming`) exactly:

1. Each fixed ``rows x cols`` tile (or tile column, ``weight_scaling_columnwise``) is divided
   by its abs-max / ``omega``; the factor comes back digitally at the output.
2. aihwkit's conductance converter (``noise_model.g_converter``) maps the normalized tile to
   conductances; a ``SinglePairConductanceConverter`` gives a pair ``g+ = g_max * max(u, 0)``,
   ``g- = g_max * max(-u, 0)`` (plus ``g_min``): the idle device of the pair sits at ``g_min``
   (0 by default) and is programmed with noise too.
3. Each device gets ``g_prog = max(g + c * s(g) * n, 0)``, ``n ~ N(0, 1)``, with ``s(g)`` the
   model's polynomial ``sum_k prog_coeff[k] (g / g_max)^k`` (times ``g_max /
   prog_coeff_g_max_reference`` for PCM and Hermes) and ``c = prog_noise_scale``: all read from
   the aihwkit model object the runtime builds (``runtime.programming.make_noise_model``).
   The clamp at 0 makes the error a rectified Gaussian, whose mean ``m`` and second moment ``M``
   are closed-form (:func:`device_error_moments`); the idle device at 0 contributes
   ``M = (c s(0))^2 / 2``, half of what a plain Gaussian would.
4. ``sigma_ij^2 = (M+ + M- - 2 m+ m-) * (tile abs-max / (g_max - g_min))^2`` (the two devices
   are independent; ``- 2 m+ m-`` is the product of their biases).

(3) Neuron-granular placement ranks an expert's intermediate neurons by how much (1) of the
expert's analog part falls when each goes digital (:func:`neuron_marginal_impact`), which
includes the range effect: the tile's abs-max, and so every remaining weight's error, falls
when the neurons holding the largest weights leave it.

Noise models or converters without this closed form (ReRAM models, n-pair converters) get
``sigma_ij^2`` estimated from ``FALLBACK_SAMPLES`` programmings by the runtime itself. Drift
and read noise are not included: the figure is the programming-noise error right after
programming.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from hetmap.runtime import AnalogSettings

#: Weights per block of the closed form's element-wise work (temporaries of 1 MiB: in cache,
#: and large enough for two threads).
_BLOCK = 1 << 18
#: Programmings averaged when a noise model has no closed form (see module docstring).
FALLBACK_SAMPLES = 8
#: ``g / sigma`` beyond which the clamp at 0 is ignored (the terms it drops are below 1e-12 of
#: ``sigma^2``; evaluating them would only underflow).
_Z_CAP = 8.0


def _polynomial_models() -> dict[Any, bool]:
    """aihwkit models whose programming noise is ``clamp(g + c * poly(g / g_max) * n, 0)``,
    mapped to whether the polynomial is rescaled by ``g_max / prog_coeff_g_max_reference``."""
    from hetmap.runtime import require_aihwkit

    require_aihwkit()
    from aihwkit.inference import PCMLikeNoiseModel, StateIndependentNoiseModel
    from aihwkit.inference.noise.hermes import HermesNoiseModel

    return {PCMLikeNoiseModel.apply_programming_noise_to_conductance: True,
            HermesNoiseModel.apply_programming_noise_to_conductance: True,
            StateIndependentNoiseModel.apply_programming_noise_to_conductance: False}


def has_closed_form(noise_model: Any) -> bool:
    """Whether :func:`weight_error_variance` is exact for ``noise_model`` (else sampled)."""
    from aihwkit.inference.converter.conductance import SinglePairConductanceConverter

    method = type(noise_model).apply_programming_noise_to_conductance
    return (method in _polynomial_models()
            and type(noise_model.g_converter) is SinglePairConductanceConverter)


def programming_sigma(noise_model: Any, conductance: torch.Tensor) -> torch.Tensor:
    """Std (in uS) of the programming noise added to target ``conductance``, before the clamp:
    ``prog_noise_scale * poly(g / g_max)`` with the model's own coefficients."""
    rescaled = _polynomial_models()[type(noise_model).apply_programming_noise_to_conductance]
    scale = float(noise_model.prog_noise_scale)
    if rescaled:
        scale *= float(noise_model.g_max) / float(noise_model.prog_coeff_g_max_reference)
    relative = conductance / float(noise_model.g_max)
    sigma = torch.full_like(conductance, 0.0)
    for coeff in reversed([float(c) for c in noise_model.prog_coeff]):  # Horner
        sigma.mul_(relative).add_(coeff)
    return sigma.mul_(scale).abs_()


def device_error_moments(conductance: torch.Tensor, sigma: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and second moment of ``max(g + sigma n, 0) - g`` for ``n ~ N(0, 1)``.

    With ``z = g / sigma``, ``phi``/``Phi`` the standard normal pdf/cdf:
    mean ``= sigma phi(z) - g Phi(-z)``; second moment ``= sigma^2 (Phi(z) - z phi(z)) +
    g^2 Phi(-z)``. ``sigma = 0`` gives zeros; ``z`` is capped at ``_Z_CAP``. ``Phi(-z)`` is
    ``erfc(z / sqrt 2) / 2`` and ``Phi(z)`` its complement (one special function per element);
    the arithmetic is in place on temporaries, the inputs are left as they are.
    """
    noisy = sigma > 0
    every = bool(noisy.all())
    safe = sigma if every else torch.where(noisy, sigma, torch.ones_like(sigma))
    z = torch.div(conductance, safe).clamp_(max=_Z_CAP)
    below = torch.mul(z, 1.0 / math.sqrt(2.0)).erfc_().mul_(0.5)  # Phi(-z)
    pdf = torch.mul(z, z).mul_(-0.5).exp_().mul_(1.0 / math.sqrt(2.0 * math.pi))
    tail = torch.mul(conductance, below)  # g Phi(-z)
    mean = torch.mul(sigma, pdf).sub_(tail)
    tail.mul_(conductance)  # g^2 Phi(-z)
    second = below.neg_().add_(1.0).sub_(z.mul_(pdf)).mul_(sigma).mul_(sigma).add_(tail)
    if every:
        return mean, second
    zero = torch.zeros_like(conductance)
    return torch.where(noisy, mean, zero), torch.where(noisy, second, zero)


def tile_abs_max(weight: torch.Tensor, rows: int, cols: int, columnwise: bool) -> torch.Tensor:
    """For every weight of ``[out, in]``, the abs-max of its crossbar tile (or tile column)."""
    out_features, in_features = weight.shape
    rows, cols = min(rows, in_features), min(cols, out_features)
    out_tiles, in_tiles = -(-out_features // cols), -(-in_features // rows)
    padded = weight.new_zeros(out_tiles * cols, in_tiles * rows)
    padded[:out_features, :in_features] = weight.abs()
    tiled = padded.view(out_tiles, cols, in_tiles, rows)
    reduce_dims = (3,) if columnwise else (1, 3)
    scale = tiled.amax(dim=reduce_dims, keepdim=True).expand_as(tiled)
    return scale.reshape(padded.shape)[:out_features, :in_features].contiguous()


def weight_error_variance(weight: torch.Tensor, settings: AnalogSettings, noise_model: Any,
                          seed: int = 0) -> torch.Tensor:
    """``sigma_ij^2 = E[(W_prog - W)_ij^2]`` of every weight of ``[out, in]``, in weight units
    (float32, as the runtime programs)."""
    weight = weight.detach().to(torch.float32)
    if not settings.programs_noise:
        return torch.zeros_like(weight)
    if not has_closed_form(noise_model):
        return _sampled_error_variance(weight, settings, noise_model, seed)
    mapping = tile_abs_max(weight, settings.rows, settings.cols,
                           settings.weight_scaling_columnwise)
    mapping.masked_fill_(mapping == 0.0, 1.0).div_(settings.weight_scaling_omega)
    # Step 2 for a single pair: a weight's device of its sign sits at g_min + |u| g-range,
    # the other at g_min (the "idle" device; both for u = 0). The error is symmetric in the
    # sign, so each weight needs the moments of one conductance, and the idle ones are one
    # number. (aihwkit's convert_to_conductances, element by element.)
    from aihwkit.inference.converter.conductance import _ZERO_CLIP  # its smallest abs-max

    converter = noise_model.g_converter
    g_min, g_max = float(converter.g_min), float(converter.g_max)
    active = torch.abs(weight).div_(mapping)
    scale_ratio = (g_max - g_min) / max(float(active.max()), _ZERO_CLIP)
    active.mul_(scale_ratio).clamp_(max=g_max).add_(g_min)
    idle = torch.full((1,), g_min)
    mean_idle, second_idle = (float(v) for v in device_error_moments(
        idle, programming_sigma(noise_model, idle)))
    # Row blocks of about _BLOCK weights: the temporaries stay in cache.
    rows = max(1, _BLOCK // max(1, active.shape[1]))
    for start in range(0, active.shape[0], rows):
        part = active[start:start + rows]
        mean, squared = device_error_moments(part, programming_sigma(noise_model, part))
        part.copy_(squared.add_(second_idle).sub_(mean.mul_(2.0 * mean_idle)))
    return active.mul_(mapping.div_(scale_ratio).square_())


def _sampled_error_variance(weight: torch.Tensor, settings: AnalogSettings, noise_model: Any,
                            seed: int) -> torch.Tensor:
    """The runtime's own programming, ``FALLBACK_SAMPLES`` times (for models without (1))."""
    from hetmap.runtime.programming import derive_seed, program_matrices, seeded

    total = torch.zeros_like(weight)
    rows = min(settings.rows, weight.shape[1])
    for sample in range(FALLBACK_SAMPLES):
        with seeded(derive_seed(seed, f"expected-impact/{sample}"), weight.device):
            tile_weights, out_scales = program_matrices(weight.unsqueeze(0), settings.rows,
                                                        settings.cols, settings, noise_model)
        scales = out_scales[0].repeat_interleave(rows, dim=0)[: weight.shape[1]].T
        total += (tile_weights[0] * scales - weight) ** 2
    return total / FALLBACK_SAMPLES


def expected_squared_error(weight: torch.Tensor, second_moment: np.ndarray | torch.Tensor,
                           settings: AnalogSettings, noise_model: Any) -> float:
    """(1): ``sum_ij sigma_ij^2 E[x_j^2]`` for ``W [out, in]`` and ``E[x^2] [in]``."""
    variance = weight_error_variance(weight, settings, noise_model)
    moment = torch.as_tensor(np.asarray(second_moment), dtype=torch.float64)
    return float(variance.sum(dim=0, dtype=torch.float64) @ moment)


def neuron_expected_error(role: str, weight: torch.Tensor, second_moment: np.ndarray | torch.Tensor,
                          settings: AnalogSettings, noise_model: Any) -> np.ndarray:
    """(1) split by intermediate neuron: for a neuron-producing matrix (gate, up: W ``[I, H]``)
    neuron ``j``'s share is its row, ``sum_i sigma_ji^2 E[x_i^2]``; for ``down`` (``[H, I]``)
    its column, ``E[h_j^2] sum_i sigma_ij^2``. The shares add up to (1)."""
    variance = weight_error_variance(weight, settings, noise_model)
    moment = torch.as_tensor(np.asarray(second_moment), dtype=torch.float64)
    if role == "down":
        return (variance.sum(dim=0, dtype=torch.float64) * moment).numpy()
    return (variance.double() @ moment).numpy()


#: closed-form evaluations per expert for its neurons' marginal impacts (3)
NEURON_STEPS = 16


def _analog_part_error(matrices: Mapping[str, torch.Tensor], second_moments: Mapping[str, np.ndarray],
                       keep: torch.Tensor, settings: AnalogSettings, noise_model: Any) -> float:
    """(1) summed over the analog part of a split expert that keeps neurons ``keep``: gate/up
    without the other rows, down without the other columns (tiled, scaled and programmed on
    their own, as the runtime maps them)."""
    if keep.numel() == 0:
        return 0.0
    total = 0.0
    for role, weight in matrices.items():
        if role == "down":
            moment = np.asarray(second_moments[role])[keep.numpy()]
            total += expected_squared_error(weight[:, keep], moment, settings, noise_model)
        else:
            total += expected_squared_error(weight[keep], second_moments[role], settings,
                                            noise_model)
    return total


def neuron_order(matrices: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(3)'s order of an expert's intermediate neurons: by the range each sets on the tiles
    (the largest ``|w|`` of its gate/up rows and down column, relative to that matrix's
    largest), widest first."""
    spread = torch.zeros(int(matrices["down"].shape[1]), dtype=torch.float64)
    for role, weight in matrices.items():
        magnitude = weight.detach().abs()  # max is exact: no float64 copy needed
        per = (magnitude.amax(dim=0) if role == "down" else magnitude.amax(dim=1)).double()
        spread = torch.maximum(spread, per / max(float(magnitude.max()), 1e-30))
    return torch.argsort(-spread, stable=True)


def neuron_marginal_impact(matrices: Mapping[str, torch.Tensor],
                           second_moments: Mapping[str, np.ndarray], settings: AnalogSettings,
                           noise_model: Any, steps: int = NEURON_STEPS
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(3): how much (1) of an expert's analog part falls when each neuron goes digital.

    A neuron's own rows and column carry its share of (1), but moving it off the tiles also
    shrinks the abs-max of the tiles it leaves when it held their largest weights, and with it
    the programming error of every weight that stays (the error is relative to the tile's
    range). So the neurons are ordered by the range they set (the largest ``|w|`` of their
    gate/up rows and down column, relative to that matrix's largest), and (1) of the analog
    part is evaluated after removing the first ``k`` of them, for ``steps`` values of ``k``
    from 0 to all; each neuron gets its chunk's fall divided by the chunk's size. Returns the
    figures, which add up to the expert's (1) (the last evaluation, nothing left analog, is
    0), and the order. Placement ranks by :func:`prefix_scores` of them: the falls were
    measured for prefixes of the order, so the digital neurons of an expert must be one."""
    width = int(matrices["down"].shape[1])
    order = neuron_order(matrices)
    chunk = -(-width // max(1, steps))
    gains = np.zeros(width)
    previous = _analog_part_error(matrices, second_moments, order.sort().values, settings,
                                  noise_model)
    for start in range(0, width, chunk):
        removed = order[start : start + chunk]
        current = _analog_part_error(matrices, second_moments,
                                     order[start + chunk :].sort().values, settings, noise_model)
        gains[removed.numpy()] = (previous - current) / removed.numel()
        previous = current
    return gains, order.numpy()


def prefix_scores(gains: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Scores that rank a prefix of ``order`` first: each neuron gets the largest gain from its
    place in ``order`` on (so never less than a neuron after it), less a tiny amount per place
    (ties keep the order)."""
    along = np.maximum(np.maximum.accumulate(gains[order][::-1])[::-1], 0.0)
    scores = np.empty_like(gains)
    scores[order] = along * (1.0 - 1e-9 * np.arange(order.size) / max(order.size, 1))
    return scores


def expert_expected_impact(density: float, matrices: Mapping[str, torch.Tensor],
                           second_moments: Mapping[str, np.ndarray], settings: AnalogSettings,
                           noise_model: Any, neurons: bool = False
                           ) -> tuple[float, np.ndarray | None]:
    """``density * sum over the expert's matrices of (1)``; ``matrices`` and
    ``second_moments`` are keyed by matrix role (``gate``, ``up``, ``down``, ...). With
    ``neurons`` (an expert of gate/up/down matrices) also its neurons' scores: the
    :func:`prefix_scores` of their marginal impacts (3), times ``density``."""
    per_neuron = None
    if neurons:
        if density == 0.0:
            per_neuron = np.zeros(int(matrices["down"].shape[1]))
        else:
            gains, order = neuron_marginal_impact(matrices, second_moments, settings, noise_model)
            per_neuron = density * prefix_scores(gains, order)
    if density == 0.0:
        return 0.0, per_neuron
    return density * sum(expected_squared_error(weight, second_moments[role], settings,
                                                noise_model)
                         for role, weight in matrices.items()), per_neuron
