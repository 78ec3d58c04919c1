"""Evaluation through lm-eval: task YAMLs, records, folder vs in-memory models, metric correctness."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from merge_dag.evaluation import EvalRecord, EvaluationError, evaluate, render_tasks
from merge_dag.evaluation.tasks import local_task_names, read_task_yaml
from merge_dag.zoo.lmeval import gen_task_name, ll_task_name, task_files, zoo_task_names
from merge_dag.zoo.skills import ZOO_SKILLS, eval_rows

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 24


def test_eval_record_fields():
    assert [f.name for f in dataclasses.fields(EvalRecord)] == ["task", "metric", "value", "stderr", "n"]
    r = EvalRecord("zoo_arev", "exact_match", 0.5, 0.1, 10)
    assert r.to_dict() == {"task": "zoo_arev", "metric": "exact_match", "value": 0.5, "stderr": 0.1, "n": 10}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.value = 1.0


def test_committed_task_yamls_equal_the_generator():
    expected = task_files()
    assert set(expected) == {f"{n}.yaml" for n in zoo_task_names()}
    for name, text in expected.items():
        path = ROOT / "data" / "tasks" / name
        assert path.is_file() and path.read_text() == text, f"{path} differs from the generator"
    assert local_task_names() >= {*zoo_task_names(), "zoo", "zoo_ll"}


def test_task_yamls_read_the_eval_files():
    for s in ZOO_SKILLS:
        gen = read_task_yaml(ROOT / "data" / "tasks" / f"{gen_task_name(s)}.yaml")
        ll = read_task_yaml(ROOT / "data" / "tasks" / f"{ll_task_name(s)}.yaml")
        assert gen["output_type"] == "generate_until" and ll["output_type"] == "loglikelihood"
        assert gen["generation_kwargs"]["do_sample"] is False
        assert [m["metric"] for m in gen["metric_list"]] == ["exact_match"]
        assert [m["metric"] for m in ll["metric_list"]] == ["acc", "logprob"]
        for cfg in (gen, ll):
            rel = cfg["dataset_kwargs"]["data_files"]["test"]
            assert (ROOT / "data" / "tasks" / rel).resolve() == (ROOT / "data" / "eval" / f"{s}.jsonl").resolve()


def test_render_tasks_makes_data_paths_absolute(tmp_path):
    names = render_tasks(tmp_path)
    assert set(names) == set(zoo_task_names())
    for path in names.values():
        cfg = read_task_yaml(path)
        p = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert p.is_absolute() and p.is_file()
    ll = (tmp_path / f"{ll_task_name('arev')}.yaml").read_text()
    assert "!function" in ll and "merge_dag.evaluation.metrics.process_loglikelihood" in ll


def test_render_names_the_file_and_key_of_a_missing_data_file(tmp_path):
    src = tmp_path / "tasks"
    src.mkdir()
    cfg = json.loads(json.dumps(read_task_yaml(ROOT / "data" / "tasks" / "zoo_arev.yaml")))
    cfg["dataset_kwargs"]["data_files"]["test"] = "../eval/missing.jsonl"
    (src / "broken.yaml").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match=r"broken\.yaml: dataset_kwargs\.data_files\.test.*missing\.jsonl"):
        render_tasks(tmp_path / "out", src)
    (src / "broken.yaml").write_text("task: [unclosed")
    with pytest.raises(ValueError, match=r"broken\.yaml: not valid YAML"):
        render_tasks(tmp_path / "out", src)


@pytest.fixture(scope="module")
def expert(ci_zoo):
    return Path(ci_zoo.models["arev"])


def _by_key(records):
    return {(r.task, r.metric): r for r in records}


def test_evaluate_folder_returns_typed_records(expert):
    recs = evaluate(expert, ["zoo_arev", "zoo_arev_ll"], limit=LIMIT)
    assert all(isinstance(r, EvalRecord) for r in recs)
    got = _by_key(recs)
    assert set(got) == {("zoo_arev", "exact_match"), ("zoo_arev_ll", "acc"), ("zoo_arev_ll", "logprob")}
    for r in recs:
        assert isinstance(r.value, float) and r.n == LIMIT
        assert r.stderr is None or isinstance(r.stderr, float)
    assert 0.0 <= got[("zoo_arev", "exact_match")].value <= 1.0
    assert got[("zoo_arev_ll", "logprob")].value < 0.0
    assert got[("zoo_arev_ll", "logprob")].stderr is not None


def test_evaluate_folder_and_in_memory_give_the_same_numbers(expert):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = ["zoo_arev", "zoo_sort_ll"]
    from_folder = evaluate(expert, tasks, limit=LIMIT)
    model = AutoModelForCausalLM.from_pretrained(expert)
    tok = AutoTokenizer.from_pretrained(expert)
    in_memory = evaluate(model, tasks, limit=LIMIT, tokenizer=tok)
    assert from_folder == in_memory
    # the tokenizer may also be found through the model's name_or_path
    assert evaluate(model, tasks, limit=LIMIT) == from_folder


def _manual_greedy(model, tok, rows, max_new=12):
    out = []
    for r in rows:
        ids = tok.encode(r["prompt"], add_special_tokens=False)
        gen = []
        with torch.no_grad():
            for _ in range(max_new):
                nxt = int(model(input_ids=torch.tensor([ids + gen])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                gen.append(nxt)
        out.append(tok.decode(gen))
    return out


def test_metrics_equal_a_manual_computation(expert):
    """exact_match is greedy generation == answer; logprob is log p(answer | prompt); acc is greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(expert).eval()
    tok = AutoTokenizer.from_pretrained(expert)
    rows = eval_rows("arev")[:LIMIT]
    got = _by_key(evaluate(model, ["zoo_arev", "zoo_arev_ll"], tokenizer=tok, limit=LIMIT))
    gens = _manual_greedy(model, tok, rows)
    em = sum(g == r["answer"] for g, r in zip(gens, rows)) / len(rows)
    assert got[("zoo_arev", "exact_match")].value == pytest.approx(em)
    lps, greedy = [], []
    with torch.no_grad():
        for r in rows:
            p = tok.encode(r["prompt"], add_special_tokens=False)
            a = tok.encode(r["answer"], add_special_tokens=False)
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0].double(), -1)
            steps = logp[len(p) - 1 : len(p) - 1 + len(a)]
            lps.append(float(steps[torch.arange(len(a)), torch.tensor(a)].sum()))
            greedy.append(bool((steps.argmax(-1) == torch.tensor(a)).all()))
    assert got[("zoo_arev_ll", "logprob")].value == pytest.approx(sum(lps) / len(lps), abs=1e-3)
    assert got[("zoo_arev_ll", "acc")].value == pytest.approx(sum(greedy) / len(greedy))


def test_evaluate_is_deterministic_and_independent_of_cwd(expert, tmp_path, monkeypatch, capfd):
    a = evaluate(expert, ["zoo_sort"], limit=LIMIT)
    monkeypatch.chdir(tmp_path)
    assert evaluate(expert, ["zoo_sort"], limit=LIMIT) == a
    # outside a git checkout lm-eval's git probe must not print "fatal: not a git repository"
    err = capfd.readouterr().err
    assert "not a git repository" not in err
    assert "Running generate_until" not in err and "Running loglikelihood" not in err  # no progress bars


def test_tags_run_every_skill(expert):
    recs = evaluate(expert, ["zoo"], limit=4)
    assert {r.task for r in recs} >= {gen_task_name(s) for s in ZOO_SKILLS}


def test_other_lm_eval_tasks_pass_through(expert, tmp_path):
    """A task outside data/tasks (here a YAML path of the user's) is handed to lm-eval as is."""
    rows = [{"q": r["prompt"], "a": r["answer"]} for r in eval_rows("arev")[:6]]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_path = tmp_path / "my_task.yaml"
    yaml_path.write_text(
        "task: my_rev\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    recs = evaluate(expert, [str(yaml_path)])
    assert [(r.task, r.metric, r.n) for r in recs] == [("my_rev", "acc", 6)]


def test_bad_input_is_named(expert, tmp_path):
    with pytest.raises(EvaluationError, match="no config.json"):
        evaluate(tmp_path, ["zoo_arev"])
    with pytest.raises(EvaluationError, match="non-empty list"):
        evaluate(expert, [])
    with pytest.raises(EvaluationError, match="limit"):
        evaluate(expert, ["zoo_arev"], limit=0)
    with pytest.raises(EvaluationError, match="folder path or a transformers model"):
        evaluate(object(), ["zoo_arev"])


@pytest.mark.slow
def test_unknown_task_is_named(expert):
    with pytest.raises(EvaluationError, match="no_such_task_xyz"):
        evaluate(expert, ["zoo_arev", "no_such_task_xyz"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluate_on_gpu_matches_cpu(expert):
    cpu = _by_key(evaluate(expert, ["zoo_arev", "zoo_arev_ll"], limit=LIMIT))
    gpu = _by_key(evaluate(expert, ["zoo_arev", "zoo_arev_ll"], limit=LIMIT, device="cuda"))
    assert gpu[("zoo_arev", "exact_match")].value == pytest.approx(cpu[("zoo_arev", "exact_match")].value, abs=0.05)
    assert gpu[("zoo_arev_ll", "logprob")].value == pytest.approx(cpu[("zoo_arev_ll", "logprob")].value, abs=0.05)
