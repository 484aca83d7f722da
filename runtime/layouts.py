"""Expert storage layouts: how an experts module keeps its E experts, read into one form.

Every back end of hetmap (the front end's weight references, calibration, the simulator and
the ONNX emitter) reads routed experts through this module, so a layout is understood in one
place. The canonical form is the paper's: per expert ``gate [I, H]``, ``up [I, H]`` and
``down [H, I]`` in ``nn.Linear`` ``[out, in]`` orientation, optional biases, and an activation
``hidden = act(gate x) * (up x)`` (the module's own ``_apply_gate`` where it has one).

Rules (:func:`read_layout`; no class names are consulted):

1. ``fused``: 3-D parameters ``gate_up_proj`` (or ``up_proj`` for gate-less experts) and
   ``down_proj``. The layout facts transformers attaches to its experts modules
   (``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``,
   ``has_post_expert_norm``) are authoritative. A module without them gets
   transformers' defaults (concatenated halves, ``chunk(2)``); its orientation is read from
   the shapes (``down_proj [E, H, I]`` or, transposed, ``[E, I, H]``) and is refused when
   ``H == I`` makes that ambiguous.
2. ``flat``: 2-D stacks ``[E * I, H]`` for gate, up and down (DBRX's ``w1``, ``v1``, ``w2``,
   directly on the module or on one child); down is used transposed (``x @ w2[e]``).
3. ``gate_up_proj`` with more experts than ``down_proj`` (LongCat-Flash): the extra router
   slots are identity ("zero") experts: they pass their input through, weighted, and hold no
   weights. Other extra router slots (up to E more) are not experts: Zaya's "skip" slot,
   which its block masks (weight 0) before the experts see it, or Inkling's shared-expert
   gates. A router with exactly E rows is preferred over one with extra slots.
4. Calling convention, from ``forward``'s signature: ``routed`` -- ``(hidden [T, H],
   top_k_index [T, k], top_k_weights [T, k])``; ``dense-input`` -- ``(hidden [E * T, H])``,
   each expert's block of T rows already scaled by its routing score (Llama 4).
5. ``sizes`` (JetMoE): the MoE block itself is the store; two children each hold one 3-D
   ``weight [E, out, in]`` and are called with ``(rows sorted by expert, rows per expert)``:
   the first maps hidden to ``2I`` (gate and up concatenated, ``chunk(2)``) or to ``I``, the
   second ``I`` back to hidden. The block routes, gathers, gates and combines itself; only
   the two stacks are replaced in simulation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Parameter names of flat 2-D stacks, by the paper's roles.
_FLAT_ROLES = {"gate": ("w1", "gate_proj"), "up": ("v1", "w3", "up_proj"), "down": ("w2", "down_proj")}


class LayoutError(ValueError):
    """An experts module whose storage hetmap cannot read unambiguously."""


@dataclass(frozen=True)
class TensorSlice:
    """One expert's matrix inside a stored tensor, in ``nn.Linear`` ``[out, in]`` terms.

    The matrix is ``t.view(split, -1, cols)[expert]`` when ``split`` is set (flat stacks),
    else ``t[expert]``; transposed if ``transposed``; then rows ``start:stop:step``.
    """

    tensor: str  # parameter name relative to the experts module
    expert: int
    transposed: bool = False
    start: int | None = None
    stop: int | None = None
    step: int = 1
    split: int | None = None


@dataclass(frozen=True)
class ExpertLayout:
    """How an experts module stores its routed experts (no tensors: works on meta models)."""

    storage: str  # "fused" or "flat"
    num_experts: int  # experts with weights
    hidden: int
    intermediate: int
    has_gate: bool
    transposed: bool
    interleaved: bool
    call: str  # "routed" or "dense-input"
    tensors: dict[str, str] = field(default_factory=dict)  # role -> parameter name
    biases: dict[str, str] = field(default_factory=dict)  # role -> bias parameter name
    identity_experts: int = 0
    post_norm: bool = False

    @property
    def name(self) -> str:
        """Short form for plan.json and ir.txt, e.g. ``fused-t-interleaved+bias``."""
        parts = [self.storage + ("-t" if self.transposed and self.storage == "fused" else "")]
        if self.interleaved:
            parts.append("interleaved")
        if not self.has_gate:
            parts.append("no-gate")
        if self.call != "routed":
            parts.append(self.call)
        text = "-".join(parts)
        if self.biases:
            text += "+bias"
        if self.identity_experts:
            text += f"+{self.identity_experts}-identity"
        if self.post_norm:
            text += "+post-norm"
        return text

    @property
    def roles(self) -> tuple[str, ...]:
        return ("gate", "up", "down") if self.has_gate else ("up", "down")

    def matrix_shape(self, role: str) -> tuple[int, int]:
        """``(out, in)`` of one expert's ``role`` matrix."""
        return (self.hidden, self.intermediate) if role == "down" else (self.intermediate, self.hidden)

    def slice(self, role: str, expert: int, *, bias: bool = False) -> TensorSlice | None:
        """Where expert ``expert``'s ``role`` weight (or bias) lives; None for a missing bias."""
        inter = self.intermediate
        if self.storage == "flat":
            name = (self.biases if bias else self.tensors).get(role)
            if name is None:
                return None
            if bias:
                return TensorSlice(name, expert, split=self.num_experts)
            return TensorSlice(name, expert, transposed=role == "down", split=self.num_experts)
        table = self.biases if bias else self.tensors
        if role == "down":
            name = table.get("down")
            return None if name is None else TensorSlice(name, expert, self.transposed and not bias)
        name = table.get("gate_up" if self.has_gate else "up")
        if name is None:
            return None
        transposed = self.transposed and not bias
        if not self.has_gate:
            return TensorSlice(name, expert, transposed)
        if self.interleaved:
            return TensorSlice(name, expert, transposed, 0 if role == "gate" else 1, None, 2)
        start = 0 if role == "gate" else inter
        return TensorSlice(name, expert, transposed, start, start + inter)


def select(full: Any, where: TensorSlice) -> Any:
    """Apply ``where`` to the full stored tensor (torch or numpy): the ``[out, in]`` matrix."""
    t = full.reshape(where.split, -1, *full.shape[1:]) if where.split else full
    t = t[where.expert]
    if where.transposed:
        t = t.T
    if where.start is not None or where.stop is not None or where.step != 1:
        t = t[where.start:where.stop:where.step]
    return t


def _has_post_norm(module: nn.Module) -> bool:
    """Whether each expert's output is normalised before its routing weight: the module's
    ``has_post_expert_norm`` flag, or else a ``post_expert_norm`` submodule (MuseSpark)."""
    flag = _flag(module, "has_post_expert_norm")
    return flag if flag is not None else isinstance(getattr(module, "post_expert_norm", None),
                                                    nn.Module)


def _flag(module: nn.Module, name: str) -> bool | None:
    value = getattr(module, name, None)
    return value if isinstance(value, bool) else None


def _call_convention(module: nn.Module) -> str:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return "routed"
    return "dense-input" if len(params) == 1 else "routed"


def _positional_parameters(module: nn.Module) -> int:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return -1
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


def _fused(module: nn.Module, router_experts: int, hidden: int) -> ExpertLayout | None:
    params = dict(module.named_parameters(recurse=False))
    down = params.get("down_proj")
    has_gate = _flag(module, "has_gate")
    if has_gate is None:
        has_gate = "gate_up_proj" in params
    inner = params.get("gate_up_proj" if has_gate else "up_proj")
    if down is None or inner is None or down.dim() != 3 or inner.dim() != 3:
        return None
    experts = int(down.shape[0])
    if int(inner.shape[0]) not in (experts, router_experts):
        return None
    if int(inner.shape[0]) == router_experts > experts:
        identity = router_experts - experts
    elif experts <= router_experts <= 2 * experts:
        identity = 0  # extra slots route elsewhere (a skip slot, shared-expert gates)
    else:
        return None
    transposed = _flag(module, "is_transposed")
    if transposed is None:
        h_last, h_mid = int(down.shape[2]) == hidden, int(down.shape[1]) == hidden
        if h_last == h_mid:
            raise LayoutError(
                f"cannot tell the orientation of down_proj {tuple(down.shape)} (hidden {hidden}) "
                f"in {type(module).__name__}: it carries no is_transposed attribute")
        transposed = h_last
    inter = int(down.shape[1] if transposed else down.shape[2])
    width = int(inner.shape[2] if transposed else inner.shape[1])
    if width != (2 * inter if has_gate else inter):
        return None
    rows = int(down.shape[2] if transposed else down.shape[1])  # the width the experts read
    if rows != int(inner.shape[1] if transposed else inner.shape[2]):
        return None
    hidden = rows  # the router's input width, or narrower (MuseSpark projects rows first)
    concatenated = _flag(module, "is_concatenated")
    inner_name = "gate_up" if has_gate else "up"
    tensors = {inner_name: "gate_up_proj" if has_gate else "up_proj", "down": "down_proj"}
    biases = {role: f"{name}_bias" for role, name in tensors.items() if f"{name}_bias" in params}
    if _flag(module, "has_bias") and len(biases) != 2:
        raise LayoutError(f"{type(module).__name__} says has_bias=True but has no "
                          f"{tensors[inner_name]}_bias / down_proj_bias parameters")
    return ExpertLayout(
        storage="fused", num_experts=experts, hidden=hidden, intermediate=inter,
        has_gate=has_gate, transposed=transposed, interleaved=concatenated is False,
        call=_call_convention(module), tensors=tensors, biases=biases,
        identity_experts=identity,
        post_norm=_has_post_norm(module))


def _flat(module: nn.Module, router_experts: int, hidden: int) -> ExpertLayout | None:
    for prefix, owner in [("", module), *((f"{n}.", c) for n, c in module.named_children())]:
        params = dict(owner.named_parameters(recurse=False))
        found = {role: next((n for n in names if n in params and params[n].dim() == 2), None)
                 for role, names in _FLAT_ROLES.items()}
        if found["up"] is None or found["down"] is None:
            continue
        shapes = {tuple(params[n].shape) for n in found.values() if n is not None}
        if len(shapes) != 1:
            continue
        rows, cols = next(iter(shapes))
        if cols != hidden or rows % router_experts:
            continue
        return ExpertLayout(
            storage="flat", num_experts=router_experts, hidden=hidden,
            intermediate=rows // router_experts, has_gate=found["gate"] is not None,
            transposed=False, interleaved=False, call=_call_convention(module),
            tensors={role: prefix + name for role, name in found.items() if name is not None})
    return None


def sized_pair(module: nn.Module, router_experts: int, hidden: int) -> ExpertLayout | None:
    """Rule 5."""
    stacks = []
    for name, child in module.named_children():
        params = dict(child.named_parameters())
        weight = params.get("weight")
        if len(params) == 1 and weight is not None and weight.dim() == 3 \
                and int(weight.shape[0]) == router_experts and _positional_parameters(child) == 2:
            stacks.append((name, tuple(int(d) for d in weight.shape[1:])))
    if len(stacks) != 2:
        return None
    (inner, (inner_out, inner_in)), (outer, (outer_out, outer_in)) = stacks
    if inner_in != hidden or outer_out != hidden or inner_out not in (outer_in, 2 * outer_in):
        return None
    has_gate = inner_out == 2 * outer_in
    return ExpertLayout(
        storage="fused", num_experts=router_experts, hidden=hidden, intermediate=outer_in,
        has_gate=has_gate, transposed=False, interleaved=False, call="sizes",
        tensors={"gate_up" if has_gate else "up": f"{inner}.weight", "down": f"{outer}.weight"})


def read_layout(module: nn.Module, router_experts: int, hidden: int) -> ExpertLayout | None:
    """The layout of ``module`` if it stores ``router_experts`` experts of width ``hidden``.

    Returns None when ``module`` is not an experts store of a known kind; raises
    :class:`LayoutError` when it is one but its layout is ambiguous.
    """
    return (_fused(module, router_experts, hidden) or _flat(module, router_experts, hidden)
            or sized_pair(module, router_experts, hidden))


def sized_stacks(layout: ExpertLayout) -> tuple[str, str]:
    """Rule 5: the child paths of the input and output stacks of a ``sizes`` layout."""
    inner = layout.tensors["gate_up" if layout.has_gate else "up"]
    return inner.removesuffix(".weight"), layout.tensors["down"].removesuffix(".weight")


@dataclass(frozen=True)
class CanonicalExperts:
    """The experts of one module in canonical form (views of its parameters, no copies)."""

    layout: ExpertLayout
    weights: dict[str, torch.Tensor]  # role -> [E, out, in]
    biases: dict[str, torch.Tensor]  # role -> [E, out]
    activation: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]
    post_norm: nn.Module | None = None


def _stack(module: nn.Module, layout: ExpertLayout, role: str, bias: bool) -> torch.Tensor | None:
    first = layout.slice(role, 0, bias=bias)
    if first is None:
        return None
    full = module.get_parameter(first.tensor).detach()
    if first.split:
        full = full.reshape(first.split, -1, *full.shape[1:])
    stacked = full.transpose(1, 2) if first.transposed else full
    return stacked[:layout.num_experts, first.start:first.stop:first.step]


def activation_of(module: nn.Module, layout: ExpertLayout
                  ) -> Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]:
    """``f(gate_out, up_out) -> hidden``: the module's own gating on canonical outputs."""
    names = ("act_fn", "activation_fn", "activation")
    act_fn = next((a for n in names if callable(a := getattr(module, n, None))), None)
    if act_fn is None:
        for child in module.children():
            act_fn = next((a for n in names if callable(a := getattr(child, n, None))), None)
            if act_fn is not None:
                break
    if not layout.has_gate:
        if not callable(act_fn):
            raise LayoutError(f"{type(module).__name__} has no act_fn")
        return lambda _gate, up: act_fn(up)
    apply_gate = getattr(type(module), "_apply_gate", None)
    custom = apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate"
    if custom:
        bound: Callable[[torch.Tensor], torch.Tensor] = module._apply_gate  # type: ignore[assignment]
        interleaved = layout.interleaved

        def stored_order_gate(gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
            assert gate is not None
            if interleaved:  # back to the stored order the module's own gating reads
                return bound(torch.stack((gate, up), dim=-1).flatten(-2))
            return bound(torch.cat((gate, up), dim=-1))

        return stored_order_gate
    if not callable(act_fn):
        raise LayoutError(f"{type(module).__name__} has no act_fn")
    return lambda gate, up: act_fn(gate) * up


def canonical(module: nn.Module, layout: ExpertLayout) -> CanonicalExperts:
    """The experts of ``module`` (read with ``layout``) in canonical form."""
    weights = {role: w for role in layout.roles if (w := _stack(module, layout, role, False)) is not None}
    biases = {role: b for role in layout.roles if (b := _stack(module, layout, role, True)) is not None}
    norm = getattr(module, "post_expert_norm", None) if layout.post_norm else None
    return CanonicalExperts(layout, weights, biases, activation_of(module, layout), norm)
