"""Fisher merging (merge_dag.guidance.fisher): the diagonal Fisher against a direct autograd computation on
a tiny random Llama, the merge against a plain-torch transcription of its formula, the fishers/<expert>
statistic as a cached Dagster asset shared by two recipes, `merge-dag merge` on a Fisher recipe equal to
the project's merge, and bad input refused with one typed error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_project
from safetensors.torch import load_file

from merge_dag.core.checkpoint import Checkpoint
from merge_dag.core.errors import MergeDagError, RecipeError
from merge_dag.core.recipe import parse_recipe
from merge_dag.guidance import fisher
from merge_dag.guidance.calibration import load_batches, load_tokenizer
from merge_dag.guidance.errors import GuidanceError
from merge_dag.guidance.model import load_model

from _models import save_hf_llama, tiny_config

TEXTS = [
    "add:13+46=59",
    "rev:abc=cba",
    "sort:3,1,2=1,2,3",
    "count:aab a=2",
    "add:7+8=15",
    "rev:hello world=dlrow olleh",
    "x",
]
CI = "data/models/ci"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base + two experts (base + noise), saved HF folders with the zoo's tokenizer, and calibration files."""
    root = tmp_path_factory.mktemp("fisher")
    base = save_hf_llama(root / "base")
    out = {"base": root / "base"}
    for i, (seed, sigma) in enumerate([(100, 0.05), (101, 0.01)]):
        g = torch.Generator().manual_seed(seed)
        save_hf_llama(root / f"e{i}", {k: v + sigma * torch.randn(v.shape, generator=g) for k, v in base.items()})
        out[f"e{i}"] = root / f"e{i}"
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    qa = [t.split("=", 1) for t in TEXTS if "=" in t]
    (root / "qa.jsonl").write_text("".join(json.dumps({"prompt": p + "=", "answer": a}) + "\n" for p, a in qa))
    out["calib"], out["qa"] = root / "calib.jsonl", root / "qa.jsonl"
    return out


def direct_fisher(model, batches, estimator: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """sum over rows of (d/dtheta sum_t log p(y_t | x_<t))^2 / number of targets, by torch.autograd.grad
    on each row alone; y_t the text's next token, or drawn from the model's softmax in row order."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    tokens = 0
    for b in batches:
        for r in range(b.input_ids.shape[0]):
            real = b.attention_mask[r].bool()
            ids, sel = b.input_ids[r][real], b.select[r][real]
            logits = model(input_ids=ids[None]).logits[0]
            terms = []
            for t in range(len(ids) - 1):
                if not sel[t + 1]:
                    continue
                logp = F.log_softmax(logits[t].float(), -1)
                if estimator == "empirical":
                    y = ids[t + 1]
                else:  # one draw per target, in position order, as torch.multinomial over the rows
                    y = None
                terms.append((t, logp, y))
            if not terms:
                continue
            if estimator == "sampled":
                probs = torch.stack([lp.detach().exp() for _, lp, _ in terms])
                ys = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                terms = [(t, lp, y) for (t, lp, _), y in zip(terms, ys)]
            score = sum(lp[y] for _, lp, y in terms)
            grads = torch.autograd.grad(score, list(params.values()))
            for (n, _), g in zip(params.items(), grads):
                acc[n] += g.double() ** 2
            tokens += len(terms)
    return {n: a / tokens for n, a in acc.items()}


# ---------------------------------------------------------------------------------------------- statistic


@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
def test_fisher_equals_a_direct_autograd_computation(family, estimator):
    model = load_model(family["e0"])
    batches = load_batches(family["calib"], load_tokenizer(family["e0"]), batch_size=3)  # padded batches
    got = fisher.fisher_diagonal(model, batches, estimator=estimator)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # left as they were
    want = direct_fisher(model, batches, estimator)
    assert sorted(got.names) == sorted(want)
    lengths = [int(n) for b in batches for n in b.attention_mask.sum(1)]
    assert (
        got.meta["tokens"] == sum(n - 1 for n in lengths)
        and got.meta["rows"] == sum(n > 1 for n in lengths) == len(TEXTS) - 1
    )  # "x": one token, no target
    assert got.meta["estimator"] == estimator
    for n, w in want.items():
        torch.testing.assert_close(got.get(n).double(), w, rtol=1e-4, atol=1e-12)
        assert got.get(n).dtype == torch.float32
    # per-row passes: the batch size (padding) changes nothing
    again = fisher.fisher_diagonal(
        model, load_batches(family["calib"], load_tokenizer(family["e0"]), batch_size=1), estimator=estimator
    )
    for n in want:
        torch.testing.assert_close(again.get(n), got.get(n), rtol=1e-5, atol=1e-12)


def test_answer_only_fisher_scores_the_answer_tokens(family):
    model = load_model(family["e1"])
    tok = load_tokenizer(family["e1"])
    batches = load_batches(family["qa"], tok, batch_size=4, tokens="answer")
    got = fisher.fisher_diagonal(model, batches, estimator="empirical")
    want = direct_fisher(model, batches, "empirical")
    assert got.meta["tokens"] == sum(int(b.select[:, 1:].sum()) for b in batches)
    for n, w in want.items():
        torch.testing.assert_close(got.get(n).double(), w, rtol=1e-4, atol=1e-12)


def test_tied_parameters_are_scored_once_and_saved_once(tmp_path, family):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**{**tiny_config(layers=1, hidden=32, vocab=64), "tie_word_embeddings": True}))
    batches = load_batches(family["calib"], load_tokenizer(family["e0"]), batch_size=4)
    got = fisher.fisher_diagonal(model.eval(), batches, estimator="empirical")
    assert got.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    want = direct_fisher(model, batches, "empirical")  # named_parameters: the tied tensor once
    torch.testing.assert_close(
        got.get("lm_head.weight").double(), want["model.embed_tokens.weight"], rtol=1e-4, atol=1e-12
    )
    folder = got.save(tmp_path / "f")
    raw = load_file(str(folder / "fisher.safetensors"))
    assert "lm_head.weight" not in raw and all(v.dtype == torch.float32 for v in raw.values())
    back = fisher.FisherStats.load(folder)
    assert back.tied == got.tied and back.meta["tokens"] == got.meta["tokens"]
    for n in list(raw) + ["lm_head.weight"]:
        assert torch.equal(back.get(n), got.get(n))


# ---------------------------------------------------------------------------------------------- the merge


def transcription(thetas, fishers, weights, eps, base=None):
    """The formula in plain torch (float64): floor each F at eps and average, or the base with Fisher eps."""
    if base is None:
        fs = [torch.clamp(f, min=eps) for f in fishers]
        return sum(w * f * t for w, f, t in zip(weights, fs, thetas)) / sum(w * f for w, f in zip(weights, fs))
    return (eps * base + sum(w * f * t for w, f, t in zip(weights, fishers, thetas))) / (
        eps + sum(w * f for w, f in zip(weights, fishers))
    )


def test_fisher_tensor_is_the_formula():
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    fishers = [torch.rand(5, 4, generator=g, dtype=torch.float64) ** 4 for _ in range(3)]
    fishers[1][0] = 0.0  # below the floor in one expert
    for f in fishers:
        f[4] = 0.0  # no Fisher mass in any expert on the last row
    base = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w, eps = [1.0, 0.5, 2.0], 1e-3
    f32 = lambda xs: [x.float() for x in xs]  # noqa: E731
    got = fisher.fisher_tensor(f32(thetas), f32(fishers), w, eps)
    torch.testing.assert_close(got.double(), transcription(thetas, fishers, w, eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[4].double(), sum(wi * t[4] for wi, t in zip(w, thetas)) / sum(w))  # weighted mean
    got = fisher.fisher_tensor(f32(thetas), f32(fishers), w, eps, base=base.float())
    torch.testing.assert_close(got.double(), transcription(thetas, fishers, w, eps, base), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[4].double(), base[4], rtol=1e-6, atol=1e-7)  # no mass: the base's
    one = fisher.fisher_tensor([thetas[0].float()], [fishers[0].float()], [1.0], eps)
    torch.testing.assert_close(one, thetas[0].float())  # one expert: its own theta
    same = fisher.fisher_tensor(f32(thetas), [fishers[0].float()] * 3, [1.0] * 3, eps)
    torch.testing.assert_close(same.double(), sum(thetas) / 3, rtol=1e-5, atol=1e-6)  # equal Fishers: the mean
    none = fisher.fisher_tensor(f32(thetas), [None] * 3, w, eps)  # a tensor no statistic has
    torch.testing.assert_close(none.double(), sum(wi * t for wi, t in zip(w, thetas)) / sum(w))
    with pytest.raises(GuidanceError, match="tensor 'q': Fisher merging needs weights >= 0"):
        fisher.fisher_tensor(f32(thetas), f32(fishers), [1.0, -1.0, 1.0], eps, name="q")
    with pytest.raises(GuidanceError, match=r"tensor 'q': input 1 has shape \[5, 4\] and Fisher \[4\]"):
        fisher.fisher_tensor(f32(thetas), [fishers[0].float(), torch.ones(4), None], w, eps, name="q")


@pytest.fixture(scope="module")
def stats(family):
    batches = {n: load_batches(family["calib"], load_tokenizer(family[n]), batch_size=4) for n in ("e0", "e1")}
    return {n: fisher.fisher_diagonal(load_model(family[n]), batches[n]) for n in ("e0", "e1")}


@pytest.mark.parametrize(
    "with_base,normalize", [(False, None), (True, None), (False, "global"), (False, "tensor"), (True, "tensor")]
)
def test_fisher_checkpoint_is_the_formula_per_tensor(tmp_path, family, stats, with_base, normalize):
    weights = [[{"filter": "mlp", "value": 3.0}, {"value": 1.0}], 1.0]  # a filter list, as recipes give it
    base = family["base"] if with_base else None
    eps = 1e-8 if normalize is None else 1e-3
    out = fisher.fisher_checkpoint(
        [family["e0"], family["e1"]],
        [stats["e0"], stats["e1"]],
        tmp_path / "fm",
        weights,
        base=base,
        epsilon=eps,
        normalize=normalize,
    )
    res = load_file(str(next(out.glob("*.safetensors"))))
    e0, e1, b = (load_file(str(family[n] / "model.safetensors")) for n in ("e0", "e1", "base"))
    assert set(res) == set(e0)
    # global: each expert's Fisher over the mean of all its elements, by hand in float64
    total = {k: torch.cat([stats[k].get(n).double().flatten() for n in stats[k].names]).mean() for k in stats}
    for n in e0:
        w = [3.0 if "mlp" in n else 1.0, 1.0]
        fs = [stats[k].get(n).double() for k in ("e0", "e1")]
        if normalize == "global":
            fs = [f / total[k] for f, k in zip(fs, ("e0", "e1"))]
        elif normalize == "tensor":
            fs = [f / f.mean() for f in fs]
        want = transcription([e0[n].double(), e1[n].double()], fs, w, eps, b[n].double() if with_base else None)
        torch.testing.assert_close(res[n].double(), want, rtol=1e-4, atol=1e-6)
    if normalize is not None:
        return
    assert Checkpoint(out).info("model.norm.weight").dtype == torch.float32
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    half = fisher.fisher_checkpoint(
        [family["e0"], family["e1"]],
        [stats["e0"], stats["e1"]],
        tmp_path / "half",
        weights,
        base=base,
        epsilon=1e-8,
        out_dtype=torch.bfloat16,
    )
    for n, t in load_file(str(next(half.glob("*.safetensors")))).items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, res[n].to(torch.bfloat16)), n


def test_bad_input_is_one_typed_error(tmp_path, family, stats):
    model = load_model(family["e0"])
    batches = load_batches(family["calib"], load_tokenizer(family["e0"]), batch_size=4)
    with pytest.raises(GuidanceError, match="Fisher estimator must be one of sampled, empirical, got 'exact'"):
        fisher.fisher_diagonal(model, batches, estimator="exact")
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    single = load_batches(tmp_path / "one.jsonl", load_tokenizer(family["e0"]))
    with pytest.raises(GuidanceError, match="no target tokens"):
        fisher.fisher_diagonal(model, single)
    # statistics of another architecture: named, nothing written
    other = fisher.FisherStats({"model.layers.9.mlp.up_proj.weight": torch.ones(2)}, {}, {}, "other.safetensors")
    with pytest.raises(GuidanceError, match="other.safetensors: tensor 'model.layers.9.mlp.up_proj.weight' is not in"):
        fisher.fisher_checkpoint([family["e0"], family["e1"]], [stats["e0"], other], tmp_path / "x")
    with pytest.raises(GuidanceError, match="Fisher normalize must be one of global, tensor"):
        fisher.fisher_checkpoint([family["e0"]], [stats["e0"]], tmp_path / "x", normalize="layer")
    with pytest.raises(GuidanceError, match="one Fisher per expert: 2 experts, 1 Fishers"):
        fisher.fisher_checkpoint([family["e0"], family["e1"]], [stats["e0"]], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    folder = stats["e0"].save(tmp_path / "saved")
    (folder / "fisher.json").write_text("{nope")
    with pytest.raises(GuidanceError, match="fisher.json: invalid JSON"):
        fisher.FisherStats.load(folder)
    (folder / "fisher.safetensors").unlink()
    with pytest.raises(GuidanceError, match="fisher.safetensors: Fisher statistics file is missing"):
        fisher.FisherStats.load(folder)


def _recipe(text: str, tmp_path: Path):
    import yaml

    return parse_recipe(yaml.safe_load(text), where="r.yaml", source_path=tmp_path / "r.yaml", root=tmp_path)


def test_recipe_validation_names_the_key(tmp_path, family):
    cal = family["calib"]
    ok = f"""
merge_method: linear
models:
  - {{model: {family["e0"]}, calibration: {cal}}}
  - {{model: {family["e1"]}, calibration: {cal}}}
parameters: {{weight: 1.0}}
guidance:
  fisher: {{estimator: empirical, epsilon: 1.0e-5}}
"""
    r = _recipe(ok, tmp_path)
    assert r.guidance.fisher.estimator == "empirical" and r.guidance.fisher.epsilon == 1e-5
    assert _recipe(ok.replace("{estimator: empirical, epsilon: 1.0e-5}", "{}"), tmp_path).guidance.fisher.estimator == (
        "sampled"
    )
    with pytest.raises(RecipeError, match=r"r.yaml: guidance.fisher: .*`linear` merge; merge_method is 'ties'"):
        _recipe(ok.replace("merge_method: linear", f"merge_method: ties\nbase_model: {family['base']}"), tmp_path)
    with pytest.raises(RecipeError, match=r"r.yaml: models\[1\].calibration: required by guidance.fisher"):
        _recipe(ok.replace(f"{family['e1']}, calibration: {cal}", f"{family['e1']}"), tmp_path)
    with pytest.raises(RecipeError, match="guidance.fisher: cannot be combined with sparsity, coefficients, aim or"):
        _recipe(ok + "  regmean: {a: 0.5}\n", tmp_path)
    with pytest.raises(MergeDagError, match="r.yaml.*estimator"):
        _recipe(ok.replace("estimator: empirical", "estimator: exact"), tmp_path)
    assert _recipe(ok.replace("epsilon: 1.0e-5", "normalize: tensor"), tmp_path).guidance.fisher.normalize == "tensor"
    with pytest.raises(MergeDagError, match="r.yaml.*normalize"):
        _recipe(ok.replace("epsilon: 1.0e-5", "normalize: layer"), tmp_path)
    with pytest.raises(MergeDagError, match="r.yaml.*epsilon"):
        _recipe(ok.replace("epsilon: 1.0e-5", "epsilon: 0"), tmp_path)


# ---------------------------------------------------------------------------------------------- Dagster


FISHER = f"""
name: {{name}}
merge_method: linear
models:
  - {{{{model: {CI}/arev, calibration: arev}}}}
  - {{{{model: {CI}/sort, calibration: sort, parameters: {{{{weight: {{w}}}}}}}}}}
parameters: {{{{weight: 1.0}}}}
guidance:
  fisher: {{{{epsilon: {{eps}}}}}}
"""


def test_the_fisher_statistic_is_a_cached_asset_shared_by_two_recipes(tmp_path, ci_zoo, instance, monkeypatch, capsys):
    """fishers/<expert>__<set> is built once for two recipes that merge the same experts on the same sets
    (a second run finds both statistics in cache and builds only the new recipe's merge); the merges equal
    fisher_checkpoint on the stored statistics, and `merge-dag merge` on the recipe writes the same tensors."""
    import dagster as dg

    from merge_dag.cli import main
    from merge_dag.dagster.definitions import ALL_JOB, build_definitions
    from merge_dag.dagster.resources import MergeDagResource
    from merge_dag.lineage.store import LineageStore
    from merge_dag.project import load_project

    a = FISHER.format(name="fisher_a", w=1.0, eps=1e-6)
    root = make_project(tmp_path, {"fisher_a.yaml": a})
    p = load_project(root)
    assert set(p.fishers) == {"ci_arev__arev", "ci_sort__sort"}
    res = MergeDagResource(root=str(root), db_path=str(root / "data" / "lineage.duckdb"), calibration_batch_size=16)
    stat_keys = [dg.AssetKey(["fishers", n]) for n in p.fishers]

    def run(recipes: list[str]):
        job = build_definitions(root, resource=res).resolve_job_def(ALL_JOB)
        keys = stat_keys + [dg.AssetKey(["merged", r]) for r in recipes]
        result = job.execute_in_process(instance=instance, asset_selection=keys)
        assert result.success
        steps = {}
        for e in LineageStore(root / "data" / "lineage.duckdb").events(run_id=result.run_id):
            steps.setdefault(e["event"], set()).add(e["step"])
        return result, steps

    first, ev = run(["fisher_a"])
    assert ev["materialized"] == {"fishers/ci_arev__arev", "fishers/ci_sort__sort", "merged/fisher_a"}

    def folder(result, *key):
        for e in result.get_asset_materialization_events():
            mat = e.event_specific_data.materialization
            if tuple(mat.asset_key.path) == key:
                return root / mat.metadata["path"].value
        raise KeyError(key)

    stats = [fisher.FisherStats.load(folder(first, "fishers", f"ci_{t}__{t}")) for t in ("arev", "sort")]
    assert stats[0].meta["estimator"] == "sampled" and stats[0].meta["seed"] == 0
    assert stats[0].meta["model"] == f"{CI}/arev" and stats[0].meta["batch_size"] == 16
    direct = fisher.fisher_checkpoint([root / CI / "arev", root / CI / "sort"], stats, tmp_path / "direct")
    got, want = Checkpoint(folder(first, "merged", "fisher_a")), Checkpoint(direct)
    assert got.tensor_names == want.tensor_names
    for n in want.tensor_names:
        assert torch.equal(got.get(n), want.get(n)), n
    card = json.loads((folder(first, "merged", "fisher_a") / "merge_dag.json").read_text())
    assert card["method"] == "fisher" and set(card["guidance"]["artifacts"]) == {"fishers", "fishers:ci_sort__sort"}

    (root / "data" / "recipes" / "fisher_b.yaml").write_text(
        FISHER.format(name="fisher_b", w=2.0, eps=1e-4) + "out_dtype: bfloat16\n"
    )
    second, ev = run(["fisher_a", "fisher_b"])
    assert ev["materialized"] == {"merged/fisher_b"}
    assert {"fishers/ci_arev__arev", "fishers/ci_sort__sort", "merged/fisher_a"} <= ev["cache_hit"]
    b = Checkpoint(folder(second, "merged", "fisher_b"))
    direct_b = fisher.fisher_checkpoint(
        [root / CI / "arev", root / CI / "sort"],
        stats,
        tmp_path / "direct_b",
        weights=[1.0, 2.0],
        epsilon=1e-4,
        out_dtype=torch.bfloat16,
    )
    assert {b.info(n).dtype for n in b.tensor_names} == {torch.bfloat16}
    for n in b.tensor_names:
        assert torch.equal(b.get(n), Checkpoint(direct_b).get(n)), n

    # merge-dag merge inside the project reads both Fishers from its cache (the assets' keys) and writes
    # the same tensors; with --no-cache it computes them itself (same batch size), same tensors again
    monkeypatch.chdir(root)
    out = tmp_path / "cached"
    args = ["merge", "data/recipes/fisher_a.yaml", str(out), "--calibration-batch-size", "16", "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "fishers/ci_arev__arev: cache hit" in err and "fishers/ci_sort__sort: cache hit" in err, err
    for n in want.tensor_names:
        assert torch.equal(Checkpoint(out).get(n), want.get(n)), n
    out = tmp_path / "offline"
    assert main([*args[:2], str(out), *args[3:], "--no-cache"]) == 0, capsys.readouterr().err
    for n in want.tensor_names:
        assert torch.equal(Checkpoint(out).get(n), want.get(n)), n
    assert json.loads((out / "merge_dag.json").read_text())["guidance"]["statistics"] == [
        f"fisher of {CI}/arev on arev",
        f"fisher of {CI}/sort on sort",
    ]
    # bad input from the CLI: one line naming the file and key, exit 2
    bad = root / "data" / "recipes" / "bad.yaml"
    bad.write_text(a.replace("merge_method: linear", "merge_method: ties\nbase_model: data/models/ci/base"))
    capsys.readouterr()
    assert main(["merge", str(bad), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml: guidance.fisher:" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "bad").exists()
