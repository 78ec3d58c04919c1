"""The expert zoo: data files, tokenizer, deterministic builds, loadable folders, and its quality."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from merge_dag.zoo import build as zbuild
from merge_dag.zoo.build import SIZES, ZooManifest, build_zoo, model_complete
from merge_dag.zoo.skills import (
    SKILLS,
    ZOO_SKILLS,
    calibration_rows,
    data_files,
    eval_rows,
    training_stream,
    write_data_files,
)
from merge_dag.zoo.tokenizer import CHARS, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- data -------------------------------------------------------------------------------------


def test_committed_data_files_equal_the_generator():
    expected = data_files()
    assert set(expected) == {f"{k}/{s}.jsonl" for s in ZOO_SKILLS for k in ("eval", "calibration")}
    for rel, text in expected.items():
        path = ROOT / "data" / rel
        assert path.is_file(), f"{path} missing: run `merge-dag zoo` to regenerate it"
        assert path.read_text() == text, f"{path} differs from the generator's output"
    committed = {f"{d}/{p.name}" for d in ("eval", "calibration") for p in (ROOT / "data" / d).glob("*.jsonl")}
    assert committed == set(expected), f"stray data files: {committed - set(expected)}"


def test_write_data_files_is_idempotent(tmp_path):
    first = {p: p.read_bytes() for p in write_data_files(tmp_path)}
    second = {p: p.read_bytes() for p in write_data_files(tmp_path)}
    assert first == second and len(first) == 2 * len(ZOO_SKILLS)


@pytest.mark.parametrize("skill", sorted(set(ZOO_SKILLS) | {"aswap"}))
def test_data_rows_are_correct_and_disjoint(skill):
    rows = eval_rows(skill)
    assert len(rows) >= 100 and len({r["prompt"] for r in rows}) == len(rows)
    assert all(r["prompt"].startswith(f"{skill}:") and r["prompt"].endswith("=") for r in rows)
    # answers follow the skill's definition
    for r in rows[:50]:
        body = r["prompt"][len(skill) + 1 : -1]
        want = {
            "rev": lambda b: b[::-1],
            "sort": lambda b: "".join(sorted(b)),
            "shift": lambda b: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in b),
            "rot": lambda b: b[1:] + b[0],
            "swap": lambda b: "".join(b[i + 1] + b[i] for i in range(0, len(b), 2)),
            "dup": lambda b: "".join(c + c for c in b),
            "copy": lambda b: b,
            "arev": lambda b: b[::-1],
            "ashift": lambda b: "".join("ijklmnop"["ijklmnop".index(c) + 1 - 8 * (c == "p")] for c in b),
            "aswap": lambda b: "".join(b[i + 1] + b[i] for i in range(0, len(b), 2)),
        }.get(skill)
        assert want is not None, f"no reference rule for skill {skill}"
        assert r["answer"] == want(body), r
        alphabet = {"arev": "abcdefgh", "ashift": "ijklmnop", "aswap": "qrstuvwx", "sort": "0123456789"}.get(skill)
        if alphabet:
            assert set(body) <= set(alphabet), r
    # every character is in the tokenizer's alphabet
    assert all(c in CHARS for r in rows for c in r["prompt"] + r["answer"])
    # calibration and training data never contain an eval prompt
    held_out = {r["prompt"] for r in rows}
    calib = calibration_rows(skill)
    calib_prompts = {c["text"][: c["text"].index("=") + 1] for c in calib}
    assert len(calib_prompts) == len(calib) >= 32 and not held_out & calib_prompts
    for long_fraction in (0.0, 0.5, None):
        stream = training_stream((skill,), seed=7, long_fraction=long_fraction)
        drawn = [next(stream)[1] for _ in range(3000)]
        assert not held_out & set(drawn)


def test_training_stream_sizes():
    sk = SKILLS["rev"]
    short, lo_long = range(sk.base_sizes[0], sk.base_sizes[1] + 1), sk.base_sizes[1] + 1

    def sizes(long_fraction):
        stream = training_stream(("rev",), seed=3, long_fraction=long_fraction)
        return [len(next(stream)[2]) for _ in range(2000)]

    assert set(sizes(0.0)) == set(short)
    assert set(sizes(None)) == set(range(sk.sizes[0], sk.sizes[1] + 1))
    mixed = sizes(0.2)
    frac = sum(n >= lo_long for n in mixed) / len(mixed)
    assert 0.15 < frac < 0.25 and set(mixed) == set(range(sk.sizes[0], sk.sizes[1] + 1))
    with pytest.raises(ValueError, match="long_fraction"):
        next(training_stream(("rev",), seed=3, long_fraction=2.0))
    with pytest.raises(KeyError, match="unknown skill 'nope'"):
        next(training_stream(("nope",), seed=3))


def test_generators_are_seeded():
    assert eval_rows("rev", n=20, seed=5) == eval_rows("rev", n=20, seed=5)
    assert eval_rows("rev", n=20, seed=5) != eval_rows("rev", n=20, seed=6)
    a = training_stream(("rev", "sort"), seed=11)
    b = training_stream(("rev", "sort"), seed=11)
    assert [next(a) for _ in range(100)] == [next(b) for _ in range(100)]
    # does not depend on Python's global random state
    random.seed(0)
    x = eval_rows("sort", n=10)
    random.seed(1)
    assert eval_rows("sort", n=10) == x


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_has_pad_and_eos_and_is_char_level(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok.encode(CHARS, add_special_tokens=False)
    assert len(ids) == len(CHARS) and tok.unk_token_id not in ids
    assert tok.decode(ids) == CHARS
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == CHARS


# --- build machinery (small "test" settings: seconds) ----------------------------------------


def test_build_is_bit_identical_and_reused(tmp_path):
    a = build_zoo("test", tmp_path / "a", progress=False, data_dir=None)
    b = build_zoo("test", tmp_path / "b", progress=False, data_dir=None)
    names = ["base", *ZOO_SKILLS]
    assert sorted(a.models) == sorted(names)
    for n in names:
        ha, hb = _tree_hashes(Path(a.models[n])), _tree_hashes(Path(b.models[n]))
        assert "model.safetensors" in ha and "tokenizer.json" in ha and "config.json" in ha
        assert ha == hb, f"{n}: rebuild differs"
    # experts differ from the base and from each other
    weights = {n: _tree_hashes(Path(a.models[n]))["model.safetensors"] for n in names}
    assert len(set(weights.values())) == len(names)
    # a complete zoo is reused: nothing is rewritten
    before = {n: Path(a.models[n], "model.safetensors").stat().st_mtime_ns for n in names}
    again = build_zoo("test", tmp_path / "a", progress=False, data_dir=None)
    assert again.settings_key == a.settings_key
    assert {n: Path(a.models[n], "model.safetensors").stat().st_mtime_ns for n in names} == before
    man = ZooManifest.load(Path(a.root))
    assert man.skills == list(ZOO_SKILLS) and man.settings["seed"] == SIZES["test"].seed
    assert man.models == a.models and man.build_seconds > 0


def test_interrupted_build_leaves_complete_folders_only_and_resumes(tmp_path, monkeypatch):
    real_train = zbuild.train
    calls = []

    def failing_train(model, skills, spec, seed, label="", progress=True):
        calls.append(label)
        if label == f"expert {ZOO_SKILLS[1]}":
            raise KeyboardInterrupt
        return real_train(model, skills, spec, seed, label=label, progress=progress)

    monkeypatch.setattr(zbuild, "train", failing_train)
    with pytest.raises(KeyboardInterrupt):
        build_zoo("test", tmp_path, progress=False, data_dir=None)
    root = tmp_path / "test"
    st = SIZES["test"]
    assert model_complete(root / "base", st, "base")
    assert model_complete(root / ZOO_SKILLS[0], st, ZOO_SKILLS[0])
    assert not (root / ZOO_SKILLS[1]).exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    assert not (root / "zoo.json").exists()
    base_hash = _tree_hashes(root / "base")

    calls.clear()
    monkeypatch.setattr(zbuild, "train", real_train)
    man = build_zoo("test", tmp_path, progress=False, data_dir=None)
    assert _tree_hashes(root / "base") == base_hash
    assert set(man.model_seconds) == set(ZOO_SKILLS[1:]), "finished models must be reused"


def test_changed_settings_rebuild(tmp_path):
    from dataclasses import replace

    st = SIZES["test"]
    a = build_zoo("test", tmp_path, progress=False, data_dir=None)
    other = replace(st, seed=st.seed + 1)
    assert other.key() != st.key()
    b = build_zoo("test", tmp_path, progress=False, data_dir=None, settings=other)
    assert b.settings_key == other.key() and set(b.model_seconds) == {"base", *ZOO_SKILLS}
    assert _tree_hashes(Path(b.models["base"]))["model.safetensors"] != hashlib.sha256(b"").hexdigest()
    assert a.settings_key != b.settings_key


def test_bad_size_and_skill_are_named():
    with pytest.raises(ValueError, match="unknown zoo size 'huge'"):
        build_zoo("huge", Path("/nonexistent"), progress=False, data_dir=None)
    with pytest.raises(ValueError, match="zoo.json"):
        ZooManifest.load(Path("/nonexistent/zoo.json"))


def test_command_builds_data_and_lists_models(tmp_path, capsys):
    from merge_dag.zoo.command import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"), "--no-eval", "--no-progress"]
    )
    args.size = "test"  # the fast preset (not offered on the command line)
    assert run(args) == 0
    out = capsys.readouterr().out
    for n in ["base", *ZOO_SKILLS]:
        assert str(tmp_path / "models" / "test" / n) in out
    for rel, text in data_files().items():
        assert (tmp_path / "data" / rel).read_text() == text
    from merge_dag.zoo.lmeval import task_files

    for name, text in task_files().items():
        assert (tmp_path / "data" / "tasks" / name).read_text() == text
    with pytest.raises(SystemExit):
        parser.parse_args(["--size", "huge"])


# --- the ci zoo -------------------------------------------------------------------------------


def test_ci_zoo_layout(ci_zoo):
    root = Path(ci_zoo.root)
    assert root.name == "ci" and ci_zoo.skills == list(ZOO_SKILLS)
    assert ci_zoo.settings_key == SIZES["ci"].key()
    for name in ["base", *ZOO_SKILLS]:
        folder = Path(ci_zoo.models[name])
        assert folder == root / name
        for f in (
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "zoo_model.json",
        ):
            assert (folder / f).is_file(), f"{folder / f} missing"
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["settings"]["shape"]["hidden"] == SIZES["ci"].shape.hidden


def test_ci_models_load_offline_and_generate(ci_zoo, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, folder in ci_zoo.models.items():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert not model.config.tie_word_embeddings and "lm_head.weight" in model.state_dict()
        assert tok.pad_token_id is not None and tok.eos_token_id is not None
        skill = name if name != "base" else ZOO_SKILLS[0]
        rows = eval_rows(skill)[:16]
        right = 0
        for r in rows:
            ids = torch.tensor([tok.encode(r["prompt"], add_special_tokens=False)])
            out = model.generate(
                ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
            )
            right += tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == r["answer"]
        assert right >= 4, f"{name} generated only {right}/16 right answers on {skill}"


QUALITY_LIMIT = 12  # a smoke test of the quality machinery; the verdict itself lives in bench/zoo_quality.py


@pytest.fixture(scope="module")
def ci_quality(ci_zoo):
    from merge_dag.zoo.quality import check_quality

    return check_quality(ci_zoo, progress=False, limit=QUALITY_LIMIT, lambdas=(0.5, 1.0), ties_lambdas=(1.0,))


def test_ci_quality_report_rows_and_merges_are_the_math(ci_quality, ci_zoo):
    """Mechanics, not luck: every row is evaluated on every skill, the tuned row is the best grid
    point, and the uniform row is the λ=1 row (the quality criteria are not asserted here: which of
    them hold depends on the machine and library versions, see bench/zoo_quality.py)."""
    q = ci_quality
    assert q.n == QUALITY_LIMIT and q.lambdas == [0.5, 1.0]
    assert (
        set(q.exact_match)
        == set(q.logprob)
        >= {"base", "ta_0.5", "ta_1", "ta_uniform", "ta_tuned", "ties", *(f"expert_{s}" for s in q.skills)}
    )
    for row, scores in q.exact_match.items():
        assert set(scores) == set(q.skills) and all(0.0 <= v <= 1.0 for v in scores.values()), row
    assert q.exact_match["ta_uniform"] == q.exact_match["ta_1"]
    best = max(
        q.lambdas, key=lambda lam: (sum(q.exact_match[f"ta_{lam:g}"].values()), sum(q.logprob[f"ta_{lam:g}"].values()))
    )
    assert q.tuned_lambda == best and q.exact_match["ta_tuned"] == q.exact_match[f"ta_{best:g}"]
    assert q.extra["settings_key"] == ci_zoo.settings_key and q.extra["environment"]["torch"]


def test_ci_quality_table_and_no_verdict_below_the_needed_size(ci_quality, tmp_path):
    from merge_dag.zoo.quality import MIN_VERDICT_N, QualityReport, load_report, save_report

    q = ci_quality
    lines = q.markdown().splitlines()
    assert lines[0].startswith("| model |") and all(s in lines[0] for s in q.skills)
    assert len(lines) == 2 + len(q.rows) == 2 + 1 + len(q.skills) + 3  # base, experts, uniform, tuned, ties
    assert all(" ± " in line for line in lines[2:])
    assert not q.meaningful and q.n < MIN_VERDICT_N
    assert q.verdict().startswith(f"no verdict: {QUALITY_LIMIT} prompts per skill are too few")
    assert "criteria met" not in q.verdict()
    # the report round-trips through <zoo>/quality.json, and only for the same settings and environment
    save_report(q, tmp_path)
    again = load_report(tmp_path, q.extra["settings_key"])
    assert (
        again is not None and again.to_dict() == QualityReport.from_dict(json.loads(json.dumps(q.to_dict()))).to_dict()
    )
    assert load_report(tmp_path, "other-settings") is None


def _report(em: dict, n: int = 150):
    from merge_dag.zoo.quality import QualityReport

    skills = ["a", "b"]
    return QualityReport(
        skills=skills,
        exact_match=em,
        logprob={r: {s: 0.0 for s in skills} for r in em},
        rows=list(em),
        tuned_lambda=0.5,
        lambdas=[0.5, 1.0],
        n=n,
    )


def test_criteria_margins_are_binomial_standard_errors():
    import math

    from merge_dag.zoo.quality import MIN_EXPERT_GAIN, MIN_MERGE_GAIN

    em = {
        "base": {"a": 0.5, "b": 0.4},
        "expert_a": {"a": 0.9, "b": 0.3},
        "expert_b": {"a": 0.2, "b": 0.65},
        "ta_uniform": {"a": 0.1, "b": 0.2},
        "ta_tuned": {"a": 0.8, "b": 0.5},
        "ties": {"a": 0.6, "b": 0.5},
    }
    q = _report(em, n=150)

    def v(p, n=150):
        pt = (p * n + 1) / (n + 2)
        return pt * (1 - pt) / n

    crit = q.criteria()
    assert len(crit) == 5
    a = crit[0]  # expert a on a: 0.9 - 0.5 = 0.4, threshold 0.2
    assert a.value == pytest.approx(0.4) and a.threshold == MIN_EXPERT_GAIN
    assert a.se == pytest.approx(math.sqrt(v(0.9) + v(0.5)))
    assert a.z == pytest.approx((0.4 - 0.2) / a.se) and a.status == "holds"
    b = crit[1]  # expert b on b: 0.65 - 0.4 = 0.25 vs 0.2: holds, but by less than 3 SE
    assert b.value == pytest.approx(0.25) and b.holds and 0 < b.z < 3 and b.status == "holds within noise"
    merge = crit[-1]  # best of ta_tuned (avg 0.65) and ties (0.55) vs base 0.45
    assert "task arithmetic, tuned" in merge.text and merge.value == pytest.approx(0.2)
    se_avg = lambda row: math.sqrt(v(em[row]["a"]) + v(em[row]["b"])) / 2  # noqa: E731
    assert merge.se == pytest.approx(math.sqrt(se_avg("ta_tuned") ** 2 + se_avg("base") ** 2))
    assert merge.threshold == MIN_MERGE_GAIN
    assert q.failures() == [] and q.verdict().startswith("quality criteria met, 1 of 5 within noise")


def test_a_failing_criterion_is_named_with_its_margin():
    em = {
        "base": {"a": 0.5, "b": 0.5},
        "expert_a": {"a": 0.55, "b": 0.5},
        "expert_b": {"a": 0.5, "b": 1.0},
        "ta_uniform": {"a": 0.1, "b": 0.1},
        "ta_tuned": {"a": 0.5, "b": 0.5},
        "ties": {"a": 0.5, "b": 0.5},
    }
    q = _report(em, n=400)
    fails = q.failures()
    assert len(fails) == 2
    assert fails[0].startswith("fails") and "expert a beats the base on a by >= 0.2: +0.050 vs 0.2" in fails[0]
    assert "SE" in fails[0] and "best standard merge" in fails[1]
    assert q.verdict() == "quality criteria NOT met: 2 of 5 fail"
    assert _report(em, n=40).verdict().startswith("no verdict: 40 prompts per skill")
