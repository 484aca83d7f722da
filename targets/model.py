"""The hardware description a mapping is compiled for: :class:`Target` and its parts.

A target has an analog side (:class:`AimcSpec`: crossbar arrays of ``rows x cols`` signed
weights, their converters, device noise and per-activation energy/latency) and a digital side
(:class:`DigitalSpec`: MAC and memory figures). Targets are frozen values; they are built from
TOML files by :mod:`hetmap.targets.loader`, which validates every field.

Vocabulary used throughout hetmap:

1. A *tile* is a ``rows x cols`` piece of one weight matrix (rows index input features, cols
   output features); an *array* is the physical crossbar that holds it.
2. A chip has ``arrays_per_chip`` crossbar *sites*. With ``tiers > 1`` (3-D AIMC) each site
   stacks ``tiers`` arrays, of which one is active at a time, so a chip holds
   ``arrays_per_chip * tiers`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetmap.common.noise import NOISE_MODELS

NoiseParameter = float | int | tuple[float, ...]


@dataclass(frozen=True)
class NoiseSpec:
    """Device noise: an aihwkit inference noise model and the keyword arguments it takes.

    ``params`` holds (name, value) pairs sorted by name, so the spec stays hashable; unset
    parameters take aihwkit's defaults.
    """

    model: str
    params: tuple[tuple[str, NoiseParameter], ...] = ()

    @property
    def aihwkit_class(self) -> str:
        """Name of the aihwkit class in ``aihwkit.inference.noise`` implementing the model."""
        return NOISE_MODELS[self.model]

    def kwargs(self) -> dict[str, Any]:
        """The parameters as keyword arguments for the aihwkit class (lists for sequences)."""
        return {name: list(v) if isinstance(v, tuple) else v for name, v in self.params}


@dataclass(frozen=True)
class AimcSpec:
    """The analog side: crossbar geometry, system size, converters, noise, energy, latency."""

    rows: int
    cols: int
    arrays_per_chip: int
    chips: int
    dac_bits: int
    adc_bits: int
    out_noise: float
    noise: NoiseSpec
    mvm_energy_j: float
    mvm_latency_s: float
    packing: bool
    tiers: int = 1

    @property
    def cells_per_array(self) -> int:
        return self.rows * self.cols

    @property
    def arrays_per_chip_total(self) -> int:
        """Arrays one chip holds, counting every tier of every site."""
        return self.arrays_per_chip * self.tiers

    def arrays_available(self, chips: int | None = None) -> int:
        """Arrays in a system of ``chips`` chips (the target's own chip count by default)."""
        return (self.chips if chips is None else chips) * self.arrays_per_chip_total


@dataclass(frozen=True)
class DigitalSpec:
    """The digital side, for batch-1 decoding: compute and weight-memory figures."""

    mac_energy_j: float
    mac_throughput: float
    mem_energy_per_byte_j: float
    mem_bandwidth: float
    weight_bytes: float


@dataclass(frozen=True)
class Target:
    """A heterogeneous analog-digital accelerator that hetmap maps models onto."""

    name: str
    aimc: AimcSpec
    digital: DigitalSpec
    description: str = ""
    source: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description (the same structure as the TOML file)."""
        aimc = self.aimc
        return {
            "name": self.name,
            "description": self.description,
            "aimc": {
                "rows": aimc.rows,
                "cols": aimc.cols,
                "arrays_per_chip": aimc.arrays_per_chip,
                "chips": aimc.chips,
                "tiers": aimc.tiers,
                "dac_bits": aimc.dac_bits,
                "adc_bits": aimc.adc_bits,
                "out_noise": aimc.out_noise,
                "mvm_energy_j": aimc.mvm_energy_j,
                "mvm_latency_s": aimc.mvm_latency_s,
                "packing": aimc.packing,
                "noise": {"model": aimc.noise.model, "params": aimc.noise.kwargs()},
            },
            "digital": {
                "mac_energy_j": self.digital.mac_energy_j,
                "mac_throughput": self.digital.mac_throughput,
                "mem_energy_per_byte_j": self.digital.mem_energy_per_byte_j,
                "mem_bandwidth": self.digital.mem_bandwidth,
                "weight_bytes": self.digital.weight_bytes,
            },
        }
