"""The zoo: one tiny config per MoE family of the pinned transformers, end to end.

Every causal-LM family of :mod:`hetmap.compiler.frontend.zoo` is compiled with the default
pipeline (expert count = MoE layers x routed experts, counted here from the model's own
modules and config; shared experts are not routed), simulated with ``--ideal`` (equal to the
digital perplexity) and emitted as ONNX (onnxruntime equals PyTorch within 1e-4 on two input
shapes; every weight-multiplying node tagged). A family hetmap cannot map is listed in
``UNSUPPORTED`` with its reason, and must fail with a one-line error saying so.

The ONNX export takes 20-30 s per family on 2 cores (several minutes for some hybrids), too
long for CI over all ~55 families: CI exports a few families of distinct layouts
(``ONNX_IN_CI``); ``benchmarks/zoo_status.py`` exports them all and writes the status the
README's family table is generated from (checked here against the JSON, and the JSON's compile
failures against ``UNSUPPORTED``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import densities_loaded_and_streamed

from hetmap.common.errors import HetmapError
from hetmap.compiler.api import Plan, compile_model
from hetmap.compiler.frontend import load_model
from hetmap.compiler.frontend.moe import find_moe_blocks
from hetmap.compiler.frontend.tracer import trace
from hetmap.compiler.frontend.zoo import ZOO
from hetmap.compiler.ir.annotations import Placement

ROOT = Path(__file__).resolve().parents[1]

#: family -> a fragment of the one-line error it must fail with (the reason it cannot work)
UNSUPPORTED = {
    "doge": "keeps single-neuron experts as rows of embeddings",  # product-key experts
    # transformers' NllbMoeExperts one-hots the router's one-hot mask: experts 0 and 1 only
    "nllb_moe": "does not dispatch tokens the way its router routes them",
}
#: families whose model forward fx traces only with trace-time resolution of static control
#: flow (tracer rule 5)
TRACED_AT_ROOT = ["gemma4", "inkling2", "inkling2_loop", "qwen3_5_moe", "qwen4_exp"]
SUPPORTED = sorted(name for name in ZOO if name not in UNSUPPORTED)
#: families of distinct layouts (fused, transposed + interleaved + bias + custom gate, dense
#: input, identity experts) and MLA; tests/backends/test_onnx_layouts.py covers flat stacks,
#: gate-less experts, Mamba and the sparse-attention indexer
ONNX_IN_CI = ["olmoe", "gpt_oss", "llama4", "longcat_flash", "deepseek_v3"]
_EXPERT_COUNT_NAMES = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")


def routed_experts_in(module: torch.nn.Module, config: object) -> int:
    """MoE layers x routed experts, from the model itself: layers (of every stack: an
    encoder-decoder has two) that hold, outside attention, a module named ``experts`` or
    expert stacks of their own (JetMoE's, which carry ``num_experts``), times the config's
    routed-expert count."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sections = [text, getattr(text, "ffn_config", None)]
    count = next(v for s in sections for n in _EXPERT_COUNT_NAMES
                 if s is not None and isinstance(v := getattr(s, n, None), int) and v > 0)
    layers = {m.group(1) for path, sub in module.named_modules()
              if (m := re.search(r"^(.*?(?:layers|blocks?)\.\d+)\.", path))
              and (re.search(r"(?<!shared_)experts$", path)
                   or isinstance(getattr(sub, "weight", None), torch.Tensor)
                   and sub.weight.dim() == 3 and isinstance(getattr(sub, "num_experts", None), int))
              and "attn" not in path and "attention" not in path}
    return len(layers) * count


def compiled(family: str) -> Plan:
    """The family compiled with the default pipeline; expert counts checked."""
    plan = compile_model(f"tiny:{family}", calib_tokens=512)
    module, config = plan.model.module, plan.model.config
    assert len(plan.graph.experts()) == routed_experts_in(module, config) > 0
    shared = {p for m in plan.graph.moe_layers.values() for p in m.shared}
    assert not any(n.module in shared for n in plan.graph.experts())
    return plan


@pytest.mark.slow
@pytest.mark.parametrize("family", SUPPORTED)
def test_family_compiles_and_simulates(family: str) -> None:
    plan = compiled(family)
    result = plan.simulate(ideal=True, seeds=1, eval_tokens=512, seq_len=128, batch=4)
    analog = [n for n in plan.graph.experts() if n.get(Placement).analog]
    # stacked experts are simulated as experts; per-expert modules (Switch) as their linears
    per_module = [n for n in analog if plan.graph.moe_layers[n.layer].layout == "modulelist"]
    assert result.analog_experts == len(analog) - len(per_module)
    assert result.analog_linears >= sum(len(n.matrices) for n in per_module) and analog
    assert result.mapped_ppl[0] == pytest.approx(result.digital_ppl, rel=1e-5)


# ONNX parity of the ONNX_IN_CI families, in every MoE form, is checked by
# tests/backends/test_onnx_forms.py::test_forms_on_the_zoo (checker, two shapes, tags vs plan).


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family_fails_in_one_line(family: str) -> None:
    with pytest.raises(HetmapError) as caught:
        compile_model(f"tiny:{family}", calib_tokens=512)
    message = str(caught.value)
    assert UNSUPPORTED[family] in message and "\n" not in message


def _zoo_status_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zoo_status", ROOT / "benchmarks" / "zoo_status.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_family_table_is_generated_from_zoo_status() -> None:
    """The README's table is ``zoo_status.py --readme``'s output for the recorded results, and
    those results fail to compile exactly the families this file lists as unsupported."""
    results = json.loads((ROOT / "benchmarks" / "results" / "zoo_status.json").read_text())
    section = _zoo_status_script().readme_section(results)
    assert section in (ROOT / "README.md").read_text()
    failing = {name for name, entry in results["families"].items()
               if entry["stages"]["compile"]["status"] == "failed"}
    assert failing == set(UNSUPPORTED)
    assert set(results["families"]) == set(ZOO)


@pytest.mark.slow
@pytest.mark.parametrize("family", TRACED_AT_ROOT)
def test_root_forward_with_static_control_flow_traces_exactly(family: str) -> None:
    """These families' model forwards branch on ranks and constant sizes: the trace resolves
    those branches once, and stays exact on inputs of other sizes."""
    loaded = load_model(f"tiny:{family}")
    gm, _, _ = trace(loaded.module, find_moe_blocks(loaded.module, loaded.config))
    for shape in [(1, 5), (2, 11)]:
        ids = torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = loaded.module(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(gm(ids), expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5_moe", "gemma4"])
def test_streamed_calibration_reads_parameters_the_graph_reads_directly(family: str,
                                                                       tmp_path) -> None:
    """Qwen3.5-MoE's linear attention is traced through, so the graph reads its parameters
    (``dt_bias``) itself; Gemma 4's scaled embedding reads a buffer in no checkpoint file
    (``embed_scale``), and its forward is traced from the checkpoint without weights (static
    rule 7). Streamed from the checkpoint, the densities equal the loaded run's."""
    load_model(f"tiny:{family}").module.save_pretrained(tmp_path)
    assert len(densities_loaded_and_streamed(tmp_path)) == 24


def test_zoo_covers_every_moe_family() -> None:
    assert len(ZOO) >= 57 and set(UNSUPPORTED) <= set(ZOO)
    assert {"switch_transformers", "nllb_moe"} <= {n for n, f in ZOO.items()
                                                   if f.kind == "encoder-decoder"}
    assert set(ONNX_IN_CI) <= set(SUPPORTED) and set(TRACED_AT_ROOT) <= set(SUPPORTED)
