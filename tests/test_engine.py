"""The streaming engine end to end: tensors equal to the math, files, fingerprints, errors, kills."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from merge_dag.cli import main as cli
from merge_dag.core.checkpoint import INDEX_NAME, Checkpoint
from merge_dag.core.engine import merge, plan_merge
from merge_dag.core.errors import CheckpointError, MergeInputError, MissingTensorError
from merge_dag.core.fingerprint import checkpoint_fingerprint
from merge_dag.core.recipe import load_recipe

from _models import base_state, load_all, perturb, tiny_config, write_model

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fp_cache")


def recipe_file(tmp_path, body: str, name="recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def ta_recipe(tmp_path, fam, extra="", out_dtype="float32"):
    return recipe_file(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        base_model: {fam["base"]}
        models:
          - model: {fam["e0"]}
            parameters: {{weight: 0.5}}
          - model: {fam["e1"]}
            parameters: {{weight: [1.0, 0.0]}}
          - model: {fam["e2"]}
            parameters:
              weight: [{{filter: mlp, value: 2.0}}, {{value: 0.25}}]
        parameters: {{lambda: 0.8}}
        out_dtype: {out_dtype}
        {extra}
    """,
    )


def test_task_arithmetic_equals_the_math_with_parameter_maps(tmp_path, family):
    out = tmp_path / "merged"
    res = merge(ta_recipe(tmp_path, family), out)
    base, e = load_all(family["base"]), [load_all(family[f"e{i}"]) for i in range(3)]
    got = load_all(out)
    assert set(got) == set(base) and res.tensor_count == len(base)
    for name, b in base.items():
        b = b.float()
        li = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = 0.0 if li is None else li / 2
        w = [0.5, 1.0 - t, 2.0 if "mlp" in name else 0.25]
        want = b + 0.8 * sum(wi * (ei[name].float() - b) for wi, ei in zip(w, e))
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)


def test_output_folder_is_a_complete_hf_checkpoint(tmp_path, family):
    out = tmp_path / "merged"
    res = merge(ta_recipe(tmp_path, family, out_dtype="bfloat16"), out, shard_size=4000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 3
    assert (out / "generation_config.json").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["marker"] == "base"
    card = (out / "README.md").read_text()
    prov = json.loads((out / "merge_dag.json").read_text())
    for name in ("base", "e0", "e1", "e2"):
        fp = checkpoint_fingerprint(family[name])
        assert fp in card and res.fingerprints[str(family[name])] == fp
    assert "task_arithmetic" in card and "lambda: 0.8" in card
    assert prov["method"] == "task_arithmetic" and prov["recipe"]["parameters"] == {"lambda": 0.8}
    assert all(Checkpoint(out).get(n).dtype == torch.bfloat16 for n in Checkpoint(out).tensor_names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_tokenizer_source_names_another_model(tmp_path, family):
    p = ta_recipe(tmp_path, family, extra=f"tokenizer_source: {family['e1']}")
    merge(p, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["marker"] == "e1"


def test_round_trip_loads_with_transformers_and_generates(tmp_path, family):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    merge(ta_recipe(tmp_path, family, out_dtype="bfloat16"), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = load_all(out)
    assert torch.equal(model.state_dict()["lm_head.weight"], ref["lm_head.weight"])
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert ids.shape == (1, 8)


def test_random_methods_repeat_under_a_seed(tmp_path, family):
    def run(seed, out):
        p = recipe_file(
            tmp_path,
            f"""
            merge_method: dare_ties
            base_model: {family["base"]}
            models:
              - model: {family["e0"]}
                parameters: {{weight: 1.0, density: 0.5}}
              - model: {family["e1"]}
                parameters: {{weight: 1.0, density: 0.5}}
            seed: {seed}
        """,
            name=f"r{seed}.yaml",
        )
        merge(p, out)
        return load_all(out)

    a, b, c = run(7, tmp_path / "a"), run(7, tmp_path / "b"), run(8, tmp_path / "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_passthrough_slices_stack_layers(tmp_path, family):
    p = recipe_file(
        tmp_path,
        f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {family["e0"]}, layer_range: [0, 2]}}]
          - sources: [{{model: {family["e1"]}, layer_range: [1, 3]}}]
        dtype: bfloat16
    """,
    )
    out = tmp_path / "frank"
    merge(p, out)
    got, e0, e1 = load_all(out), load_all(family["e0"]), load_all(family["e1"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    q = "self_attn.q_proj.weight"
    assert torch.equal(got[f"model.layers.0.{q}"], e0[f"model.layers.0.{q}"])
    assert torch.equal(got[f"model.layers.1.{q}"], e0[f"model.layers.1.{q}"])
    assert torch.equal(got[f"model.layers.2.{q}"], e1[f"model.layers.1.{q}"])
    assert torch.equal(got[f"model.layers.3.{q}"], e1[f"model.layers.2.{q}"])
    assert torch.equal(got["model.embed_tokens.weight"], e0["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], e0["lm_head.weight"])
    assert not any(k.startswith("model.layers.4.") for k in got)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


# ---------------------------------------------------------------------------------------------
# bad inputs: each a clear error naming model and tensor, and no output folder left behind
# ---------------------------------------------------------------------------------------------


def _assert_no_output(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_shape_disagreement(tmp_path, family):
    state = load_all(family["e1"])
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(8, 8)
    write_model(family["e1"], state, tiny_config(3), shards=1)
    for f in family["e1"].glob("model-*"):
        f.unlink()
    (family["e1"] / INDEX_NAME).unlink()
    out = tmp_path / "out"
    with pytest.raises(
        MergeInputError, match=r"model '.*e1': tensor 'model.layers.1.mlp.up_proj.weight' has shape \[8, 8\]"
    ):
        merge(ta_recipe(tmp_path, family), out)
    _assert_no_output(tmp_path, out)


def test_missing_tensor_in_one_expert(tmp_path, family):
    state = load_all(family["e2"])
    del state["model.layers.2.self_attn.k_proj.weight"]
    shutil.rmtree(family["e2"])
    write_model(family["e2"], state, tiny_config(3))
    out = tmp_path / "out"
    with pytest.raises(
        MissingTensorError,
        match=r"tensor 'model.layers.2.self_attn.k_proj.weight' is in .*'.*e1' but missing from '.*e2'; "
        r"set `missing_tensors: base`",
    ):
        merge(ta_recipe(tmp_path, family), out)
    _assert_no_output(tmp_path, out)


def test_extra_tensor_in_one_expert(tmp_path, family):
    state = load_all(family["e2"])
    state["model.extra.weight"] = torch.zeros(2)
    shutil.rmtree(family["e2"])
    write_model(family["e2"], state, tiny_config(3))
    with pytest.raises(
        MissingTensorError, match=r"tensor 'model.extra.weight' is in '.*e2' but missing from '.*base', "
    ):
        merge(ta_recipe(tmp_path, family), tmp_path / "out")


def test_nan_in_an_input(tmp_path, family):
    state = load_all(family["e0"])
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    shutil.rmtree(family["e0"])
    write_model(family["e0"], state, tiny_config(3))
    out = tmp_path / "out"
    with pytest.raises(
        MergeInputError, match=r"model '.*e0': tensor 'model.layers.2.mlp.down_proj.weight' contains NaN"
    ):
        merge(ta_recipe(tmp_path, family), out)
    _assert_no_output(tmp_path, out)


def test_inf_in_an_input(tmp_path, family):
    state = load_all(family["e1"])
    state["lm_head.weight"][3, 3] = float("inf")
    shutil.rmtree(family["e1"])
    write_model(family["e1"], state, tiny_config(3))
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=r"model '.*e1': tensor 'lm_head.weight' contains Inf"):
        merge(ta_recipe(tmp_path, family), out)
    _assert_no_output(tmp_path, out)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("where,bad", [("e2", "nan"), ("base", "inf"), ("e0", "-inf")])
def test_non_finite_input_is_named_whatever_the_method(tmp_path, family, method, where, bad):
    """Streamed steps (task_arithmetic, ties) check only their output on the way and then name the
    input; the other methods check every input as it is read: the same error either way."""
    name = "model.layers.1.self_attn.q_proj.weight"
    state = load_all(family[where])
    state[name][1, 2] = float(bad)
    shutil.rmtree(family[where])
    write_model(family[where], state, tiny_config(3))
    entry = "\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.4}}"
    models = "".join(entry.format(family[e]) for e in ("e0", "e1", "e2"))
    recipe = recipe_file(tmp_path, f"merge_method: {method}\nbase_model: {family['base']}\nmodels:{models}\nseed: 1\n")
    out = tmp_path / "out"
    word = "NaN" if bad == "nan" else "Inf"
    with pytest.raises(MergeInputError, match=rf"model '.*{where}': tensor '{name}' contains {word} values"):
        merge(recipe, out)
    _assert_no_output(tmp_path, out)


def test_truncated_input(tmp_path, family):
    shard = sorted(family["e1"].glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-64])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated safetensors file: tensor"):
        merge(ta_recipe(tmp_path, family), out)
    _assert_no_output(tmp_path, out)


def test_path_that_does_not_exist(tmp_path, family):
    family = dict(family, e1=tmp_path / "no-such-model")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model '.*no-such-model': path does not exist"):
        merge(ta_recipe(tmp_path, family), out)
    _assert_no_output(tmp_path, out)


def test_same_model_under_two_names_by_path(tmp_path, family):
    alias = tmp_path / "alias"
    alias.symlink_to(family["e0"], target_is_directory=True)
    family = dict(family, e1=alias)
    with pytest.raises(MergeInputError, match=r"model '.*alias' and model '.*e0' are the same checkpoint"):
        merge(ta_recipe(tmp_path, family), tmp_path / "out")


def test_same_model_under_two_names_by_content(tmp_path, family):
    copy = tmp_path / "copy-of-e0"
    shutil.copytree(family["e0"], copy)
    family = dict(family, e2=copy)
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=r"model '.*e0' and model '.*copy-of-e0' hold identical weights"):
        merge(ta_recipe(tmp_path, family), out)
    _assert_no_output(tmp_path, out)


def test_pickled_expert_is_refused(tmp_path, family):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    family = dict(family, e1=legacy)
    with pytest.raises(CheckpointError, match=r"holds only pickled weights.*Convert it once"):
        merge(ta_recipe(tmp_path, family), tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# CLI, dry run, and a merge killed part-way
# ---------------------------------------------------------------------------------------------


def test_cli_dry_run_prints_plan_and_writes_nothing(tmp_path, family, capsys):
    out = tmp_path / "out"
    assert cli(["merge", str(ta_recipe(tmp_path, family)), str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "method:     task_arithmetic" in text
    assert "est. peak memory" in text and "model.layers.2.mlp.up_proj.weight" in text
    assert "weight=2" in text and "lambda=0.8" in text
    _assert_no_output(tmp_path, out)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    p = recipe_file(tmp_path, "merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nextra_key: 1\n")
    assert cli(["merge", str(p), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "extra_key: unknown key" in err and "Traceback" not in err


def test_cli_merge_runs(tmp_path, family, capsys):
    out = tmp_path / "out"
    assert cli(["merge", str(ta_recipe(tmp_path, family)), str(out), "--no-progress", "--shard-size", "5KB"]) == 0
    assert "merged" in capsys.readouterr().out
    assert len(list(out.glob("*.safetensors"))) > 1


KILL_SCRIPT = """
import sys, time
from merge_dag.core.engine import execute, plan_merge
from merge_dag.core.recipe import load_recipe

def on_tensor(done, total):
    if done == 5:
        print("HALFWAY", flush=True)
        time.sleep(60)

execute(plan_merge(load_recipe(sys.argv[1])), sys.argv[2], progress=False, on_tensor=on_tensor)
"""


def test_merge_killed_part_way_leaves_nothing_and_next_run_succeeds(tmp_path, family):
    recipe = ta_recipe(tmp_path, family)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(recipe), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout.readline().strip() == "HALFWAY"
        tmp_dirs = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        assert len(tmp_dirs) == 1 and any(tmp_dirs[0].iterdir())  # it was writing
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    res = merge(recipe, out)  # the next run succeeds and sweeps the dead run's temporary folder
    assert out.exists() and res.tensor_count == len(Checkpoint(out).tensors)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_plan_estimates_memory_from_largest_tensor(tmp_path, family):
    plan = plan_merge(load_recipe(ta_recipe(tmp_path, family)))
    largest = max(t.numel() for t in load_all(family["base"]).values())
    assert plan.largest_tensor == largest
    assert plan.estimated_peak_bytes() == (4 + 2) * largest * 4 + 4 * largest * 2


def test_unchanged_expert_weights_keep_fingerprint_after_rewrite(tmp_path):
    state = base_state()
    a = write_model(tmp_path / "a", perturb(state, 1), tiny_config())
    fp = checkpoint_fingerprint(a)
    write_model(tmp_path / "a", perturb(state, 1), tiny_config())  # same content, new mtime
    assert checkpoint_fingerprint(a) == fp
