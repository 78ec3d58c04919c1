"""Recipes: mergekit's YAML shape, parameter maps, and errors that name the file and the key."""

import textwrap

import pytest

from merge_dag.core import params as pmap
from merge_dag.core.errors import RecipeError
from merge_dag.core.recipe import load_recipe


def write(tmp_path, text, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_mergekit_shape_loads(tmp_path):
    p = write(
        tmp_path,
        """
        merge_method: ties
        base_model: base
        models:
          - model: base
          - model: a
            parameters: {weight: 1.0, density: [0.2, 0.8]}
          - model: b
            parameters:
              weight: [{filter: mlp, value: 0.5}, {value: 1.0}]
              density: 0.5
        parameters: {lambda: 0.9, normalize: true}
        dtype: float32
        out_dtype: bfloat16
        tokenizer_source: base
    """,
    )
    r = load_recipe(p)
    assert r.merge_method == "ties" and r.base_model == "base"
    assert [m.model for m in r.models] == ["base", "a", "b"]
    assert r.parameters["lambda"] == 0.9
    assert r.source_path == p.absolute()


def test_gradient_interpolates_over_layers_like_mergekit():
    g = [0.0, 1.0, 0.5]
    assert pmap.evaluate(g, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.0
    assert pmap.evaluate(g, "x", 0.25) == pytest.approx(0.5)
    assert pmap.evaluate(g, "x", 0.5) == pytest.approx(1.0)
    assert pmap.evaluate(g, "x", 0.75) == pytest.approx(0.75)
    assert pmap.evaluate(g, "x", 1.0) == pytest.approx(0.5)
    assert pmap.layer_position("model.layers.3.self_attn.q_proj.weight", 7) == pytest.approx(0.5)
    assert pmap.layer_position("model.embed_tokens.weight", 7) == 0.0
    assert pmap.layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def test_filters_first_match_wins():
    v = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 7}]
    assert pmap.evaluate(v, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.1
    assert pmap.evaluate(v, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert pmap.evaluate(v, "lm_head.weight", 0.0) == 7
    assert pmap.evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0.0) is None


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\nbogus: 1\n",
            r"recipe.yaml: bogus: unknown key",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, paramters: {weight: 1}}]\n",
            r"recipe.yaml: models\[0\].paramters: unknown key",
        ),
        (
            "merge_method: tiez\nbase_model: b\nmodels: [{model: a}]\n",
            r"recipe.yaml: merge_method: unknown merge_method 'tiez'",
        ),
        (
            "merge_method: linear\nmodels: [{model: a}, {model: b, parameters: {weight: 1}}]\n",
            r"recipe.yaml: models\[0\].parameters.weight: required by linear",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 0}}]\n",
            r"recipe.yaml: models\[0\].parameters.density: must be in \(0, 1\], got 0",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: [0.5, 1.5]}}]\n",
            r"recipe.yaml: models\[0\].parameters.density: must be in \(0, 1\], got 1.5",
        ),
        (
            "merge_method: slerp\nbase_model: b\nmodels: [{model: a}]\nparameters: {t: 1.2}\n",
            r"recipe.yaml: parameters.t: must be in \[0, 1\], got 1.2",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, denisty: 0.5}}]\n",
            r"recipe.yaml: models\[0\].parameters.denisty: unknown parameter for ties",
        ),
        (
            "merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n",
            r"recipe.yaml: base_model: required by merge_method 'ties'",
        ),
        ("merge_method: ties\nbase_model: b\n", r"recipe.yaml: models: required key is missing"),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: float33\n",
            r"recipe.yaml: dtype: .*unknown dtype 'float33'",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, lambda: 2}}]\n",
            r"recipe.yaml: models\[0\].parameters.lambda: lambda is a global parameter of ties",
        ),
        (
            "merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {t: 0.5}\n",
            r"recipe.yaml: models: slerp takes at most 1 model\(s\) besides the base, got 2",
        ),
        ("- just a list\n", r"recipe.yaml: a recipe must be a YAML mapping"),
        ("merge_method: [unclosed\n", r"recipe.yaml: invalid YAML"),
    ],
)
def test_errors_name_file_and_key(tmp_path, body, message):
    p = write(tmp_path, body)
    with pytest.raises(RecipeError, match=message):
        load_recipe(p)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"nope.yaml: recipe file does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_top_level_default_satisfies_required_per_model_parameter(tmp_path):
    p = write(tmp_path, "merge_method: linear\nmodels: [{model: a}, {model: b}]\nparameters: {weight: 1.0}\n")
    assert load_recipe(p).parameters == {"weight": 1.0}


def test_relative_model_paths_fall_back_to_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "sub" / "m").mkdir(parents=True)
    p = tmp_path / "sub" / "r.yaml"
    p.write_text("merge_method: linear\nmodels: [{model: m}, {model: n}]\nparameters: {weight: 1}\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(p)
    assert r.resolve_path("m") == (tmp_path / "sub" / "m").absolute()
    assert r.resolve_path("n") == (tmp_path / "n").absolute()  # neither exists: relative to cwd


def test_glob_entries_expand_to_matching_folders(tmp_path):
    from merge_dag.core.errors import RecipeError

    for name in ("base", "math-a", "math-b", ".math-c.tmp-1", "code-a"):
        (tmp_path / "models" / name).mkdir(parents=True)
    (tmp_path / "models" / "math-file").write_text("not a folder")
    p = tmp_path / "r.yaml"
    p.write_text(
        "merge_method: ties\nbase_model: models/base\n"
        "models:\n  - model: models/math-b\n    parameters: {weight: 0.5}\n"
        "  - glob: models/math-*\n    parameters: {weight: 1.0, density: 0.4}\n"
    )
    r = load_recipe(p, root=tmp_path)
    assert [(m.model, m.parameters, m.from_glob) for m in r.models] == [
        ("models/math-b", {"weight": 0.5}, None),
        ("models/math-a", {"weight": 1.0, "density": 0.4}, "models/math-*"),
    ]
    assert r.globs == ["models/math-*"]
    assert r.to_yaml_dict()["models"][1] == {"model": "models/math-a", "parameters": {"weight": 1.0, "density": 0.4}}

    p.write_text(
        "merge_method: ties\nbase_model: models/base\nmodels: [{glob: 'models/none-*'}]\nparameters: {weight: 1.0}\n"
    )
    with pytest.raises(
        RecipeError,
        match=r"r.yaml: models: ties needs at least 1 model\(s\) besides the base, "
        r"got 0; glob 'models/none-\*' matched no model folder",
    ):
        load_recipe(p, root=tmp_path)
    p.write_text("merge_method: ties\nbase_model: models/base\nmodels: [{glob: 'models/*', model: models/base}]\n")
    with pytest.raises(RecipeError, match=r"models\[0\]: .*exactly one of `model`"):
        load_recipe(p, root=tmp_path)


GUIDED = """
merge_method: {method}
base_model: base
models:
  - {{model: a, calibration: {cal}}}
  - {{model: b}}
parameters: {{weight: 1.0, density: 0.5}}
guidance: {guidance}
"""


@pytest.mark.parametrize(
    "method, cal, guidance, message",
    [
        (
            "ties",
            "c1",
            "{sparsity: {gamma: 0.9, epsilon: 0.5}}",
            r"guidance.sparsity: Value error, gamma \(0.9\) must not exceed epsilon \(0.5\)",
        ),
        ("ties", "c1", "{sparsity: {method: owl}}", r"guidance.sparsity.method: Input should be 'lewis'"),
        ("ties", "c1", "{sparsity: {}}", r"models\[1\].calibration: required by guidance.sparsity"),
        (
            "ties",
            "c1",
            "{sparsity: {calibration: nope}}",
            r"guidance.sparsity.calibration: calibration set 'nope' not found \(.*data/calibration/nope.jsonl\)",
        ),
        (
            "task_arithmetic",
            "c1",
            "{sparsity: {calibration: c1}}",
            r"guidance.sparsity: task_arithmetic does not sparsify",
        ),
        (
            "ties",
            "c1",
            "{coefficients: {temperature: 0}}",
            r"guidance.coefficients.temperature: Input should be greater than 0",
        ),
        ("ties", "c1", "{coefficients: {}}", r"models\[1\].calibration: required by guidance.coefficients"),
        ("ties", "c1", "{regmean: {}}", r"guidance.regmean: RegMean replaces the linears of a `linear` merge"),
        ("ties", "c1", "{aim: {calibration: [], omega: 0.4}}", r"guidance.aim.calibration: name at least one"),
        (
            "ties",
            "c1",
            "{aim: {calibration: c1, omega: 1.5}}",
            r"guidance.aim.omega: Input should be less than or equal to 1",
        ),
        (
            "ties",
            "missing",
            "{aim: {calibration: c1}}",
            r"models\[0\].calibration: calibration set 'missing' not found",
        ),
        ("ties", "c1", "{bogus: 1}", r"guidance.bogus: unknown key"),
        (
            "ties",
            "c1",
            "{aim: {calibration: c1}, tokens: prompt}",
            r"guidance.tokens: Input should be 'all' or 'answer'",
        ),
        (
            "ties",
            "c1",
            "{sparsity: {calibration: c1, scaling: zscore}}",
            r"guidance.sparsity.scaling: Input should be 'minmax', 'rank' or 'quantile'",
        ),
        (
            "ties",
            "c1",
            "{sparsity: {calibration: c1, quantile: 0.1}}",
            r"guidance.sparsity: Value error, quantile applies to scaling: quantile",
        ),
        (
            "ties",
            "c1",
            "{sparsity: {calibration: c1, clip_quantile: 0}}",
            r"guidance.sparsity.clip_quantile: Input should be greater than 0",
        ),
        (
            "ties",
            "c1",
            "{coefficients: {normalize: zscore}}",
            r"guidance.coefficients.normalize: Input should be 'l2', 'rms' or 'layer'",
        ),
    ],
)
def test_guidance_errors_name_the_key(tmp_path, method, cal, guidance, message):
    (tmp_path / "data" / "calibration").mkdir(parents=True)
    (tmp_path / "data" / "calibration" / "c1.jsonl").write_text('{"text": "x"}\n')
    p = write(tmp_path, GUIDED.format(method=method, cal=cal, guidance=guidance))
    with pytest.raises(RecipeError, match=message):
        load_recipe(p, root=tmp_path)


def test_guided_recipe_loads_and_the_engine_refuses_it_alone(tmp_path):
    from merge_dag.core.engine import plan_merge

    (tmp_path / "data" / "calibration").mkdir(parents=True)
    (tmp_path / "data" / "calibration" / "c1.jsonl").write_text('{"text": "x"}\n')
    p = write(
        tmp_path,
        GUIDED.format(
            method="ties",
            cal="c1",
            guidance="{sparsity: {calibration: c1, gamma: 0.2, mean_density: 0.5}, coefficients: {temperature: 3}}",
        ).replace("{model: b}", "{model: b, calibration: c1}"),
    )
    r = load_recipe(p, root=tmp_path)
    assert r.guidance.sparsity.gamma == 0.2 and r.guidance.sparsity.epsilon == 0.8
    assert r.calibration_path("c1") == tmp_path / "data" / "calibration" / "c1.jsonl"
    assert r.models[0].calibration == "c1"
    with pytest.raises(RecipeError, match="guidance: data-guided merges need their calibration statistics"):
        plan_merge(r)
