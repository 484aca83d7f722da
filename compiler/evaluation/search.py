"""``search``: the smallest digital budget whose mapped perplexity stays within a relative loss
of the all-digital model.

Reads: a base plan whose analysis passes have run (``density,expert-score``, plus
``sensitivity`` for the ``measured`` policy). Writes nothing: returns a :class:`SearchResult`
with every step it took and the chosen plan.

Rules:

1. Candidates are the budgets that give distinct placements short of all-digital: one budget
   per distinct tuple of digital expert counts over the placement groups (each MoE layer for
   ``budget_scope=layer``, all experts for ``global``), preferably a simple ``k / n``
   (``k / 8`` for eight experts a layer). All-digital meets any loss and is no candidate.
2. A budget is mapped on a copy of the base graph (``place``, ``tile``, ``allocate``, ``cost``)
   and simulated over ``seeds`` programming seeds on the evaluation text (never the
   calibration text). Its loss is ``(mean + std) / digital - 1``, a one-std margin over
   the seeds; it passes when the loss is at most ``max_loss``. A budget whose analog part does
   not fit the target's arrays fails without simulation. The all-digital perplexity, the model
   and the evaluation windows are computed once. The tiles are programmed as ``simulate``
   programs them (``programming``: ``auto`` decides per budget from its tile memory and the
   device's free memory; the result's settings name the modes used and why).
3. Bisection over the candidates, assuming more digital experts never hurt: the answer is the
   smallest candidate that passes whose next smaller candidate fails (or the smallest of all),
   after ``ceil(log2(m + 1))`` evaluations for ``m`` candidates; each is evaluated at most once.
4. When no candidate passes, the result has no plan; :meth:`SearchResult.require_plan` raises
   :class:`NoBudgetError` naming the best loss found.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hetmap.common.errors import CapacityError, SimulationError
from hetmap.compiler.passes.place import budget_count

if TYPE_CHECKING:
    from hetmap.compiler.api import Plan
    from hetmap.compiler.ir.graph import Graph
    from hetmap.compiler.registry import Registries

MAP_PIPELINE = "place,tile,allocate,cost"
METRICS = ("ppl",)
Progress = Callable[[str, int], Callable[[int], None]]


class NoBudgetError(SimulationError):
    """No budget short of all-digital keeps the loss within the limit."""


def parse_loss(text: str) -> float:
    """``"1%"`` -> 0.01; a bare number is a fraction below 1 (``"0.01"``)."""
    value = text.strip()
    percent = value.endswith("%")
    try:
        number = float(value.rstrip("%").strip())
    except ValueError:
        raise SimulationError(f"--max-loss must be a percentage like 1% or a fraction like "
                              f"0.01, got {text!r}") from None
    if not math.isfinite(number) or number < 0:
        raise SimulationError(f"--max-loss must be a non-negative loss, got {text!r}")
    if not percent and number >= 1:
        raise SimulationError(f"--max-loss {text!r} is ambiguous: write {number:g}% for a "
                              f"percentage or a fraction below 1")
    return number / 100 if percent else number


def candidate_budgets(group_sizes: list[int]) -> list[float]:
    """Budgets with distinct placements short of all-digital, smallest first (rule 1).

    A group of ``n`` experts changes its digital count at the budgets ``(k - 1/2) / n`` (the
    place pass rounds halves up); every interval between two such edges is one placement. Each
    is represented by its smallest simple fraction ``k / n`` where one lies in it, else by the
    interval's midpoint."""
    sizes = sorted({n for n in group_sizes if n > 0})
    simple = sorted({k / n for n in sizes for k in range(n + 1)})
    edges = sorted({0.0, 1.0} | {(k - 0.5) / n for n in sizes for k in range(1, n + 1)})
    midpoints = sorted((a + b) / 2 for a, b in zip(edges, edges[1:], strict=False))
    full = tuple(group_sizes)
    chosen: dict[tuple[int, ...], float] = {}
    for value in [*simple, *midpoints]:  # simple fractions first: they win their placement
        budget = round(value, 6)
        counts = tuple(budget_count(budget, n) for n in group_sizes)
        if counts != full and counts not in chosen:
            chosen[counts] = budget
    return sorted(chosen.values())


def bisect_smallest(count: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest index in ``[0, count)`` for which ``passes`` holds, if it holds for every
    index above some threshold; ``None`` if it holds for none. Index ``count`` (all-digital) is
    taken to pass, so ``ceil(log2(count + 1))`` calls are made."""
    failing, passing = -1, count
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if passes(middle):
            passing = middle
        else:
            failing = middle
    return passing if passing < count else None


@dataclass(frozen=True)
class SearchStep:
    """One evaluated budget."""

    budget: float
    experts_digital: int
    experts_total: int
    digital_fraction: float
    ppl: tuple[float, ...]
    digital_ppl: float
    max_loss: float
    energy_per_token_j: float | None = None
    latency_per_token_s: float | None = None
    fits: bool = True

    @property
    def ppl_mean(self) -> float:
        return statistics.fmean(self.ppl) if self.ppl else math.inf

    @property
    def ppl_std(self) -> float:
        return statistics.stdev(self.ppl) if len(self.ppl) > 1 else 0.0

    @property
    def loss(self) -> float:
        """Relative perplexity increase over all-digital, mean + one std over seeds."""
        return (self.ppl_mean + self.ppl_std) / self.digital_ppl - 1.0

    @property
    def passed(self) -> bool:
        return self.fits and self.loss <= self.max_loss

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, "experts_digital": self.experts_digital,
                "experts_total": self.experts_total, "digital_fraction": self.digital_fraction,
                "fits": self.fits, "ppl": list(self.ppl),
                "ppl_mean": self.ppl_mean if self.fits else None,
                "ppl_std": self.ppl_std if self.fits else None,
                "loss": self.loss if self.fits else None, "passed": self.passed,
                "energy_per_token_j": self.energy_per_token_j,
                "latency_per_token_s": self.latency_per_token_s}


@dataclass
class SearchResult:
    """The path a search took and what it chose (``plan`` is None when nothing passed)."""

    max_loss: float
    digital_ppl: float
    policy: str
    budget_scope: str
    candidates: list[float]
    steps: list[SearchStep]
    chosen: SearchStep | None
    plan: Plan | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> SearchStep | None:
        fitting = [s for s in self.steps if s.fits]
        return min(fitting, key=lambda s: s.loss) if fitting else None

    def require_plan(self) -> Plan:
        """The chosen plan, or :class:`NoBudgetError` saying the best loss found."""
        if self.plan is not None:
            return self.plan
        best = self.best
        found = (f"the best evaluated, budget {best.budget:g} ({best.experts_digital} of "
                 f"{best.experts_total} experts digital), loses {best.loss:+.2%}"
                 if best is not None else "no evaluated budget fits the target")
        raise NoBudgetError(f"no budget short of all-digital keeps the perplexity loss within "
                            f"{self.max_loss:.2%} ({self.policy}, {len(self.candidates)} "
                            f"candidates); {found}. Allow a larger --max-loss or try another --policy")

    def to_json(self) -> dict[str, Any]:
        return {"max_loss": self.max_loss, "digital_ppl": self.digital_ppl,
                "policy": self.policy, "budget_scope": self.budget_scope,
                "criterion": "(mean + std over seeds) / digital - 1 <= max_loss",
                "candidates": self.candidates, "settings": self.settings,
                "steps": [s.to_json() for s in self.steps],
                "chosen": self.chosen.to_json() if self.chosen is not None else None}


def check_search(metric: str, policy: str, registries: Registries) -> None:
    """Fail before any work for a metric or policy a search cannot use."""
    if metric not in METRICS:
        raise SimulationError(f"--metric {metric!r} is not available: search measures "
                              f"{', '.join(METRICS)} (perplexity on the evaluation text)")
    if getattr(registries.policies.get(policy), "fixed", None) is not None:
        raise SimulationError(f"policy {policy!r} places experts whatever the budget; search "
                              "needs a ranking policy (see 'hetmap passes')")


def group_sizes(graph: Graph, budget_scope: str) -> list[int]:
    """Expert counts of the placement groups: each MoE layer, or all experts at once."""
    if budget_scope == "global":
        return [len(graph.experts())]
    return [len(experts) for experts in graph.experts_by_layer().values()]


def map_budget(base: Plan, budget: float, *, policy: str, budget_scope: str,
               registries: Registries, seed: int = 0, chips: int | str | None = None,
               granularity: str = "expert") -> Plan:
    """``base`` (analysed) placed and mapped at ``budget`` on a copy of its graph."""
    from hetmap.compiler.api import Plan
    from hetmap.compiler.passes.base import CompileContext
    from hetmap.compiler.passes.manager import build_passes, run_pipeline
    from hetmap.compiler.passes.pipeline import parse_pipeline

    options: dict[str, Any] = {"policy": policy, "budget": budget, "budget_scope": budget_scope,
                               "chips": chips, "granularity": granularity}
    passes = build_passes(parse_pipeline(MAP_PIPELINE), registries.passes, options)
    ctx = CompileContext(model=base.model, target=base.target, registries=registries, seed=seed)
    run = run_pipeline(copy.deepcopy(base.graph), passes, ctx)
    recorded = {**base.options, **{k: v for k, v in options.items() if v is not None}}
    return Plan(run.graph, base.model, base.target, f"{base.pipeline},{MAP_PIPELINE}",
                [*base.timings, *run.timings], recorded)


class _Evaluator:
    """The model, evaluation windows and all-digital perplexity, prepared once (rule 2)."""

    def __init__(self, base: Plan, settings: Any, eval_file: str | None, eval_tokens: int,
                 seq_len: int, device: str, programming: str = "auto") -> None:
        from hetmap.compiler.data.textdata import batches, load_tokens
        from hetmap.compiler.evaluation.simulate import perplexity

        self.model = base.model.runnable().to(device)
        self.windows = batches(load_tokens(base.model, eval_file, "eval", eval_tokens), seq_len, 8)
        self.settings = settings
        self.device = device
        self.programming = programming
        #: programming modes used, each with why (the first budget that used it)
        self.modes: dict[str, str] = {}
        self.digital_ppl = perplexity(self.model, self.windows, device)

    @property
    def tokens(self) -> int:
        return int(sum(w.numel() for w in self.windows))

    def mapped_ppl(self, plan: Plan, seeds: range, advance: Callable[[int], None]) -> list[float]:
        from hetmap.compiler.evaluation.simulate import analog_part, perplexity, programming_mode

        part = analog_part(plan.graph, self.model)
        mode, reason = programming_mode(self.programming, part, self.model, self.device, False)
        self.modes.setdefault(mode, reason)
        settings = dataclasses.replace(self.settings, programming=mode)
        values = []
        for seed in seeds:
            simulated = part.build(self.model, settings, seed)
            values.append(perplexity(simulated.to(self.device), self.windows, self.device))
            del simulated
            advance(1)
        return values


def search_budget(base: Plan, *, max_loss: float, policy: str, budget_scope: str = "layer",
                  seeds: int = 3, seed: int = 0, noise_scale: float | None = None,
                  drift_time: float | None = None, eval_file: str | None = None,
                  eval_tokens: int = 8192, seq_len: int = 256, device: str = "cpu",
                  chips: int | str | None = None, registries: Registries | None = None,
                  progress: Progress | None = None,
                  on_step: Callable[[SearchStep], None] | None = None,
                  granularity: str = "expert", programming: str = "auto",
                  kernels: str = "eager") -> SearchResult:
    """Bisect the candidate budgets of ``base`` for the smallest within ``max_loss`` (rules 1-4)."""
    from hetmap.compiler.evaluation.simulate import check_kernels, check_programming
    from hetmap.compiler.registry import load_registries
    from hetmap.runtime.settings import settings_for

    if seeds < 1:
        raise SimulationError(f"--seeds must be at least 1, got {seeds}")
    check_programming(programming)
    check_kernels(kernels)
    registries = registries or load_registries()
    candidates = candidate_budgets(group_sizes(base.graph, budget_scope))
    settings = settings_for(base.target, noise_scale=noise_scale, drift_time=drift_time,
                            kernels=kernels)
    evaluator = _Evaluator(base, settings, eval_file, eval_tokens, seq_len, device, programming)
    make_bar = progress or (lambda _d, _t: (lambda _n: None))
    steps: dict[int, SearchStep] = {}
    plans: dict[int, Plan] = {}

    def passes(index: int) -> bool:
        budget = candidates[index]
        try:
            plan = map_budget(base, budget, policy=policy, budget_scope=budget_scope,
                              registries=registries, seed=seed, chips=chips,
                              granularity=granularity)
        except CapacityError:
            step = _step(base.graph, budget, budget_scope, (), evaluator.digital_ppl, max_loss,
                         None, fits=False)
        else:
            advance = make_bar(f"budget {budget:g}", seeds)
            ppl = evaluator.mapped_ppl(plan, range(seed, seed + seeds), advance)
            step = _step(plan.graph, budget, budget_scope, tuple(ppl), evaluator.digital_ppl,
                         max_loss, plan.summary)
            plans[index] = plan
        steps[index] = step
        if on_step is not None:
            on_step(step)
        return step.passed

    found = bisect_smallest(len(candidates), passes)
    settings_json = {**settings.to_dict(), "seeds": list(range(seed, seed + seeds)),
                     "eval_tokens": evaluator.tokens, "eval_source": eval_file or "corpus:eval",
                     "device": device, "granularity": granularity,
                     "programming": ", ".join(evaluator.modes) or "none (no budget simulated)",
                     "programming_reason": "; ".join(evaluator.modes.values())}
    return SearchResult(max_loss, evaluator.digital_ppl, policy, budget_scope, candidates,
                        list(steps.values()), steps[found] if found is not None else None,
                        plans[found] if found is not None else None, settings_json)


def _step(graph: Graph, budget: float, budget_scope: str, ppl: tuple[float, ...],
          digital_ppl: float, max_loss: float, summary: dict[str, Any] | None,
          fits: bool = True) -> SearchStep:
    sizes = group_sizes(graph, budget_scope)
    counted = sum(budget_count(budget, n) for n in sizes)
    return SearchStep(
        budget=budget, experts_digital=summary["experts_digital"] if summary else counted,
        experts_total=sum(sizes), ppl=ppl, digital_ppl=digital_ppl, max_loss=max_loss,
        digital_fraction=summary["digital_param_fraction"] if summary else math.nan,
        energy_per_token_j=(summary or {}).get("energy_per_token_j"),
        latency_per_token_s=(summary or {}).get("latency_per_token_s"), fits=fits)
