"""Explicit registries for passes, placement policies, targets and emitters.

A :class:`Registries` object is built by :func:`load_registries`: the built-ins first, then the
Python entry points of the groups ``hetmap.passes``, ``hetmap.policies``, ``hetmap.targets`` and
``hetmap.emitters``. Nothing registers itself on import. A duplicate name is an error; a
plugin that fails to load (import error, duplicate name, wrong kind of object) is recorded as a
:class:`PluginError` naming the plugin and entry point, reported as a warning, and skipped --
the rest of hetmap keeps working.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hetmap.common.errors import PluginError, RegistryError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    description: str
    origin: str  # "built-in" or "plugin <dist>:<entry point>"


@dataclass
class Registry(Generic[T]):
    """Names to objects of one kind."""

    kind: str
    group: str
    check: Callable[[Any], str | None] = lambda _v: None
    describe: Callable[[Any], str] = lambda v: (getattr(v, "description", "") or "")
    entries: dict[str, Entry[T]] = field(default_factory=dict)
    problems: list[PluginError] = field(default_factory=list)
    #: entry-point names whose plugin failed to load, with the reason
    failed: dict[str, PluginError] = field(default_factory=dict)

    def register(self, name: str, value: T, description: str | None = None,
                 origin: str = "built-in") -> None:
        if name in self.entries:
            raise RegistryError(f"duplicate {self.kind} name {name!r}: registered by "
                                f"{self.entries[name].origin} and again by {origin}")
        problem = self.check(value)
        if problem:
            raise RegistryError(f"{self.kind} {name!r} from {origin}: {problem}")
        self.entries[name] = Entry(name, value, description or self.describe(value), origin)

    def get(self, name: str) -> T:
        entry = self.entries.get(name)
        if entry is None:
            if name in self.failed:
                raise self.failed[name]
            known = ", ".join(sorted(self.entries)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r} (known: {known})")
        return entry.value

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self.entries.values(), key=lambda e: e.name))

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = ep.dist.name if ep.dist is not None else "?"
            origin = f"plugin {dist} (entry point '{ep.name} = {ep.value}' in {self.group})"
            try:
                value = ep.load()
            except Exception as exc:  # any failure inside third-party code
                self._fail(ep.name, PluginError(
                    f"{origin} failed to import: {type(exc).__name__}: {exc}"))
                continue
            # classes (passes, policies) carry their own name; other objects use the entry point's
            declared = getattr(value, "name", None) if isinstance(value, type) else None
            name = declared if isinstance(declared, str) and declared else ep.name
            try:
                self.register(name, value, origin=origin)
            except RegistryError as exc:
                self._fail(name, PluginError(str(exc)))

    def _fail(self, name: str, problem: PluginError) -> None:
        self.problems.append(problem)
        if name not in self.entries:
            self.failed[name] = problem


@dataclass
class Registries:
    passes: Registry[Any]
    policies: Registry[Any]
    targets: Registry[Any]
    emitters: Registry[Any]

    def all(self) -> list[Registry[Any]]:
        return [self.passes, self.policies, self.targets, self.emitters]

    @property
    def problems(self) -> list[PluginError]:
        return [p for r in self.all() for p in r.problems]


def _check_pass(value: Any) -> str | None:
    if not isinstance(value, type) or not callable(getattr(value, "run", None)):
        return "a pass must be a class with a run(graph, ctx) method"
    if not getattr(value, "name", None):
        return "a pass class needs a kebab-case 'name'"
    return None


def _check_policy(value: Any) -> str | None:
    if not isinstance(value, type) or not callable(getattr(value, "scores", None)):
        return "a policy must be a class with a scores(graph, experts, ctx) method"
    return None


def load_registries(*, plugins: bool = True) -> Registries:
    """Fresh registries: built-ins, then (unless ``plugins`` is False) entry points."""
    from hetmap.compiler.algorithms.place import builtin_policies
    from hetmap.compiler.backends import builtin_emitters
    from hetmap.compiler.passes import builtin_passes
    from hetmap.targets import builtin_targets

    registries = Registries(
        passes=Registry("pass", "hetmap.passes", check=_check_pass),
        policies=Registry("policy", "hetmap.policies", check=_check_policy),
        targets=Registry("target", "hetmap.targets"),
        emitters=Registry("emitter", "hetmap.emitters"),
    )
    for cls in builtin_passes():
        registries.passes.register(cls.name, cls)
    for cls in builtin_policies():
        registries.policies.register(cls.name, cls)
    for name, path in builtin_targets().items():
        registries.targets.register(name, path, description=_target_description(path))
    for name, (emitter, description) in builtin_emitters().items():
        registries.emitters.register(name, emitter, description)
    if plugins:
        for registry in registries.all():
            registry.load_entry_points()
    return registries


def _target_description(path: Any) -> str:
    try:
        import tomllib

        with open(path, "rb") as fh:
            return str(tomllib.load(fh).get("description", ""))
    except (OSError, ValueError):
        return ""
