"""Draw the README's pictures of the demo model into ``docs/img/``.

* ``demo-placement.png``: which experts the default policy (``expected-impact``, budget 0.125)
  puts on digital, shaded by routing density, beside the scores it ranked by;
* ``demo-floorplan.png``: the analog tiles of that plan on their crossbar arrays;
* ``demo-pareto.png``: perplexity against energy per token from a sweep of four policies over
  four budgets (noise scale 1.5), the Pareto-optimal points marked;
* ``olmoe-floorplan.png``: the aggregated floorplan of the full-size OLMoE-1B-7B config
  (``--policy random --budget 0.25``, structure only).

Run from the repository root (about 2 minutes on 2 busy cores)::

    .venv/bin/python examples/make_pictures.py [--out docs/img] [--seeds 3] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from hetmap.compiler.api import compile_model, run_sweep
from hetmap.compiler.evaluation.plots import plot_floorplan, plot_placement

POLICIES = ["expected-impact", "activation-frequency", "max-norm", "random"]
BUDGETS = [0.0, 0.125, 0.25, 0.5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    demo = compile_model("demo").to_json()
    grid = plot_placement(args.out / "demo-placement.png", demo)
    tiles = plot_floorplan(args.out / "demo-floorplan.png", demo)
    print(f"demo: {int(grid.digital.sum())} of {grid.digital.size} experts digital; "
          f"{tiles.slot.size} tiles on {tiles.slots_used().size} arrays")

    olmoe = compile_model("olmoe-1b-7b", policy="random", budget=0.25).to_json()
    tiles = plot_floorplan(args.out / "olmoe-floorplan.png", olmoe)
    print(f"olmoe-1b-7b: {tiles.slot.size} tiles on {tiles.slots_used().size} arrays")

    with tempfile.TemporaryDirectory() as scratch:
        sweep = Path(scratch) / "sweep"
        result = run_sweep("demo", policies=POLICIES, budgets=BUDGETS, noise_scales=[1.5],
                           seeds=args.seeds, eval_tokens=args.eval_tokens, out=sweep)
        shutil.copy(sweep / "pareto.png", args.out / "demo-pareto.png")
    print(f"sweep: all digital perplexity {result['digital_ppl']:.4f}")
    for row in result["summary"]:
        print(f"  {row['policy']:<22} budget {row['budget']:<6} ppl {row['ppl_mean']:.4f} "
              f"+- {row['ppl_std']:.4f}  energy/token {row['energy_per_token_j']:.3e} J")
    print(f"wrote {args.out}/demo-placement.png, demo-floorplan.png, demo-pareto.png, "
          "olmoe-floorplan.png")


if __name__ == "__main__":
    main()
