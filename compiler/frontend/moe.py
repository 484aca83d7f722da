"""Structural detection of MoE blocks and their experts, whatever the storage layout.

A module is an MoE block when it has (rules, in order):

1. a *router* child: a module (often ``gate`` or ``router``) whose 2-D ``weight`` is
   ``[E, H]`` -- an ``nn.Linear(H, E)`` or a custom top-k router;
2. an *experts* child holding E experts, in one of these layouts:
   ``fused``      -- 3-D parameters ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``
                     (or ``up_proj`` instead of ``gate_up_proj`` for gate-less experts);
   ``fused-t``    -- the transposed GPT-OSS form ``gate_up_proj [E, H, 2I]`` (gate/up
                     interleaved) and ``down_proj [E, I, H]``, with optional biases;
   ``modulelist`` -- an ``nn.ModuleList``/``nn.ModuleDict`` of E MLPs made of ``nn.Linear``.
3. Other parametrised children of the block are shared experts (MLPs) or small dense
   linears (e.g. Qwen2-MoE's ``shared_expert_gate``).

No class names are consulted. Each expert's matrices are described by :class:`Matrix`
entries in nn.Linear ``[out, in]`` terms; weights are referenced by state-dict name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hetmap.compiler.ir import Matrix, WeightRef

#: nn.Linear child names mapped to the paper's roles (gate, up, down).
ROLE_ALIASES = {
    "gate_proj": "gate", "w1": "gate", "wi_0": "gate", "gate": "gate",
    "up_proj": "up", "w3": "up", "wi_1": "up", "fc1": "up", "wi": "up", "up": "up",
    "down_proj": "down", "w2": "down", "wo": "down", "fc2": "down", "down": "down",
}


@dataclass(frozen=True)
class MoeBlock:
    """One detected MoE block (paths are module paths inside the model)."""

    path: str
    router: str
    experts: str
    layout: str
    num_experts: int
    hidden: int
    top_k: int
    shared: tuple[str, ...]
    other_linears: tuple[str, ...]
    expert_matrices: tuple[tuple[Matrix, ...], ...]


def _join(prefix: str, name: str) -> str:
    if not name:
        return prefix
    return f"{prefix}.{name}" if prefix else name


def _router_rows(module: nn.Module) -> tuple[int, int] | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter | __import__("torch").Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def linear_matrices(module: nn.Module, path: str) -> tuple[Matrix, ...]:
    """Matrices of every nn.Linear inside ``module`` (roles = child paths or paper roles)."""
    found = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            full = _join(path, name)
            role = ROLE_ALIASES.get(name, name) if name else "weight"
            found.append(Matrix(
                role=role, key=full, out_features=child.out_features, in_features=child.in_features,
                weight=WeightRef(f"{full}.weight"),
                bias=WeightRef(f"{full}.bias") if child.bias is not None else None))
    roles = [m.role for m in found]
    if len(set(roles)) != len(roles):  # aliases collided: fall back to child paths
        found = [Matrix(role=m.key[len(path) + 1:] if path else m.key, key=m.key,
                        out_features=m.out_features, in_features=m.in_features,
                        weight=m.weight, bias=m.bias) for m in found]
    return tuple(found)


def _fused_matrices(experts: nn.Module, path: str, num_experts: int, hidden: int
                    ) -> tuple[str, tuple[tuple[Matrix, ...], ...]] | None:
    params = dict(experts.named_parameters(recurse=False))
    down = params.get("down_proj")
    gate_up = params.get("gate_up_proj")
    up_only = params.get("up_proj")
    if down is None or down.dim() != 3 or down.shape[0] != num_experts:
        return None
    fused_in = gate_up if gate_up is not None else up_only
    if fused_in is None or fused_in.dim() != 3 or fused_in.shape[0] != num_experts:
        return None
    transposed = bool(getattr(experts, "is_transposed", False))
    if not hasattr(experts, "is_transposed"):
        transposed = int(down.shape[2]) == hidden and int(down.shape[1]) != hidden
    has_gate = gate_up is not None
    inter = int(down.shape[1] if transposed else down.shape[2])
    in_name = f"{path}.{'gate_up_proj' if has_gate else 'up_proj'}"
    down_bias = f"{path}.down_proj_bias" if "down_proj_bias" in params else None
    in_bias = f"{in_name}_bias" if f"{in_name.rsplit('.', 1)[1]}_bias" in params else None
    table = []
    for e in range(num_experts):
        mats = []
        if has_gate:
            # standard: rows [0:I] gate, [I:2I] up; transposed (GPT-OSS): interleaved columns
            spans: dict[str, tuple[int, int | None, int]] = {
                "gate": (0, inter, 1), "up": (inter, 2 * inter, 1)}
            if transposed:
                spans = {"gate": (0, None, 2), "up": (1, None, 2)}
            for role, (start, stop, step) in spans.items():
                mats.append(Matrix(
                    role=role, key=f"{path}.{e}.{role}", out_features=inter, in_features=hidden,
                    weight=WeightRef(in_name, e, transposed, start, stop, step),
                    bias=WeightRef(in_bias, e, False, start, stop, step) if in_bias else None))
        else:
            mats.append(Matrix(role="up", key=f"{path}.{e}.up", out_features=inter,
                               in_features=hidden, weight=WeightRef(in_name, e, transposed),
                               bias=WeightRef(in_bias, e) if in_bias else None))
        mats.append(Matrix(role="down", key=f"{path}.{e}.down", out_features=hidden,
                           in_features=inter, weight=WeightRef(f"{path}.down_proj", e, transposed),
                           bias=WeightRef(down_bias, e) if down_bias else None))
        table.append(tuple(mats))
    return ("fused-t" if transposed else "fused"), tuple(table)


def _list_matrices(experts: nn.Module, path: str, num_experts: int
                   ) -> tuple[tuple[Matrix, ...], ...] | None:
    if not isinstance(experts, nn.ModuleList | nn.ModuleDict) or len(experts) != num_experts:
        return None
    members = list(experts.items()) if isinstance(experts, nn.ModuleDict) else \
        [(str(i), m) for i, m in enumerate(experts)]
    table = tuple(linear_matrices(member, _join(path, name)) for name, member in members)
    if not all(table) or len({tuple(m.shape for m in mats) for mats in table}) != 1:
        return None
    return table


def _find_top_k(block: nn.Module, router: nn.Module, config: object | None) -> int:
    for owner in (router, block, getattr(block, "experts", None)):
        for attr in ("top_k", "num_experts_per_tok", "k"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    value = getattr(config, "num_experts_per_tok", None)
    return value if isinstance(value, int) and value > 0 else 1


def detect_moe_block(module: nn.Module, path: str, config: object | None = None) -> MoeBlock | None:
    """Return the MoE description of ``module`` if it is an MoE block, else None."""
    children = dict(module.named_children())
    for router_name, router in children.items():
        rows = _router_rows(router)
        if rows is None or rows[0] < 2:
            continue
        num_experts, hidden = rows
        for experts_name, experts in children.items():
            if experts_name == router_name:
                continue
            experts_path = _join(path, experts_name)
            fused = _fused_matrices(experts, experts_path, num_experts, hidden)
            if fused is not None:
                layout, table = fused
            else:
                listed = _list_matrices(experts, experts_path, num_experts)
                if listed is None:
                    continue
                layout, table = "modulelist", listed
            shared: list[str] = []
            others: list[str] = []
            for name, child in children.items():
                if name in (router_name, experts_name) or not any(True for _ in child.parameters()):
                    continue
                (others if isinstance(child, nn.Linear) else shared).append(_join(path, name))
            return MoeBlock(
                path=path, router=_join(path, router_name), experts=experts_path, layout=layout,
                num_experts=num_experts, hidden=hidden, top_k=_find_top_k(module, router, config),
                shared=tuple(shared), other_linears=tuple(others), expert_matrices=table)
    return None


def find_moe_blocks(model: nn.Module, config: object | None = None) -> dict[str, MoeBlock]:
    """All MoE blocks of ``model`` by module path (outermost match wins)."""
    blocks: dict[str, MoeBlock] = {}
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in blocks):
            continue
        block = detect_moe_block(module, path, config)
        if block is not None:
            blocks[path] = block
    return blocks
