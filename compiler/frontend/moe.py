"""Structural detection of MoE blocks and their experts, whatever the storage layout.

A module is an MoE block when it has (rules, in order):

1. an *experts* child holding the routed experts, read by
   :func:`hetmap.runtime.layouts.read_layout` (fused 3-D stacks in either orientation,
   concatenated or interleaved gate/up, biases, gate-less experts, flat 2-D stacks, identity
   experts, experts called with routed or pre-scaled dense inputs), or an
   ``nn.ModuleList``/``nn.ModuleDict`` of E MLPs made of ``nn.Linear``;
2. a *router* at any depth inside the block but outside the experts: the first module (in
   definition order) whose 2-D ``weight`` is ``[E, H]``, E the number of router slots the
   experts take (for identity experts, more than the experts with weights). Its containing
   child of the block belongs to the router (e.g. AfMoE ``router.gate``, DBRX ``router.layer``);
3. other parametrised children of the block are small dense linears (e.g. Qwen2-MoE's
   ``shared_expert_gate``), *dense* modules when the block is a whole decoder layer (attention
   and norms beside router and experts, e.g. Gemma 4), or else shared experts (MLPs);
4. failing 1-3, the block itself stores its experts in two stacks called with rows sorted by
   expert (JetMoE; :func:`hetmap.runtime.layouts.read_layout` rule 5) beside a router;
5. experts inside an attention module (a path segment naming attention: JetMoE's mixture of
   attention heads) are part of that attention, not an MoE block: they are placed with it.

No class names are consulted. Each expert's matrices are described by :class:`Matrix`
entries in nn.Linear ``[out, in]`` terms; weights are referenced by state-dict name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hetmap.common.errors import TraceError
from hetmap.compiler.frontend.tracer import is_attention, is_norm
from hetmap.compiler.ir.graph import Matrix, WeightRef
from hetmap.runtime.layouts import ExpertLayout, LayoutError, read_layout, sized_pair

#: nn.Linear child names mapped to the paper's roles (gate, up, down).
_ATTENTION_SEGMENT = re.compile(r"(?:^|\.)[^.]*(?:attn|attention)[^.]*(?:\.|$)", re.IGNORECASE)
ROLE_ALIASES = {
    "gate_proj": "gate", "w1": "gate", "wi_0": "gate", "gate": "gate",
    "up_proj": "up", "w3": "up", "v1": "up", "wi_1": "up", "fc1": "up", "wi": "up", "up": "up",
    "down_proj": "down", "w2": "down", "wo": "down", "fc2": "down", "down": "down",
}
#: attribute names that hold the number of experts chosen per token
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "moe_topk", "moe_top_k", "num_selected_experts",
                "router_topk", "top_k_experts", "k")


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
    #: router slots beyond ``num_experts`` whose experts pass their input through unchanged
    identity_experts: int = 0
    #: attention and norms inside the block (a block that is a whole decoder layer)
    dense: tuple[str, ...] = ()


def _join(prefix: str, name: str) -> str:
    if not name:
        return prefix
    return f"{prefix}.{name}" if prefix else name


def _router_rows(module: nn.Module) -> tuple[int, int] | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
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


def _ref(path: str, layout: ExpertLayout, role: str, expert: int, bias: bool) -> WeightRef | None:
    where = layout.slice(role, expert, bias=bias)
    if where is None:
        return None
    return WeightRef(_join(path, where.tensor), where.expert, where.transposed, where.start,
                     where.stop, where.step, where.split)


def layout_matrices(layout: ExpertLayout, path: str) -> tuple[tuple[Matrix, ...], ...]:
    """Per expert, its matrices (gate, up, down) as the IR describes them."""
    table = []
    for e in range(layout.num_experts):
        mats = []
        for role in layout.roles:
            weight = _ref(path, layout, role, e, False)
            assert weight is not None
            out_features, in_features = layout.matrix_shape(role)
            mats.append(Matrix(role=role, key=f"{path}.{e}.{role}", out_features=out_features,
                               in_features=in_features, weight=weight,
                               bias=_ref(path, layout, role, e, True)))
        table.append(tuple(mats))
    return tuple(table)


def _list_matrices(experts: nn.Module, path: str, num_experts: int
                   ) -> tuple[tuple[Matrix, ...], ...] | None:
    if not isinstance(experts, nn.ModuleList | nn.ModuleDict):
        return None
    members = list(experts.items()) if isinstance(experts, nn.ModuleDict) else \
        [(str(i), m) for i, m in enumerate(experts)]
    # members without weights (NLLB-MoE's token dropout beside its experts) are not experts
    members = [(name, m) for name, m in members if any(True for _ in m.parameters())]
    if len(members) != num_experts:
        return None
    table = tuple(linear_matrices(member, _join(path, name)) for name, member in members)
    if not all(table) or len({tuple(m.shape for m in mats) for mats in table}) != 1:
        return None
    return table


def _top_k_from(owner: object) -> int | None:
    for attr in _TOP_K_NAMES:
        value = getattr(owner, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _find_top_k(owners: Sequence[object], config: object | None) -> int:
    for owner in owners:
        value = _top_k_from(owner)
        if value is not None:
            return value
    for section in (config, getattr(config, "text_config", None),
                    getattr(config, "ffn_config", None)):
        value = _top_k_from(section) if section is not None else None
        if value is not None:
            return value
    return 1


def _router_candidates(module: nn.Module, skip: str) -> Iterator[tuple[str, nn.Module, int, int]]:
    """Modules under ``module`` (not under child ``skip``; embeddings neither) with a 2-D
    weight ``[E >= 2, H]``."""
    for name, child in module.named_modules():
        if not name or (skip and (name == skip or name.startswith(skip + "."))) \
                or isinstance(child, nn.Embedding):
            continue
        rows = _router_rows(child)
        if rows is not None and rows[0] >= 2:
            yield name, child, rows[0], rows[1]


def _experts_layout(experts: nn.Module, path: str, slots: int, hidden: int
                    ) -> tuple[str, tuple[tuple[Matrix, ...], ...], int] | None:
    try:
        layout = read_layout(experts, slots, hidden)
    except LayoutError as exc:
        raise TraceError(f"experts module {path!r}: {exc}") from exc
    if layout is not None and layout.call == "sizes":
        return None  # a block of its own (rule 4), not the experts child of this module
    if layout is not None:
        return layout.name, layout_matrices(layout, path), layout.identity_experts
    listed = _list_matrices(experts, path, slots)
    return None if listed is None else ("modulelist", listed, 0)


def _sized_block(module: nn.Module, path: str, config: object | None) -> MoeBlock | None:
    """Rule 4."""
    for router_name, router, slots, hidden in _router_candidates(module, skip=""):
        layout = sized_pair(module, slots, hidden)
        if layout is None:
            continue
        router_child = dict(module.named_children())[router_name.split(".", 1)[0]]
        return MoeBlock(
            path=path, router=_join(path, router_name), experts=path, layout=layout.name,
            num_experts=slots, hidden=hidden, top_k=_find_top_k([router, module, router_child],
                                                                config),
            shared=(), other_linears=(), expert_matrices=layout_matrices(layout, path),
            identity_experts=0, dense=())
    return None


def detect_moe_block(module: nn.Module, path: str, config: object | None = None) -> MoeBlock | None:
    """Return the MoE description of ``module`` if it is an MoE block, else None.

    Among routers that fit an experts child, one with exactly as many rows as experts wins;
    otherwise the first in definition order (identity or skip slots).
    """
    children = dict(module.named_children())
    for experts_name, experts in children.items():
        if not _could_hold_experts(experts):
            continue
        experts_path = _join(path, experts_name)
        fits = []
        for router_name, router, slots, hidden in _router_candidates(module, experts_name):
            found = _experts_layout(experts, experts_path, slots, hidden)
            if found is not None:
                fits.append((len(found[1]) != slots, router_name, router, hidden, found))
        if not fits:
            continue
        _, router_name, router, hidden, (layout, table, identity) = min(fits, key=lambda f: f[0])
        router_child = router_name.split(".", 1)[0]
        shared: list[str] = []
        others: list[str] = []
        dense: list[str] = []
        for name, child in children.items():
            if name in (router_child, experts_name) or not any(True for _ in child.parameters()):
                continue
            kind = others if isinstance(child, nn.Linear) else \
                dense if is_attention(child) or is_norm(child) else shared
            kind.append(_join(path, name))
        owners = [router, module, experts, children[router_child]]
        return MoeBlock(
            path=path, router=_join(path, router_name), experts=experts_path, layout=layout,
            num_experts=len(table), hidden=hidden, top_k=_find_top_k(owners, config),
            shared=tuple(shared), other_linears=tuple(others), expert_matrices=table,
            identity_experts=identity, dense=tuple(dense))
    return _sized_block(module, path, config)


def _could_hold_experts(module: nn.Module) -> bool:
    """Cheap pre-check: a container of modules, or 3-D / 2-D parameters on it or a child."""
    if isinstance(module, nn.ModuleList | nn.ModuleDict):
        return True
    owners = [module, *module.children()]
    return any(p.dim() >= 2 for owner in owners for p in owner.parameters(recurse=False)) \
        and not isinstance(module, nn.Linear | nn.Embedding)


def unmappable_moe(model: nn.Module) -> str | None:
    """Why a model in which no MoE block was found still looks like an MoE hetmap cannot map
    (None if it does not): a module with a router (a 2-D weight ``[E, H]``) beside

    1. two or more children (not convolutions) holding stacks of E matrices (3-D
       ``[E, ...]``): experts whose matrices are split over several modules, each called with
       rows grouped per expert (JetMoE's ``ParallelExperts``);
    2. with the router a child of the module, two or more embedding children with at least E
       rows of width H: single-neuron experts fetched by product keys (Doge's
       ``down_embed``/``up_embed``).
    """
    for path, module in model.named_modules():
        children = dict(module.named_children())
        for router, _, slots, hidden in _router_candidates(module, skip=""):
            stacks = [name for name, child in children.items()
                      if not isinstance(child, nn.modules.conv._ConvNd)
                      and any(p.dim() == 3 and p.shape[0] == slots
                              for p in child.parameters(recurse=False))]
            if len(stacks) >= 2:
                return (f"MoE block {path!r} splits its {slots} experts' matrices over modules "
                        f"{', '.join(repr(s) for s in stacks)}, called with rows grouped per "
                        "expert (as JetMoE's ParallelExperts); hetmap reads all of an expert's "
                        "matrices from one experts module, so this layout is not supported")
            tables = [name for name, child in children.items()
                      if isinstance(child, nn.Embedding) and child.embedding_dim == hidden
                      and child.num_embeddings >= slots]
            if router in children and len(tables) >= 2:
                return (f"MoE block {path!r} keeps single-neuron experts as rows of embeddings "
                        f"{', '.join(repr(t) for t in tables)} chosen by router {router!r} "
                        "(product keys, as Doge's CDMoE); hetmap maps routed experts made of "
                        "weight matrices, so this layout is not supported")
    return None


def in_attention(path: str) -> bool:
    """Rule 5: whether ``path`` lies inside an attention module (a segment naming attention)."""
    return bool(_ATTENTION_SEGMENT.search(path))


def find_moe_blocks(model: nn.Module, config: object | None = None) -> dict[str, MoeBlock]:
    """All MoE blocks of ``model`` by module path (outermost match wins)."""
    blocks: dict[str, MoeBlock] = {}
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in blocks) or in_attention(path):
            continue  # rule 5
        block = detect_moe_block(module, path, config)
        if block is not None:
            blocks[path] = block
    return blocks
