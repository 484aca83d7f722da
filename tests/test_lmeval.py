"""Downstream accuracy through lm-eval on a local multiple-choice task (no download): the
adapter's digital accuracy equals a direct computation with the model, ``--ideal`` mapped
accuracy equals digital, noisy mapped accuracy has a std over seeds, errors are one line."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator

import pytest
import torch
from conftest import FIXTURES
from lm_eval.api.instance import Instance
from torch import nn

from hetmap.common.errors import MissingDataError, SimulationError
from hetmap.compiler.api import Plan, compile_model
from hetmap.compiler.cli import main
from hetmap.compiler.evaluation.lmeval import (
    HetmapLM,
    TaskSet,
    evaluate_plan,
    load_tasks,
    run_tasks,
)
from hetmap.compiler.frontend import LoadedModel

TASKS = FIXTURES / "lmeval"
TASK = "python_continuation"
ITEMS = [json.loads(line) for line in (TASKS / f"{TASK}.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matrices on a shared 2-core machine: one thread is ~10x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plan(one_thread: None) -> Plan:
    return compile_model("demo", calib_tokens=256)


@pytest.fixture(scope="module")
def tasks() -> TaskSet:
    return load_tasks([TASK], TASKS)


def direct_scores(model: nn.Module, context: str, choices: list[str]) -> list[float]:
    """Sum of the byte tokens' log-probabilities of each choice after the context."""
    scores = []
    for choice in choices:
        prefix, ending = list(context.encode()), list(choice.encode())
        ids = torch.tensor([prefix + ending])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0]
        scored = log_probs[len(prefix) - 1:].gather(1, torch.tensor(ending)[:, None])
        scores.append(float(scored.sum()))
    return scores


def test_digital_accuracy_equals_direct_computation(plan: Plan, tasks: TaskSet) -> None:
    model = plan.model.runnable()
    lm = HetmapLM.for_model(plan.model, model, batch_size=8)
    metrics, samples = run_tasks(lm, tasks, limit=None, num_fewshot=None)
    direct = [direct_scores(model, item["context"], item["choices"]) for item in ITEMS]
    acc = statistics.fmean(float(s.index(max(s)) == item["label"]) for s, item in zip(direct, ITEMS, strict=True))
    normed = [[v / len(c.encode()) for v, c in zip(s, item["choices"], strict=True)]
              for s, item in zip(direct, ITEMS, strict=True)]
    acc_norm = statistics.fmean(float(s.index(max(s)) == item["label"])
                                for s, item in zip(normed, ITEMS, strict=True))
    assert samples[TASK] == len(ITEMS) == 24
    assert metrics[TASK]["acc"] == acc and metrics[TASK]["acc_norm"] == acc_norm
    assert acc > 0.4 and acc_norm > 0.4  # the demo does better than chance (0.25)
    # the batched, padded log-likelihoods are the per-choice ones
    requests = [Instance("loglikelihood", {}, (item["context"], choice), 0)
                for item in ITEMS[:6] for choice in item["choices"]]
    got = [value for value, _ in lm.loglikelihood(requests)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor([v for s in direct[:6] for v in s]),
                               rtol=1e-5, atol=1e-4)


def test_a_group_reports_lm_evals_aggregate(plan: Plan, tasks: TaskSet) -> None:
    lm = HetmapLM.for_model(plan.model, plan.model.runnable())
    group = load_tasks(["hetmap_tests"], TASKS)  # tests/fixtures/lmeval/hetmap_tests.yaml
    assert group.members == {"hetmap_tests": (TASK,)}
    metrics, samples = run_tasks(lm, group, limit=10, num_fewshot=None)
    alone, _ = run_tasks(lm, tasks, limit=10, num_fewshot=None)
    assert metrics["hetmap_tests"]["acc"] == alone[TASK]["acc"] and samples == {"hetmap_tests": 10}
    with pytest.raises(SimulationError, match=f"task '{TASK}' is named twice"):
        load_tasks(["hetmap_tests", TASK], TASKS)


def test_rolling_loglikelihood_and_greedy_generation(plan: Plan) -> None:
    model = plan.model.runnable()
    lm = HetmapLM.for_model(plan.model, model)
    text = "for name in sorted(names):\n    print(name)\n"
    ids = [ord("\n")] + list(text.encode())  # the newline byte is the prefix token (rule 1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits, dim=-1)[0]
    expected = float(log_probs.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got == pytest.approx(expected, rel=1e-5)
    context = "def close(self):\n    self."
    (answer,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 12}), 0)])
    with torch.no_grad():
        first = int(model(torch.tensor([list(context.encode())])).logits[0, -1].argmax())
    assert answer and len(answer) <= 12 and "\n" not in answer and answer.encode()[0] == first


def test_a_hugging_face_tokenizer_is_used_when_the_model_has_one() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hetmap.compiler.frontend import load_model

    text = ["def scale(x):\n    return x * 2\n", "import os\nprint(os.getcwd())\n"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(text * 10, trainers.BpeTrainer(vocab_size=120,
                                                           special_tokens=["<eos>", "<unk>"]))
    loaded = load_model("olmoe-tiny")
    loaded.tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    lm = HetmapLM.for_model(loaded, loaded.runnable(), batch_size=3)
    pairs = [("def scale(x):", " return x * 2"), ("import os", " print(os.getcwd())"), ("", "import os")]
    expected = []
    for context, ending in pairs:
        whole = loaded.tokenizer.encode(context + ending, add_special_tokens=False)
        start = len(loaded.tokenizer.encode(context, add_special_tokens=False)) if context else 0
        ids = ([] if context else [loaded.tokenizer.eos_token_id]) + whole
        start += 0 if context else 1
        assert ids[start:] and max(ids) < 256 and lm.tok_encode(context + ending) == whole
        with torch.no_grad():
            log_probs = torch.log_softmax(lm.model(torch.tensor([ids[:-1]])).logits, dim=-1)[0]
        expected.append(float(log_probs[start - 1:].gather(1, torch.tensor(ids[start:])[:, None]).sum()))
    got = [value for value, _ in lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs])]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-4)


def test_ideal_mapped_equals_digital_and_noise_varies_over_seeds(plan: Plan, tasks: TaskSet) -> None:
    ideal = evaluate_plan(plan, tasks, seeds=1, ideal=True)
    assert ideal.analog_experts > 0  # something really runs on simulated tiles
    assert ideal.mapped[TASK] == {metric: [v] for metric, v in ideal.digital[TASK].items()}
    noisy = evaluate_plan(plan, tasks, seeds=3, noise_scale=8.0)
    assert noisy.digital == ideal.digital  # the digital run does not depend on the settings
    data = noisy.to_json()
    row = data["results"][TASK]["acc"]
    assert row["mapped"] == noisy.mapped[TASK]["acc"] and len(row["mapped"]) == 3
    assert row["mapped_std"] == statistics.stdev(row["mapped"]) > 0
    assert row["mapped_mean"] < row["digital"]  # heavy programming noise costs accuracy
    assert data["average"]["mapped_mean"] == row["mapped_mean"]  # one task: its own average
    again = evaluate_plan(plan, tasks, seeds=3, noise_scale=8.0)
    assert again.mapped == noisy.mapped  # same seeds: same programming, same accuracy


def test_eval_cli_on_model_and_plan_directory(tmp_path, capsys) -> None:
    out = tmp_path / "plan"
    code = main(["eval", "demo", "--tasks", TASK, "--include-path", str(TASKS), "--seeds", "2",
                 "--calib-tokens", "256", "--limit", "12", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((out / "eval.json").read_text())
    assert data["seeds"] == [0, 1] and data["samples"] == {TASK: 12} and data["tokenizer"] == "bytes"
    assert set(data["results"][TASK]) == {"acc", "acc_norm"}
    assert 0 < data["digital_param_fraction"] < 1
    line = next(x for x in captured.out.splitlines() if x.split()[:2] == [TASK, "acc"])
    assert f"{100 * data['digital'][TASK]['acc']:.2f}" in line and "+-" in line
    code = main(["eval", str(out), "--tasks", TASK, "--include-path", str(TASKS), "--ideal",
                 "--limit", "12"])
    assert code == 0, capsys.readouterr().err
    again = json.loads((out / "eval.json").read_text())
    assert again["settings"]["ideal"] and again["mapped"][TASK]["acc"] == [again["digital"][TASK]["acc"]]
    assert not list(out.glob(".*.tmp"))  # written atomically
    code = main(["eval", str(out), "--tasks", TASK, "--include-path", str(TASKS), "--policy", "random"])
    err = capsys.readouterr().err
    assert code == 2 and "--policy does not apply to a compiled plan directory" in err


def test_eval_user_errors_are_one_line(tmp_path, capsys) -> None:
    code = main(["eval", "demo", "--tasks", TASK, "--include-path", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code = main(["eval", "demo", "--tasks", " , "])
    assert code == 2 and "names no task" in capsys.readouterr().err
    no_vocabulary = LoadedModel(spec="linear", name="linear", source="module", module=nn.Linear(4, 4))
    with pytest.raises(MissingDataError, match="no vocabulary size"):
        HetmapLM.for_model(no_vocabulary, no_vocabulary.module)


@pytest.mark.slow
def test_unknown_and_undownloadable_tasks_are_one_line(tmp_path, capsys) -> None:
    # both need lm-eval's built-in catalogue indexed (tens of seconds); the second also waits
    # for the Hub's retries to give up
    code = main(["eval", "demo", "--tasks", "no_such_task", "--include-path", str(TASKS)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown task 'no_such_task'") and len(err.splitlines()) == 1
    (tmp_path / "remote.yaml").write_text(
        "task: remote_items\ndataset_path: hetmap-tests/not-local\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n")
    with pytest.raises(SimulationError, match="task 'remote_items' cannot load its data set .*needs network"):
        load_tasks(["remote_items"], tmp_path)


def test_per_batch_programming_and_device_map_give_the_same_accuracy(plan: Plan, tasks: TaskSet,
                                                                     tmp_path) -> None:
    """eval with per-batch tiles, and with demo's layer 3 offloaded to disk by a device map,
    gives the resident figures per seed (noise scale 8: accuracy moves with the seed)."""
    runs = {"resident": evaluate_plan(plan, tasks, seeds=2, noise_scale=8.0, limit=12,
                                      programming="resident"),
            "per-batch": evaluate_plan(plan, tasks, seeds=2, noise_scale=8.0, limit=12,
                                       programming="per-batch")}
    model = plan.model.runnable()
    layers = [name for name, _ in model.named_children()]
    device_map = {name: "cpu" for name in layers if name != "model"}
    inner = model.get_submodule("model")
    device_map.update({f"model.{name}": "cpu" for name, _ in inner.named_children()
                       if name != "layers"})
    count = len(inner.get_submodule("layers"))
    device_map.update({f"model.layers.{i}": "disk" if i == count - 1 else "cpu"
                       for i in range(count)})
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    placed = _placed_plan().evaluate(tasks, seeds=2, noise_scale=8.0, limit=12,
                                     device_map=str(tmp_path / "map.json"))
    assert runs["per-batch"].mapped == runs["resident"].mapped
    assert placed.mapped == runs["resident"].mapped and placed.digital == runs["resident"].digital
    assert placed.settings["programming"] == "per-batch"


def test_sdpa_attention_gives_the_eager_accuracy(plan: Plan, tasks: TaskSet) -> None:
    """eval --attention sdpa: the digital accuracy of eager attention (the same arithmetic up
    to float rounding), recorded in the result; the model runs eager again afterwards."""
    eager = evaluate_plan(plan, tasks, seeds=1, limit=12)
    sdpa = evaluate_plan(plan, tasks, seeds=1, limit=12, attention="sdpa")
    assert sdpa.digital == eager.digital and sdpa.attention == "sdpa"
    assert sdpa.to_json()["attention"] == "sdpa" and eager.attention == "eager"
    assert plan.model.runnable().config._attn_implementation == "eager"


def _placed_plan() -> Plan:
    """A second demo plan (a device map dispatches the model it places, in place)."""
    return compile_model("demo", calib_tokens=256)
