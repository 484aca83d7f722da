"""Sequence mixers whose PyTorch form fixes the sequence length, in forms that keep it dynamic.

``torch.export`` evaluates Python branches and loops over the sequence length for the example
input; the exported graph then runs only for lengths that take the same branch (or the same
number of loop steps). While the exporter traces (:func:`dynamic_sequence_forms`), two such
mixers are replaced by exact equivalents without those branches:

1. Mamba-2's chunked scan: every modeling module (Python module) of the model's classes that
   defines ``mamba2_chunk_scan`` with the reference parameters (:data:`CHUNK_SCAN_PARAMETERS`;
   Mamba2, Bamba, NemotronH, GraniteMoeHybrid, Zamba2, FalconH1) has that function replaced
   by :func:`chunk_scan`. The reference pads the sequence to a multiple of the chunk size but
   crops the padding only ``if pad_size > 0``, so an example whose length is a multiple of
   the chunk size drops the crop; :func:`chunk_scan` is the same computation (the state-space
   dual form, chunk by chunk) with the crop unconditional.
2. MiniMax's lightning attention: every module with the buffers and projections of
   :data:`LIGHTNING_PARTS` runs :func:`lightning_attention` when called without a cache.
   The reference loops in Python over blocks of ``block_size`` tokens (one unrolled step per
   block of the example); :func:`lightning_attention` is the same causal linear attention in
   its parallel form, ``o = ((q k^T) * decay) v`` with ``decay[h, i, j] = exp(-slope_h (i -
   j))`` for ``j <= i`` and 0 above the diagonal (the block form splits that sum at block
   boundaries), and returns the same last state ``sum_j exp(-slope (L - 1 - j)) k_j^T v_j``.
3. Qwen4-Exp's QSA indexer: every module with the parts of :data:`INDEXER_PARTS` runs
   :func:`qsa_indexer` when called without a cache. The reference loops in Python over batch
   rows and queries and branches on the number of visible tokens (data-dependent:
   ``torch.export`` cannot trace it); :func:`qsa_indexer` computes the same selection for all
   queries at once: a query's visible tokens (its mask row), in order, form blocks of
   ``compress_ratio`` tokens (complete blocks only; the rest is its tail), each block's key
   is the normalised mean of its raw keys rotated at the block's first token, the
   ``token_budget // compress_ratio`` blocks with the largest ``sum_heads relu(q . k) /
   sqrt(d)`` are kept, and the mask selects their tokens and the tail. Memory grows as
   ``batch x queries x blocks x head_dim``.
4. Everything replaced is put back afterwards, also on errors; nothing else changes. The
   exported graph is checked against the unpatched PyTorch model afterwards (the exporter's
   onnxruntime comparison), so a wrong replacement cannot pass silently.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_SCAN = "mamba2_chunk_scan"
CHUNK_SCAN_PARAMETERS = ("hidden_states", "dt", "A", "B", "C", "chunk_size", "D", "dt_bias",
                         "initial_states", "dt_softplus", "dt_limit", "return_final_states")
#: what marks a Qwen4-Exp QSA indexer (rule 3): attributes
INDEXER_PARTS = ("index_qk_proj", "q_layernorm", "k_layernorm", "compress_ratio", "token_budget",
                 "block_topk", "index_n_heads", "index_kv_heads", "index_head_dim")
#: what marks a MiniMax lightning-attention module (rule 2): buffers, then submodules
LIGHTNING_PARTS = (("slope_rate", "query_decay", "key_decay", "diagonal_decay"),
                   ("qkv_proj", "output_gate", "out_proj", "norm", "act_fn"))


# ---------------------------------------------------------------- rule 1: Mamba-2


def _pad_sequence(tensor: torch.Tensor, pad: torch.SymInt | int) -> torch.Tensor:
    """``tensor [b, L, ...]`` with ``pad`` zero positions appended to dim 1."""
    zeros = tensor.new_zeros((tensor.shape[0], pad, *tensor.shape[2:]))
    return torch.cat([tensor, zeros], dim=1)


def _chunks(tensor: torch.Tensor, pad: torch.SymInt | int, chunk_size: int) -> torch.Tensor:
    """``[b, L, ...]`` padded and split into ``[b, chunks, chunk_size, ...]``."""
    padded = _pad_sequence(tensor, pad)
    return padded.reshape(padded.shape[0], -1, chunk_size, *padded.shape[2:])


def _segment_sum(values: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(values[..., j + 1 : i + 1])`` for ``j <= i``, ``-inf`` above."""
    size = values.size(-1)
    expanded = values[..., None].expand(*values.size(), size)
    below = torch.tril(torch.ones(size, size, device=values.device, dtype=torch.bool), -1)
    sums = torch.cumsum(expanded.masked_fill(~below, 0), dim=-2)
    on_or_below = torch.tril(torch.ones(size, size, device=values.device, dtype=torch.bool))
    return sums.masked_fill(~on_or_below, -torch.inf)


def chunk_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,  # noqa: N803 - the reference's names
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    chunk_size: int,
    D: torch.Tensor | None = None,  # noqa: N803
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    **_: object,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Rule 1. ``hidden_states [b, L, h, p]``, ``dt [b, L, h]``, ``A [h]``, ``B``, ``C``
    ``[b, L, g, n]``; returns ``[b, L, h, p]`` (and the last state ``[b, h, p, n]``)."""
    batch, length, heads, head_dim = hidden_states.shape
    groups = B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    x = hidden_states.float()
    B = B.float().repeat_interleave(heads // groups, dim=2, output_size=heads)  # noqa: N806
    C = C.float().repeat_interleave(heads // groups, dim=2, output_size=heads)  # noqa: N806
    pad = (chunk_size - length % chunk_size) % chunk_size
    skip = None if D is None else D[..., None] * _pad_sequence(x, pad)
    x = x * dt[..., None].float()
    A = A.to(x.dtype) * dt.float()  # noqa: N806 - [b, L, h]
    x, A, B, C = (_chunks(t, pad, chunk_size) for t in (x, A, B, C))  # noqa: N806
    A = A.permute(0, 3, 1, 2)  # noqa: N806 - [b, h, chunks, l]
    a_cumsum = torch.cumsum(A, dim=-1)
    # within chunks (b: batch, c: chunk, l/s: positions, h: head, p: head dim, n: state)
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B)
    masked = scores * torch.exp(_segment_sum(A)).permute(0, 2, 3, 4, 1)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", masked, x)
    # each chunk's state, then the states at chunk starts
    decay_states = torch.exp(a_cumsum[:, :, :, -1:] - a_cumsum)
    b_decay = B * decay_states.permute(0, -2, -1, 1)[..., None]
    states = torch.einsum("bclhn,bclhp->bchpn", b_decay, x)
    previous = (torch.zeros_like(states[:, :1]) if initial_states is None
                else initial_states[:, None].to(dtype=states.dtype, device=states.device))
    states = torch.cat([previous, states], dim=1)
    decay_chunk = torch.exp(_segment_sum(F.pad(a_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)
    new_states = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # chunk-start states to outputs
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, states)
    y_off = y_off * torch.exp(a_cumsum).permute(0, 2, 3, 1)[..., None]
    output = (y_diag + y_off).reshape(batch, -1, heads, head_dim)
    if skip is not None:
        output = output + skip
    output = output[:, :length]  # unconditional: the point of this replacement
    return (output, final_state) if return_final_states else output


@contextmanager
def _functions_replaced(model: nn.Module, name: str, parameters: tuple[str, ...],
                        replacement: Callable[..., object]) -> Iterator[list[str]]:
    """Replace ``name`` in the modeling modules of ``model``'s classes where it takes
    ``parameters`` first; yields the patched modules' names; restores them on exit."""
    patched: list[tuple[ModuleType, object]] = []
    try:
        for module_name in sorted({type(module).__module__ for module in model.modules()}):
            modeling = sys.modules.get(module_name)
            original = getattr(modeling, name, None)
            if modeling is not None and original is not replacement and _takes(original, parameters):
                patched.append((modeling, original))
                setattr(modeling, name, replacement)
        yield [modeling.__name__ for modeling, _ in patched]
    finally:
        for modeling, original in patched:
            setattr(modeling, name, original)


def _takes(function: object, parameters: tuple[str, ...]) -> bool:
    if not callable(function):
        return False
    try:
        names = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return names[: len(parameters)] == parameters


def _size(module: nn.Module, name: str) -> int:
    """An integer attribute of ``module`` (a head count, a ratio)."""
    return int(getattr(module, name))


def _part(module: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable attribute of ``module`` (a projection, a norm, an activation)."""
    part: Callable[[torch.Tensor], torch.Tensor] = getattr(module, name)
    return part


# ---------------------------------------------------------------- rule 2: MiniMax


def is_lightning_attention(module: nn.Module) -> bool:
    """Rule 2's marks: the decay buffers and the projections of lightning attention."""
    buffers, children = LIGHTNING_PARTS
    return (all(isinstance(module._buffers.get(b), torch.Tensor) for b in buffers)
            and all(hasattr(module, c) for c in children))


def lightning_attention(module: nn.Module, hidden_states: torch.Tensor,
                        attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule 2 for ``module`` on ``hidden_states [b, L, H]``: (output, last state)."""
    batch, length, _ = hidden_states.shape
    heads, head_dim = _size(module, "num_attention_heads"), _size(module, "head_dim")
    qkv = _part(module, "act_fn")(_part(module, "qkv_proj")(hidden_states))
    if attention_mask is not None:  # the reference's padding mask [b, L]
        qkv = (qkv * attention_mask[:, :, None]).to(qkv.dtype)
    qkv = qkv.reshape(batch, length, heads, 3 * head_dim).transpose(1, 2)
    query, key, value = torch.split(qkv, head_dim, dim=3)
    slope = module.get_buffer("slope_rate")  # [heads, 1, 1]
    positions = torch.arange(length, device=hidden_states.device)
    distance = (positions[:, None] - positions[None, :]).to(slope.dtype)
    decay = torch.where(distance >= 0, torch.exp(-slope * distance.clamp(min=0)), 0.0)
    output = torch.matmul(torch.matmul(query, key.transpose(-1, -2)) * decay, value)
    to_last = torch.exp(-slope * (length - 1 - positions).to(slope.dtype)[:, None])  # [h, L, 1]
    state = torch.matmul((key * to_last).transpose(-1, -2), value)
    output = output.transpose(1, 2).reshape(batch, length, heads * head_dim)
    gate = torch.sigmoid(_part(module, "output_gate")(hidden_states))
    output = gate * _part(module, "norm")(output)
    return _part(module, "out_proj")(output), state


def _lightning_forward(module: nn.Module, original: Callable[..., object]) -> Callable[..., object]:
    """``forward`` for ``module``: rule 2 without a cache, else the reference."""
    signature = inspect.signature(original)

    def forward(*args: object, **kwargs: object) -> object:
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return original(*args, **kwargs)
        extra = bound.get("kwargs", {})
        cache = bound.get("cache", extra.get("cache", extra.get("past_key_values")))
        hidden, mask = bound.get("hidden_states"), bound.get("attention_mask")
        if cache is not None or not isinstance(hidden, torch.Tensor):
            return original(*args, **kwargs)
        return lightning_attention(module, hidden, mask if isinstance(mask, torch.Tensor) else None)

    return forward


# ---------------------------------------------------------------- rule 3: Qwen4-Exp


def is_qsa_indexer(module: nn.Module) -> bool:
    """Rule 3's marks."""
    return all(hasattr(module, part) for part in INDEXER_PARTS)


def _indexer_query_keys(module: nn.Module, hidden_states: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor,
                        rotate: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's rotated, normalised queries ``[b, L, heads, d]`` and raw keys
    ``[b, L, d]``."""
    batch, length, _ = hidden_states.shape
    head_dim = _size(module, "index_head_dim")
    shape = (batch, length, -1, head_dim)
    query, keys = torch.split(_part(module, "index_qk_proj")(hidden_states),
                              [_size(module, "index_n_heads") * head_dim,
                               _size(module, "index_kv_heads") * head_dim], dim=-1)
    query = _part(module, "q_layernorm")(query.reshape(*shape))
    query = rotate(query, cos=cos[:, -length:, :], sin=sin[:, -length:, :], unsqueeze_dim=2)
    return query, keys.reshape(*shape).squeeze(2)


def qsa_indexer(module: nn.Module, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor, rotate: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Rule 3: the selection mask ``[b, 1, L, kv]`` the reference indexer returns."""
    cos, sin = position_embeddings
    query, keys = _indexer_query_keys(module, hidden_states, cos, sin, rotate)
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    visible = visible[:, 0]  # [b, L, kv]
    ratio, top = _size(module, "compress_ratio"), _size(module, "block_topk")
    kv = visible.shape[-1]
    rank = visible.long().cumsum(-1) - 1
    complete = visible.long().sum(-1, keepdim=True) // ratio  # [b, L, 1]
    block_of = torch.where(visible, rank // ratio, -1)
    in_blocks = visible & (block_of < complete)
    ids = torch.arange(kv // ratio + top, device=visible.device)  # top extra: never complete
    members = (block_of[..., None, :] == ids[:, None]) & in_blocks[..., None, :]  # [b, L, n, kv]
    pooled = torch.matmul(members.float(), keys.float()[:, None]) / ratio
    pooled = _part(module, "k_layernorm")(pooled.to(keys.dtype))
    positions = torch.arange(kv, device=visible.device)
    starts = torch.where(members, positions, kv - 1).amin(dim=-1)  # [b, L, n]
    rows = torch.arange(visible.shape[0], device=visible.device)[:, None, None]
    block_keys = rotate(pooled.unsqueeze(-2), cos=cos[rows, starts], sin=sin[rows, starts],
                        unsqueeze_dim=-2).squeeze(-2)
    scores = torch.einsum("bqhd,bqnd->bqnh", query.float(), block_keys.float())
    scores = torch.relu(scores).sum(dim=-1) / math.sqrt(_size(module, "index_head_dim"))
    scores = torch.where(ids < complete, scores, -torch.inf)
    best_scores, best = scores.topk(top, dim=-1)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, best, best_scores > -torch.inf)
    picked = chosen.gather(-1, block_of.clamp(min=0)) & in_blocks
    return (picked | (visible & ~in_blocks)).unsqueeze(1)


def _indexer_forward(module: nn.Module, original: Callable[..., object]) -> Callable[..., object]:
    """``forward`` for ``module``: rule 3 without a cache, else the reference."""
    signature = inspect.signature(original)
    rotate = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)

    def forward(*args: object, **kwargs: object) -> object:
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return original(*args, **kwargs)
        hidden, embeddings = bound.get("hidden_states"), bound.get("position_embeddings")
        mask = bound.get("attention_mask")
        if (bound.get("cache") is not None or rotate is None or not isinstance(hidden, torch.Tensor)
                or not isinstance(mask, torch.Tensor) or mask.dim() != 4
                or not isinstance(embeddings, tuple)):
            return original(*args, **kwargs)
        return qsa_indexer(module, hidden, embeddings, mask, rotate)

    return forward


@contextmanager
def _forwards_replaced(model: nn.Module, marks: Callable[[nn.Module], bool],
                       replacement: Callable[[nn.Module, Callable[..., object]], Callable[..., object]]
                       ) -> Iterator[list[str]]:
    """Each module ``marks`` accepts has its ``forward`` shadowed on the instance by
    ``replacement(module, original forward)``; restored on exit."""
    patched = [(path, module) for path, module in model.named_modules()
               if marks(module) and "forward" not in module.__dict__]
    try:
        for _, module in patched:
            module.forward = replacement(module, module.forward)  # type: ignore[method-assign]
        yield [path for path, _ in patched]
    finally:
        for _, module in patched:
            module.__dict__.pop("forward", None)


@contextmanager
def dynamic_sequence_forms(model: nn.Module) -> Iterator[list[str]]:
    """Rules 1 to 3 for ``model``; yields the patched modeling modules and module paths."""
    with ExitStack() as stack:
        scans = stack.enter_context(_functions_replaced(model, CHUNK_SCAN, CHUNK_SCAN_PARAMETERS,
                                                        chunk_scan))
        lightning = stack.enter_context(
            _forwards_replaced(model, is_lightning_attention, _lightning_forward))
        indexers = stack.enter_context(_forwards_replaced(model, is_qsa_indexer, _indexer_forward))
        yield [*scans, *lightning, *indexers]
