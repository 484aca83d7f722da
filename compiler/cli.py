"""The ``hetmap`` command line: a thin layer over :mod:`hetmap.compiler.api`.

User errors (any :class:`HetmapError`) print one line, ``error: ...``, and exit with status 2;
``--traceback`` shows the Python traceback too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hetmap.common.errors import HetmapError, OutputError

err = Console(stderr=True, highlight=False, soft_wrap=True)
console = Console(highlight=False, soft_wrap=True)


def progress_factory(enabled: bool) -> Callable[[str, int], Callable[[int], None]]:
    """Progress bars on stderr for long steps (disabled when stderr is not a terminal)."""
    def make(description: str, total: int) -> Callable[[int], None]:
        if not enabled or total <= 1:
            return lambda _n: None
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=err, transient=True)
        task = bar.add_task(description, total=total)
        bar.start()
        state = {"done": 0}

        def advance(n: int) -> None:
            state["done"] += n
            bar.advance(task, n)
            if state["done"] >= total:
                bar.stop()
        return advance
    return make


def compile_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``compile``, ``simulate`` and ``sweep``."""
    options = [
        click.option("--target", "target", default="aimc-512", show_default=True,
                     help="Target name (see 'hetmap targets') or a TOML file."),
        click.option("--pipeline", default=None,
                     help="Pass pipeline, e.g. 'density,expert-score,place{policy=max-norm},tile'."),
        click.option("--policy", default=None, help="Placement policy (see 'hetmap passes'). [default: expected-impact]"),
        click.option("--budget", type=float, default=None, help="Fraction of experts per layer on digital. [default: 0.125]"),
        click.option("--budget-scope", type=click.Choice(["layer", "global"]), default=None,
                     help="Rank experts within each layer or across layers. [default: layer]"),
        click.option("--granularity", type=click.Choice(["expert", "neuron"]), default=None,
                     help="Unit of placement: whole routed experts, or their intermediate "
                     "neurons at the same digital parameter count (splits experts). "
                     "[default: expert]"),
        click.option("--dense", type=click.Choice(["digital", "analog"]), default=None,
                     help="Where dense modules go ('analog' for the all-analog baseline). [default: digital]"),
        click.option("--dense-threshold", type=float, default=None,
                     help="Density from which a module counts as dense. [default: 0.5]"),
        click.option("--calib", type=click.Path(), default=None,
                     help="Calibration text file (default: the built-in corpus' calibration split)."),
        click.option("--calib-tokens", type=int, default=None, help="Calibration tokens. [default: 4096]"),
        click.option("--chips", default=None, help="Chips in the system: a number or 'auto'. [default: the target's]"),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for random policies."),
        click.option("--trust-remote-code", is_flag=True, help="Allow checkpoints that ship modeling code."),
        click.option("--allow-dense", is_flag=True,
                     help="Map a model in which no MoE block is found (dense rule only)."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     default="auto", show_default=True,
                     help="Weights' dtype for loading, calibration and the digital part of "
                     "simulation ('auto': the checkpoint's own when reduced, else float32); "
                     "analog tiles always compute in float32."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def pass_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ("policy", "budget", "budget_scope", "granularity", "dense", "dense_threshold", "calib",
            "calib_tokens", "chips")
    return {k: kw.get(k) for k in keys if kw.get(k) is not None}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hetmap")
@click.option("--traceback", is_flag=True, hidden=True, help="Show Python tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, traceback: bool) -> None:
    """hetmap: map Mixture-of-Experts transformers onto analog-digital accelerators."""
    ctx.obj = {"traceback": traceback}
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@cli.command("compile")
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output directory for plan.json and ir.txt (and model.onnx).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--emit", default="plan", show_default=True,
              help="'plan' (plan.json and ir.txt only), 'onnx' (also OUT/model.onnx with placement "
              "metadata), or any emitter a plugin registers (see 'hetmap plugins').")
@click.option("--onnx-tiles", is_flag=True, help="Lower analog matmuls to one MatMul per crossbar tile.")
@click.option("--onnx-moe", type=click.Choice(["static", "dispatch", "ort"]), default="dispatch",
              show_default=True, help="MoE form: 'dispatch' (each expert on its routed tokens, "
              "standard ops), 'ort' (onnxruntime's com.microsoft.MoE where it fits), 'static' "
              "(every expert on every token).")
@click.option("--onnx-external-data", is_flag=True,
              help="Write the weights to model.onnx.data (always done above 2 GB).")
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None,
              help="Directory for the IR text after every pass.")
@click.option("-v", "--verbose", is_flag=True, help="Show per-pass timings.")
@compile_options
def compile_cmd(model: str, out: Path | None, force: bool, emit: str, onnx_tiles: bool,
                onnx_moe: str, onnx_external_data: bool,
                dump_ir: Path | None, verbose: bool, **kw: Any) -> None:
    """Compile MODEL: a built-in name (see 'hetmap models'), a checkpoint directory, or a
    factory 'file.py:function'."""
    from hetmap.compiler.api import compile_model
    from hetmap.compiler.registry import load_registries

    onnx_flags = [flag for flag, given in (("--onnx-tiles", onnx_tiles),
                                           ("--onnx-moe", onnx_moe_given(onnx_moe)),
                                           ("--onnx-external-data", onnx_external_data)) if given]
    if onnx_flags and emit != "onnx":
        raise click.UsageError(f"{', '.join(onnx_flags)} only apply with --emit onnx")
    if emit != "plan" and out is None:
        raise click.UsageError(f"--emit {emit} needs -o OUT")
    if dump_ir is not None and dump_ir.exists() and not dump_ir.is_dir():
        raise click.UsageError(f"--dump-ir {dump_ir} is a file; give a directory (new or existing)")
    if out is not None and out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another -o")
    registries = load_registries()
    _warn_plugins(registries)
    if emit != "plan" and emit not in registries.emitters:
        known = ", ".join(["plan", *sorted(registries.emitters.entries)])
        raise click.UsageError(f"unknown emitter {emit!r} for --emit (known: {known})")
    plan = compile_model(model, target=kw["target"], pipeline=kw["pipeline"], seed=kw["seed"],
                         trust_remote_code=kw["trust_remote_code"], allow_dense=kw["allow_dense"],
                         dtype=kw["dtype"], dump_dir=dump_ir,
                         registries=registries, log=lambda message: err.print(message, markup=False),
                         progress=progress_factory(err.is_terminal),
                         on_pass=(lambda t: err.print(f"  pass {t.name:<14} {t.seconds * 1000:8.1f} ms"
                                                      f"{'  ' + '; '.join(t.notes) if t.notes else ''}"))
                         if verbose else None,
                         **pass_overrides(kw))
    extra = None
    if emit == "onnx":
        def extra(staging: Path) -> None:
            from hetmap.compiler.backends.onnx_emitter import summary_line

            plan.emit_onnx(staging, tiles=onnx_tiles, moe=onnx_moe, external_data=onnx_external_data)
            err.print(summary_line(staging), markup=False)
    elif emit != "plan":
        emitter = registries.emitters.get(emit)

        def extra(staging: Path) -> None:
            written = emitter(plan, staging)
            err.print(f"emitter {emit}: wrote {', '.join(Path(p).name for p in written or [])}",
                      markup=False)
    if out is not None:  # files first: a closed stdout (e.g. '| head') must not lose them
        plan.write(out, force=force, extra=extra)
    print_summary(plan.header())
    if out is not None:
        files = "plan.json, ir.txt" + {"plan": "", "onnx": ", model.onnx, onnx_summary.json"}.get(
            emit, f" and the files of emitter {emit}")
        err.print(f"wrote {out}/ ({files})")
    else:
        err.print("(pass -o DIR to write plan.json and ir.txt)")


def onnx_moe_given(value: str) -> bool:
    """Whether --onnx-moe was given on the command line (not just its default)."""
    source = click.get_current_context().get_parameter_source("onnx_moe")
    return source is not None and source.name == "COMMANDLINE"


def print_summary(plan: dict[str, Any] | Any) -> None:
    """Print a plan's typed summary (:class:`hetmap.compiler.backends.plan.PlanSummary`; a
    plan.json dict is read into one first)."""
    from rich.table import Table

    from hetmap.compiler.backends.plan import PlanSummary

    s = plan if isinstance(plan, PlanSummary) else PlanSummary.from_json(plan)
    console.print(f"[bold]{s.model_name}[/] on [bold]{s.target_name}[/]  pipeline: {s.pipeline}  "
                  f"weights: {s.dtype}")
    console.print(f"  parameters   {s.params_total:,}  digital {s.params_digital:,} "
                  f"({s.digital_param_fraction:.2%})  analog {s.params_analog:,}")
    split = sum(row.experts_split for row in s.layers)
    neurons = (f", {split} split ({sum(row.neurons_digital for row in s.layers):,} neurons "
               "digital)" if split else "")
    console.print(f"  experts      {s.experts_digital} of {s.experts_total} digital{neurons} "
                  f"in {s.moe_layers} MoE layers")
    if s.allocation is not None:
        a = s.allocation
        console.print(f"  crossbars    {a.tiles_used:,} tiles on {a.arrays_used:,} arrays, "
                      f"utilization {a.tile_utilization:.1%}")
    if s.cost is not None:
        mapped, digital = s.cost.estimate.mapped, s.cost.estimate.all_digital
        ratio = mapped.energy_j / digital.energy_j if digital.energy_j else 0
        lat = mapped.latency_s / digital.latency_s if digital.latency_s else 0
        console.print(f"  energy/token {mapped.energy_j:.3e} J ({ratio:.2f}x all-digital)   "
                      f"latency/token {mapped.latency_s:.3e} s ({lat:.2f}x all-digital)")
    if s.layers:
        table = Table(title=None, show_edge=False, pad_edge=False)
        columns = ["layer", "experts", "top-k", "digital", "expert params digital"]
        if split:
            columns[4:4] = ["split", "neurons digital"]
        for col in columns:
            table.add_column(col, justify="right")
        for row in s.layers:
            share = row.expert_params_digital / row.expert_params if row.expert_params else 0
            cells = [str(row.layer), str(row.experts), str(row.top_k), str(row.experts_digital),
                     f"{share:.1%}"]
            if split:
                cells[4:4] = [str(row.experts_split), f"{row.neurons_digital:,}"]
            table.add_row(*cells)
        console.print(table)
    if s.cost is not None and s.cost.estimate.mapped.energy_by_kind:
        by_kind = s.cost.estimate.mapped.energy_by_kind
        table = Table(show_edge=False, pad_edge=False)
        for col in ("kind", "energy/token (J)", "share"):
            table.add_column(col, justify="right")
        total = sum(by_kind.values()) or 1.0
        for kind, energy in sorted(by_kind.items()):
            table.add_row(kind, f"{energy:.3e}", f"{energy / total:.1%}")
        console.print(table)


def simulation_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Programming seeds (mean +- std over them)."),
        click.option("--noise-scale", type=float, default=None,
                     help="Programming-noise scale c. [default: the target's]"),
        click.option("--drift-time", type=float, default=None, help="Seconds of drift after programming (with GDC)."),
        click.option("--ideal", is_flag=True, help="Turn every analog non-ideality off."),
        click.option("--eval", "eval_file", type=click.Path(), default=None,
                     help="Evaluation text (default: held-out files of the built-in corpus)."),
        click.option("--eval-tokens", type=click.IntRange(min=2), default=8192, show_default=True,
                     help="Evaluation tokens (at least 2: one prediction)."),
        click.option("--backend", type=click.Choice(["hetmap", "aihwkit"]), default="hetmap",
                     show_default=True, help="Tile model: hetmap's vectorized one or aihwkit's AnalogLinear."),
        click.option("--device", default=None, callback=_check_device,
                     help="Torch device for the simulation. [default: cuda if available, else cpu]"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    """A torch device string this machine has: 'cpu', 'cuda', 'cuda:N' (or 'mps'); None: the
    first CUDA device when there is one, else the CPU."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise click.BadParameter(f"{value!r} is not a torch device (use cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{value!r}: this machine has no CUDA device (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value!r}: this machine has {torch.cuda.device_count()} "
                                     "CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter(f"{value!r}: MPS is not available here (use cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise click.BadParameter(f"{value!r}: hetmap simulates on cpu or cuda")
    return value


programming_option = click.option(
    "--programming", type=click.Choice(["auto", "resident", "per-batch"]), default="auto",
    show_default=True,
    help="When the tiles are programmed: once per seed and kept (resident: float32 tiles beside "
    "the weights), or at every batch a few experts at a time (per-batch: no tile memory, slower "
    "on a CPU); auto keeps them when they take at most half of the free memory. Same noise "
    "either way.")
kernels_option = click.option(
    "--kernels", type=click.Choice(["eager", "compiled"]), default="eager", show_default=True,
    help="How hetmap's tiles run their element-wise steps and PCM programming: PyTorch ops with "
    "torch.randn noise (eager), or kernels fused by torch.compile (compiled: C++ on a CPU, "
    "Triton on a GPU; compiling takes a minute once per process) that draw their noise inside, "
    "from a counter-based generator: the same distributions, other samples for a seed.")
attention_option = click.option(
    "--attention", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
    help="Transformers' attention implementation for the runs: eager (what tracing and export "
    "use) or sdpa (PyTorch's fused attention: less memory and time at long sequences, the same "
    "arithmetic up to float rounding).")
device_map_option = click.option(
    "--device-map", default=None, metavar="auto|FILE.json",
    help="Place the model across GPUs, CPU and disk with accelerate: 'auto', or a JSON object "
    "from module names to a GPU index, 'cpu' or 'disk' (offloaded modules are simulated from "
    "their weights at every call). Overrides --device.")


@cli.command()
@click.argument("plan_or_model")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Write plan.json, ir.txt and simulation.json here (MODEL form).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@simulation_options
@programming_option
@kernels_option
@attention_option
@click.option("--stream", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Run a checkpoint leaf by leaf from its files instead of loading it (auto: "
              "when its files exceed half of the machine's memory). Every weight is read "
              "once per batch and seed.")
@device_map_option
@compile_options
def simulate(plan_or_model: str, out: Path | None, force: bool, seeds: int,
             noise_scale: float | None, drift_time: float | None, ideal: bool,
             eval_file: str | None, eval_tokens: int, backend: str, device: str,
             programming: str, kernels: str, attention: str, stream: str,
             device_map: str | None, **kw: Any) -> None:
    """Perplexity of the all-digital and the mapped model with analog non-idealities.

    PLAN_OR_MODEL is a compiled plan directory (simulation.json is added to it) or a MODEL,
    compiled first with the compile options."""
    from hetmap.compiler.api import compile_model, load_plan
    from hetmap.compiler.backends.plan import PLAN_FILE
    from hetmap.compiler.evaluation.simulate import check_kernels

    plan_dir = Path(plan_or_model)
    is_plan = (plan_dir / PLAN_FILE).is_file()
    if is_plan:
        context = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in (*kw, "out", "force")
                 if name != "seed" and getattr(context.get_parameter_source(name), "name",
                                               None) == "COMMANDLINE"]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to a "
                f"compiled plan directory: it is "
                f"simulated as compiled, and simulation.json is written into it; recompile with "
                f"'hetmap compile ... -o DIR' to change the mapping")
    if not is_plan and out is not None and out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another -o")
    check_kernels(kernels, backend)  # before compiling
    progress = progress_factory(err.is_terminal)
    if is_plan:
        plan = load_plan(plan_dir)
    else:
        plan = compile_model(plan_or_model, target=kw["target"], pipeline=kw["pipeline"],
                             seed=kw["seed"], trust_remote_code=kw["trust_remote_code"], allow_dense=kw["allow_dense"],
                         dtype=kw["dtype"],
                             progress=progress, log=lambda m: err.print(m, markup=False),
                             **pass_overrides(kw))
    result = plan.simulate(seeds=seeds, seed=kw["seed"], noise_scale=noise_scale,
                           drift_time=drift_time, ideal=ideal, eval_file=eval_file,
                           eval_tokens=eval_tokens, backend=backend, device=device,
                           progress=progress, programming=programming, stream=stream,
                           device_map=device_map, kernels=kernels, attention=attention)
    data = {**result.to_json(), "digital_param_fraction": plan.summary["digital_param_fraction"]}
    print_simulation(plan.model.name, data)
    write_result(plan, plan_dir if is_plan else None, out, force, "simulation.json", data)


def write_result(plan: Any, plan_dir: Path | None, out: Path | None, force: bool, name: str,
                 data: dict[str, Any]) -> None:
    """``name`` (simulation.json, eval.json) into the plan directory it came from (atomically:
    a hidden file renamed into place), or with the plan into a new ``out`` directory."""
    from hetmap.compiler.backends.plan import write_json

    if plan_dir is not None:
        target = plan_dir / name
        staging = plan_dir / f".{name}.tmp"
        write_json(staging, data)
        staging.replace(target)
        err.print(f"wrote {target}")
    elif out is not None:
        plan.write(out, force=force, extra=lambda d: write_json(d / name, data))
        err.print(f"wrote {out}/ (plan.json, ir.txt, {name})")


SIMULATION_KEYS = {"seeds": list, "eval_tokens": int, "eval_source": str, "backend": str,
                   "settings": dict, "digital_ppl": float, "mapped_ppl_mean": float,
                   "mapped_ppl_std": float, "digital_param_fraction": float}


def read_simulation(path: Path) -> dict[str, Any]:
    """A simulation.json written by 'hetmap simulate', or a one-line OutputError."""
    import json

    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise OutputError(f"{path} is not readable JSON ({type(exc).__name__}); rerun "
                          "'hetmap simulate' on the plan directory") from exc
    if not isinstance(data, dict):
        raise OutputError(f"{path} is not a simulation result (a JSON {type(data).__name__}); "
                          "rerun 'hetmap simulate' on the plan directory")
    for key, kind in SIMULATION_KEYS.items():
        value = data.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float \
            else isinstance(value, kind)
        if not ok:
            raise OutputError(f"{path}: {key!r} is missing or not a {kind.__name__}; rerun "
                              "'hetmap simulate' on the plan directory")
    settings = data["settings"]
    if not isinstance(settings.get("noise_scale"), (int, float)) or "ideal" not in settings:
        raise OutputError(f"{path}: 'settings' lacks noise_scale or ideal; rerun 'hetmap simulate'")
    return data


def print_simulation(name: str, data: dict[str, Any]) -> None:
    seeds = len(data["seeds"])
    console.print(f"[bold]{name}[/]: perplexity on {data['eval_tokens']:,} tokens ({data['eval_source']}), "
              f"{data['backend']} tiles, noise scale {data['settings']['noise_scale']}"
              f"{', ideal' if data['settings']['ideal'] else ''}{_run_modes(data)}")
    console.print(f"  all digital      {data['digital_ppl']:10.4f}")
    console.print(f"  mapped           {data['mapped_ppl_mean']:10.4f} +- {data['mapped_ppl_std']:.4f}"
              f"  ({seeds} seed{'s' if seeds != 1 else ''}, "
              f"{data['digital_param_fraction']:.1%} of parameters digital)")
    if "programming" in data:
        streamed = (f"; streamed from the checkpoint, every weight read {data['weight_reads']} "
                    "time(s) per seed") if data.get("streamed") else ""
        console.print(f"  [dim]tiles programmed {_programmed(data['programming'])}"
                      f" ({data['programming_reason']}){streamed}[/]", markup=True)
    if data.get("simulated_digital"):
        console.print(f"  [dim]kept digital in simulation (not nn.Linear): "
                  f"{', '.join(data['simulated_digital'][:4])}...[/]")


def _run_modes(data: dict[str, Any]) -> str:
    """``, compiled kernels, sdpa attention`` for what a run used besides the defaults."""
    modes = []
    if data["settings"].get("kernels", "eager") != "eager":
        modes.append(f"{data['settings']['kernels']} kernels")
    if data.get("attention", "eager") != "eager":
        modes.append(f"{data['attention']} attention")
    return "".join(f", {mode}" for mode in modes)


@cli.command("eval")
@click.argument("plan_or_model")
@click.option("--tasks", default=None,
              help="Comma-separated lm-eval task, group or tag names. "
              "[default: the paper's piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande,mathqa,mmlu]")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory of local lm-eval task YAML files (tasks whose data need no download).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N items per task.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
              help="Few-shot examples per item. [default: the task's, else 0]")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward pass.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Programming seeds (mean +- std over them).")
@click.option("--noise-scale", type=float, default=None,
              help="Programming-noise scale c. [default: the target's]")
@click.option("--drift-time", type=float, default=None, help="Seconds of drift after programming (with GDC).")
@click.option("--ideal", is_flag=True, help="Turn every analog non-ideality off.")
@click.option("--backend", type=click.Choice(["hetmap", "aihwkit"]), default="hetmap",
              show_default=True, help="Tile model: hetmap's vectorized one or aihwkit's AnalogLinear.")
@click.option("--device", default=None, callback=_check_device,
              help="Torch device for the simulation. [default: cuda if available, else cpu]")
@programming_option
@kernels_option
@attention_option
@device_map_option
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Write plan.json, ir.txt and eval.json here (MODEL form).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@compile_options
def eval_cmd(plan_or_model: str, tasks: str | None, include_path: str | None, limit: int | None,
             num_fewshot: int | None, batch_size: int, seeds: int, noise_scale: float | None,
             drift_time: float | None, ideal: bool, backend: str, device: str,
             programming: str, kernels: str, attention: str, device_map: str | None,
             out: Path | None, force: bool, **kw: Any) -> None:
    """Downstream-task accuracy (lm-evaluation-harness) of the all-digital and the mapped model.

    PLAN_OR_MODEL is a compiled plan directory (eval.json is added to it) or a MODEL, compiled
    first with the compile options."""
    import logging

    from hetmap.compiler.api import compile_model, load_plan
    from hetmap.compiler.backends.plan import PLAN_FILE
    from hetmap.compiler.evaluation.simulate import check_kernels

    for name in ("lm_eval", "huggingface_hub", "datasets"):  # notes and retries: one error line
        logging.getLogger(name).setLevel(logging.ERROR)
    plan_dir = Path(plan_or_model)
    is_plan = (plan_dir / PLAN_FILE).is_file()
    context = click.get_current_context()
    if is_plan:
        given = [f"--{name.replace('_', '-')}" for name in (*kw, "out", "force")
                 if name != "seed" and (source := context.get_parameter_source(name)) is not None
                 and source.name == "COMMANDLINE"]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to a compiled "
                "plan directory: it is evaluated as compiled, and eval.json is written into it")
    elif out is not None and out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another -o")
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    if names == []:
        raise click.UsageError("--tasks names no task; give NAME[,NAME...]")
    task_set = plan_tasks(names, include_path)  # unknown names fail before any compiling
    check_kernels(kernels, backend)
    progress = progress_factory(err.is_terminal)
    if is_plan:
        plan = load_plan(plan_dir)
    else:
        plan = compile_model(plan_or_model, target=kw["target"], pipeline=kw["pipeline"],
                             seed=kw["seed"], trust_remote_code=kw["trust_remote_code"],
                             allow_dense=kw["allow_dense"], dtype=kw["dtype"], progress=progress,
                             log=lambda m: err.print(m, markup=False), **pass_overrides(kw))
    result = plan.evaluate(task_set, seeds=seeds, seed=kw["seed"],
                           limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                           noise_scale=noise_scale, drift_time=drift_time, ideal=ideal,
                           backend=backend, device=device, progress=progress,
                           programming=programming, device_map=device_map, kernels=kernels,
                           attention=attention)
    data = {**result.to_json(), "digital_param_fraction": plan.summary["digital_param_fraction"]}
    print_eval(plan.model.name, data)
    write_result(plan, plan_dir if is_plan else None, out, force, "eval.json", data)


def plan_tasks(names: list[str] | None, include_path: str | None) -> Any:
    """The lm-eval tasks to run, loaded (see hetmap.compiler.evaluation.lmeval.load_tasks)."""
    from hetmap.compiler.api import require_lm_eval

    lmeval = require_lm_eval()
    return lmeval.load_tasks(lmeval.PAPER_TASKS if names is None else names, include_path)


def print_eval(name: str, data: dict[str, Any]) -> None:
    """The accuracy table of eval.json, in percent like the paper's."""
    seeds = len(data["seeds"])
    settings = data["settings"]
    console.print(f"[bold]{name}[/]: lm-eval accuracy (%), {data['backend']} tiles, noise scale "
                  f"{settings['noise_scale']}{', ideal' if settings['ideal'] else ''}"
                  f"{_run_modes(data)}, {seeds} seed"
                  f"{'s' if seeds != 1 else ''}, {data['digital_param_fraction']:.1%} of parameters "
                  f"digital", markup=True)
    console.print(f"  {'task':<24} {'metric':<9} {'items':>6} {'digital':>8}  mapped", markup=False)
    for task, metrics in data["results"].items():
        for metric, row in metrics.items():
            console.print(f"  {task:<24} {metric:<9} {data['samples'].get(task, 0):>6} "
                          f"{100 * row['digital']:>8.2f}  {100 * row['mapped_mean']:.2f} +- "
                          f"{100 * row['mapped_std']:.2f}", markup=False)
    if data.get("average") and len(data["results"]) > 1:
        average = data["average"]
        console.print(f"  {'average (' + average['metric'] + ')':<24} {'':<9} {'':>6} "
                      f"{100 * average['digital']:>8.2f}  {100 * average['mapped_mean']:.2f} +- "
                      f"{100 * average['mapped_std']:.2f}", markup=False)


@cli.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--policies", default="expected-impact,max-norm,activation-frequency,activation-weight,router-norm,random",
              show_default=True, help="Comma-separated placement policies.")
@click.option("--budgets", default="0.125,0.25", show_default=True, help="Comma-separated budgets.")
@click.option("--noise-scales", default="1.5,2.5", show_default=True, help="Comma-separated c values.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Programming seeds per point.")
@click.option("--workers", type=click.IntRange(min=0), default=0,
              help="Local worker processes (0: serial).")
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value="local",
              help="Run points as Ray tasks: an address, or no value for a local instance.")
@click.option("--eval", "eval_file", type=click.Path(), default=None, help="Evaluation text.")
@click.option("--eval-tokens", type=click.IntRange(min=2), default=8192, show_default=True)
@click.option("--target", default="aimc-512", show_default=True, help="Target name or TOML file.")
@click.option("--calib-tokens", type=int, default=None, help="Calibration tokens. [default: 4096]")
@click.option("--seed", type=int, default=0, show_default=True, help="First programming seed.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted sweep into OUT: its finished points are not recomputed.")
@click.option("--granularity", type=click.Choice(["expert", "neuron"]), default="expert",
              show_default=True, help="Unit of placement of every policy; one written "
              "NAME@neuron in --policies is placed by neuron whatever this says.")
@programming_option
@kernels_option
def sweep(model: str, out: Path, force: bool, policies: str, budgets: str, noise_scales: str,
          seeds: int, workers: int, ray_address: str | None, eval_file: str | None,
          eval_tokens: int, target: str, calib_tokens: int | None, seed: int,
          resume: bool, granularity: str, programming: str, kernels: str) -> None:
    """Trade-off study: perplexity against digital parameter fraction (sweep.csv/json/png)."""
    from hetmap.compiler.api import run_sweep

    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another -o")
    from hetmap.compiler.evaluation.sweep import parse_floats, parse_names

    result = run_sweep(model, policies=parse_names(policies), budgets=parse_floats(budgets, "--budgets"),
                       noise_scales=parse_floats(noise_scales, "--noise-scales"), seeds=seeds,
                       seed=seed, target=target, calib_tokens=calib_tokens, eval_file=eval_file,
                       eval_tokens=eval_tokens, workers=workers, ray=ray_address, out=out,
                       force=force, resume=resume, progress=progress_factory(err.is_terminal),
                       granularity=granularity, programming=programming, kernels=kernels)
    if result.get("resumed_points"):
        err.print(f"resumed: {result['resumed_points']} point(s) taken from the interrupted run",
                  markup=False)
    console.print(f"all digital perplexity {result['digital_ppl']:.4f}")
    for row in result["summary"]:
        energy = row.get("energy_per_token_j")
        console.print(f"  {row['policy']:<22} budget {row['budget']:<6} c={row['noise_scale']:<4} "
                  f"digital {row['digital_fraction']:6.1%}  ppl {row['ppl_mean']:.4f} +- {row['ppl_std']:.4f}"
                  + (f"  energy/token {energy:.3e} J" if energy is not None else ""))
    err.print(f"wrote {out}/ (sweep.csv, sweep.json, sweep.png, pareto.png)")


@cli.command("search")
@click.argument("model")
@click.option("--max-loss", required=True,
              help="Largest perplexity loss against all-digital: a percentage (1%) or a fraction (0.01).")
@click.option("--metric", default="ppl", show_default=True,
              help="Quality measure: ppl (perplexity on the evaluation text).")
@click.option("--policy", default=None, help="Placement policy (see 'hetmap passes'). [default: expected-impact]")
@click.option("--budget-scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True,
              help="Granularity: the budget counts experts per MoE layer or across all layers.")
@click.option("--granularity", type=click.Choice(["expert", "neuron"]), default="expert",
              show_default=True, help="Unit of placement: whole experts, or their neurons at "
              "the same digital parameter count.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Programming seeds per budget; mean + one std must stay within the loss.")
@click.option("--noise-scale", type=float, default=None, help="Programming-noise scale c. [default: the target's]")
@click.option("--drift-time", type=float, default=None, help="Seconds of drift after programming (with GDC).")
@click.option("--eval", "eval_file", type=click.Path(), default=None,
              help="Evaluation text (default: held-out files of the built-in corpus).")
@click.option("--eval-tokens", type=int, default=8192, show_default=True)
@click.option("--device", default=None, callback=_check_device,
              help="Torch device. [default: cuda if available, else cpu]")
@click.option("--target", default="aimc-512", show_default=True, help="Target name or TOML file.")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text file.")
@click.option("--calib-tokens", type=int, default=None, help="Calibration tokens. [default: 4096]")
@click.option("--chips", default=None, help="Chips in the system: a number or 'auto'. [default: the target's]")
@click.option("--seed", type=int, default=0, show_default=True, help="First programming seed (and random policies' seed).")
@click.option("--trust-remote-code", is_flag=True, help="Allow checkpoints that ship modeling code.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Write the chosen plan here (plan.json, ir.txt, search.json).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@programming_option
@kernels_option
def search_cmd(model: str, max_loss: str, metric: str, policy: str | None, budget_scope: str,
               granularity: str, seeds: int, noise_scale: float | None, drift_time: float | None,
               eval_file: str | None, eval_tokens: int, device: str, target: str,
               calib: str | None, calib_tokens: int | None, chips: str | None, seed: int,
               trust_remote_code: bool, out: Path | None, force: bool, programming: str,
               kernels: str) -> None:
    """The smallest digital budget whose mapped perplexity stays within --max-loss of
    all-digital (bisection over budgets; prints every step, writes the chosen plan)."""
    from hetmap.compiler.api import search
    from hetmap.compiler.backends.plan import write_json
    from hetmap.compiler.evaluation.search import SearchStep, parse_loss
    from hetmap.compiler.passes.place import PlacePass

    loss = parse_loss(max_loss)
    if out is not None and out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it or choose another -o")
    shown: list[SearchStep] = []

    def on_step(step: SearchStep) -> None:
        if not shown:
            scope = "per layer" if budget_scope == "layer" else "across layers"
            if granularity == "neuron":
                scope += ", placed by neuron"
            console.print(f"search {model}: policy {policy or PlacePass.policy}, budget {scope}; "
                          f"all digital perplexity {step.digital_ppl:.4f}")
            console.print(f"  a budget passes when mean + 1 std over {seeds} seed"
                          f"{'s' if seeds != 1 else ''} is within {loss:.2%} "
                          f"(<= {step.digital_ppl * (1 + loss):.4f})")
            console.print(f"  {'step':>4}  {'budget':>7}  {'experts':^9}  {'digital':>7}  "
                          f"{'perplexity':^18}  {'loss':>7}  {'energy/token':>12}  result")
        shown.append(step)
        console.print(search_row(len(shown), step))

    result = search(model, max_loss=loss, metric=metric, policy=policy, budget_scope=budget_scope,
                    granularity=granularity,
                    seeds=seeds, seed=seed, noise_scale=noise_scale, drift_time=drift_time,
                    target=target, calib=calib, calib_tokens=calib_tokens, chips=chips,
                    eval_file=eval_file, eval_tokens=eval_tokens, device=device,
                    trust_remote_code=trust_remote_code, progress=progress_factory(err.is_terminal),
                    on_step=on_step, programming=programming, kernels=kernels)
    if result.settings.get("programming_reason"):
        used = ", ".join(_programmed(m) for m in result.settings["programming"].split(", "))
        console.print(f"  [dim]tiles programmed {used} ({result.settings['programming_reason']})[/]",
                      markup=True)
    plan = result.require_plan()  # no budget: one 'error:' line naming the best loss, exit 2
    chosen = result.chosen
    assert chosen is not None
    s = plan.summary
    console.print(f"chosen: budget {chosen.budget:g} ({chosen.experts_digital} of "
                  f"{chosen.experts_total} experts digital, {chosen.digital_fraction:.1%} of "
                  f"parameters) after {len(result.steps)} of {len(result.candidates)} candidates: "
                  f"loss {chosen.loss:+.2%} <= {loss:.2%}")
    if "energy_per_token_j" in s:
        console.print(f"  energy/token {s['energy_per_token_j']:.3e} J "
                      f"({s['energy_per_token_j'] / s['digital_energy_per_token_j']:.2f}x all-digital)"
                      f"   latency/token {s['latency_per_token_s']:.3e} s "
                      f"({s['latency_per_token_s'] / s['digital_latency_per_token_s']:.2f}x all-digital)")
    if out is not None:
        plan.write(out, force=force, extra=lambda d: write_json(d / "search.json", result.to_json()))
        err.print(f"wrote {out}/ (plan.json, ir.txt, search.json)")
    else:
        err.print("(pass -o DIR to write the chosen plan)")


def _programmed(mode: str) -> str:
    """When the tiles of a programming mode are programmed, in words."""
    return {"resident": "once per seed", "per-batch": "per batch"}.get(mode, mode)


def search_row(index: int, step: Any) -> str:
    """One line of the search path: budget, experts, perplexity, loss, energy, pass/fail."""
    energy = f"{step.energy_per_token_j:.3e} J" if step.energy_per_token_j is not None else "-"
    if not step.fits:
        return (f"  {index:>4}  {step.budget:>7g}  {step.experts_digital:>4}/{step.experts_total:<4}  "
                f"{'':>7}  {'does not fit the target':>27}  {'':>12}  fail")
    return (f"  {index:>4}  {step.budget:>7g}  {step.experts_digital:>4}/{step.experts_total:<4}  "
            f"{step.digital_fraction:>7.1%}  {step.ppl_mean:>8.4f} +- {step.ppl_std:.4f}  "
            f"{step.loss:>+7.2%}  {energy:>12}  {'pass' if step.passed else 'fail'}")


@cli.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("out/demo"),
              show_default=True, help="Where the demo plan goes (replaced if it exists).")
@click.option("--seeds", type=int, default=3, show_default=True)
def demo(out: Path, seeds: int) -> None:
    """Compile and simulate the built-in trained demo model, and say what to try next."""
    from hetmap.compiler.api import compile_model
    from hetmap.compiler.backends.plan import write_json

    progress = progress_factory(err.is_terminal)
    err.print("compiling the demo model (OLMoE architecture, trained on Python stdlib sources)...")
    plan = compile_model("demo", progress=progress)
    print_summary(plan.header())
    err.print(f"simulating {seeds} programming seeds on held-out text...")
    result = plan.simulate(seeds=seeds, progress=progress)
    data = {**result.to_json(), "digital_param_fraction": plan.summary["digital_param_fraction"]}
    print_simulation("demo", data)
    plan.write(out, force=True, extra=lambda d: write_json(d / "simulation.json", data))
    console.print(f"\nwrote {out}/plan.json, ir.txt, simulation.json")
    console.print("next steps:")
    console.print(f"  .venv/bin/hetmap inspect {out}                      # the plan again")
    console.print("  .venv/bin/hetmap simulate demo --policy max-norm --budget 0.25 --seeds 5   # the paper's score")
    console.print("  .venv/bin/hetmap compile demo --emit onnx -o out/demo-onnx   # ONNX with placement tags")
    console.print("  .venv/bin/hetmap sweep demo -o out/sweep --seeds 3           # policies x budgets x noise")


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--plot", is_flag=True,
              help="Also write OUT_DIR/placement.png (layers x experts) and floorplan.png (chips x arrays).")
def inspect(out_dir: Path, plot: bool) -> None:
    """Print the summary and per-layer table of a compiled plan directory (and its
    simulation results, if simulated)."""

    from hetmap.compiler.backends.plan import read_plan

    plan = read_plan(out_dir)
    print_summary(plan)
    simulation = out_dir / "simulation.json"
    if simulation.is_file():
        print_simulation(plan["model"]["name"], read_simulation(simulation))
    if plot:
        from hetmap.compiler.evaluation.plots import write_plan_pictures

        written, skipped = write_plan_pictures(out_dir, plan)
        for note in skipped:
            err.print(f"note: {note}", markup=False)
        err.print(f"wrote {', '.join(str(p) for p in written)}", markup=False)


@cli.command()
def passes() -> None:
    """List registered passes and placement policies."""
    from hetmap.compiler.registry import load_registries

    registries = load_registries()
    _warn_plugins(registries)
    console.print("[bold]passes[/]")
    for entry in registries.passes:
        console.print(f"  {entry.name:<22} {entry.description}{_origin(entry.origin)}")
    console.print("[bold]policies[/] (place{policy=NAME} or --policy NAME)")
    for entry in registries.policies:
        console.print(f"  {entry.name:<22} {entry.description}{_origin(entry.origin)}")
    console.print("[bold]emitters[/]")
    for entry in registries.emitters:
        console.print(f"  {entry.name:<22} {entry.description}{_origin(entry.origin)}")


@cli.command()
@click.argument("target", required=False)
def targets(target: str | None) -> None:
    """List registered hardware targets; with TARGET (a name or a TOML file), show it: its
    tables and the noise model the simulator builds from it, every parameter as used."""
    from hetmap.compiler.registry import load_registries

    registries = load_registries()
    _warn_plugins(registries)
    if target is None:
        for entry in registries.targets:
            console.print(f"  {entry.name:<22} {entry.description}{_origin(entry.origin)}")
        return
    from hetmap.compiler.api import resolve_target
    from hetmap.runtime import require_aihwkit
    from hetmap.runtime.programming import make_noise_model
    from hetmap.runtime.settings import settings_for
    from hetmap.targets import NOISE_PARAMETERS

    resolved = resolve_target(target, registries)
    require_aihwkit()
    model = make_noise_model(settings_for(resolved))  # a bad parameter: one error, no output
    noise = resolved.aimc.noise.model
    used = {name: getattr(model, name) for name in NOISE_PARAMETERS[noise] if hasattr(model, name)}
    data = resolved.to_json()
    console.print(f"{data['name']}: {data['description']}", markup=False)
    for table in ("aimc", "digital"):
        fields = {k: v for k, v in data.get(table, {}).items() if not isinstance(v, dict)}
        console.print(f"  [{table}] " + "  ".join(f"{k}={v}" for k, v in fields.items()),
                      markup=False)
    console.print(f"  [noise] {noise} (aihwkit {type(model).__name__}): "
                  + "  ".join(f"{k}={v}" for k, v in used.items()), markup=False)


@cli.command()
def models() -> None:
    """List built-in model names."""
    from hetmap.compiler.frontend.builtin import BUILTIN_MODELS, TRAINED_MODELS
    from hetmap.compiler.frontend.zoo import ZOO

    for name, (directory, description) in TRAINED_MODELS.items():
        if (directory / "config.json").is_file():
            console.print(f"  {name:<20} trained: {description}")
    for model in BUILTIN_MODELS.values():
        console.print(f"  {model.name:<20} {model.description}")
    for family in (f for f in ZOO.values() if f.kind != "encoder-decoder"):
        console.print(f"  tiny:{family.name:<15} {family.model_type} config of transformers, "
                      f"tiny ({family.kind}, random)", markup=False)


def _origin(origin: str) -> str:
    return "" if origin == "built-in" else f"  [dim]({origin})[/]"


def _warn_plugins(registries: Any) -> None:
    for problem in registries.problems:
        err.print(f"warning: {problem}")


def quiet_third_party() -> None:
    """Keep third-party warnings (torch.onnx's registration notes, deprecations inside
    transformers or torch) off stderr: they are not the user's to act on. ``-v`` keeps them."""
    import logging
    import warnings

    import torch  # noqa: F401 - importing torch resets its loggers' levels: set them after

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|onnx)")
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hetmap`` console script."""
    args = argv if argv is not None else sys.argv[1:]
    show_tb = "--traceback" in args
    if not {"-v", "--verbose"} & set(args):
        quiet_third_party()
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="hetmap")
    except click.exceptions.Abort:
        err.print("error: interrupted")
        return 130
    except click.UsageError as exc:  # one line, like every other user error
        command = exc.ctx.command_path if exc.ctx is not None else "hetmap"
        err.print(f"error: {exc.format_message()} (see '{command} --help')", markup=False,
                  soft_wrap=True)
        return exc.exit_code
    except click.ClickException as exc:
        err.print(f"error: {exc.format_message()}", markup=False, soft_wrap=True)
        return exc.exit_code
    except HetmapError as exc:
        if show_tb:
            raise
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("error: interrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): nothing to report
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def run() -> None:
    """Console-script entry: :func:`main` made interruptible (see
    :func:`hetmap.compiler.launch.run_interruptible`)."""
    from hetmap.compiler.launch import run_interruptible

    sys.exit(run_interruptible(sys.argv[1:]))
