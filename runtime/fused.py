"""The tile periphery's element-wise steps, fused: output noise drawn inside the ADC step.

Output noise needs one Gaussian sample per output of every tile product. Drawn with
``torch.randn`` (a Mersenne twister on the CPU) it costs more than the rest of the periphery
and an extra pass over the outputs. With ``kernels="compiled"`` the samples come from a
counter-based generator instead, so that they are drawn inside the ADC's pass:

1. Sample ``j`` of a call with keys ``(k1, k2)`` is ``TABLE[h(h(j + k1) ^ k2) & 0xFFFF]``, ``h``
   a 32-bit integer hash (Wellons' ``[16 21f0aaad 15 735a2d97 15]``) and ``TABLE`` the
   standard normal's quantiles at ``(i + 0.5) / 65536``: a normal sample up to a CDF error of
   ``1 / 131072``, tails cut at ``|z| = 4.33``.
2. Each call of an :class:`OutputNoise` takes fresh keys from its seed and call count
   (splitmix64): a seed fixes every draw, on any device, and no two calls share samples.
3. :func:`fused_add_round_` computes ``outputs <- round(outputs + scale * sample)`` in place
   in plain tensor ops; ``torch.compile`` turns it into one kernel (C++ on the CPU, Triton on
   a GPU) that reads and writes every output once, with no temporaries. Run uncompiled it is
   the reference the compiled kernel is tested against (equal up to float contraction).
4. :func:`dac_levels` is the DAC step (scale, round, clip) as one function for the compiler.
5. ``kernels="eager"`` (the default) draws with ``torch.randn`` from a ``torch.Generator``
   seeded with the same seed, then adds and rounds in place: no compilation, the draws
   hetmap has always made.
6. Programming noise with ``kernels="compiled"`` (:func:`normal_pair`): element ``j`` of a
   call with keys ``(k1, k2, k3, k4)`` takes two 24-bit uniforms
   ``u = (h(h(j + k1) ^ k2) >> 8 + 0.5) / 2**24`` and ``v`` (the same with ``k3, k4``) and
   returns the Box-Muller pair ``sqrt(-2 ln u) * (cos 2 pi v, sin 2 pi v)``: two independent
   standard normal samples, continuous up to the uniforms' 24 bits, tails to
   ``|z| = 5.9``. The keys are drawn from torch's (seeded) global generator, one set per
   programming call, so that the programming calls of a seed stay in step however they are
   grouped, as ``torch.randn``'s draws do with ``kernels="eager"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hetmap.common.errors import SimulationError

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_SHIFTS = (16, 15, 15)
_TABLE_BITS = 16


def normal_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """``[65536]`` float32: the standard normal's quantiles at ``(i + 0.5) / 65536``."""
    levels = (torch.arange(1 << _TABLE_BITS, dtype=torch.float64) + 0.5) / (1 << _TABLE_BITS)
    return (torch.special.erfinv(2.0 * levels - 1.0) * 2.0**0.5).to(torch.float32).to(device)


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def call_keys(seed: int, call: int) -> tuple[int, int]:
    """Rule 2: the two 32-bit keys of call number ``call`` of a generator seeded ``seed``."""
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ call)
    return mixed & _MASK32, mixed >> 32


def _hash_int64(values: torch.Tensor) -> torch.Tensor:
    """Rule 1's ``h`` on int64 ``values`` holding 32-bit numbers (no overflow: both
    multipliers are below 2**31)."""
    for step, shift in enumerate(_SHIFTS):
        values = values ^ (values >> shift)
        if step < len(_MULTIPLIERS):
            values = (values * _MULTIPLIERS[step]) & _MASK32
    return values


def _uniform24(count: torch.Tensor, first_key: torch.Tensor, second_key: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Rule 6's uniform in ``(0, 1)``: 24 bits of the keyed hash of ``count``, centred."""
    hashed = _hash_int64(_hash_int64((count + first_key) & _MASK32) ^ second_key)
    return ((hashed >> 8).to(dtype) + 0.5) * (1.0 / (1 << 24))


def normal_pair(shape: torch.Size | tuple[int, ...], keys: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule 6: two independent standard normal tensors of ``shape`` (``dtype``) from the four
    int64 ``keys`` (32-bit values) on their device; plain tensor ops that ``torch.compile``
    fuses into the kernel that uses them (no sample is written to memory)."""
    count = torch.arange(math.prod(shape), device=keys.device, dtype=torch.int64).view(shape)
    radius = torch.sqrt(-2.0 * torch.log(_uniform24(count, keys[0], keys[1], dtype)))
    angle = _uniform24(count, keys[2], keys[3], dtype) * (2.0 * math.pi)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def program_keys(count: int, device: torch.device) -> torch.Tensor:
    """Rule 6: ``count`` 32-bit keys (int64) from torch's global generator of ``device``."""
    return torch.randint(0, 1 << 32, (count,), dtype=torch.int64, device=device)


def fused_add_round(outputs: torch.Tensor, table: torch.Tensor, first_key: torch.Tensor,
                    second_key: torch.Tensor, scale: float, rounds: bool) -> torch.Tensor:
    """Rules 1 and 3 out of place, in plain tensor ops (what ``torch.compile`` fuses)."""
    count = torch.arange(outputs.numel(), device=outputs.device, dtype=torch.int64)
    hashed = _hash_int64((count + first_key) & _MASK32)
    hashed = _hash_int64(hashed ^ second_key)
    noise = table[hashed & ((1 << _TABLE_BITS) - 1)].view(outputs.shape)
    moved = outputs + noise * scale
    return torch.round(moved) if rounds else moved


def fused_add_round_(outputs: torch.Tensor, table: torch.Tensor, first_key: torch.Tensor,
                     second_key: torch.Tensor, scale: float, rounds: bool) -> torch.Tensor:
    """:func:`fused_add_round` written back into ``outputs`` (one kernel once compiled)."""
    return outputs.copy_(fused_add_round(outputs, table, first_key, second_key, scale, rounds))


def dac_levels(inputs: torch.Tensor, scale: torch.Tensor, inp_unit: float, unit: float,
               bound: float, rounds: bool) -> torch.Tensor:
    """The DAC of :class:`~.analog.AnalogTileStack` (steps 1-2) out of place: ``inputs``
    times ``scale`` (per row, or one number) in DAC steps, rounded (``rounds``), clipped to
    ``bound`` and expressed in ADC steps ``unit``."""
    levels = inputs * (scale / inp_unit)
    if rounds:
        levels = torch.round(levels)
    levels = levels.clamp(-bound / inp_unit, bound / inp_unit)
    return levels * (inp_unit / unit) if inp_unit != unit else levels


_COMPILED: dict[str, Any] = {}


#: Inductor options of every compiled kernel: no bounds check of indirect indices (the only
#: one is rule 1's table look-up, whose index is masked to the table's size).
_OPTIONS: dict[str, Any] = {"assert_indirect_indexing": False}


def compiled(function: Any) -> Any:
    """``torch.compile(function, dynamic=True)``: one wrapper per function, made on first use
    (torch compiles on the wrapper's first call and keeps the kernels with it). A machine
    where torch.compile cannot build kernels (no working C++ compiler, no Triton) gets one
    :class:`SimulationError` naming the cause, not torch's traceback."""
    name = function.__name__
    if name not in _COMPILED:
        _COMPILED[name] = _Guarded(torch.compile(function, dynamic=True, options=_OPTIONS))
    return _COMPILED[name]


def _compile_failures() -> tuple[type[BaseException], ...]:
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    return (TorchDynamoException, CppCompileError, InvalidCxxCompiler)


class _Guarded:
    """A compiled function whose compilation failures are one line (see :func:`compiled`)."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def __call__(self, *args: Any) -> Any:
        try:
            return self.function(*args)
        except _compile_failures() as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            cause = lines[0] if lines else type(error).__name__
            raise SimulationError(f"kernels=compiled: torch.compile cannot build its kernels "
                                  f"here ({cause}); use --kernels eager") from None


class OutputNoise:
    """Seeded Gaussian output noise of one tile stack, added and rounded call by call."""

    def __init__(self, seed: int, device: torch.device, compiled: bool = False) -> None:
        self.seed = seed
        self.device = device
        self.compiled = compiled
        self.calls = 0
        self._table = normal_table(device) if compiled else None
        self._generator: torch.Generator | None = None
        if not compiled:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed)

    def add_round_(self, outputs: torch.Tensor, scale: float, rounds: bool) -> torch.Tensor:
        """``outputs <- round(outputs + scale * sample)`` (no rounding without ``rounds``)."""
        if self._table is None:  # rule 5
            noise = torch.randn(outputs.shape, generator=self._generator,
                                device=outputs.device, dtype=outputs.dtype)
            outputs.add_(noise, alpha=scale)
            return outputs.round_() if rounds else outputs
        first, second = call_keys(self.seed, self.calls)
        self.calls += 1
        keys = torch.tensor([first, second], dtype=torch.int64, device=outputs.device)
        if self._table.dtype != outputs.dtype:
            self._table = self._table.to(outputs.dtype)
        compiled(fused_add_round_)(outputs, self._table, keys[0], keys[1], scale, rounds)
        return outputs
