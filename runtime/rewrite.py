"""Make a model executable with analog non-idealities.

:func:`build_simulated_model` returns a copy of a model in which

1. every ``nn.Linear`` at a path in ``analog_linears`` is replaced by a simulated AIMC layer
   (:class:`SimulatedLinear`, or aihwkit's ``AnalogLinear`` with ``backend="aihwkit"``);
2. every experts module at a path in ``analog_experts`` (any layout
   :func:`~.layouts.read_layout` reads: given in ``layouts``, else inferred from the module by
   :func:`experts_layout`) is replaced by one whose listed experts run on simulated AIMC
   tiles and whose other experts stay exact digital (:class:`SimulatedExperts`, or
   :class:`ReferenceExperts` with ``backend="aihwkit"``); for a block of the ``sizes``
   layout (JetMoE) its two expert stacks are replaced instead (:mod:`.sized`);
3. everything else is the original model's own modules, shared: only the modules on a path
   to a replaced one are shallow clones. The original model is not modified and no weight
   is copied (the new modules are built from the original's weights); the simulated model
   costs the memory of its tiles only.

4. a module an accelerate device map offloads (weights on the meta device, brought in by its
   hook for each call) is simulated by a module built from its weights at every call
   (:class:`BuiltOnCall`); instance-bound forwards (accelerate's hooks) of the cloned modules
   are rebound to the clones.

Every replaced module draws its noise from its own seed, derived from ``seed`` and its path, so
one seed fixes the whole simulated model and two modules never share noise.
"""

from __future__ import annotations

import copy
import functools
import itertools
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hetmap.common.errors import SimulationError

from .analog import SimulatedLinear
from .experts import SimulatedExperts, experts_layout
from .layouts import ExpertLayout, sized_stacks
from .programming import derive_seed
from .reference import ReferenceExperts, ReferenceLinear
from .settings import AnalogSettings
from .sized import SimulatedSizedStack

BACKENDS = ("hetmap", "aihwkit")


def module_seed(seed: int, path: str) -> int:
    """The seed of the module at ``path`` in a simulated model built with ``seed``."""
    return derive_seed(seed, path)


def build_simulated_model(
    model: nn.Module,
    analog_linears: Iterable[str],
    analog_experts: Mapping[str, Iterable[int]],
    settings: AnalogSettings,
    seed: int,
    backend: str = "hetmap",
    layouts: Mapping[str, ExpertLayout] | None = None,
    digital_neurons: Mapping[str, Mapping[int, Sequence[int]]] | None = None,
    prefix: str = "",
) -> nn.Module:
    """A copy of ``model`` with the given linears and experts on simulated AIMC tiles.

    ``analog_linears``: module paths of ``nn.Linear`` layers. ``analog_experts``: module path of
    an experts module -> the expert indices that run analog. ``layouts``: module path -> its
    :class:`ExpertLayout` where known (e.g. read with the router's size); the others are
    inferred from the module. ``digital_neurons``: experts module path -> analog expert -> its
    intermediate neurons that run digitally (split experts, :class:`SimulatedExperts`; the
    ``hetmap`` backend only). ``prefix``: the path of ``model`` inside a larger model whose
    seeds it shares (a module simulated on its own, e.g. one leaf of a streamed run); the path
    ``""`` names ``model`` itself. Returns the copy in eval mode. Raises :class:`SimulationError`
    for unknown paths, wrong module kinds, unreadable layouts, bad expert indices or an
    unknown backend.
    """
    if backend not in BACKENDS:
        raise SimulationError(
            f"unknown simulation backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    modules = dict(model.named_modules())
    linear_paths = sorted(set(analog_linears))
    expert_paths = sorted(analog_experts)
    for path in linear_paths:
        module = _lookup(modules, path)
        if not isinstance(module, nn.Linear):
            raise SimulationError(
                f"analog linear {path!r} is a {type(module).__name__}, not an nn.Linear"
            )
    given = layouts or {}
    expert_layouts: dict[str, ExpertLayout] = {}
    for path in expert_paths:
        module = _lookup(modules, path)
        expert_layouts[path] = given[path] if path in given else experts_layout(module, path)
    overlap = set(linear_paths) & set(expert_paths)
    if overlap:
        raise SimulationError(
            f"module {sorted(overlap)[0]!r} is listed both as a linear and as experts"
        )

    split = {path: dict(value) for path, value in (digital_neurons or {}).items() if value}
    if split and backend != "hetmap":
        raise SimulationError(f"the {backend} backend does not simulate split experts "
                              "(neuron-granular placement); use the hetmap backend")
    unknown = sorted(set(split) - set(expert_paths))
    if unknown:
        raise SimulationError(f"digital neurons given for {unknown[0]!r}, which is not an "
                              "analog experts module")
    make_linear: Callable[[nn.Linear, AnalogSettings, int], nn.Module]
    make_linear = SimulatedLinear if backend == "hetmap" else ReferenceLinear
    make_experts = SimulatedExperts if backend == "hetmap" else ReferenceExperts
    # the hetmap tiles program reduced-precision weights chunk by chunk into float32 (no
    # float32 copy of the module); aihwkit's tiles need float32 modules
    widen = (lambda module: module) if backend == "hetmap" else _float32
    replacements: dict[str, nn.Module] = {}
    for path in linear_paths:
        replacements[path] = _placed(modules[path], functools.partial(
            _linear, make_linear, widen, settings, module_seed(seed, _join(prefix, path))))
    for path in expert_paths:
        indices = [int(index) for index in analog_experts[path]]
        if expert_layouts[path].call == "sizes":
            replacements.update(_sized_replacements(
                modules, path, expert_layouts[path], indices, settings, seed, backend,
                path in split, prefix))
            continue
        experts_seed = module_seed(seed, _join(prefix, path))

        def build(module: nn.Module, path: str = path, indices: list[int] = indices,
                  experts_seed: int = experts_seed) -> nn.Module:
            if path in split:
                return SimulatedExperts(widen(module), indices, settings, experts_seed, path,
                                        expert_layouts[path], split[path])
            return make_experts(widen(module), indices, settings, experts_seed, path,
                                expert_layouts[path])

        replacements[path] = _placed(modules[path], build)
    if "" in replacements:
        return replacements[""].eval()
    return _graft(model, "", replacements).eval()


def _placed(module: nn.Module, build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Rule 4: ``build(module)``, or for a module an accelerate device map offloads (its
    weights on the meta device until its hook brings them in for a call) a
    :class:`BuiltOnCall` that builds it at every call."""
    hook = getattr(module, "_hf_hook", None)
    offloaded = hook is not None and any(
        t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))
    return BuiltOnCall(module, build) if offloaded else build(module)


class BuiltOnCall(nn.Module):
    """A simulated module built from an offloaded module's weights at every call: the
    module's accelerate hook brings its weights to the execution device, the simulated
    module is built from them (per-batch programming makes that cheap), runs, and the hook
    sends the weights back. The offloaded module is not a submodule (its weights are the
    hook's to manage)."""

    def __init__(self, module: nn.Module, build: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        object.__setattr__(self, "offloaded", module)
        self.build = build

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module: Any = self.__dict__["offloaded"]
        hook = module._hf_hook
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
        output = None
        try:
            output = self.build(module)(*args, **kwargs)
        finally:
            output = hook.post_forward(module, output)
        return output


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _graft(module: nn.Module, prefix: str, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """Rule 3: a shallow clone of ``module`` with ``replacements`` (path -> module) in place.

    Only the modules on a path to a replacement are cloned (their own containers of children,
    parameters and buffers are new; the tensors are shared); every other submodule is the
    original object, so the digital model's weights are neither copied nor changed.
    """
    clone = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, types.MethodType) and value.__self__ is module:
            # a method bound to the instance (e.g. a forward set on it) runs on the clone
            object.__setattr__(clone, name, types.MethodType(value.__func__, clone))
        elif isinstance(value, functools.partial) and value.args and value.args[0] is module:
            # a forward wrapped around the instance (accelerate's device hooks)
            rebound = functools.partial(value.func, clone, *value.args[1:], **value.keywords)
            object.__setattr__(clone, name, functools.update_wrapper(rebound, value))
        elif isinstance(value, dict) and "hook" in name:
            # hooks registered on the clone later must not reach the digital model
            object.__setattr__(clone, name, type(value)(value))
    clone._modules = OrderedDict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    for name, child in module._modules.items():
        path = f"{prefix}.{name}" if prefix else name
        if path in replacements:
            clone._modules[name] = replacements[path]
        elif child is not None and any(p.startswith(path + ".") for p in replacements):
            clone._modules[name] = _graft(child, path, replacements)
    return clone


def _sized_replacements(modules: Mapping[str, nn.Module], path: str, layout: ExpertLayout,
                        indices: list[int], settings: AnalogSettings, seed: int, backend: str,
                        split: bool, prefix: str = "") -> dict[str, nn.Module]:
    """Rule 2 for the ``sizes`` layout (JetMoE): the block's two stacks are replaced."""
    if backend != "hetmap" or split:
        what = "the aihwkit backend" if backend != "hetmap" else "neuron-granular placement"
        raise SimulationError(f"{path!r} keeps its experts in two stacks called with rows per "
                              f"expert (JetMoE), which {what} does not simulate; use the "
                              "hetmap backend and --granularity expert")
    inner, outer = sized_stacks(layout)
    splits = (layout.intermediate, layout.intermediate) if layout.has_gate else None
    replaced: dict[str, nn.Module] = {}
    for child, out_splits in ((inner, splits), (outer, None)):
        name = _join(path, child)
        replaced[name] = _placed(_lookup(modules, name), functools.partial(
            _sized_stack, indices=indices, settings=settings,
            seed=module_seed(seed, _join(prefix, name)), path=name, out_splits=out_splits))
    return replaced


def _sized_stack(stack: nn.Module, *, indices: list[int], settings: AnalogSettings, seed: int,
                 path: str, out_splits: tuple[int, ...] | None) -> nn.Module:
    return SimulatedSizedStack(stack, indices, settings, seed, path, out_splits)


def _linear(make: Callable[[nn.Linear, AnalogSettings, int], nn.Module],
            widen: Callable[[nn.Module], nn.Module], settings: AnalogSettings, seed: int,
            module: nn.Module) -> nn.Module:
    linear = widen(module)
    assert isinstance(linear, nn.Linear)
    return make(linear, settings, seed)


def _float32(module: nn.Module) -> nn.Module:
    """``module`` itself when its floating-point weights are float32, else a float32 copy
    (for aihwkit's tiles; hetmap's convert chunk by chunk while programming).

    The analog tiles program and compute in float32 whatever the model's storage dtype
    (bfloat16 or float16 checkpoints): the DAC/ADC steps, the noise and the scales need it.
    Their outputs go back to the input's dtype, so the digital rest of the model keeps its own.
    """
    reduced = any(p.is_floating_point() and p.dtype != torch.float32
                  for p in [*module.parameters(), *module.buffers()])
    return copy.deepcopy(module).float() if reduced else module


def _lookup(modules: Mapping[str, nn.Module], path: str) -> nn.Module:
    if path not in modules:
        raise SimulationError(f"model has no module at path {path!r}")
    return modules[path]
