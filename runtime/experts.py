"""Simulated Mixture-of-Experts experts: some experts analog, the rest exact digital.

Replaces an experts module of any layout :func:`~.layouts.read_layout` reads (fused
``[E, 2I, H]`` stacks, transposed or gate/up interleaved, with biases, gate-less, flat 2-D
stacks, post-expert norm, identity experts, routed or dense-input calls) with a module of the
same call convention. The matrices are taken in canonical ``[out, in]`` form
(:func:`~.layouts.canonical`), so the storage layout matters only when reading them.

1. The listed experts' gate and up matrices are programmed side by side onto one
   :class:`AnalogTileStack` (each on its own column tiles; up alone for gate-less experts),
   their down matrices onto another; the other experts stay exact digital
   (:class:`DigitalStack`). Biases are digital: added after the tile product.
2. Per group (analog, digital) the (token, expert) pairs are sorted by expert; each matrix of
   the group is one grouped product over all its experts (:mod:`.grouped`).
3. The module's own gating (:func:`~.layouts.activation_of`: ``act(gate) * up``, a custom
   ``_apply_gate``, or ``act(up)`` without a gate) gives down's input; the post-expert norm,
   if any, applies to each expert's output, then the routing weight.
4. ``routed`` calls: ``(hidden [T, H] or [..., H], top_k_index [T, k], top_k_weights [T, k])``;
   indices ``E .. E + identity - 1`` are identity experts (the weighted input is added),
   other indices outside ``0 .. E - 1`` (expert-parallel sentinels) are skipped.
   ``dense-input`` calls (Llama 4): ``hidden [slots * T, H]``, block ``e`` holding expert
   ``e``'s inputs already scaled by its routing score; output row for row. Without biases an
   all-zero input row is a token not routed to that expert: it is not computed (its exact
   output is zero; analog hardware would not run it) and gives zero.
5. The output has the original module's shape (read once at construction by running the
   original on two zero tokens: the input's shape, or ``[batch, -1, H]`` like DBRX) and the
   input's dtype.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from hetmap.common.errors import SimulationError

from .analog import AnalogTileStack, DigitalStack, StackView
from .grouped import RowGroups
from .layouts import (
    CanonicalExperts,
    ExpertLayout,
    LayoutError,
    activation_of,
    canonical,
    read_layout,
)
from .programming import derive_seed
from .settings import AnalogSettings

#: integer attributes that hold the number of experts of a flat (2-D) expert stack
_COUNT_NAMES = ("num_experts", "moe_num_experts", "num_local_experts", "n_routed_experts")

Activation = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``module`` and of its direct children, by relative name."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: tensor for name, tensor in named if name.count(".") <= 1}


def _size_candidates(module: nn.Module) -> list[tuple[int, int]]:
    """``(router slots, hidden)`` pairs that ``module``'s stored tensors allow."""
    tensors = _tensors(module)
    down, inner = tensors.get("down_proj"), tensors.get("gate_up_proj", tensors.get("up_proj"))
    found: list[tuple[int, int]] = []
    if down is not None and inner is not None and down.dim() == 3 and inner.dim() == 3:
        found += [(int(inner.shape[0]), int(width)) for width in down.shape[1:]]
    owners = [module, *module.children()]
    attributes = [getattr(owner, name, None) for owner in owners for name in _COUNT_NAMES]
    counts = {count for count in attributes if isinstance(count, int) and count > 0}
    widths = {int(t.shape[1]) for t in tensors.values() if t.dim() == 2}
    found += [(count, width) for count in sorted(counts) for width in sorted(widths)]
    return list(dict.fromkeys(found))


def _shapes_agree(module: nn.Module, layout: ExpertLayout) -> bool:
    """Whether the canonical views of ``module`` read with ``layout`` have its matrix shapes
    (a layout flag such as ``is_transposed`` fixes the orientation whatever ``hidden`` is)."""
    views = canonical(module, layout).weights
    return all(tuple(view.shape[1:]) == layout.matrix_shape(role) for role, view in views.items())


def experts_layout(
    module: nn.Module, path: str, router_experts: int | None = None, hidden: int | None = None
) -> ExpertLayout:
    """The layout of the experts module at ``path``; raise :class:`SimulationError` if none.

    Without ``router_experts`` and ``hidden`` they are inferred from the module: the router
    slots from the first dimension of ``gate_up_proj``/``up_proj`` (or, for flat stacks, an
    attribute such as ``num_experts``), the hidden size from ``down_proj``'s dimensions.
    """
    if router_experts is not None and hidden is not None:
        candidates = [(router_experts, hidden)]
    else:
        candidates = _size_candidates(module)
    layouts: list[ExpertLayout] = []
    problems: list[str] = []
    for slots, width in candidates:
        try:
            layout = read_layout(module, slots, width)
            if layout is None or not _shapes_agree(module, layout) or layout in layouts:
                continue
        except LayoutError as exc:
            problems.append(str(exc))
            continue
        layouts.append(layout)
    where = f"experts module {path!r} ({type(module).__name__})"
    if len(layouts) == 1:
        return layouts[0]
    if layouts:
        names = ", ".join(f"{layout.name} (hidden {layout.hidden})" for layout in layouts)
        raise SimulationError(
            f"{where} can be read as {names}; pass its layout (build_simulated_model(layouts=))"
        )
    if problems:
        raise SimulationError(f"{where}: {problems[0]}")
    raise SimulationError(
        f"{where} is not an experts store hetmap can read (needs gate_up_proj/up_proj and "
        "down_proj [E, ., .] stacks, or flat [E * I, H] w1/v1/w2 stacks)"
    )


def routed_layout(experts: nn.Module, path: str, router: nn.Module | None) -> ExpertLayout:
    """:func:`experts_layout` with the router slots and hidden size of ``router``'s 2-D
    ``weight [slots, H]`` (inferred from the experts module if the router has none, or if the
    experts do not read ``H``-wide rows and the inferred layout has the router's slots)."""
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        try:
            return experts_layout(experts, path, int(weight.shape[0]), int(weight.shape[1]))
        except SimulationError:
            # experts narrower than the router's input (MuseSpark projects the rows first):
            # the widths the experts module itself gives
            layout = experts_layout(experts, path)
            if layout.num_experts != int(weight.shape[0]):
                raise
            return layout
    return experts_layout(experts, path)


def canonical_experts(
    module: nn.Module, path: str, layout: ExpertLayout | None = None
) -> CanonicalExperts:
    """The experts of ``module`` (at ``path``) in canonical form; raise if unreadable."""
    layout = layout or experts_layout(module, path)
    try:
        return canonical(module, layout)
    except LayoutError as exc:
        raise SimulationError(f"experts module {path!r}: {exc}") from exc




def checked_expert_indices(indices: Iterable[int], num_experts: int, path: str) -> list[int]:
    """Sorted distinct expert indices; raise if one is out of range."""
    chosen = sorted({int(index) for index in indices})
    bad = [index for index in chosen if not 0 <= index < num_experts]
    if bad:
        raise SimulationError(
            f"experts module {path!r} has experts 0..{num_experts - 1}; got analog experts {bad}"
        )
    return chosen


def _stored(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` (relative, dotted) of ``module``."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return cast(torch.Tensor, getattr(owner, leaf))


def _weightless_copy(module: nn.Module, layout: ExpertLayout) -> nn.Module:
    """A copy of ``module`` without its expert weights and biases (those become None): its
    activation, gating constants and post-expert norm, as small as they are."""
    names = [*layout.tensors.values(), *layout.biases.values()]
    memo: dict[int, object] = {id(_stored(module, name)): None for name in names}
    return copy.deepcopy(module, memo)


def _batch_view(module: nn.Module, layout: ExpertLayout, like: torch.Tensor, path: str) -> bool:
    """Whether ``module`` returns ``[batch, -1, H]`` (DBRX) rather than its input's shape, read
    by calling its own forward on two zero tokens (undecorated: no hooks, and the module's
    eager code rather than transformers' ``experts_implementation`` kernels, which not every
    dtype has)."""
    slots = layout.num_experts + layout.identity_experts
    rows = slots if layout.call == "dense-input" else 2
    probe = like.new_zeros(rows, layout.hidden)
    forward = inspect.unwrap(type(module).forward)
    with torch.no_grad():
        if layout.call == "dense-input":
            output = forward(module, probe)
        else:
            index = torch.zeros(rows, 2, dtype=torch.long, device=like.device)
            output = forward(module, probe, index, like.new_ones(rows, 2))
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    if shape == tuple(probe.shape):
        return False
    if shape == (rows, 1, layout.hidden):
        return True
    raise SimulationError(
        f"experts module {path!r} ({type(module).__name__}) returns "
        f"{type(output).__name__} {shape} for hidden states {tuple(probe.shape)}; hetmap "
        "mimics only outputs of the input's shape or [batch, -1, hidden]"
    )


class LayoutExperts(nn.Module):
    """What every replacement of an experts module shares: the call convention, identity
    experts, post-expert norm, output shape. Subclasses compute the experts' outputs."""

    def __init__(
        self, experts: nn.Module, analog_experts: Iterable[int], path: str,
        layout: ExpertLayout | None,
    ) -> None:
        super().__init__()
        self.layout = layout or experts_layout(experts, path)
        self.path = path
        self.num_experts = self.layout.num_experts
        self.hidden = self.layout.hidden
        self.analog_experts = tuple(checked_expert_indices(analog_experts, self.num_experts, path))
        self.shell = _weightless_copy(experts, self.layout)
        try:
            activation_of(self.shell, self.layout)
        except LayoutError as exc:
            raise SimulationError(f"experts module {path!r}: {exc}") from exc
        like = _stored(experts, self.layout.tensors["down"])
        self.batch_view = _batch_view(experts, self.layout, like, path)

    def extra_repr(self) -> str:
        return (f"layout={self.layout.name}, experts={self.num_experts}, "
                f"analog={list(self.analog_experts)}")

    def expert_outputs(
        self, inputs: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor,
        activation: Activation,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For pairs (row of ``inputs``, expert ``< E``): ``(pair positions, outputs)`` chunks,
        every pair exactly once, outputs before post-norm and routing weights."""
        raise NotImplementedError

    def _outputs(
        self, inputs: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        activation = activation_of(self.shell, self.layout)
        norm = getattr(self.shell, "post_expert_norm", None) if self.layout.post_norm else None
        for positions, outputs in self.expert_outputs(inputs, pair_row, pair_expert, activation):
            yield positions, outputs if norm is None else norm(outputs)

    def _shaped(self, output: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.batch_view:
            return output.view(hidden_states.shape[0], -1, self.hidden)
        return output.view(hidden_states.shape)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.layout.call == "dense-input":
            return self._shaped(self._dense_input(hidden_states), hidden_states)
        if top_k_index is None or top_k_weights is None:
            raise SimulationError(
                f"experts module {self.path!r} is called with (hidden, top_k_index, "
                "top_k_weights)")
        return self._shaped(self._routed(hidden_states, top_k_index, top_k_weights),
                            hidden_states)

    def _routed(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, self.hidden)
        final = torch.zeros_like(flat)
        index = top_k_index.reshape(flat.shape[0], -1)
        token = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(index.shape[1])
        expert = index.reshape(-1)
        weight = top_k_weights.reshape(-1)
        pairs = ((expert >= 0) & (expert < self.num_experts)).nonzero().squeeze(1)
        for positions, outputs in self._outputs(flat, token[pairs], expert[pairs]):
            chosen = pairs[positions]
            outputs = outputs * weight[chosen].unsqueeze(-1).to(outputs.dtype)
            final.index_add_(0, token[chosen], outputs.to(final.dtype))
        if self.layout.identity_experts:
            last = self.num_experts + self.layout.identity_experts
            identity = ((expert >= self.num_experts) & (expert < last)).nonzero().squeeze(1)
            passed = flat[token[identity]] * weight[identity].unsqueeze(-1).to(flat.dtype)
            final.index_add_(0, token[identity], passed.to(final.dtype))
        return final

    def _dense_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, self.hidden)
        slots = self.num_experts + self.layout.identity_experts
        if flat.shape[0] % slots:
            raise SimulationError(
                f"experts module {self.path!r} takes blocks of rows for {slots} experts; got "
                f"{flat.shape[0]} rows")
        row = torch.arange(flat.shape[0], device=flat.device)
        expert = row // (flat.shape[0] // slots)
        if not self.layout.biases:
            routed = flat.ne(0).any(dim=-1)
            row, expert = row[routed], expert[routed]
        output = torch.zeros_like(flat)
        computed = expert < self.num_experts
        pair_row, pair_expert = row[computed], expert[computed]
        for positions, outputs in self._outputs(flat, pair_row, pair_expert):
            output.index_copy_(0, pair_row[positions], outputs.to(output.dtype))
        passed = row[~computed]
        output[passed] = flat[passed]
        return output


class _ExpertGroup(nn.Module):
    """The experts of one group: gate/up (or up) and down stacks, their digital biases."""

    inner_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    valid: torch.Tensor | None

    def __init__(self, inner: nn.Module, down: nn.Module, inner_bias: torch.Tensor | None,
                 down_bias: torch.Tensor | None, intermediate: int, gated: bool,
                 valid: torch.Tensor | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.down = down
        self.register_buffer("inner_bias", inner_bias)
        self.register_buffer("down_bias", down_bias)
        #: [E, intermediate]: which neuron slots hold a neuron (the others are zero padding)
        self.register_buffer("valid", valid)
        self.intermediate = intermediate
        self.gated = gated

    def forward(self, inputs: torch.Tensor, rows: RowGroups, activation: Activation
                ) -> torch.Tensor:
        projected = self.inner(inputs, rows)
        if self.inner_bias is not None:
            projected = projected + self.inner_bias[rows.row_matrix]
        if self.gated:
            gate, up = projected.split(self.intermediate, dim=-1)
            hidden = activation(gate, up)
        else:
            hidden = activation(None, projected)
        if self.valid is not None:  # padding slots feed nothing to down (its noise included)
            hidden = hidden * self.valid[rows.row_matrix].to(hidden.dtype)
        outputs = self.down(hidden, rows)
        if self.down_bias is not None:
            outputs = outputs + self.down_bias[rows.row_matrix]
        return outputs


def _inner_bias(experts: CanonicalExperts, chosen: list[int]) -> torch.Tensor | None:
    """``[len(chosen), (2)I]`` gate/up biases (zeros for a role without one), or None."""
    biases = experts.biases
    roles = [role for role in experts.layout.roles if role != "down"]
    if not any(role in biases for role in roles):
        return None
    parts = [biases[role][chosen] if role in biases
             else experts.weights[role].new_zeros(len(chosen), experts.weights[role].shape[1])
             for role in roles]
    return torch.cat(parts, dim=1).contiguous()


def _neuron_slices(canon: CanonicalExperts, chosen: list[int],
                   neurons: list[torch.Tensor], with_down_bias: bool
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Experts ``chosen`` restricted to their listed ``neurons`` (gate/up rows, down columns),
    each expert's neurons first in their own order, then zero padding to the widest: weights
    and biases by role (down's bias only ``with_down_bias``), and the ``[E, width]`` mask of
    slots holding a neuron."""
    width = max(int(n.numel()) for n in neurons)
    valid = torch.zeros(len(chosen), width, dtype=torch.bool)
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for role, stack in canon.weights.items():
        shape = (len(chosen), stack.shape[1], width) if role == "down" else \
            (len(chosen), width, stack.shape[2])
        weights[role] = stack.new_zeros(shape)
        if role in canon.biases and (role != "down" or with_down_bias):
            bias = canon.biases[role]
            biases[role] = bias[chosen].clone() if role == "down" else \
                bias.new_zeros(len(chosen), width)
    for slot, (expert, index) in enumerate(zip(chosen, neurons, strict=True)):
        count = int(index.numel())
        valid[slot, :count] = True
        index = index.to(canon.weights["down"].device)
        for role, stack in canon.weights.items():
            if role == "down":
                weights[role][slot, :, :count] = stack[expert][:, index]
            else:
                weights[role][slot, :count] = stack[expert][index]
                if role in biases:
                    biases[role][slot, :count] = canon.biases[role][expert][index]
    return weights, biases, valid


def expert_group(canon: CanonicalExperts, chosen: list[int], settings: AnalogSettings | None,
                 seed: int, neurons: list[torch.Tensor] | None = None,
                 with_down_bias: bool = True, resident: bool = True) -> _ExpertGroup:
    """The gate/up and down stacks of experts ``chosen``: analog tiles with ``settings``,
    exact digital products without. With ``neurons`` (one index tensor per chosen expert)
    only those intermediate neurons of each expert, packed first and zero-padded to the
    widest (:func:`_neuron_slices`); padded slots are masked before down, so each expert
    computes exactly its neurons' part of its output. ``resident=False`` (per-batch
    programming, settings rule 12): digital stacks read the model's own stores at every
    forward instead of keeping a copy."""
    layout = canon.layout
    roles = ("gate", "up") if layout.has_gate else ("up",)
    valid = None
    if neurons is None:
        every = chosen == list(range(canon.layout.num_experts))  # views: no copy
        index = None if every else torch.tensor(chosen, dtype=torch.long)
        views = {role: StackView(canon.weights[role].detach(), index)
                 for role in (*roles, "down")}
        down_bias = canon.biases["down"][chosen].contiguous() if "down" in canon.biases else None
        inner_bias = _inner_bias(canon, chosen)
        width = layout.intermediate
    else:
        weights, biases, valid = _neuron_slices(canon, chosen, neurons, with_down_bias)
        views = {role: StackView(tensor) for role, tensor in weights.items()}
        width = int(valid.shape[1])
        down_bias = biases.get("down")
        inner_bias = None
        if any(role in biases for role in roles):
            inner_bias = torch.cat([biases.get(role, weights[role].new_zeros(len(chosen), width))
                                    for role in roles], dim=1)
        valid = valid.to(canon.weights["down"].device)
    inner_stack: nn.Module
    down_stack: nn.Module
    if settings is None:
        inner_stack = DigitalStack([views[role] for role in roles], resident)
        down_stack = DigitalStack(views["down"], resident)
    else:  # programmed from the blocks themselves: no concatenated or float32 copy
        splits = (width,) * len(roles)
        inner_stack = AnalogTileStack([views[role] for role in roles], settings,
                                      derive_seed(seed, "gate_up"), out_splits=splits)
        down_stack = AnalogTileStack(views["down"], settings, derive_seed(seed, "down"))
    return _ExpertGroup(inner_stack, down_stack, inner_bias, down_bias, width, layout.has_gate,
                        valid)


class SimulatedExperts(LayoutExperts):
    """An experts module with ``analog_experts`` on simulated AIMC tiles, the rest exact.

    ``digital_neurons`` (neuron-granular placement): analog expert -> the intermediate neurons
    that run digitally. Such a split expert's analog part (its other neurons, packed) is
    programmed in a stack of split experts whose down matrices span as many input tiles as its
    own (so the tiles are those of its smaller matrices); its digital part is exact; the two
    parts' outputs are added before the post-expert norm and the routing weight.
    """

    def __init__(
        self,
        experts: nn.Module,
        analog_experts: Iterable[int],
        settings: AnalogSettings,
        seed: int,
        path: str = "experts",
        layout: ExpertLayout | None = None,
        digital_neurons: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        super().__init__(experts, analog_experts, path, layout)
        self.members: torch.Tensor  # [groups, E]: each expert's index in a group, or -1
        canon = canonical_experts(experts, path, self.layout)
        analog = set(self.analog_experts)
        split = self._checked_split(digital_neurons or {}, analog)
        whole = [index for index in self.analog_experts if index not in split]
        digital = [index for index in range(self.num_experts) if index not in analog]
        device = canon.weights["down"].device
        self.split = bool(split)
        self.groups = nn.ModuleList()
        members: list[torch.Tensor] = []

        def add(group: _ExpertGroup, chosen: list[int]) -> None:
            member = torch.full((self.num_experts,), -1, dtype=torch.long)
            member[chosen] = torch.arange(len(chosen))
            self.groups.append(group)
            members.append(member)

        # the whole analog and the whole digital experts: as without splits (same seeds)
        if whole:
            add(expert_group(canon, whole, settings, seed), whole)
        resident = settings.programming == "resident"
        if digital:
            add(expert_group(canon, digital, None, seed, resident=resident), digital)
        width = self.layout.intermediate
        by_tiles: dict[int, list[int]] = {}
        for index, neurons in sorted(split.items()):
            by_tiles.setdefault(-(-(width - len(neurons)) // settings.rows), []).append(index)
        for tiles, chosen in sorted(by_tiles.items()):
            keep = [torch.tensor(sorted(set(range(width)) - set(split[e])), dtype=torch.long)
                    for e in chosen]
            add(expert_group(canon, chosen, settings, derive_seed(seed, f"split/{tiles}"),
                             keep), chosen)
        if split:
            chosen = sorted(split)
            add(expert_group(canon, chosen, None, seed,
                             [torch.tensor(split[e], dtype=torch.long) for e in chosen],
                             with_down_bias=False, resident=resident), chosen)
        self.register_buffer("members", torch.stack(members).to(device), persistent=False)

    def _checked_split(self, digital_neurons: Mapping[int, Sequence[int]], analog: set[int]
                       ) -> dict[int, list[int]]:
        width = self.layout.intermediate
        split: dict[int, list[int]] = {}
        for expert, neurons in digital_neurons.items():
            chosen = sorted({int(j) for j in neurons})
            if not chosen:
                continue
            if int(expert) not in analog:
                raise SimulationError(f"experts module {self.path!r}: expert {expert} has digital "
                                      "neurons but is not an analog expert")
            if chosen[0] < 0 or chosen[-1] >= width or len(chosen) == width:
                raise SimulationError(f"experts module {self.path!r}: digital neurons of expert "
                                      f"{expert} must be some of 0..{width - 1}, not all")
            split[int(expert)] = chosen
        return split

    def expert_outputs(
        self, inputs: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor,
        activation: Activation,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        total: torch.Tensor | None = None
        for group, member in zip(self.groups, self.members, strict=True):
            local = member[pair_expert]
            chosen = (local >= 0).nonzero().squeeze(1)
            if chosen.numel() == 0:
                continue
            local, order = torch.sort(local[chosen], stable=True)
            chosen = chosen[order]
            inner = cast(AnalogTileStack | DigitalStack, cast(_ExpertGroup, group).inner)
            rows = RowGroups.from_sorted(local, inner.num_matrices)
            outputs = group(inputs[pair_row[chosen]], rows, activation)
            if not self.split:  # every pair in exactly one group
                yield chosen, outputs
                continue
            if total is None:
                total = outputs.new_zeros(pair_row.shape[0], outputs.shape[-1])
            total.index_add_(0, chosen, outputs.to(total.dtype))
        if total is not None:  # split experts: both parts added before the norm and weight
            yield torch.arange(pair_row.shape[0], device=pair_row.device), total
