"""Load and validate target descriptions from TOML.

File layout (every field below is required unless a default is shown)::

    name = "aimc-512"
    description = "..."            # default ""
    [aimc]
    rows, cols, arrays_per_chip, chips   # positive integers
    tiers = 1                      # arrays stacked per crossbar site (3-D AIMC)
    dac_bits, adc_bits             # integers in 1..32
    out_noise                      # >= 0, std of additive output noise (aihwkit forward.out_noise)
    mvm_energy_j, mvm_latency_s    # > 0, per activation of one array (one tier)
    packing                        # bool: may partial tiles of different matrices share an array
    [aimc.noise]
    model                          # pcm | hermes | reram | reram-cmo | state-independent
    [aimc.noise.params]            # keyword arguments of the aihwkit noise model (default: none)
    [digital]
    mac_energy_j, mac_throughput, mem_energy_per_byte_j, mem_bandwidth, weight_bytes   # > 0

Rules:

1. Unknown, missing or ill-typed fields raise :class:`TargetError` with one line naming the file
   and the dotted field, e.g. ``x.toml: aimc.rows must be a positive integer, got 0``.
2. Booleans are not accepted where numbers are expected (TOML ``true`` is not ``1``).
3. Noise parameters are checked against the parameters the chosen aihwkit model takes.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetmap.common.errors import TargetError
from hetmap.targets.model import (
    NOISE_MODELS,
    AimcSpec,
    DigitalSpec,
    NoiseParameter,
    NoiseSpec,
    Target,
)

DEFAULT_TARGET = "aimc-512"


class _FieldError(ValueError):
    """A field value is wrong; the message completes ``<field> ...`` (never escapes)."""


def _finite(value: object) -> float | None:
    """The value as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise _FieldError("must be a positive integer")


def _bits(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 32:
        return value
    raise _FieldError("must be an integer from 1 to 32")


def _positive_number(value: object) -> float:
    number = _finite(value)
    if number is not None and number > 0:
        return number
    raise _FieldError("must be a positive number")


def _non_negative_number(value: object) -> float:
    number = _finite(value)
    if number is not None and number >= 0:
        return number
    raise _FieldError("must be a number >= 0")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _FieldError("must be true or false")


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _FieldError("must be a string")


def _coefficients(value: object) -> tuple[float, ...]:
    numbers = [_finite(v) for v in value] if isinstance(value, list) else []
    if numbers and all(n is not None for n in numbers):
        return tuple(n for n in numbers if n is not None)
    raise _FieldError("must be a non-empty list of numbers")


def _device_count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 2):
        return value
    raise _FieldError("must be 1 or 2")


def _noise_model(value: object) -> str:
    if value in NOISE_MODELS:
        return str(value)
    raise _FieldError(f"must be one of {', '.join(NOISE_MODELS)}")


@dataclass(frozen=True)
class _Field:
    check: Callable[[object], Any]
    default: Any = None  # None: required


_TOP_FIELDS = {"name": _Field(_text), "description": _Field(_text, default="")}
_AIMC_FIELDS = {
    "rows": _Field(_positive_int),
    "cols": _Field(_positive_int),
    "arrays_per_chip": _Field(_positive_int),
    "chips": _Field(_positive_int),
    "tiers": _Field(_positive_int, default=1),
    "dac_bits": _Field(_bits),
    "adc_bits": _Field(_bits),
    "out_noise": _Field(_non_negative_number),
    "mvm_energy_j": _Field(_positive_number),
    "mvm_latency_s": _Field(_positive_number),
    "packing": _Field(_boolean),
}
_DIGITAL_FIELDS = {
    "mac_energy_j": _Field(_positive_number),
    "mac_throughput": _Field(_positive_number),
    "mem_energy_per_byte_j": _Field(_positive_number),
    "mem_bandwidth": _Field(_positive_number),
    "weight_bytes": _Field(_positive_number),
}
_NOISE_FIELDS = {"model": _Field(_noise_model)}

# Keyword arguments of each aihwkit noise model (aihwkit.inference.noise, 1.x) that a TOML
# file may set; the conductance converter and per-time coefficient tables are left default.
_PCM_PARAMS: dict[str, Callable[[object], Any]] = {
    "prog_coeff": _coefficients,
    "g_max": _positive_number,
    "t_read": _positive_number,
    "t_0": _positive_number,
    "prog_noise_scale": _non_negative_number,
    "read_noise_scale": _non_negative_number,
    "drift_scale": _non_negative_number,
    "prog_coeff_g_max_reference": _positive_number,
}
#: noise model -> the parameters a target may set for it, with their checks
NOISE_PARAMETERS: dict[str, dict[str, Callable[[object], Any]]] = {
    "pcm": _PCM_PARAMS,
    "hermes": {**_PCM_PARAMS, "num_devices": _device_count},
    "reram": {
        "g_max": _positive_number,
        "noise_scale": _non_negative_number,
        "coeff_g_max_reference": _positive_number,
    },
    "reram-cmo": {
        "g_max": _positive_number,
        "g_min": _non_negative_number,
        "prog_noise_scale": _non_negative_number,
        "read_noise_scale": _non_negative_number,
        "drift_scale": _non_negative_number,
        "acceptance_range": _positive_number,
    },
    "state-independent": {
        "prog_coeff": _coefficients,
        "g_max": _positive_number,
        "prog_noise_scale": _non_negative_number,
        "drift_nu_mean": _non_negative_number,
        "drift_nu_std": _non_negative_number,
        "drift_scale": _non_negative_number,
        "t_0": _positive_number,
        "read_noise_scale": _non_negative_number,
        "t_read": _positive_number,
    },
}


def _fail(source: str, where: str, message: str) -> TargetError:
    return TargetError(f"{source}: {where} {message}")


def _table(data: Mapping[str, Any], key: str, prefix: str, source: str) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        raise _fail(source, f"{prefix}{key}", f"is missing (add a [{prefix}{key}] table)")
    if not isinstance(value, Mapping):
        raise _fail(source, f"{prefix}{key}", "must be a table")
    return value


def _read_fields(
    data: Mapping[str, Any],
    fields: Mapping[str, _Field],
    prefix: str,
    source: str,
    tables: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check ``data`` against ``fields``: unknown keys, missing keys, then each value."""
    for key in data:
        if key not in fields and key not in tables:
            known = ", ".join([*fields, *tables])
            raise _fail(source, f"{prefix}{key}", f"is not a known field (known: {known})")
    values: dict[str, Any] = {}
    for key, spec in fields.items():
        if key not in data:
            if spec.default is None:
                raise _fail(source, f"{prefix}{key}", "is missing")
            values[key] = spec.default
            continue
        try:
            values[key] = spec.check(data[key])
        except _FieldError as invalid:
            raise _fail(source, f"{prefix}{key}", f"{invalid}, got {data[key]!r}") from None
    return values


def _read_noise(aimc: Mapping[str, Any], source: str) -> NoiseSpec:
    noise = _table(aimc, "noise", "aimc.", source)
    model = _read_fields(noise, _NOISE_FIELDS, "aimc.noise.", source, tables=("params",))["model"]
    raw = noise.get("params", {})
    if not isinstance(raw, Mapping):
        raise _fail(source, "aimc.noise.params", "must be a table")
    allowed = NOISE_PARAMETERS[model]
    params: list[tuple[str, NoiseParameter]] = []
    for key in sorted(raw):
        if key not in allowed:
            known = ", ".join(allowed)
            raise _fail(
                source,
                f"aimc.noise.params.{key}",
                f"is not a parameter of the {model!r} noise model (known: {known})",
            )
        try:
            params.append((key, allowed[key](raw[key])))
        except _FieldError as invalid:
            where = f"aimc.noise.params.{key}"
            raise _fail(source, where, f"{invalid}, got {raw[key]!r}") from None
    return NoiseSpec(model=model, params=tuple(params))


def target_from_dict(data: Mapping[str, Any], source: str = "<target>") -> Target:
    """Validate a parsed target description; ``source`` names it in error messages."""
    top = _read_fields(data, _TOP_FIELDS, "", source, tables=("aimc", "digital"))
    aimc_table = _table(data, "aimc", "", source)
    aimc = _read_fields(aimc_table, _AIMC_FIELDS, "aimc.", source, tables=("noise",))
    noise = _read_noise(aimc_table, source)
    digital = _read_fields(_table(data, "digital", "", source), _DIGITAL_FIELDS, "digital.", source)
    return Target(
        name=top["name"],
        description=top["description"],
        aimc=AimcSpec(noise=noise, **aimc),
        digital=DigitalSpec(**digital),
        source=source,
    )


def builtin_targets() -> dict[str, Path]:
    """The preset targets shipped with hetmap: name (file stem) -> TOML path."""
    return {path.stem: path for path in sorted(Path(__file__).parent.glob("*.toml"))}


def load_target_file(path: str | Path) -> Target:
    """Load and validate one TOML target file."""
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise TargetError(f"{source}: no such target file") from None
    except tomllib.TOMLDecodeError as error:
        raise TargetError(f"{source}: invalid TOML: {error}") from error
    return target_from_dict(data, source)


def load_target(name_or_path: str | Path = DEFAULT_TARGET) -> Target:
    """A built-in target by name (``aimc-512``) or a target file by path (``my.toml``)."""
    builtins = builtin_targets()
    if str(name_or_path) in builtins:
        return load_target_file(builtins[str(name_or_path)])
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return load_target_file(path)
    known = ", ".join(builtins)
    raise TargetError(
        f"unknown target {str(name_or_path)!r}; built-in targets: {known} "
        "(or give the path of a .toml file)"
    )
