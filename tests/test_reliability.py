"""Issue 11 (core and CLI): never destroy a user's data, no exit 0 with a bad result, no raw
traceback, no hang. One section per class of the issue; each test failed on the code before it."""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_dag.cli import main as cli
from merge_dag.core import checkpoint as ckmod
from merge_dag.core.checkpoint import MARKER, Checkpoint, CheckpointWriter, clean_stale_temporaries
from merge_dag.core.engine import merge, plan_merge
from merge_dag.core.errors import (
    CheckpointError,
    MergeDagError,
    MergeInputError,
    MergeOutputError,
    OutputError,
    RecipeError,
)
from merge_dag.core.fingerprint import checkpoint_fingerprint
from merge_dag.core.recipe import load_recipe

from _models import base_state, load_all, make_family, perturb, tiny_config, write_model

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fp_cache")


@pytest.fixture()
def family(tmp_path):
    return make_family(tmp_path / "models", n_experts=2, layers=2)


def recipe_file(tmp_path, body: str, name="recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def ta_recipe(tmp_path, fam, weight=0.5, extra="", name="recipe.yaml"):
    return recipe_file(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        base_model: {fam["base"]}
        models:
          - model: {fam["e0"]}
            parameters: {{weight: {weight}}}
          - model: {fam["e1"]}
            parameters: {{weight: 0.3}}
        out_dtype: float32
        {extra}
    """,
        name,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. the output folder: never a user's folder, an input, or the working directory
# ---------------------------------------------------------------------------------------------


def test_user_folder_is_never_replaced_even_with_overwrite(tmp_path, family, capsys):
    mywork = tmp_path / "mywork"
    (mywork / "thesis").mkdir(parents=True)
    (mywork / "thesis" / "notes.txt").write_text("x")
    before = snapshot(mywork)
    recipe = ta_recipe(tmp_path, family)
    for extra in ([], ["--overwrite"], ["--dry-run"]):
        assert cli(["merge", str(recipe), str(mywork), "--no-progress", *extra]) == 2
        line = one_error_line(capsys)
        assert str(mywork) in line and "not an earlier merge_dag output" in line
        assert snapshot(mywork) == before
    with pytest.raises(OutputError):
        merge(recipe, mywork, overwrite=True)
    assert snapshot(mywork) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mywork.")]


def test_current_directory_and_its_parents_are_refused(tmp_path, family, capsys, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    recipe = ta_recipe(tmp_path, family)
    monkeypatch.chdir(work)
    for target in (".", "..", str(work), str(tmp_path / "work")):
        assert cli(["merge", str(recipe), target, "--no-progress", "--overwrite"]) == 2
        line = one_error_line(capsys)
        assert "current directory" in line
    assert (work / "keep.txt").read_text() == "mine"


def test_inputs_and_folders_holding_or_inside_them_are_refused(tmp_path, family, capsys):
    base_before = snapshot(family["base"])
    recipe = ta_recipe(tmp_path, family)
    cases = {
        family["base"]: "is the input",
        family["e1"]: "is the input",
        tmp_path / "models": "contains the input",
        family["base"] / "merged": "lies inside the input",
    }
    for target, rel in cases.items():
        assert cli(["merge", str(recipe), str(target), "--no-progress", "--overwrite"]) == 2
        line = one_error_line(capsys)
        assert str(target) in line and rel in line
    # the tokenizer source is an input too
    other = write_model(tmp_path / "tok", base_state(), tiny_config())
    recipe2 = ta_recipe(tmp_path, family, extra=f"tokenizer_source: {other}", name="r2.yaml")
    with pytest.raises(OutputError, match="is the input"):
        merge(recipe2, other, overwrite=True)
    assert snapshot(family["base"]) == base_before
    assert not (family["base"] / "merged").exists()


def test_earlier_output_is_replaced_and_overwrite_only_adds_extra_files(tmp_path, family, capsys):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    merge(ta_recipe(tmp_path, family), out)
    assert (out / MARKER).is_file()
    res = merge(ta_recipe(tmp_path, family, weight=0.9, name="r2.yaml"), out)  # an earlier output: replaced
    assert json.loads((out / MARKER).read_text())["recipe"]["models"][0]["parameters"]["weight"] == 0.9
    (out / "eval-notes.txt").write_text("my notes")
    recipe3 = ta_recipe(tmp_path, family, weight=0.1, name="r3.yaml")
    assert cli(["merge", str(recipe3), str(out), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "eval-notes.txt" in line and "--overwrite" in line
    assert checkpoint_fingerprint(Checkpoint(out)) == res.output_fingerprint
    assert cli(["merge", str(recipe3), str(out), "--no-progress", "--overwrite"]) == 0
    assert not (out / "eval-notes.txt").exists()
    assert json.loads((out / MARKER).read_text())["recipe"]["models"][0]["parameters"]["weight"] == 0.1


def test_a_file_or_a_link_as_target_is_refused(tmp_path, family):
    f = tmp_path / "file.bin"
    f.write_text("data")
    link = tmp_path / "link"
    earlier = tmp_path / "earlier"
    merge(ta_recipe(tmp_path, family), earlier)
    link.symlink_to(earlier)
    for target, msg in ((f, "not a folder"), (link, "symbolic link")):
        with pytest.raises(OutputError, match=msg):
            merge(ta_recipe(tmp_path, family), target, overwrite=True)
    assert f.read_text() == "data" and (earlier / MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# 2. a crash between the renames of the atomic replace: recovery restores, never deletes
# ---------------------------------------------------------------------------------------------

CRASH_SCRIPT = """
import os, shutil, sys
from merge_dag.core import checkpoint
from merge_dag.core.engine import merge

point = sys.argv[3]
real_rename, real_rmtree = os.rename, shutil.rmtree

def rename(a, b):
    a, b = str(a), str(b)
    if point == "finish" and ".tmp-" in a and ".new-" in b: os._exit(9)      # before step 2
    if point == "swap_out" and ".old-" in b: os._exit(9)                      # between 2 and 3
    if point == "swap_in" and ".new-" in a: os._exit(9)                       # between 3 and 4
    return real_rename(a, b)

def rmtree(p, *a, **k):
    if point == "drop" and ".old-" in str(p): os._exit(9)                     # between 4 and 5
    return real_rmtree(p, *a, **k)

checkpoint.os.rename = rename
checkpoint.shutil.rmtree = rmtree
merge(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize(
    "point,survivor,left",
    [
        ("finish", "old", {".tmp-"}),
        ("swap_out", "new", {".new-"}),
        ("swap_in", "new", {".new-", ".old-"}),
        ("drop", "new", {".old-"}),
    ],
)
def test_crash_between_renames_keeps_a_complete_output(tmp_path, family, point, survivor, left):
    out = tmp_path / "out"
    old = merge(ta_recipe(tmp_path, family, weight=0.5), out)
    recipe_new = ta_recipe(tmp_path, family, weight=0.9, name="new.yaml")
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(recipe_new), str(out), point],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 9, proc.stderr
    leftovers = {p.name[len(".out") : len(".out") + 5] for p in tmp_path.iterdir() if p.name.startswith(".out.")}
    assert leftovers == left
    # the next merge into that path fails validation (an input with NaN): it must delete nothing
    bad = dict(load_all(family["e1"]))
    bad["model.norm.weight"] = bad["model.norm.weight"].clone().fill_(float("nan"))
    nan_model = write_model(tmp_path / "models" / "nan", bad, tiny_config())
    recipe_bad = recipe_file(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        base_model: {family["base"]}
        models:
        - {{model: {family["e0"]}, parameters: {{weight: 1}}}}
        - {{model: {nan_model}, parameters: {{weight: 1}}}}
    """,
        "bad.yaml",
    )
    with pytest.raises(MergeInputError, match="NaN"):
        merge(recipe_bad, out)
    want = old.output_fingerprint if survivor == "old" else None
    fp = checkpoint_fingerprint(Checkpoint(out))
    card = json.loads((out / MARKER).read_text())
    assert card["recipe"]["models"][0]["parameters"]["weight"] == (0.5 if survivor == "old" else 0.9)
    if want:
        assert fp == want
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_recovery_of_the_old_naming_restores_instead_of_deleting(tmp_path, family):
    """Before this fix a finished folder was swapped in from .X.tmp-*; a crash between the two
    renames left .X.old-* (old output) and .X.tmp-* (new output) and the next merge deleted both."""
    a = merge(ta_recipe(tmp_path, family, weight=0.5), tmp_path / "a")
    b = merge(ta_recipe(tmp_path, family, weight=0.9, name="b.yaml"), tmp_path / "b")
    out = tmp_path / "out"
    os.rename(a.out_dir, tmp_path / ".out.old-999999999-abcdef12")
    os.rename(b.out_dir, tmp_path / ".out.tmp-999999999-abcdef12")
    clean_stale_temporaries(out)
    assert checkpoint_fingerprint(Checkpoint(out)) == b.output_fingerprint  # the finished new output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # an .old- alone, the target gone: restored
    os.rename(out, tmp_path / ".out.old-999999998-abcdef13")
    clean_stale_temporaries(out)
    assert checkpoint_fingerprint(Checkpoint(out)) == b.output_fingerprint


def test_a_failing_rename_puts_the_old_output_back(tmp_path, family, monkeypatch):
    out = tmp_path / "out"
    old = merge(ta_recipe(tmp_path, family), out)
    real = os.rename

    def rename(a, b):
        if ".new-" in str(a):
            raise OSError(errno.EIO, "I/O error", str(a))
        return real(a, b)

    monkeypatch.setattr(ckmod.os, "rename", rename)
    with pytest.raises(OutputError, match="I/O error"):
        merge(ta_recipe(tmp_path, family, weight=0.9, name="r2.yaml"), out)
    monkeypatch.setattr(ckmod.os, "rename", real)
    assert checkpoint_fingerprint(Checkpoint(out)) == old.output_fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---------------------------------------------------------------------------------------------
# 6. non-finite parameters and outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where,value",
    [
        ("models[0].parameters.weight", ".nan"),
        ("models[0].parameters.weight", ".inf"),
        ("models[0].parameters.weight", "[0.5, -.inf]"),
        ("models[0].parameters.weight", "[{filter: mlp, value: .nan}, {value: 1.0}]"),
        ("parameters.lambda", ".nan"),
    ],
)
def test_non_finite_parameters_are_refused(tmp_path, family, where, value):
    w = value if where.startswith("models") else "0.5"
    lam = value if where == "parameters.lambda" else "1.0"
    p = recipe_file(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        base_model: {family["base"]}
        models:
          - model: {family["e0"]}
            parameters: {{weight: {w}}}
          - model: {family["e1"]}
            parameters: {{weight: 0.3}}
        parameters: {{lambda: {lam}}}
    """,
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: {where}: must be a finite number")


def test_non_finite_guidance_value_is_refused(tmp_path, family):
    p = recipe_file(
        tmp_path,
        f"""
        merge_method: linear
        models:
        - {{model: {family["e0"]}, parameters: {{weight: 1}}}}
        - {{model: {family["e1"]}, parameters: {{weight: 1}}}}
        guidance: {{regmean: {{ridge: .inf}}}}
    """,
    )
    with pytest.raises(RecipeError, match=r"guidance\.regmean\.ridge"):
        load_recipe(p)


def test_non_finite_merged_output_is_refused_and_nothing_written(tmp_path, family):
    p = recipe_file(
        tmp_path,
        f"""
        merge_method: linear
        models:
          - model: {family["e0"]}
            parameters: {{weight: 1.0e+8}}
          - model: {family["e1"]}
            parameters: {{weight: 1.0e+8}}
        parameters: {{normalize: false}}
        out_dtype: float16
    """,
    )
    with pytest.raises(MergeOutputError, match=r"merged tensor '[^']+' contains Inf values .*float16"):
        merge(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".out.")]


# ---------------------------------------------------------------------------------------------
# 7. config against tensors, tokenizer required or waived, integer tensors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,tensor",
    [
        ("hidden_size", 48, "model.embed_tokens.weight"),
        ("vocab_size", 100, "model.embed_tokens.weight"),
        ("num_hidden_layers", 3, "model.layers.1."),
        ("intermediate_size", 40, "mlp."),
    ],
)
def test_config_that_disagrees_with_tensors_is_refused_in_the_plan(tmp_path, family, key, value, tensor, capsys):
    cfg_path = family["base"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    recipe = ta_recipe(tmp_path, family)
    assert cli(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 2
    line = one_error_line(capsys)
    assert str(cfg_path) in line and f"{key} is {value}" in line and tensor in line
    assert not (tmp_path / "out").exists()


def test_tokenizer_is_required_or_explicitly_waived(tmp_path):
    cfg = tiny_config()
    base = base_state()
    fam = {
        "base": write_model(tmp_path / "m" / "base", base, cfg, tokenizer=False),
        "e0": write_model(tmp_path / "m" / "e0", perturb(base, 1), cfg, tokenizer=False),
        "e1": write_model(tmp_path / "m" / "e1", perturb(base, 2), cfg, tokenizer=False),
    }
    with pytest.raises(
        CheckpointError, match=r"tokenizer_source: model .* has no tokenizer files .*tokenizer_source: none"
    ):
        plan_merge(load_recipe(ta_recipe(tmp_path, fam)))
    res = merge(ta_recipe(tmp_path, fam, extra="tokenizer_source: none", name="waived.yaml"), tmp_path / "out")
    assert json.loads((tmp_path / "out" / MARKER).read_text())["tokenizer_source"] is None
    assert res.tensor_count and not any((tmp_path / "out" / n).exists() for n in ckmod.TOKENIZER_FILES)


def _with_int_tensor(folder: Path, values: torch.Tensor) -> None:
    state = load_all(folder)
    state["model.position_ids"] = values
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def test_integer_tensors_are_never_merged_as_floats(tmp_path, family):
    ids = torch.arange(8, dtype=torch.int64)
    _with_int_tensor(family["base"], ids)
    _with_int_tensor(family["e0"], ids)
    _with_int_tensor(family["e1"], ids.to(torch.float32))  # float in one expert, integer in the base
    with pytest.raises(MergeInputError, match=r"model '.*e1': tensor 'model.position_ids' is float32, but .* int64"):
        plan_merge(load_recipe(ta_recipe(tmp_path, family)))
    _with_int_tensor(family["e1"], ids + 1)  # integer everywhere, but different
    with pytest.raises(MergeInputError, match=r"tensor 'model.position_ids' is int64 and differs"):
        merge(ta_recipe(tmp_path, family), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _with_int_tensor(family["e1"], ids)  # identical: copied as it is
    merge(ta_recipe(tmp_path, family), tmp_path / "out")
    assert torch.equal(load_all(tmp_path / "out")["model.position_ids"], ids)


def test_task_vector_refuses_an_integer_tensor_that_differs(tmp_path, family):
    """The Dagster layer merges through cached task vectors: an integer tensor there is zero, so an
    expert whose integer tensor differs from the base's must be refused, not silently reset."""
    from merge_dag.core.task_vector import compute_task_vector

    ids = torch.arange(8, dtype=torch.int64)
    _with_int_tensor(family["base"], ids)
    _with_int_tensor(family["e0"], ids + 1)
    with pytest.raises(MergeInputError, match=r"tensor 'model.position_ids' is int64 and differs from base"):
        compute_task_vector(family["base"], family["e0"], tmp_path / "tv")
    assert not (tmp_path / "tv").exists()
    _with_int_tensor(family["e0"], ids)
    compute_task_vector(family["base"], family["e0"], tmp_path / "tv")
    assert torch.equal(load_all(tmp_path / "tv")["model.position_ids"], torch.zeros(8, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# 8. links out of a model folder are never copied into an output
# ---------------------------------------------------------------------------------------------


def test_symlink_out_of_the_model_folder_is_refused(tmp_path, family):
    secret = tmp_path / "secret.txt"
    secret.write_text("API_KEY=hunter2")
    link = family["base"] / "tokenizer_config.json"
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(CheckpointError, match=rf"{link}: is a symbolic link to {secret}, outside the model folder"):
        merge(ta_recipe(tmp_path, family), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # a link that stays inside the folder is a file of the model: copied (as a regular file)
    (family["base"] / "real_tok.json").write_text('{"ok": 1}')
    link.unlink()
    link.symlink_to("real_tok.json")
    merge(ta_recipe(tmp_path, family), tmp_path / "out")
    copied = tmp_path / "out" / "tokenizer_config.json"
    assert not copied.is_symlink() and copied.read_text() == '{"ok": 1}'


# ---------------------------------------------------------------------------------------------
# 9. user strings in the model card are escaped
# ---------------------------------------------------------------------------------------------


def test_model_card_escapes_names(tmp_path, family):
    evil = tmp_path / "models" / "<img src=x onerror=alert(1)>"
    shutil.copytree(family["e1"], evil)
    p = recipe_file(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        name: "<script>alert(1)</script> ```\\n# injected heading\\n```"
        base_model: {family["base"]}
        models:
          - model: {family["e0"]}
            parameters: {{weight: 0.5}}
          - model: "{evil}"
            parameters: {{weight: 0.3}}
    """,
    )
    merge(p, tmp_path / "out")
    readme = (tmp_path / "out" / "README.md").read_text()
    # the YAML front matter is data (the Hub parses it, never renders it as Markdown): the strings
    # there are YAML-quoted, and the document ends where it should
    import yaml

    assert readme.startswith("---\n")
    front, card = readme[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["merge_dag"]["recipe"]["name"].startswith("<script>")
    assert str(evil) in meta["base_model"]
    fence_lines = [line for line in card.splitlines() if line.startswith("```")]
    assert len(fence_lines) == 2 and fence_lines[0].rstrip("yaml") == fence_lines[1]  # one block, closed
    assert len(fence_lines[1]) > 3  # longer than the backtick run inside the recipe
    head, rest = card.split(fence_lines[0] + "\n", 1)
    code, tail = rest.split("\n" + fence_lines[1] + "\n", 1)
    rendered = head + tail  # markdown outside the code block (inside it, text is shown as text)
    assert "<script" not in rendered and "<img" not in rendered
    assert "&lt;script&gt;" in rendered and "&lt;img src=x onerror=alert\\(1\\)&gt;" in rendered
    assert not [line for line in rendered.splitlines() if "injected" in line and not line.startswith("# &lt;script")]
    assert "<script>alert(1)</script>" in code  # the recipe as written, inside a block it cannot close


def test_md_text_neutralises_code_and_newlines():
    from merge_dag.core.markdown import md_text

    assert md_text("a`b`c\nd|e<x>") == "a\\`b\\`c d\\|e&lt;x&gt;"


# ---------------------------------------------------------------------------------------------
# 10. one line and exit 2, never a traceback
# ---------------------------------------------------------------------------------------------


def test_recipe_not_utf8_or_a_folder(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"merge_method: linear\nname: caf\xe9\n")
    assert cli(["merge", str(bad), str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert f"{bad}:2: not UTF-8" in line
    assert cli(["merge", str(tmp_path), str(tmp_path / "o")]) == 2
    assert f"{tmp_path}: is a folder" in one_error_line(capsys)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_invalid_device(tmp_path, family, capsys, device):
    assert cli(["merge", str(ta_recipe(tmp_path, family)), str(tmp_path / "o"), "--device", device, "--dry-run"]) == 2
    assert repr(device) in one_error_line(capsys)


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, family, capsys, monkeypatch):
    real = CheckpointWriter.write
    calls = {"n": 0}

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp / self.shard_names[0]))
        return real(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", write)
    out = tmp_path / "out"
    assert cli(["merge", str(ta_recipe(tmp_path, family)), str(out), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "no space left on device" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_read_only_output_folder_is_one_line(tmp_path, family, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert cli(["merge", str(ta_recipe(tmp_path, family)), str(ro / "out"), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert str(ro / "out") in line and "read-only file system" in line


def test_cli_turns_any_oserror_into_one_line(monkeypatch, capsys):
    import merge_dag.cli as climod

    def boom(args):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.json")

    monkeypatch.setattr(climod, "_run_merge", boom)
    assert cli(["merge", "r.yaml", "out"]) == 2
    assert one_error_line(capsys) == "error: /x/y.json: No such file or directory"


def test_corrupt_lineage_database_is_one_line_and_repair_moves_it_aside(tmp_path, capsys):
    db = tmp_path / "lineage.duckdb"
    db.write_bytes(b"this is not a duckdb file" * 200)
    assert cli(["audit", "ties", "--db", str(db)]) == 2
    line = one_error_line(capsys)
    assert str(db) in line and "--repair" in line
    assert db.read_bytes().startswith(b"this is not")  # nothing changed
    assert cli(["audit", "--repair", "--db", str(db)]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("lineage.duckdb.corrupt-")]
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not") and not db.exists()
    from merge_dag.lineage.store import LineageStore

    store = LineageStore(db)
    store.record_run(run_id="r1", status="success")  # a fresh database
    assert [r["run_id"] for r in store.query("SELECT run_id FROM runs")] == ["r1"]
    assert cli(["audit", "--repair", "--db", str(db)]) == 0  # healthy: left alone
    assert "nothing to repair" in capsys.readouterr().out and db.exists()


def test_evaluation_error_is_a_merge_dag_error(tmp_path):
    from merge_dag.evaluation import EvaluationError, evaluate

    assert issubclass(EvaluationError, MergeDagError) and issubclass(EvaluationError, ValueError)
    with pytest.raises(MergeDagError, match="not a model folder"):
        evaluate(tmp_path, ["zoo_arev"], limit=1)


# ---------------------------------------------------------------------------------------------
# 11. YAML aliases ("billion laughs") are refused, not expanded
# ---------------------------------------------------------------------------------------------

LAUGHS = (
    "\n".join(
        ["merge_method: linear", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
        + ["models: [{model: x, parameters: {weight: *a9}}]"]
    )
    + "\n"
)


def test_yaml_aliases_are_refused_everywhere_recipes_load(tmp_path, capsys):
    p = tmp_path / "laughs.yaml"
    p.write_text(LAUGHS)
    with pytest.raises(RecipeError, match=rf"{p}:3: YAML alias \*a0 is not allowed"):
        load_recipe(p)
    assert cli(["merge", str(p), str(tmp_path / "o"), "--dry-run"]) == 2
    assert "YAML alias" in one_error_line(capsys)
    from merge_dag.project import recipe_spec  # the Dagster project's loader uses the same reader

    with pytest.raises(RecipeError, match="YAML alias"):
        recipe_spec(tmp_path, p)


# ---------------------------------------------------------------------------------------------
# 12. --dry-run checks everything knowable before reading tensors
# ---------------------------------------------------------------------------------------------


def test_dry_run_refuses_the_same_model_twice(tmp_path, family, capsys):
    twice = recipe_file(
        tmp_path,
        f"""
        merge_method: linear
        models:
          - model: {family["e0"]}
            parameters: {{weight: 1}}
          - model: {family["e0"]}
            parameters: {{weight: 1}}
    """,
    )
    assert cli(["merge", str(twice), str(tmp_path / "o"), "--dry-run"]) == 2
    assert "is listed twice" in one_error_line(capsys)
    alias = tmp_path / "alias"
    alias.symlink_to(family["e0"])
    linked = tmp_path / "hardlinked"
    linked.mkdir()
    for f in family["e0"].iterdir():
        os.link(f, linked / f.name)
    for other, msg in ((alias, "are the same checkpoint"), (linked, "share the weight file")):
        p = recipe_file(
            tmp_path,
            f"""
            merge_method: linear
            models:
              - model: {family["e0"]}
                parameters: {{weight: 1}}
              - model: {other}
                parameters: {{weight: 1}}
        """,
            "r.yaml",
        )
        assert cli(["merge", str(p), str(tmp_path / "o"), "--dry-run"]) == 2
        assert msg in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_dry_run_raises_what_the_merge_would(tmp_path, family, capsys):
    """The plan-time checks (target, device, config, tokenizer, links) run in --dry-run too."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.txt").write_text("a")
    recipe = ta_recipe(tmp_path, family)
    assert cli(["merge", str(recipe), str(user), "--dry-run"]) == 2
    dry = one_error_line(capsys)
    assert cli(["merge", str(recipe), str(user), "--no-progress"]) == 2
    assert one_error_line(capsys) == dry
