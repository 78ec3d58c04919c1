"""Streamed merges (MergeMethod.prepare / merge_into, computed chunk by chunk from the inputs'
storage dtype) write the same bits as the float32 path (merge() and the cast), for every
parameter that changes the arithmetic; and the engine takes the streamed path where it should."""

import pytest
import torch

from merge_dag.core import chunks
from merge_dag.core import merge as engine
from merge_dag.core import sparsify as sp
from merge_dag.core.methods.base import TensorTask
from merge_dag.core.methods.registry import get_method

from _models import load_all

pytestmark = pytest.mark.usefixtures("fp_cache")

N = sp.SAMPLE_MIN_N + 3001  # the sampled-bracket path, several chunks, a partial last chunk


def inputs(n_models: int, dtype: torch.dtype, seed: int, n: int = N, coarse: bool = False) -> list[torch.Tensor]:
    """Base then experts. `coarse`: experts differ from the base by a few distinct values, so every
    top-k threshold sits inside a large tie set (the partial-tie path of the masks)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    if coarse:
        deltas = [torch.randint(-3, 4, (n,), generator=g).float() * 0.001 for _ in range(n_models)]
    else:
        deltas = [torch.randn(n, generator=g) * 0.002 for _ in range(n_models)]
    return [base.to(dtype)] + [(base + d).to(dtype) for d in deltas]


def both_ways(method_name, raws, model_params, params, out_dtype):
    """(float32 path, streamed path) outputs of one tensor."""
    method = get_method(method_name)()
    floats = [r.to(torch.float32, copy=True) for r in raws]  # merge() works in place
    want = method.merge(TensorTask("t", floats[0], floats[1:], model_params, params)).to(out_dtype)
    task = TensorTask("t", raws[0], raws[1:], model_params, params)
    assert method.streams(params)
    before = [r.clone() for r in raws]
    out = torch.empty(raws[0].shape, dtype=out_dtype)
    with chunks.workers(raws[0]):
        method.merge_into(task, out, method.prepare(task))
    assert all(torch.equal(a, b) for a, b in zip(before, raws)), "a streamed merge wrote into its inputs"
    return want, out


def full_params(method_name, **given):
    method = get_method(method_name)
    return {p.name: given.get(p.name, p.default) for p in method.params if not p.per_model}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method_name", ["task_arithmetic", "ties"])
@pytest.mark.parametrize(
    "weights,density,params",
    [
        ([1.0, 1.0, 1.0], [0.3, 0.3, 0.3], {}),
        ([0.5, 2.0, 0.25], [0.2, 0.5, 0.9], {"lambda": 0.7}),
        ([1.0, -0.5, 0.0], [1.0, 0.4, 0.1], {"normalize": False}),
        ([0.7, 0.3, 1.5], [0.3, 0.3, 0.3], {"normalize": True, "lambda": 1.3}),
    ],
)
def test_streamed_equals_float32_path(monkeypatch, threads, dtype, method_name, weights, density, params):
    monkeypatch.setattr(chunks, "CPU_CHUNK", 4093)  # many chunks, and segments for two workers
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for coarse in (False, True):
            raws = inputs(3, dtype, seed=len(weights) + threads, coarse=coarse)
            mps = [{"weight": w, "density": d} for w, d in zip(weights, density)]
            want, got = both_ways(method_name, raws, mps, full_params(method_name, **params), torch.bfloat16)
            assert torch.equal(want.view(torch.int16), got.view(torch.int16)), f"coarse={coarse}"
    finally:
        torch.set_num_threads(old)


def test_ties_cuts_made_with_one_worker_serve_a_combination_with_several(monkeypatch):
    """prepare() runs on the engine's read-ahead thread (one worker), merge_into on the merging
    thread (several): the masks' tie counting follows the cuts' own chunks."""
    monkeypatch.setattr(chunks, "CPU_CHUNK", 4093)
    raws = inputs(3, torch.bfloat16, seed=7, coarse=True)
    method = get_method("ties")()
    mps = [{"weight": 1.0, "density": 0.3}] * 3
    params = full_params("ties")
    floats = [r.to(torch.float32, copy=True) for r in raws]  # merge() works in place
    want = method.merge(TensorTask("t", floats[0], floats[1:], mps, params)).to(torch.bfloat16)
    task = TensorTask("t", raws[0], raws[1:], mps, params)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cuts = method.prepare(task)
        assert any(c.need > 0 for c in cuts)  # partial tie sets, counted per segment
        torch.set_num_threads(3)
        out = torch.empty(raws[0].shape, dtype=torch.bfloat16)
        with chunks.workers(raws[0]):
            method.merge_into(task, out, cuts)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(want.view(torch.int16), out.view(torch.int16))


def test_streams_only_where_the_math_is_streamed():
    """ties with rescale, and the methods without a streamed path, take the float32 path."""
    ties = get_method("ties")()
    assert ties.streams(full_params("ties")) and not ties.streams(full_params("ties", rescale=True))
    assert get_method("task_arithmetic")().streams(full_params("task_arithmetic"))
    for name in ("dare_ties", "breadcrumbs", "della", "linear", "slerp"):
        assert not get_method(name)().streams({})


@pytest.mark.parametrize("method_name", ["task_arithmetic", "ties"])
def test_engine_output_is_the_same_streamed_or_not(tmp_path, family, monkeypatch, method_name):
    """A whole merge through the engine writes the same bytes with the streamed path switched off,
    and the streamed one never makes a float32 copy of an input."""
    models = "".join(
        f"\n  - model: {family[e]}\n    parameters: {{weight: {w}, density: 0.4}}"
        for e, w in (("e0", 1.0), ("e1", 0.5), ("e2", 0.8))
    )
    recipe = tmp_path / "recipe.yaml"
    head = f"merge_method: {method_name}\nbase_model: {family['base']}\n"
    recipe.write_text(f"{head}models:{models}\nout_dtype: bfloat16\n")
    taken = []
    real = engine._streamed
    monkeypatch.setattr(engine, "_streamed", lambda *a: taken.append(real(*a)) or taken[-1])
    streamed = engine.merge(recipe, tmp_path / "a")
    assert taken and any(taken)
    monkeypatch.setattr(engine, "_streamed", lambda *a: False)
    plain = engine.merge(recipe, tmp_path / "b")
    assert streamed.output_fingerprint == plain.output_fingerprint
    a, b = load_all(tmp_path / "a"), load_all(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("coarse", [False, True])
def test_streamed_ties_on_the_one_pass_path(monkeypatch, coarse):
    """Tensors large enough for the sampled bracket (every tensor of the bench takes it): the
    experts' cuts come from one shared pass, and the bits still equal the float32 path's."""
    passes = []
    real = sp._bracket_cuts_many
    monkeypatch.setattr(sp, "_bracket_cuts_many", lambda *a: passes.append(len(a[0])) or real(*a))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        raws = inputs(3, torch.bfloat16, seed=5, n=1 << 21, coarse=coarse)
        mps = [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (0.6, 0.5), (1.2, 0.2))]
        want, got = both_ways("ties", raws, mps, full_params("ties"), torch.bfloat16)
    finally:
        torch.set_num_threads(old)
    assert passes == [1, 1, 1, 3]  # the float32 path: one pass per expert; the streamed one: one for all
    assert torch.equal(want.view(torch.int16), got.view(torch.int16))
