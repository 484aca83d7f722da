"""Export-friendly stand-ins for routed experts: one parameter per expert matrix, static dispatch.

The ONNX back end (see :mod:`hetmap.compiler.backends.onnx_prepare`) swaps these in before
``torch.onnx.export`` and puts the originals back afterwards. An experts store of any layout
:mod:`hetmap.runtime.layouts` reads (fused, transposed, interleaved, gate-less, flat 2-D
stacks, with biases, custom gating, a post-expert norm or identity experts) becomes a
:class:`StaticExperts`.

Rules:

1. Every expert matrix is its own ``nn.Linear``-layout ``[out, in]`` parameter named
   ``<experts path>.<e>.<role>.weight`` (roles ``gate``, ``up``, ``down``; ``gate`` is absent
   for gate-less experts), its bias ``<experts path>.<e>.<role>.bias``; both are applied with
   ``F.linear`` (exported as ``Gemm`` or ``MatMul``).
2. An expert computes ``down(activation(gate(x), up(x)))`` with the store's own activation
   (its ``_apply_gate`` where custom, ``act_fn(up)`` without a gate), then the store's
   ``post_expert_norm`` if it has one (registered under that name, so its parameters keep
   their names).
3. ``routed`` stores run densely: every expert computes all tokens and its output is kept
   only where the router picked it, weighted by the routing weight. Router slots from
   ``num_experts`` up to ``num_experts + identity_experts`` pass the token through, weighted.
   The index ``num_experts + identity_experts`` (the sentinel Hugging Face uses for tokens
   masked out by expert parallelism) routes nowhere. The output has the input's shape.
4. ``dense-input`` stores (Llama 4) take ``[E * T, H]``, rows ``e*T .. (e+1)*T`` being expert
   ``e``'s input, and return expert ``e``'s output in the same rows.
5. The graph is static and exact; compute scales with the number of experts, memory with the
   weights only (no per-token gathers of expert weights).
6. A split expert (``split``: expert -> its digital neurons) is a :class:`SplitExpertMLP`:
   ``<e>.gate/up/down`` hold its analog neurons in their original order (gate/up rows, down
   columns; the down bias stays here), ``<e>.digital.gate/up/down`` its digital neurons, and
   the two parts' outputs are added. The activation acts neuron by neuron, so the sum is the
   expert's output.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hetmap.common.errors import EmitError
from hetmap.runtime.layouts import CanonicalExperts, ExpertLayout, LayoutError, canonical

Activation = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


class ExpertLinear(nn.Module):
    """One expert matrix in ``nn.Linear`` layout ``[out, in]``, with an optional bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().contiguous(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


class ExpertMLP(nn.Module):
    """One expert, ``down(activation(gate(x), up(x)))``, as separate matrices (rule 2)."""

    def __init__(self, gate: nn.Module | None, up: nn.Module, down: nn.Module,
                 activation: Activation) -> None:
        super().__init__()
        self.gate = gate
        self.up = up
        self.down = down
        self.activation = activation

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate = None if self.gate is None else self.gate(hidden)
        return self.down(self.activation(gate, self.up(hidden)))


class SplitExpertMLP(ExpertMLP):
    """A split expert (neuron-granular placement): its own ``gate``/``up``/``down`` hold the
    analog neurons (rows of gate/up, columns of down), ``digital`` the digital neurons; the
    output is the sum of the two parts (rule 6)."""

    def __init__(self, analog: ExpertMLP, digital: ExpertMLP) -> None:
        super().__init__(analog.gate, analog.up, analog.down, analog.activation)
        self.digital = digital

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden) + self.digital(hidden)


def routing_matrix(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, slots: int
) -> torch.Tensor:
    """Dense ``[T, slots]`` routing weights from top-k indices and weights (rule 3)."""
    one_hot = F.one_hot(top_k_index, num_classes=slots + 1).to(top_k_weights.dtype)
    return (one_hot * top_k_weights.unsqueeze(-1)).sum(dim=1)[:, :slots]


def dense_dispatch(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    identity_experts: int = 0,
) -> torch.Tensor:
    """Sum over experts of each expert's output on all tokens times its routing weight."""
    routing = routing_matrix(top_k_index, top_k_weights, len(experts) + identity_experts)
    output = torch.zeros_like(hidden)
    for index, expert in enumerate(experts):
        weight = routing[:, index : index + 1]
        contribution = torch.where(weight != 0, expert(hidden) * weight, 0.0)
        output = output + contribution.to(hidden.dtype)
    if identity_experts:
        passed = routing[:, len(experts) :].sum(dim=-1, keepdim=True)
        output = output + (hidden * passed).to(hidden.dtype)
    return output


class StaticExperts(nn.Module):
    """Stand-in for an experts store of any layout (module rules 1-5).

    Children are named ``<e>`` with grandchildren ``gate``/``up``/``down``, so parameter
    names are ``<experts path>.<e>.<role>.weight``: hetmap's matrix key plus ``.weight``.
    Subclasses change the dispatch only (:mod:`~hetmap.compiler.backends.onnx_dispatch`).
    """

    form = "static"

    def __init__(self, store: nn.Module, layout: ExpertLayout,
                 split: Mapping[int, Sequence[int]] | None = None) -> None:
        super().__init__()
        experts = canonical(store, layout)
        split = split or {}
        self.call = layout.call
        self.hidden = layout.hidden
        self.num_experts = layout.num_experts
        self.identity_experts = layout.identity_experts
        self.zero_to_zero = layout.has_gate and not layout.biases and not layout.post_norm
        self.signature = inspect.signature(store.forward)
        for index in range(layout.num_experts):
            self.add_module(str(index), _expert(experts, index, split.get(index)))
        if experts.post_norm is not None:
            self.post_expert_norm = experts.post_norm

    def expert_functions(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Each expert's function of its input, the post-expert norm included (rule 2)."""
        experts = [self.get_submodule(str(e)) for e in range(self.num_experts)]
        norm = getattr(self, "post_expert_norm", None)
        if norm is None:
            return list(experts)
        return [_then(expert, norm) for expert in experts]

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        values = in_signature_order(self.signature, args, kwargs)
        hidden_states = values[0]
        assert isinstance(hidden_states, torch.Tensor)
        if self.call == "dense-input":
            return self.dispatch_dense_input(
                hidden_states.reshape(self.num_experts, -1, self.hidden))
        top_k_index, top_k_weights = (values[1], values[2]) if len(values) >= 3 else (None, None)
        if not (isinstance(top_k_index, torch.Tensor) and isinstance(top_k_weights, torch.Tensor)):
            raise EmitError(
                f"a routed experts store was called with {len(values)} argument(s), not "
                "(hidden, top_k_index, top_k_weights); it cannot be exported per expert")
        hidden = hidden_states.reshape(-1, self.hidden)
        output = self.dispatch(hidden, top_k_index.reshape(hidden.shape[0], -1),
                               top_k_weights.reshape(hidden.shape[0], -1))
        return output.reshape(hidden_states.shape)

    def dispatch(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        """Rule 3: every expert on every token, kept where routed."""
        return dense_dispatch(hidden, top_k_index, top_k_weights, self.expert_functions(),
                              self.identity_experts)

    def dispatch_dense_input(self, blocks: torch.Tensor) -> torch.Tensor:
        """Rule 4 on ``blocks [E, T, H]``."""
        outputs = [expert(blocks[e]) for e, expert in enumerate(self.expert_functions())]
        return torch.cat(outputs, dim=0)


def _then(first: nn.Module, second: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda hidden: second(first(hidden))


def in_signature_order(signature: inspect.Signature, args: tuple, kwargs: dict) -> list[object]:
    """The call's arguments in the order of the store's own ``forward`` parameters."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return [*args, *kwargs.values()]
    values: list[object] = []
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            values.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            values.extend(value.values())
        else:
            values.append(value)
    return values


def _expert(experts: CanonicalExperts, index: int,
            digital: Sequence[int] | None = None) -> ExpertMLP:
    if not digital:
        return _expert_part(experts, index, None, True)
    chosen = set(int(j) for j in digital)
    width = experts.layout.intermediate
    analog = torch.tensor([j for j in range(width) if j not in chosen], dtype=torch.long)
    return SplitExpertMLP(_expert_part(experts, index, analog, True),
                          _expert_part(experts, index, torch.tensor(sorted(chosen)), False))


def _expert_part(experts: CanonicalExperts, index: int, neurons: torch.Tensor | None,
                 down_bias: bool) -> ExpertMLP:
    """Expert ``index`` restricted to ``neurons`` (all when None): gate/up rows and biases,
    down columns (rule 6)."""
    linears = {}
    for role, weights in experts.weights.items():
        weight = weights[index]
        bias = experts.biases[role][index] if role in experts.biases else None
        if neurons is not None:
            if role == "down":
                weight = weight[:, neurons]
                bias = bias if down_bias else None
            else:
                weight = weight[neurons]
                bias = None if bias is None else bias[neurons]
        linears[role] = ExpertLinear(weight, bias)
    return ExpertMLP(linears.get("gate"), linears["up"], linears["down"], experts.activation)


def experts_problem(store: nn.Module, layout: ExpertLayout) -> str | None:
    """Why ``store`` (read with ``layout``) cannot become :class:`StaticExperts` (None if it can)."""
    if layout.call not in ("routed", "dense-input"):
        return f"calling convention {layout.call!r} is not supported"
    try:
        experts = canonical(store, layout)
    except LayoutError as error:
        return str(error)
    missing = [role for role in layout.roles if role not in experts.weights]
    if missing:
        return f"no weights for {', '.join(missing)}"
    if layout.post_norm and experts.post_norm is None:
        return "has_post_expert_norm is set but it has no post_expert_norm module"
    return None


class DenseDispatchExperts(nn.Module):
    """Stand-in for a hand-written ModuleList/ModuleDict experts container called as
    ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``.

    The original expert modules are re-registered under their own names, so parameter names
    do not change; only the (data-dependent) dispatch is replaced.
    """

    def __init__(self, container: nn.Module) -> None:
        super().__init__()
        for name, expert in container.named_children():
            self.add_module(name, expert)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return dense_dispatch(hidden_states, top_k_index, top_k_weights, list(self.children()))


def top_1_of_one_hot(selected: torch.Tensor, weights: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformers' call ``(selected [T, 1, E] one-hot, weights [T, 1])`` as top-1
    ``(index [T, 1], weight [T, 1])``; a token dropped over capacity (no expert selected) gets
    weight 0."""
    rows = selected.reshape(selected.shape[0], -1)
    chosen = rows.sum(dim=-1, keepdim=True).to(weights.dtype)
    return rows.argmax(dim=-1, keepdim=True), weights.reshape(-1, 1) * chosen
