"""Checkpoints run streamed (one leaf module at a time) give exactly the in-memory results."""

from __future__ import annotations

import pytest
from conftest import TINY

from hetmap.compiler.api import compile_model
from hetmap.compiler.frontend import load_model
from hetmap.compiler.ir.annotations import Density, ExpertScore

PIPE = "density{{calib_tokens=512,seq_len=128,stream={}}},expert-score"


@pytest.mark.parametrize("name", TINY)
def test_streamed_calibration_and_scores_equal_in_memory(name: str, tmp_path) -> None:
    load_model(name).module.save_pretrained(tmp_path)
    streamed = compile_model(str(tmp_path), pipeline=PIPE.format("on"))
    assert streamed.model.on_meta  # never materialised
    in_memory = compile_model(str(tmp_path), pipeline=PIPE.format("off"))
    assert not in_memory.model.on_meta
    for node in in_memory.graph.experts():
        other = streamed.graph.node(node.name)
        assert other.get(Density) == node.get(Density)
        assert other.get(ExpertScore).max_norm == pytest.approx(node.get(ExpertScore).max_norm, rel=1e-6)
