"""Find the experts stores of a model and read their layouts, for the ONNX back end.

An *experts store* is a module that keeps several experts' matrices in stacked tensors;
:mod:`hetmap.runtime.layouts` says how each layout is read. This module decides which modules
of a model are stores and with which arguments their layout is read.

Rules:

1. A module may be a store if it has 3-D ``gate_up_proj``/``up_proj``/``down_proj``
   parameters, or two same-shaped 2-D parameters on itself or one child (flat stacks such as
   DBRX's ``mlp.w1/v1/w2``).
2. Router slots (experts with weights plus identity experts): the largest leading dimension of
   its 3-D stacks; else a ``num_experts``-like attribute of the module or a child; else the row
   count of the first 2-D ``weight [E, H]`` elsewhere in its parent (the router).
3. Width ``H``: the last dimension of the store's recorded input; else its ``hidden_size`` or
   ``hidden_dim`` attribute.
4. A module with 3-D stacks whose layout cannot be read (unknown, ambiguous, no activation,
   not called and without a width) is an :class:`EmitError` naming the module and the reason;
   flat candidates that read as no layout are not stores (None).
"""

from __future__ import annotations

from torch import nn

from hetmap.common.errors import EmitError
from hetmap.compiler.backends.onnx_experts import experts_problem
from hetmap.runtime.layouts import ExpertLayout, LayoutError, read_layout

#: 3-D parameters that mark an experts store (rule 1)
_STACKS = ("gate_up_proj", "up_proj", "down_proj")
#: attributes that give a store's number of router slots when its stacks cannot (flat stacks)
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")
#: layout facts transformers attaches to experts modules (quoted in error messages)
_LAYOUT_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate",
                 "has_post_expert_norm")


def _stacks(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own 3-D expert stacks (rule 1)."""
    return {name: p for name, p in module.named_parameters(recurse=False)
            if name in _STACKS and p.dim() == 3}


def may_store_experts(module: nn.Module) -> bool:
    """Rule 1: 3-D stacks, or two same-shaped 2-D parameters on the module or one child."""
    if _stacks(module):
        return True
    for owner in (module, *module.children()):
        shapes = [tuple(p.shape) for p in owner.parameters(recurse=False) if p.dim() == 2]
        if len(shapes) > len(set(shapes)):
            return True
    return False


def store_layout(model: nn.Module, path: str, input_width: int | None) -> ExpertLayout | None:
    """Rules 2-4: the layout of the store at ``path``; None if it is no experts store."""
    module = model.get_submodule(path)
    stacked = _stacks(module)
    where = f"experts module {path!r} ({type(module).__name__})"
    hidden = input_width if input_width is not None else _hidden_attribute(module)
    slots = None if hidden is None else _router_slots(model, path, hidden)
    if hidden is None or slots is None:
        if stacked:
            raise EmitError(f"{where} was not called on the example input; its width and "
                            "number of experts cannot be read")
        return None
    try:
        layout = read_layout(module, slots, hidden)
    except LayoutError as error:
        raise EmitError(f"{where} cannot be exported per expert: {error}") from error
    if layout is None:
        if stacked:
            shapes = ", ".join(f"{name} {list(p.shape)}" for name, p in stacked.items())
            flags = "".join(f", {flag}={getattr(module, flag)}" for flag in _LAYOUT_FLAGS
                            if isinstance(getattr(module, flag, None), bool))
            raise EmitError(f"{where} cannot be exported per expert: {shapes} (hidden {hidden}"
                            f"{flags}) match no expert layout hetmap reads")
        return None
    problem = experts_problem(module, layout)
    if problem is not None:
        raise EmitError(f"{where} cannot be exported per expert: {problem}")
    return layout


def _hidden_attribute(module: nn.Module) -> int | None:
    for attribute in ("hidden_size", "hidden_dim"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    return None


def _router_slots(model: nn.Module, path: str, hidden: int) -> int | None:
    """Rule 2: the number of router slots (experts, identity experts included) of a store."""
    module = model.get_submodule(path)
    stacked = _stacks(module)
    if stacked:
        return max(int(p.shape[0]) for p in stacked.values())
    for owner in (module, *module.children()):
        for attribute in _EXPERT_COUNTS:
            value = getattr(owner, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
    parent_path = path.rpartition(".")[0]
    for name, candidate in model.get_submodule(parent_path).named_modules():
        full = f"{parent_path}.{name}" if parent_path else name
        if full == path or full.startswith(f"{path}."):
            continue
        weight = candidate._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and weight.shape[1] == hidden:
            return int(weight.shape[0])
    return None
