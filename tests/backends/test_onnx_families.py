"""Zoo families that export to ONNX through the sequence forms, kept stores and router seeds.

Each family is compiled by hetmap (default pipeline) and emitted as ONNX (default MoE form);
the emitter fails on any weight-multiplying node without hetmap tags. onnxruntime must equal
PyTorch within 1e-4 on inputs (2, 7) and (1, 5): lengths that are no multiple of the Mamba-2
chunk size or of MiniMax's block size (4 in the zoo), unlike the (2, 8) example the graph is
traced on. 25-45 s per family on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hetmap.compiler.api import compile_model
from hetmap.compiler.frontend.loader import LoadedModel, load_model
from hetmap.compiler.frontend.zoo import ZOO

TOLERANCE = 1e-4
SHAPES = [(2, 7), (1, 5)]
FAMILIES = {
    "afmoe": "routers drawn from a seed (zero-filled ones would be merged as duplicates)",
    "inkling": "shared experts stored as 3-D stacks, called (hidden, gammas): kept as written",
    "minimax": "lightning attention in its parallel form",
    "nemotron_h": "Mamba-2 chunked scan cropped unconditionally",
    "granitemoehybrid": "Mamba-2 chunked scan cropped unconditionally",
    "jetmoe": "two expert stacks called with rows per expert: per-expert matrices on the block",
    "switch_transformers": "experts container called with a one-hot mask: read as top-1",
    "muse_spark": "a 1e-8 norm epsilon the optimizer must keep; experts narrower than the router",
}


def _loaded(family: str) -> LoadedModel:
    """The tiny family with its ``post_init`` applied (idempotent where the loader applies it)."""
    loaded = load_model(f"tiny:{family}")
    ZOO[family].initialize(loaded.module)
    return loaded


def test_afmoe_routers_are_distinct_and_seeded() -> None:
    first, second = (_loaded("afmoe").module for _ in range(2))
    routers = {p: m.weight for p, m in first.named_modules() if p.endswith("router.gate")}
    assert len(routers) == 2 and all(w.abs().min() > 0 for w in routers.values())
    one, other = routers.values()
    assert not torch.equal(one, other)
    for path, weight in routers.items():
        assert torch.equal(weight, second.get_submodule(path).weight)


@pytest.mark.parametrize("sparse", [False, True])
def test_one_hot_dispatch_equals_switch_experts_with_a_dropped_token(sparse: bool) -> None:
    """Switch's experts container called with a one-hot mask in which token 2 selects no
    expert (over capacity): the dispatch stand-ins give its output, token 2 getting zero."""
    from hetmap.compiler.backends.onnx_prepare import OneHotDenseDispatch, OneHotSparseDispatch

    container = _loaded("switch_transformers").module.get_submodule(
        "encoder.block.1.layer.1.mlp.experts")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 64, generator=generator)
    chosen = torch.tensor([0, 3, 1, 7, 3, 5])
    selected = torch.nn.functional.one_hot(chosen, 8).unsqueeze(1)
    selected[2] = 0
    weights = torch.rand(6, 1, generator=generator)
    stand_in = (OneHotSparseDispatch if sparse else OneHotDenseDispatch)(container)
    with torch.no_grad():
        expected = container(hidden, selected, weights)
        actual = stand_in(hidden, selected, weights)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert not actual[2].any() and actual[1].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_and_matches_pytorch(family: str, tmp_path: Path) -> None:
    loaded = _loaded(family)
    plan = compile_model(loaded, calib_tokens=512)
    (path,) = plan.emit_onnx(tmp_path)
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vocab = int(getattr(loaded.config, "vocab_size", 512))
    for shape in SHAPES:
        ids = np.random.default_rng(sum(shape)).integers(0, vocab, shape).astype(np.int64)
        with torch.no_grad():
            expected = loaded.module(input_ids=torch.from_numpy(ids), use_cache=False).logits
        (actual,) = session.run(["logits"], {"input_ids": ids})
        np.testing.assert_allclose(actual, expected.numpy(), atol=TOLERANCE, rtol=TOLERANCE,
                                   err_msg=f"{family} {shape}: {FAMILIES[family]}")
