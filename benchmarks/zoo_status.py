"""Push every tiny MoE family of the zoo (``tiny:<family>``) through hetmap and record what fails.

Per family, each step a fresh subprocess (timeout ``--timeout`` s), ``--jobs`` families at once:

1. ``compile``: ``hetmap compile tiny:F -o DIR``; plan.json must count MoE layers x routed
   experts, as found in the model's modules (outside attention: the largest ``num_experts`` of
   each decoder layer; shared experts are not routed);
2. ``simulate``: ``hetmap simulate tiny:F --ideal --seeds 1 --eval-tokens 512 -o DIR``; with
   every non-ideality off the mapped perplexity must equal the digital one;
3. ``onnx``: ``hetmap compile tiny:F --emit onnx -o DIR``; onnxruntime's logits must equal
   PyTorch's (the same seeded weights) on inputs of shape (2, 7) and (1, 5) within 1e-4.

Each step records ok / failed (/ skipped), the last stderr line or the failed check, and its
seconds. Encoder-decoder families run as next-token models (the decoder reads the encoder's
window: see ``as_next_token_model``). Writes (merging with
earlier runs, family by family) ``zoo_status.json`` and ``zoo_status.md`` into ``--out``:

    .venv/bin/python benchmarks/zoo_status.py [--families jamba,dbrx] [--out benchmarks/results]

``--readme`` runs nothing: it rewrites the README's family table (between the markers
:data:`README_BEGIN` and :data:`README_END`) from ``zoo_status.json``
(``tests/test_zoo.py`` checks that the README matches it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from hetmap.compiler.frontend.zoo import EXCLUDED, ZOO

ROOT = Path(__file__).resolve().parents[1]
HETMAP = Path(sys.executable).with_name("hetmap")
STAGES = ("compile", "simulate", "onnx")
ONNX_SHAPES = [(2, 7), (1, 5)]
TOLERANCE = 1e-4
Result = dict[str, Any]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:600] if lines else ""


def _run(args: list[str], timeout: float) -> tuple[bool, str, str]:
    """Run a subprocess: (succeeded, stdout, last stderr line or why it failed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        return False, "", f"timeout after {timeout:.0f} s"
    error = _last_line(proc.stderr) or f"exit status {proc.returncode}"
    return proc.returncode == 0, proc.stdout, error if proc.returncode else ""


def _helper(mode: str, family: str, *args: str, timeout: float) -> tuple[dict[str, Any], str]:
    """This script's ``--probe`` / ``--check-onnx`` in a subprocess: (its JSON, error)."""
    ok, stdout, error = _run([sys.executable, __file__, mode, family, *args], timeout)
    if not ok:
        return {}, error
    return json.loads(stdout.strip().splitlines()[-1]), ""


def _stage(run: Callable[[], tuple[str, dict[str, Any]]]) -> Result:
    start = time.perf_counter()
    error, details = run()
    return {"status": "failed" if error else "ok", "error": error or None,
            "seconds": round(time.perf_counter() - start, 1), **details}


def stage_compile(family: str, out: Path, timeout: float) -> tuple[str, dict[str, Any]]:
    ok, _, error = _run([str(HETMAP), "compile", f"tiny:{family}", "-o", str(out)], timeout)
    if not ok:
        return error, {"cli_failed": True}
    plan = json.loads((out / "plan.json").read_text())
    summary, nodes = plan["summary"], plan["nodes"]
    expected, error = _helper("--probe", family, timeout=timeout)
    if error:
        return f"probe: {error}", {}
    found = {"moe_layers": summary["moe_layers"], "experts": summary["experts_total"],
             "shared_expert_nodes": sum(n["kind"] == "shared-expert" for n in nodes)}
    details = {"found": found, "expected": expected}
    if (found["moe_layers"], found["experts"]) != (expected["moe_layers"], expected["experts"]):
        return (f"plan has {found['experts']} experts in {found['moe_layers']} MoE layers, the "
                f"model {expected['experts']} in {expected['moe_layers']} "
                f"({expected['per_layer']})"), details
    return "", details


def stage_simulate(family: str, out: Path, timeout: float) -> tuple[str, dict[str, Any]]:
    ok, _, error = _run([str(HETMAP), "simulate", f"tiny:{family}", "--ideal", "--seeds", "1",
                         "--eval-tokens", "512", "-o", str(out)], timeout)
    if not ok:
        return error, {}
    result = json.loads((out / "simulation.json").read_text())
    digital, mapped = result["digital_ppl"], result["mapped_ppl_mean"]
    details = {"digital_ppl": digital, "mapped_ppl": mapped}
    if abs(mapped - digital) > 1e-6 * abs(digital):
        return f"ideal mapped perplexity {mapped:.6g} != digital {digital:.6g}", details
    return "", details


def stage_onnx(family: str, out: Path, timeout: float) -> tuple[str, dict[str, Any]]:
    ok, _, error = _run([str(HETMAP), "compile", f"tiny:{family}", "--emit", "onnx", "-o",
                         str(out)], timeout)
    if not ok:
        return error, {}
    details, error = _helper("--check-onnx", family, str(out / "model.onnx"), timeout=timeout)
    if error or "ort_error" in details:
        return error or details["ort_error"], details
    if details["max_abs_diff"] > TOLERANCE:
        return (f"onnxruntime logits differ from PyTorch by {details['max_abs_diff']:.3g} "
                f"(> {TOLERANCE})"), details
    return "", details


def run_family(family: str, timeout: float) -> dict[str, Any]:
    """All stages of one family, in a fresh temporary directory."""
    entry = {"model_type": ZOO[family].model_type, "kind": ZOO[family].kind,
             "run_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    stages: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix=f"zoo-{family}-") as tmp:
        stages["compile"] = _stage(lambda: stage_compile(family, Path(tmp) / "plan", timeout))
        if stages["compile"].pop("cli_failed", False):
            skipped = {"status": "skipped", "error": "compile failed", "seconds": 0.0}
            return {**entry, "stages": {**stages, "simulate": skipped, "onnx": skipped}}
        stages["simulate"] = _stage(lambda: stage_simulate(family, Path(tmp) / "sim", timeout))
        stages["onnx"] = _stage(lambda: stage_onnx(family, Path(tmp) / "onnx", timeout))
    return {**entry, "stages": stages}


# ------------------------------------------------------------------ helpers run in a subprocess


def probe(family: str) -> dict[str, Any]:
    """MoE layers and routed experts of ``tiny:family``, from its modules (not hetmap's IR)."""
    from hetmap.compiler.frontend.loader import load_model

    per_layer: dict[tuple[str, int], int] = {}
    for name, module in load_model(f"tiny:{family}").module.named_modules():
        # blocks: DBRX; block: an encoder-decoder's encoder.block / decoder.block
        layer = re.search(r"^(.*?(?:layers|blocks?))\.(\d+)\.", name + ".")
        experts = getattr(module, "num_experts", None)
        if layer is None or not isinstance(experts, int) or re.search(r"attn|attention", name):
            continue
        key = (layer.group(1), int(layer.group(2)))
        per_layer[key] = max(per_layer.get(key, 0), experts)
    stacks = len({stack for stack, _ in per_layer})
    return {"moe_layers": len(per_layer), "experts": sum(per_layer.values()),
            "per_layer": ", ".join(f"{stack + ' ' if stacks > 1 else 'layer '}{k}: {v}"
                                   for (stack, k), v in per_layer.items())}


def check_onnx(family: str, path: str) -> dict[str, Any]:
    """Largest |onnxruntime - PyTorch| logit over :data:`ONNX_SHAPES`."""
    import onnxruntime as ort
    import torch

    from hetmap.compiler.frontend.loader import load_model

    model = load_model(f"tiny:{family}").module  # seeded: the weights the plan was made from
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in ONNX_SHAPES:
        input_ids = torch.randint(0, 512, shape, generator=generator)
        with torch.no_grad():
            expected = model(input_ids).logits.numpy()
        try:
            (actual,) = session.run(["logits"], {"input_ids": input_ids.numpy()})
        except Exception as exc:  # onnxruntime's errors: keep the node and the shapes only
            node = re.search(r"Name:'([^']*)'", str(exc))
            why = re.split(r"Status Message: |was false\. ", str(exc))[-1].strip()
            return {"ort_error": f"onnxruntime fails on input {shape} in "
                                 f"{node.group(1) if node else 'a node'}: {why}"}
        worst = max(worst, float(abs(actual - expected).max()))
    return {"max_abs_diff": worst}


# ------------------------------------------------------------------ report


def _cell(stage: Result) -> str:
    return f"{stage['status']} {stage['seconds']:.0f} s" if stage["status"] != "skipped" else "-"


def _seconds(families: dict[str, Any], stage: str) -> list[float]:
    return [e["stages"][stage]["seconds"] for e in families.values()
            if e["stages"][stage]["status"] != "skipped"]


def markdown(results: dict[str, Any]) -> str:
    """The table (one row per family) and the errors, grouped by stage."""
    families = results["families"]
    lines = [f"# hetmap on the tiny MoE zoo (transformers {results['transformers']})", "",
             "| family | model_type | kind | compile | simulate | onnx |",
             "|---|---|---|---|---|---|"]
    for name, entry in families.items():
        cells = " | ".join(_cell(entry["stages"][s]) for s in STAGES)
        lines.append(f"| {name} | {entry['model_type']} | {entry['kind']} | {cells} |")
    lines += ["", "Seconds per step (2 families at a time on 2 cores): " + "; ".join(
        f"{stage} median {statistics.median(t):.0f}, max {max(t):.0f}, total {sum(t):.0f}"
        for stage in STAGES if (t := _seconds(families, stage)))]
    lines += ["", "## Failures", ""]
    for name, entry in families.items():
        for stage in STAGES:
            if entry["stages"][stage]["status"] == "failed":
                lines.append(f"- {name} ({stage}): {entry['stages'][stage]['error']}")
    lines += ["", "## Not in the zoo", ""]
    lines += [f"- {name}: {why}" for name, why in results["excluded"].items()]
    return "\n".join(lines) + "\n"


README = ROOT / "README.md"
README_BEGIN = "<!-- zoo-status: generated by benchmarks/zoo_status.py --readme, do not edit -->"
README_END = "<!-- /zoo-status -->"
_README_CELL = {"ok": "ok", "failed": "fails", "skipped": "-"}


def _error(stage: Result) -> str:
    return str(stage["error"]).removeprefix("error: ").replace("|", "\\|")


def readme_section(results: dict[str, Any]) -> str:
    """The README's family table (markers included), from ``zoo_status.json``'s content."""
    families = results["families"]
    simulated = [n for n, e in families.items()
                 if all(e["stages"][s]["status"] == "ok" for s in ("compile", "simulate"))]
    exported = [n for n in simulated if families[n]["stages"]["onnx"]["status"] == "ok"]
    pairs = [n for n, e in families.items() if e["kind"] == "encoder-decoder"]
    multimodal = [n for n, e in families.items() if e["kind"] == "multimodal"]
    summary = (f"Last run (transformers {results['transformers']}, "
               f"`benchmarks/results/zoo_status.json`): of {len(families)} MoE families "
               f"({len(pairs)} of them encoder-decoders, {len(multimodal)} image-text-to-text "
               f"models mapped through their text model), {len(simulated)} compile and simulate "
               f"(`--ideal` equal to digital), {len(exported)} of them also export to ONNX "
               "matching PyTorch (the ONNX errors are in `benchmarks/results/zoo_status.md`). "
               "An encoder-decoder runs as a next-token model: the decoder reads the window the "
               "encoder read, so its perplexity is a reconstruction measure, compared digital "
               "against mapped like any other.")
    lines = [README_BEGIN, textwrap.fill(summary, 95), "",
             "| family | model_type | kind | compile | simulate | ONNX |",
             "|---|---|---|---|---|---|"]
    for name, entry in families.items():
        cells = " | ".join(_README_CELL[entry["stages"][s]["status"]] for s in STAGES)
        lines.append(f"| {name} | {entry['model_type']} | {entry['kind']} | {cells} |")
    failed = {n: e["stages"]["compile"] for n, e in families.items()
              if e["stages"]["compile"]["status"] == "failed"}
    if failed:
        lines += ["", "Not supported, each failing with this one-line error (`UNSUPPORTED` in "
                  "`tests/test_zoo.py`):", "", "| family | error |", "|---|---|"]
        lines += [f"| {name} | {_error(stage)} |" for name, stage in failed.items()]
    return "\n".join([*lines, README_END])


def rewrite_readme(results: dict[str, Any], readme: Path = README) -> None:
    """Replace the README's section between the markers with :func:`readme_section`."""
    text = readme.read_text()
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + readme_section(results) + text[end:])


def save(out: Path, families: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write zoo_status.json and .md (families in ZOO order)."""
    import torch
    import transformers

    ordered = {name: families[name] for name in ZOO if name in families}
    results = {"transformers": transformers.__version__, "torch": torch.__version__, **meta,
               "families": ordered, "excluded": EXCLUDED}
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_status.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "zoo_status.md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated subset (default: all of ZOO)")
    parser.add_argument("--missing", action="store_true",
                        help="only the families that --out has no result for yet (resume a run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per subprocess")
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite the README's family table from --out's zoo_status.json")
    parser.add_argument("--probe", metavar="FAMILY", help=argparse.SUPPRESS)
    parser.add_argument("--check-onnx", nargs=2, metavar=("FAMILY", "ONNX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe or args.check_onnx:
        print(json.dumps(probe(args.probe) if args.probe else check_onnx(*args.check_onnx)))
        return
    if args.readme:
        rewrite_readme(json.loads((args.out / "zoo_status.json").read_text()))
        return
    names = args.families.split(",") if args.families else list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(ZOO)}")
    json_path = args.out / "zoo_status.json"
    families = json.loads(json_path.read_text())["families"] if json_path.exists() else {}
    names = [n for n in names if not (args.missing and n in families)]
    meta = {"timeout_s": args.timeout, "jobs": args.jobs}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_family, name, args.timeout): name for name in names}
        for future in as_completed(futures):  # saved family by family: a killed run resumes
            name = futures[future]
            families[name] = entry = future.result()
            save(args.out, families, meta)
            print(f"{name:<20} " + "  ".join(f"{s} {_cell(entry['stages'][s])}" for s in STAGES),
                  flush=True)


if __name__ == "__main__":
    main()
