"""Downstream-task accuracy of a plan through lm-evaluation-harness (``lm-eval``): the paper's
metric, the all-digital model once and the mapped model per programming seed.

Rules:

1. A model runs in lm-eval as a :class:`HetmapLM` (an lm-eval ``TemplateLM``): text becomes the
   ids of the model's Hugging Face tokenizer when it has one, else hetmap's byte-level tokens
   (token = byte % vocabulary size, as the corpus tokenizes; the end-of-text and empty-context
   prefix token is the newline byte). Sequences longer than the model's
   ``max_position_embeddings`` keep their last tokens. A model without a vocabulary size is a
   one-line error.
2. Tasks are lm-eval task, group or tag names, or names of YAML tasks under ``include_path``
   (lm-eval's ``TaskManager(include_path=...)``). When every name is found under
   ``include_path`` the built-in catalogue is not indexed (it takes tens of seconds). An
   unknown name, or a task whose data set must be downloaded and cannot be, is a one-line
   error naming the task. Each task's data are loaded once and shared by every run.
3. Every run (digital, then seeds ``seed .. seed+seeds-1``) is lm-eval's own
   ``simple_evaluate`` with the same tasks, ``limit``, ``num_fewshot`` and lm-eval's default
   random seeds; the metrics are lm-eval's (``acc``, ``acc_norm``, ... of the unfiltered
   output), never recomputed here.
4. The mapped model of a seed is built as ``simulate`` builds it (same analog part, settings
   and seeded programming noise). Mapped values are the mean and sample standard deviation
   over seeds; the average over tasks (of ``acc``) is taken per seed first.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from hetmap.common.errors import MissingDataError, SimulationError
from hetmap.compiler.frontend.loader import LoadedModel

if TYPE_CHECKING:
    from hetmap.compiler.api import Plan

#: the eight zero-shot tasks the paper averages (lm-eval names)
PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande",
               "mathqa", "mmlu")
#: the metric averaged over tasks
AVERAGE_METRIC = "acc"
BYTE_EOT = ord("\n")
DEFAULT_MAX_LENGTH = 2048


class HetmapLM(TemplateLM):
    """An ``nn.Module`` language model as lm-eval sees it (rule 1)."""

    def __init__(self, model: nn.Module, *, vocab_size: int, tokenizer: Any = None,
                 max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8,
                 device: str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.batch_size = batch_size
        self._device = torch.device(device)

    @classmethod
    def for_model(cls, loaded: LoadedModel, model: nn.Module, **options: Any) -> HetmapLM:
        vocab = loaded.vocab_size
        if vocab is None:
            raise MissingDataError(f"model {loaded.name!r} has no vocabulary size (no config and no "
                                   "nn.Embedding): lm-eval tasks need text tokenized for it")
        length = getattr(loaded.config, "max_position_embeddings", None)
        return cls(model, vocab_size=vocab, tokenizer=loaded.tokenizer,
                   max_length=length if isinstance(length, int) else DEFAULT_MAX_LENGTH, **options)

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos) if eos is not None else BYTE_EOT % self.vocab_size

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))
        return [byte % self.vocab_size for byte in string.encode("utf-8")]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        if self.tokenizer is not None:
            return str(self.tokenizer.decode(list(tokens)))
        return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")

    def _logits(self, sequences: list[list[int]]) -> torch.Tensor:
        """Next-token logits [batch, longest, vocab] of right-padded sequences (on the device;
        a causal model's logits at a position do not depend on the padding after it)."""
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.eot_token_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        with torch.no_grad():
            output = self.model(ids.to(self._device))
        return output.logits if hasattr(output, "logits") else output

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities, and whether it is the greedy one."""
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chosen]
            logits = self._logits(inputs)
            for row, index in enumerate(chosen):
                key, _, continuation = requests[index]
                scored = continuation[-len(inputs[row]):]
                end = len(inputs[row])
                rows = torch.log_softmax(logits[row, end - len(scored):end].float(), dim=-1).cpu()
                target = torch.tensor(scored, dtype=torch.long)
                value = float(rows.gather(1, target[:, None]).sum())
                answers[index] = (value, bool((rows.argmax(dim=-1) == target).all()))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answers[index])
        return answers

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = True) -> list[float]:
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, context, target) for context, target in windows])
            totals.append(sum(score for score, _ in scores))
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = True) -> list[str]:
        """Greedy decoding (no cache: for the short answers of generative tasks)."""
        outputs = []
        for context, options in (request.args for request in requests):
            until = options.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            tokens = self.tok_encode(context)
            produced: list[int] = []
            text = ""
            for _ in range(int(options.get("max_gen_toks", 256))):
                token = int(self._logits([(tokens + produced)[-self.max_length:]])[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                produced.append(token)
                text = self.tok_decode(produced)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, options), text)
        return outputs


@dataclass(frozen=True)
class TaskSet:
    """Loaded lm-eval Task/Group objects, and the names results are reported under (a task or
    group by its name, a tag by the names of its tasks)."""

    objects: tuple[Any, ...]
    names: tuple[str, ...]
    #: reported name -> the names of the tasks it runs (a group's leaves, or itself)
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)


def load_tasks(names: Sequence[str], include_path: str | Path | None = None) -> TaskSet:
    """lm-eval tasks for ``names``, their data loaded (rule 2)."""
    if not names:
        raise SimulationError("no task given: pass --tasks NAME[,NAME...]")
    if include_path is not None and not Path(include_path).is_dir():
        raise SimulationError(f"--include-path {include_path} is not a directory of lm-eval "
                              "task YAML files")
    manager = TaskManager(include_path=str(include_path), include_defaults=False) \
        if include_path is not None else None
    if manager is None or any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    loaded: list[Any] = []
    members: dict[str, tuple[str, ...]] = {}
    for name in names:
        if name not in manager.all_tasks:
            where = f" nor a task YAML under {include_path}" if include_path else \
                " (pass --include-path DIR for a local task YAML)"
            raise SimulationError(f"unknown task {name!r}: not an lm-eval task, group or tag{where}")
        try:
            result = manager.load([name])
        except (ConnectionError, OSError) as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SimulationError(
                f"task {name!r} cannot load its data set ({cause}); a task whose data must be "
                "downloaded needs network access: use local data (--include-path DIR)") from exc
        twice = next((task for task in result["tasks"] for other, leaves in members.items()
                      if task in leaves), None)
        if twice is not None:
            raise SimulationError(f"task {twice!r} is named twice by --tasks (in {name!r} and "
                                  "another name): lm-eval runs each task once; drop one")
        if name in result["groups"] or name in result["tasks"]:
            loaded.append(result["groups"].get(name) or result["tasks"][name])
            members[name] = tuple(result["tasks"])
        else:  # a tag: its tasks
            loaded.extend(result["tasks"].values())
            members.update({task: (task,) for task in result["tasks"]})
    return TaskSet(tuple(loaded), tuple(members), members)


def run_tasks(lm: HetmapLM, tasks: TaskSet, *, limit: int | None,
              num_fewshot: int | None) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """lm-eval's metrics of one model per reported name, and the items each task used."""
    results = simple_evaluate(model=lm, tasks=list(tasks.objects), limit=limit,
                              num_fewshot=num_fewshot,
                              log_samples=False, bootstrap_iters=0,
                              task_manager=TaskManager(include_defaults=False))
    assert results is not None  # single process: rank 0
    metrics = {name: {key.removesuffix(",none"): float(value)
                      for key, value in results["results"][name].items()
                      if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
               for name in tasks.names}
    counts = results.get("n-samples", {})
    samples = {name: sum(int(counts.get(task, {}).get("effective", 0))
                         for task in tasks.members.get(name, (name,)))
               for name in tasks.names}
    return metrics, samples


@dataclass
class EvalResult:
    """Downstream accuracy of the digital model and of the mapped model per seed."""

    tasks: list[str]
    digital: dict[str, dict[str, float]]
    #: task -> metric -> one value per seed
    mapped: dict[str, dict[str, list[float]]]
    seeds: list[int]
    settings: dict[str, Any]
    samples: dict[str, int]
    limit: int | None
    num_fewshot: int | None
    backend: str
    device: str
    tokenizer: str
    analog_linears: int
    analog_experts: int
    simulated_digital: list[str] = field(default_factory=list)
    #: simulate's rule 7: the attention implementation the runs used
    attention: str = "eager"

    def average(self) -> dict[str, Any] | None:
        """Average ``acc`` over tasks: digital, and mapped mean/std over seeds (rule 4)."""
        if not all(AVERAGE_METRIC in self.digital[t] for t in self.tasks):
            return None
        per_seed = [statistics.fmean(self.mapped[t][AVERAGE_METRIC][i] for t in self.tasks)
                    for i in range(len(self.seeds))]
        return {"metric": AVERAGE_METRIC,
                "digital": statistics.fmean(self.digital[t][AVERAGE_METRIC] for t in self.tasks),
                "mapped_mean": statistics.fmean(per_seed), "mapped_std": _std(per_seed)}

    def rows(self) -> Iterator[tuple[str, str, float, float, float]]:
        """(task, metric, digital, mapped mean, mapped std) for every reported metric."""
        for task in self.tasks:
            for metric, value in self.digital[task].items():
                values = self.mapped[task][metric]
                yield task, metric, value, statistics.fmean(values), _std(values)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["results"] = {task: {metric: {"digital": digital, "mapped_mean": mean,
                                           "mapped_std": std, "mapped": self.mapped[task][metric]}
                                  for t, metric, digital, mean, std in self.rows() if t == task}
                           for task in self.tasks}
        data["average"] = self.average()
        return data


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def evaluate_plan(plan: Plan, tasks: Sequence[str] | TaskSet = PAPER_TASKS, *, seeds: int = 1,
                  seed: int = 0, include_path: str | Path | None = None, limit: int | None = None,
                  num_fewshot: int | None = None, batch_size: int = 8,
                  noise_scale: float | None = None, drift_time: float | None = None,
                  ideal: bool = False, backend: str = "hetmap", device: str = "cpu",
                  progress: Callable[[str, int], Callable[[int], None]] | None = None,
                  programming: str = "auto", device_map: str | None = None,
                  kernels: str = "eager", attention: str = "eager") -> EvalResult:
    """Accuracy of ``plan``'s model on lm-eval ``tasks`` (names, or a :class:`TaskSet` from
    :func:`load_tasks`): all-digital and mapped per seed. ``programming`` and ``device_map``
    as for :func:`~hetmap.compiler.evaluation.simulate.simulate_plan` (rules 4 and 6)."""
    with tempfile.TemporaryDirectory(prefix="hetmap-offload-") as offload:
        return _evaluate(plan, tasks, seeds=seeds, seed=seed, include_path=include_path,
                         limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                         noise_scale=noise_scale, drift_time=drift_time, ideal=ideal,
                         backend=backend, device=device, progress=progress,
                         programming=programming, device_map=device_map, kernels=kernels,
                         attention=attention, offload=Path(offload))


def _evaluate(plan: Plan, tasks: Sequence[str] | TaskSet, *, seeds: int, seed: int,
              include_path: str | Path | None, limit: int | None, num_fewshot: int | None,
              batch_size: int, noise_scale: float | None, drift_time: float | None, ideal: bool,
              backend: str, device: str,
              progress: Callable[[str, int], Callable[[int], None]] | None, programming: str,
              device_map: str | None, kernels: str, attention: str, offload: Path
              ) -> EvalResult:
    from hetmap.compiler.data.devices import dispatched, read_device_map
    from hetmap.compiler.evaluation.simulate import (
        analog_part,
        attention_implementation,
        check_attention,
        check_kernels,
        check_programming,
        programming_mode,
    )
    from hetmap.runtime.settings import settings_for

    if seeds < 1:
        raise SimulationError(f"--seeds must be at least 1, got {seeds}")
    if limit is not None and limit < 1:
        raise SimulationError(f"--limit must be at least 1, got {limit}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SimulationError("--device cuda asked for, but no CUDA device is available here")
    check_programming(programming)
    check_kernels(kernels, backend)
    check_attention(attention)
    placed = None if device_map is None else read_device_map(device_map)
    if placed is not None:
        model = dispatched(plan.model, placed, offload)
        device = "cpu"  # the inputs: accelerate's hooks move them to each module's device
    else:
        model = plan.model.runnable().to(device)
    options = {"batch_size": batch_size, "device": device}
    digital_lm = HetmapLM.for_model(plan.model, model, **options)  # no vocabulary: fails first
    loaded = tasks if isinstance(tasks, TaskSet) else load_tasks(list(dict.fromkeys(tasks)),
                                                                 include_path)
    names = list(loaded.names)
    part = analog_part(plan.graph, model)
    mode, _reason = programming_mode(programming, part, model, device, False, placed is not None,
                                     backend)
    settings = settings_for(plan.target, noise_scale=noise_scale, drift_time=drift_time,
                            ideal=ideal, programming=mode, kernels=kernels)
    advance = (progress or (lambda _d, _t: (lambda _n: None)))("evaluating", seeds + 1)
    with attention_implementation(model, attention):
        run = {"limit": limit, "num_fewshot": num_fewshot}
        digital, samples = run_tasks(digital_lm, loaded, **run)
        advance(1)
        mapped: dict[str, dict[str, list[float]]] = {t: {m: [] for m in digital[t]} for t in names}
        for index in range(seeds):
            simulated = part.build(model, settings, seed + index, backend)
            if placed is None:  # placed by a device map: the tiles are where their weights are
                simulated = simulated.to(device)
            values, _ = run_tasks(HetmapLM.for_model(plan.model, simulated, **options), loaded, **run)
            for task, metrics in mapped.items():
                for metric, series in metrics.items():
                    series.append(values[task][metric])
            del simulated
            advance(1)
    return EvalResult(
        tasks=names, digital=digital, mapped=mapped, seeds=list(range(seed, seed + seeds)),
        settings=settings.to_dict(), samples={t: samples.get(t, 0) for t in names}, limit=limit,
        num_fewshot=num_fewshot, backend=backend, device=device,
        tokenizer="huggingface" if plan.model.tokenizer is not None else "bytes",
        analog_linears=len(part.linears), analog_experts=sum(len(v) for v in part.experts.values()),
        simulated_digital=list(part.simulated_digital), attention=attention)
