"""Can ``aimc-tile`` run a node? A capability predicate, kept apart from placement policies.

Rules, checked in order (the first that fails is the reason given):

1. The node must be a matrix multiply: kinds ``attention``, ``router``, ``expert``,
   ``shared-expert``, ``dense-ffn``, ``linear`` and ``lm-head``. An ``embedding`` is a table
   lookup; ``norm``, ``op``, ``input`` and ``output`` have no weight matrix.
2. Its weight must be a 2-D matrix with positive sizes.
3. Its weights must be static (programmed once; a crossbar cannot be rewritten per token).

Any size is supported: larger matrices are tiled, and capacity is the allocator's question.
"""

from __future__ import annotations

from hetmap.targets.model import Target

MATMUL_KINDS = frozenset(
    {"attention", "router", "expert", "shared-expert", "dense-ffn", "linear", "lm-head"}
)
_NOT_MATMUL = {
    "embedding": "not a matrix multiply (an embedding is a table lookup)",
    "norm": "not a matrix multiply (a normalization has no weight matrix)",
    "op": "not a matrix multiply",
    "input": "not a matrix multiply (a graph input)",
    "output": "not a matrix multiply (a graph output)",
}


def aimc_supports(
    target: Target, kind: str, shape: tuple[int, ...], weights_static: bool
) -> tuple[bool, str]:
    """Whether a node of ``kind`` with weight ``shape`` ([out, in]) can run on ``target``'s
    crossbars, and why (a short reason, also given when it can)."""
    if kind in _NOT_MATMUL:
        return False, _NOT_MATMUL[kind]
    if kind not in MATMUL_KINDS:
        return False, f"unknown node kind {kind!r}"
    if len(shape) != 2 or min(shape) <= 0:
        return False, f"weight is not a 2-D matrix (shape {tuple(shape)})"
    if not weights_static:
        return False, "weights not static"
    rows, cols = target.aimc.rows, target.aimc.cols
    return True, f"static matrix multiply, tiled onto {rows}x{cols} crossbars"
