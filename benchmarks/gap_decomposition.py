"""What the perplexity gap a mapping leaves is made of: programming noise or the periphery.

For ``--model`` (its own calibration and evaluation text, as ``policy_evidence.py``) and each
mapping (expected-impact at budgets 0.25, whole experts and by neuron), the mapped perplexity
at c = ``--noise-scale`` over ``--seeds`` programming seeds with

* the target's full settings;
* programming noise only (no output noise, no DAC/ADC quantization);
* the periphery only (DAC/ADC, output noise; programming noise scale 0).

The excess over digital perplexity of each tells which non-ideality the remaining gap is.
Prints JSON (and writes it to ``--out/gap_decomposition.json``).

    .venv/bin/python benchmarks/gap_decomposition.py --model demo --seeds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import policy_evidence as pe  # noqa: E402

from hetmap.compiler.api import compile_model  # noqa: E402
from hetmap.compiler.data.textdata import batches, load_tokens  # noqa: E402
from hetmap.compiler.evaluation.simulate import analog_part, perplexity, settings_for  # noqa: E402
from hetmap.compiler.registry import load_registries  # noqa: E402

MAPPINGS = {"expected-impact 0.25": "place{policy=expected-impact,budget=0.25}",
            "expected-impact@neuron 0.25":
                "place{policy=expected-impact,budget=0.25,granularity=neuron}",
            "dense digital, experts analog": "place{policy=none}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", choices=sorted(pe.MODELS))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--noise-scale", type=float, default=2.5)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(2)
    registries = load_registries()
    with tempfile.TemporaryDirectory() as workdir:
        calib = pe.write_split_text(Path(workdir), pe.MODELS[args.model], "calib", 8192)
        evaluation = pe.write_split_text(Path(workdir), pe.MODELS[args.model], "eval",
                                         args.eval_tokens)
        base = compile_model(args.model, pipeline="density,expert-score", registries=registries,
                             calib=str(calib), calib_tokens=4096, granularity="neuron")
        windows = batches(load_tokens(base.model, evaluation, "eval", args.eval_tokens), 256, 8)
    model = base.model.runnable()
    digital = perplexity(model, windows)
    full = settings_for(base.target, noise_scale=args.noise_scale)
    variants = {"full": full,
                "programming noise only": dataclasses.replace(full, out_noise=0.0, dac_bits=None,
                                                              adc_bits=None),
                "periphery only": dataclasses.replace(full, noise_scale=0.0)}
    rows = []
    for mapping, text in MAPPINGS.items():
        part = analog_part(pe.run_passes(base.graph, base, registries, text), model)
        for variant, settings in variants.items():
            values = [perplexity(part.build(model, settings, seed), windows)
                      for seed in range(args.seeds)]
            rows.append({"mapping": mapping, "settings": variant, "ppl": values,
                         "excess_mean": statistics.fmean(values) - digital})
            print(f"{mapping:30s} {variant:24s} excess {rows[-1]['excess_mean']:+.4f}",
                  file=sys.stderr, flush=True)
    result = {"benchmark": "gap_decomposition", "model": args.model, "digital_ppl": digital,
              "noise_scale": args.noise_scale, "seeds": args.seeds, "target": base.target.name,
              "out_noise": full.out_noise, "rows": rows,
              "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gap_decomposition.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
