"""Pipeline text: ``pass1,pass2{opt=value,opt=value},...``.

Rules: (1) passes are separated by top-level commas; (2) options sit in braces after the pass
name as ``key=value`` pairs separated by commas; (3) keys may be written with ``-`` or ``_``;
(4) values are converted to the option field's declared type (int, float, bool, str or a
``Literal`` of allowed strings); (5) an unknown pass, an unknown option or a bad value is a
:class:`PipelineError` naming the pass and option.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any

from hetmap.common.errors import PipelineError

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, str]

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options.items()) + "}"


def parse_pipeline(text: str) -> list[PassSpec]:
    specs: list[PassSpec] = []
    depth, start = 0, 0
    pieces: list[str] = []
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"pipeline {text!r}: unmatched '}}' at position {i}")
        elif ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise PipelineError(f"pipeline {text!r}: unclosed '{{'")
    pieces.append(text[start:])
    for piece in (p.strip() for p in pieces):
        if not piece:
            raise PipelineError(f"pipeline {text!r}: empty pass name (stray comma?)")
        name, _, rest = piece.partition("{")
        name = name.strip()
        if not _NAME.match(name):
            raise PipelineError(f"pipeline {text!r}: {name!r} is not a pass name (kebab-case expected)")
        options: dict[str, str] = {}
        if rest:
            if not rest.endswith("}"):
                raise PipelineError(f"pipeline {text!r}: text after '}}' in {piece!r}")
            for item in filter(None, (s.strip() for s in rest[:-1].split(","))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise PipelineError(f"pass {name}: option {item!r} must be key=value")
                options[key.strip().replace("-", "_")] = value.strip()
        specs.append(PassSpec(name, options))
    return specs


def option_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def convert(pass_name: str, key: str, raw: Any, kind: Any) -> Any:
    """Convert ``raw`` (a string from pipeline text, or a Python value) to ``kind``."""
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if raw.lower() in ("none", ""):
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if origin is typing.Literal:
            if raw not in args:
                raise ValueError(f"expected one of {', '.join(map(str, args))}")
            return raw
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind in (int, float, str):
            return kind(raw)
    except ValueError as exc:
        raise PipelineError(f"pass {pass_name}: option {key}={raw!r}: {exc}") from None
    return raw


def instantiate(cls: type, spec_options: dict[str, Any], pass_name: str) -> Any:
    """Build a pass (or policy) object of dataclass ``cls`` from options."""
    types = option_types(cls)
    values: dict[str, Any] = {}
    for key, raw in spec_options.items():
        if key not in types:
            known = ", ".join(types) or "none"
            raise PipelineError(f"pass {pass_name} has no option {key!r} (options: {known})")
        values[key] = convert(pass_name, key, raw, types[key])
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"pass {pass_name}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problem = validate()
        if problem:
            raise PipelineError(f"pass {pass_name}: {problem}")
    return obj
