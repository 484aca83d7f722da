"""hetmap's Python API, exposed as ``import hetmap``; the CLI is a thin layer over it.

    import hetmap
    plan = hetmap.compile("demo", policy="activation-frequency", budget=0.25)
    print(plan.summary["digital_param_fraction"], plan.placement("model.layers.0.mlp.experts.3"))
    plan.write("out/demo-af", force=True)         # plan.json + ir.txt
    plan.emit_onnx("out/demo-af")                 # model.onnx with placement metadata
    result = plan.simulate(seeds=3)               # perplexity all-digital vs mapped
    print(result.digital_ppl, result.mapped_ppl_mean, result.mapped_ppl_std)
    accuracy = plan.evaluate(["piqa"], seeds=3)   # lm-eval task accuracy, digital vs mapped
    same = hetmap.load_plan("out/demo-af")        # a plan directory back as a Plan
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any

from torch import nn

from hetmap.common.errors import HetmapError, OutputError, TargetError
from hetmap.compiler.backends.plan import (
    IR_FILE,
    PLAN_FILE,
    SCHEMA_VERSION,
    atomic_directory,
    node_json,
    restore_annotations,
    summarize,
    write_plan,
)
from hetmap.compiler.frontend import LoadedModel, import_model, load_model
from hetmap.compiler.ir.annotations import Density, Placement
from hetmap.compiler.ir.graph import Graph, Node
from hetmap.compiler.passes.base import CompileContext
from hetmap.compiler.passes.contracts import Provenance
from hetmap.compiler.passes.manager import PassTiming, build_passes, check_contracts, run_pipeline
from hetmap.compiler.passes.pipeline import parse_pipeline
from hetmap.compiler.registry import Registries, load_registries

if TYPE_CHECKING:
    from hetmap.compiler.evaluation.search import SearchResult, SearchStep

DEFAULT_PIPELINE = "density,expert-score,place,tile,allocate,cost"
#: the default pipeline for policies that rank by a costly analysis pass of their own
POLICY_PIPELINES = {"measured": "density,expert-score,sensitivity,place,tile,allocate,cost"}


def version() -> str:
    try:
        return importlib.metadata.version("hetmap")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "0+unknown"


def resolve_target(name_or_path: str, registries: Registries) -> Any:
    """A target by registered name (built-in or plugin) or TOML file path."""
    from hetmap.targets import Target, load_target_file

    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return load_target_file(name_or_path)
    if name_or_path not in registries.targets:
        known = ", ".join(sorted(registries.targets.entries))
        raise TargetError(f"unknown target {name_or_path!r} (known: {known}; or a .toml file)")
    value = registries.targets.get(name_or_path)
    if isinstance(value, Target):
        return value
    if callable(value) and not isinstance(value, (str, Path)):
        value = value()
        if isinstance(value, Target):
            return value
    return load_target_file(value)


@dataclass
class Plan:
    """A compiled plan: the annotated IR plus how it was made."""

    graph: Graph
    model: LoadedModel
    target: Any
    pipeline: str
    timings: list[PassTiming] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.graph)

    def placement(self, name: str) -> Placement | None:
        return self.graph.node(name).get(Placement)

    def nodes(self) -> list[Node]:
        return list(self.graph)

    def header(self) -> dict[str, Any]:
        """plan.json without its per-node list (what summaries and reports need)."""
        provenance = self.graph.get(Provenance)
        return {
            "schema_version": SCHEMA_VERSION,
            "hetmap_version": version(),
            "model": {"spec": _portable_spec(self.model.spec), "name": self.model.name,
                      "source": self.model.source},
            "target": self.target.to_json(),
            "pipeline": self.pipeline,
            "options": self.options,
            **({"provided": provenance.providers()} if provenance is not None else {}),
            "timings": [{"pass": t.name, "seconds": round(t.seconds, 4)} for t in self.timings],
            "summary": self.summary,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.header(), "nodes": [node_json(n) for n in self.graph]}

    def emit_onnx(self, out_dir: str | Path, *, tiles: bool = False, moe: str | None = None,
                  external_data: bool = False) -> list[Path]:
        """Write ``out_dir/model.onnx`` with placement metadata (see the onnx emitter);
        ``moe``: ``static``, ``dispatch`` (default) or ``ort``."""
        from hetmap.compiler.backends.onnx_emitter import emit_onnx

        return emit_onnx(self, Path(out_dir), tiles=tiles, moe=moe, external_data=external_data)

    def simulate(self, **options: Any) -> Any:
        """Perplexity all-digital vs mapped; see :func:`hetmap.compiler.evaluation.simulate.simulate_plan`."""
        from hetmap.compiler.evaluation.simulate import simulate_plan

        return simulate_plan(self, **options)

    def evaluate(self, tasks: Any = None, **options: Any) -> Any:
        """Downstream-task accuracy (lm-eval) all-digital vs mapped, ``tasks`` defaulting to the
        paper's eight; see :func:`hetmap.compiler.evaluation.lmeval.evaluate_plan`."""
        lmeval = require_lm_eval()
        return lmeval.evaluate_plan(self, lmeval.PAPER_TASKS if tasks is None else tasks, **options)

    def write(self, out: str | Path, *, force: bool = False,
              extra: Callable[[Path], None] | None = None) -> Path:
        """Write plan.json and ir.txt (and whatever ``extra`` adds) atomically into ``out``."""
        out = Path(out)
        with atomic_directory(out, force) as staging:
            write_plan(staging / PLAN_FILE, self.to_json())
            (staging / IR_FILE).write_text(str(self.graph))
            if extra is not None:
                extra(staging)
        return out


def require_lm_eval() -> ModuleType:
    """:mod:`hetmap.compiler.evaluation.lmeval`, or a one-line error when lm-eval (the optional
    ``eval`` extra) is not installed."""
    try:
        from hetmap.compiler.evaluation import lmeval
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("lm_eval"):
            raise
        from hetmap.common.errors import SimulationError

        raise SimulationError("downstream accuracy needs lm-evaluation-harness: pip install "
                              "'hetmap[eval]' ('make venv' installs it)") from exc
    return lmeval


def _portable_spec(spec: str) -> str:
    """Model specs that name files are stored absolute, so a plan can be reloaded anywhere."""
    path, colon, function = spec.rpartition(":")
    if colon and Path(path).is_file():
        return f"{Path(path).resolve()}:{function}"
    if Path(spec).is_dir():
        return str(Path(spec).resolve())
    return spec


def load_plan(out: str | Path, *, registries: Registries | None = None) -> Plan:
    """Rebuild a :class:`Plan` from a compiled plan directory: plan.json is validated against
    its schema, the model it names is imported again, the plan is checked against that model
    (node names, kinds, matrix shapes, parameter counts) and every annotation plan.json
    records is restored onto the IR (placements, densities, scores, tiles, arrays, the
    allocation and cost summaries), so the loaded plan equals the compiled one."""
    from hetmap.compiler.backends.plan import read_plan
    from hetmap.targets import target_from_dict

    data = read_plan(Path(out))
    registries = registries or load_registries()
    loaded = load_model(data["model"]["spec"], dtype=str(data["options"].get("dtype", "auto")))
    if loaded.name != data["model"]["name"]:
        raise OutputError(f"{out}/plan.json was compiled for model {data['model']['name']!r}, "
                          f"but {data['model']['spec']!r} now loads {loaded.name!r}; recompile it")
    graph = import_model(loaded, allow_dense=bool(data.get("options", {}).get("allow_dense")))
    target = target_from_dict(data["target"], source=f"{out}/plan.json")
    restore_annotations(graph, data, target, registries.passes, source=f"{out}/plan.json")
    return Plan(graph, loaded, target, data["pipeline"], [], data.get("options", {}))


def compile_model(model: str | nn.Module | LoadedModel, *, target: str = "aimc-512",
                  pipeline: str | None = None, seed: int = 0, trust_remote_code: bool = False,
                  dtype: str = "auto",
                  allow_dense: bool = False, registries: Registries | None = None, dump_dir: Path | None = None,
                  progress: Callable[[str, int], Callable[[int], None]] | None = None,
                  on_pass: Callable[[PassTiming], None] | None = None,
                  log: Callable[[str], None] | None = None,
                  **options: Any) -> Plan:
    """Compile ``model`` (a MODEL string, an nn.Module or a LoadedModel) into a :class:`Plan`.

    ``options`` fill pass options the pipeline text does not set (``policy``, ``budget``,
    ``calib_tokens``, ``chips``, ...); an option no pass in the pipeline takes is an error.
    A model in which no MoE block is found is an error unless ``allow_dense`` is set.
    """
    from hetmap.runtime import require_aihwkit

    require_aihwkit()  # the passes' noise models and the simulator are aihwkit's
    registries = registries or load_registries()
    text = pipeline or POLICY_PIPELINES.get(str(options.get("policy")), DEFAULT_PIPELINE)
    specs = parse_pipeline(text)
    passes = build_passes(specs, registries.passes, options)
    used = {k for p in passes for k in getattr(p, "__dataclass_fields__", {})}
    unused = sorted(k for k, v in options.items() if v is not None and k not in used)
    if unused:
        from hetmap.common.errors import PipelineError

        raise PipelineError(f"option(s) {', '.join(unused)} not taken by any pass of "
                            f"pipeline {text!r}")
    check_contracts(None, passes, SimpleNamespace(registries=registries))
    if isinstance(model, str):
        loaded = load_model(model, trust_remote_code=trust_remote_code, dtype=dtype)
    elif isinstance(model, nn.Module):
        loaded = LoadedModel(spec=type(model).__name__, name=type(model).__name__,
                             source="module", module=model.eval(), config=getattr(model, "config", None))
    else:
        loaded = model
    ctx = CompileContext(model=loaded, target=resolve_target(target, registries),
                         registries=registries, seed=seed)
    if progress is not None:
        ctx.progress = progress
    if log is not None:
        ctx.log = log
    graph = import_model(loaded, allow_dense=allow_dense)
    run = run_pipeline(graph, passes, ctx, dump_dir=dump_dir, on_pass=on_pass)
    recorded = {"seed": seed, "dtype": str(loaded.dtype).removeprefix("torch."),
                **({"allow_dense": True} if allow_dense else {}),
                **{k: v for k, v in options.items() if v is not None}}
    calibrated = [d.tokens for n in run.graph
                  if (d := n.get(Density)) is not None and d.source == "calibration"]
    if calibrated:  # what was used, which a short text makes less than what was asked
        recorded["calib_tokens_used"] = max(calibrated)
    return Plan(run.graph, loaded, ctx.target, ",".join(str(s) for s in specs), run.timings,
                recorded)


def run_sweep(model: str, *, policies: list[str], budgets: list[float], noise_scales: list[float],
              seeds: int, out: str | Path, seed: int = 0, target: str = "aimc-512",
              calib_tokens: int | None = None, eval_file: str | None = None,
              eval_tokens: int = 8192, seq_len: int = 256, workers: int = 0,
              ray: str | None = None, force: bool = False, resume: bool = False,
              progress: Callable[[str, int], Callable[[int], None]] | None = None,
              granularity: str = "expert", programming: str = "auto",
              kernels: str = "eager") -> dict[str, Any]:
    """The trade-off study of :mod:`hetmap.compiler.evaluation.sweep`; writes
    sweep.csv/json/png to ``out``. Each finished point is recorded beside ``out`` as it
    completes; ``resume`` continues an interrupted sweep from those records (same numbers as
    an uninterrupted run), and without it a sweep that left records is refused. A policy
    written ``NAME@neuron`` (or ``NAME@expert``) is placed at that granularity, the others at
    ``granularity``. ``programming`` is simulate's (``auto``: decided per point by the process
    that simulates it, from its free memory); ``kernels`` is simulate's too."""
    import copy

    from hetmap.compiler.data.textdata import batches, load_tokens
    from hetmap.compiler.evaluation import sweep as sweeping
    from hetmap.compiler.evaluation.simulate import (
        check_kernels,
        check_programming,
        perplexity,
        settings_for,
    )

    check_programming(programming)
    check_kernels(kernels)
    registries = load_registries()
    for policy in policies:
        registries.policies.get(sweeping.split_policy(policy, granularity)[0])  # fail early
    record = sweeping.SweepProgress(Path(out))
    done = record.load() if resume else {}
    if not resume and record.path.is_file():
        raise OutputError(f"an interrupted sweep into {out} left {len(record.load())} finished "
                          f"point(s) in {record.path}: pass --resume to continue it, or delete "
                          "that file to start over")
    units = {sweeping.split_policy(policy, granularity)[1] for policy in policies}
    base = compile_model(model, target=target, pipeline="density,expert-score",
                         registries=registries, progress=progress, calib_tokens=calib_tokens,
                         granularity="neuron" if "neuron" in units else "expert")
    plans = []
    for policy in policies:
        for budget in budgets:
            graph = copy.deepcopy(base.graph)
            name, unit = sweeping.split_policy(policy, granularity)
            specs = parse_pipeline(f"place{{policy={name},budget={budget},granularity={unit}}},"
                                   "tile,allocate{chips=auto},cost")
            ctx = CompileContext(model=base.model, target=base.target, registries=registries, seed=seed)
            run = run_pipeline(graph, build_passes(specs, registries.passes), ctx)
            plans.append((policy, budget, Plan(run.graph, base.model, base.target, base.pipeline)))
    points = sweeping.sweep_points(
        base.model.spec, plans, noise_scales, seeds, seed,
        lambda scale: settings_for(base.target, noise_scale=scale, kernels=kernels), eval_file,
        eval_tokens, seq_len, programming)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as every sweep point
    try:
        tokens = load_tokens(base.model, eval_file, "eval", eval_tokens)
        digital = perplexity(base.model.runnable(), batches(tokens, seq_len, 8))
    finally:
        torch.set_num_threads(threads)
    reused = sum(1 for p in points if sweeping.point_key(p) in done)
    record.start(keep=resume)
    try:
        values = sweeping.run_points(points, workers=workers, ray=ray, progress=progress,
                                     done=done, record=record.record)
    finally:
        record.close()
    summary = sweeping.summarize_points(points, values)
    extra = {"model": base.model.spec, "target": base.target.name, "digital_ppl": digital,
             "policies": policies, "budgets": budgets, "noise_scales": noise_scales,
             "seeds": seeds, "eval_tokens": eval_tokens, "eval_source": eval_file or "corpus:eval",
             "programming": programming, "kernels": kernels}
    extra["resumed_points"] = reused
    with atomic_directory(Path(out), force) as staging:
        sweeping.write_outputs(staging, points, values, summary, extra)
    record.finish()
    return {**extra, "summary": summary, "points": values}


def search(model: str | nn.Module | LoadedModel, *, max_loss: float, metric: str = "ppl",
           policy: str | None = None, budget_scope: str = "layer", seeds: int = 3, seed: int = 0,
           noise_scale: float | None = None, drift_time: float | None = None,
           target: str = "aimc-512", calib: str | None = None, calib_tokens: int | None = None,
           chips: int | str | None = None, eval_file: str | None = None, eval_tokens: int = 8192,
           device: str = "cpu", trust_remote_code: bool = False,
           registries: Registries | None = None,
           progress: Callable[[str, int], Callable[[int], None]] | None = None,
           on_step: Callable[[SearchStep], None] | None = None,
           granularity: str = "expert", programming: str = "auto",
           kernels: str = "eager") -> SearchResult:
    """The smallest digital budget whose mapped perplexity (mean + one std over ``seeds``) stays
    within ``max_loss`` (a fraction: 0.01 is 1%) of all-digital; see
    :mod:`hetmap.compiler.evaluation.search`. Calibration and scores are computed once. Returns
    a ``SearchResult``: its ``steps``, ``chosen`` step and ``plan`` (None when nothing passed;
    ``require_plan()`` then raises the one-line error)."""
    from hetmap.compiler.evaluation.search import check_search, search_budget
    from hetmap.compiler.evaluation.simulate import check_kernels, check_programming
    from hetmap.compiler.passes.place import PlacePass

    registries = registries or load_registries()
    policy = policy or PlacePass.policy
    check_search(metric, policy, registries)
    check_programming(programming)  # before the analysis passes run
    check_kernels(kernels)
    analysis = POLICY_PIPELINES.get(policy, DEFAULT_PIPELINE).split(",place")[0]
    base = compile_model(model, target=target, pipeline=analysis, seed=seed,
                         trust_remote_code=trust_remote_code, registries=registries,
                         progress=progress, calib=calib, calib_tokens=calib_tokens,
                         granularity=granularity)
    return search_budget(base, max_loss=max_loss, policy=policy, budget_scope=budget_scope,
                         seeds=seeds, seed=seed, noise_scale=noise_scale, drift_time=drift_time,
                         eval_file=eval_file, eval_tokens=eval_tokens, device=device, chips=chips,
                         registries=registries, progress=progress, on_step=on_step,
                         granularity=granularity, programming=programming, kernels=kernels)


__all__ = ["DEFAULT_PIPELINE", "HetmapError", "Plan", "compile_model", "load_plan", "resolve_target",
           "run_sweep", "search", "version"]
