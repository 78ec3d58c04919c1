"""Every merge method against a reference written from the math in plain torch (small tensors)."""

import math

import pytest
import torch

from merge_dag.core import chunks
from merge_dag.core.errors import RecipeError
from merge_dag.core.methods import METHODS, TensorTask, get_method
from merge_dag.core.sparsify import sparsify

GTA = [name for name, m in METHODS.items() if m.takes_coefficients]  # the task-arithmetic family
NEWER = [
    "nuslerp",
    "multislerp",
    "karcher",
    "sce",
    "arcee_fusion",
    "nearswap",  # test_mergekit_parity.py
    "tsv_merge",
    "iso_c",
    "iso_cts",
]  # test_spectral_methods.py


MANY_CHUNKS = 53  # the chunk size of conftest's `chunking` fixture in its "many-chunks" run


def assert_close(got, want, rtol=1e-6, atol=1e-6):
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.allclose(got, want.float(), rtol=rtol, atol=atol), (
        f"max abs diff {(got - want).abs().max().item():.3g}"
    )


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def run(name, base, models, model_params=None, generator=None, **params):
    """Merge with defaults filled the way the engine fills them; inputs are cloned."""
    m = get_method(name)
    glob = {p.name: p.default for p in m.params if not p.per_model}
    glob.update(params)
    per = [
        {p.name: p.default for p in m.params if p.per_model} | (mp or {}) for mp in (model_params or [{}] * len(models))
    ]
    task = TensorTask(
        "model.layers.0.mlp.up_proj.weight",
        None if base is None else base.clone(),
        [x.clone() for x in models],
        per,
        glob,
        generator,
    )
    out = m().merge(task)
    assert out.dtype == torch.float32 and out.shape == models[0].shape
    return out


# ---- references (from docs/methods.md / mergekit's definitions) ----------------------------------------
def ref_topk_mask(d, density):
    n = d.numel()
    k = max(1, int(density * n))
    order = torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(d.shape)


def ref_breadcrumbs_mask(d, density, gamma):
    n = d.numel()
    target = int(density * n)
    n_top = min(int(gamma * n), n - target)
    order = torch.sort(d.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_top : n_top + target]] = True
    return mask.view(d.shape)


def ref_combine(base, deltas, weights, consensus, normalize, lam):
    W = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * base.dim()))
    D = torch.stack(deltas) * W
    if consensus:
        majority = torch.where(D.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(D) == majority  # zeros never agree
        mix = (D * agree).sum(0)
        div = (W * agree).sum(0)
        div[div == 0] = 1
    else:
        mix = D.sum(0)
        div = W.sum()
        if div.abs() < 1e-8:
            div = torch.ones(())
    if normalize:
        mix = mix / div
    return base + lam * mix


def ref_gta(base, xs, weights, densities, *, sparsify_mask=None, consensus, normalize, lam, rescale=False):
    deltas = []
    for x, d in zip(xs, densities):
        delta = x - base
        if sparsify_mask is not None and d < 1:
            kept = delta * sparsify_mask(delta, d)
            if rescale:
                before, after = delta.abs().sum(), kept.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    kept = kept * (before / after)
            delta = kept
        deltas.append(delta)
    return ref_combine(base, deltas, weights, consensus, normalize, lam)


def ref_slerp(t, v0, v1):
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    dot = float((a / (na if na > 1e-8 else 1)) @ (b / (nb if nb > 1e-8 else 1)))
    if abs(dot) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    th = math.acos(max(-1.0, min(1.0, dot)))
    return ((math.sin((1 - t) * th) * v0.double() + math.sin(t * th) * v1.double()) / math.sin(th)).float()


def ref_model_stock(base, xs, filter_wise):
    b = base.double()
    if filter_wise:
        rows = b.reshape(-1, b.shape[-1]) if b.dim() >= 1 else b.reshape(1, 1)
    else:
        rows = b.reshape(1, -1)
    ds = [(x.double().reshape(rows.shape) - rows) for x in xs]
    cos = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            c = (ds[i] * ds[j]).sum(-1) / (ds[i].norm(dim=-1) * ds[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    k = len(xs)
    t = k * c / (1 + (k - 1) * c)
    t = torch.where((1 + (k - 1) * c).abs() < 1e-6, torch.zeros_like(t), t).unsqueeze(-1)
    avg = sum(x.double().reshape(rows.shape) for x in xs) / k
    return (t * avg + (1 - t) * rows).reshape(base.shape).float()


def family(n_experts, shape=(37, 23), seed=0, integers=False):
    g = torch.Generator().manual_seed(seed)
    if integers:  # integer-valued task vectors: large tie sets at every threshold
        base = torch.randint(-3, 4, shape, generator=g).float()
        return base, [base + torch.randint(-4, 5, shape, generator=g).float() for _ in range(n_experts)]
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * (0.5 + i) for i in range(n_experts)]


# ---- contract ------------------------------------------------------------------------------------
MERGEKIT_DEFAULTS = {  # method: (normalize, rescale) defaults in mergekit's registry
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_ties": (False, True),
    "dare_linear": (False, True),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (False, False),
    "della": (True, True),
    "della_linear": (False, True),
}


def test_method_abilities_and_the_lists_derived_from_them():
    from merge_dag.core.methods import registry
    from merge_dag.core.methods._task_arithmetic_family import TaskArithmeticFamily

    family = [
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ]
    assert GTA == family == [n for n, m in METHODS.items() if issubclass(m, TaskArithmeticFamily)]
    assert registry.COEFFICIENT_METHODS == tuple(family)
    assert registry.SPARSIFYING == tuple(n for n in family if n != "task_arithmetic")
    assert registry.TASK_VECTOR_METHODS == tuple(family + ["slerp", "model_stock"])
    assert registry.names_where(lambda m: m.uses_task_vectors) == registry.TASK_VECTOR_METHODS
    for name, m in METHODS.items():  # every method cites its source, except mergekit's own inventions
        assert m.reference_url.startswith("https://") or name in ("passthrough", "nuslerp"), name
        assert m.sparsifies == (getattr(m, "sparsification", None) is not None)


def test_registry_and_class_attributes():
    assert set(METHODS) == set(GTA) | {"linear", "slerp", "model_stock", "passthrough"} | set(NEWER)
    for name in GTA:
        m = get_method(name)
        assert m.requires_base and m.min_models == 1 and m.max_models is None
        assert m.randomized == (name.startswith("dare") or name.startswith("della"))
        ps = {p.name: p for p in m.params}
        assert ps["weight"].required and ps["weight"].per_model
        assert ps["density"].per_model and ps["density"].default == 1.0
        assert ps["lambda"].default == 1.0 and not ps["lambda"].per_model
        assert (ps["normalize"].default, ps["rescale"].default) == MERGEKIT_DEFAULTS[name]
        assert ps["int8_mask"].default is False and ps["normalize"].kind is bool
        assert ("gamma" in ps) == name.startswith("breadcrumbs") and ("epsilon" in ps) == name.startswith("della")
        if "gamma" in ps:
            assert ps["gamma"].default == 0.01 and ps["gamma"].per_model
        if "epsilon" in ps:
            assert ps["epsilon"].default == 0.15 and ps["epsilon"].per_model
        assert ps["density"].check(0) and ps["density"].check(1.5) and ps["density"].check(1) is None
    lin, sl, ms, pt = (get_method(n) for n in ("linear", "slerp", "model_stock", "passthrough"))
    assert not lin.requires_base and lin.min_models == 2 and lin.param("normalize").default is True
    assert lin.param("weight").required
    assert sl.requires_base and sl.min_models == sl.max_models == 1 and sl.param("t").required
    assert sl.param("t").check(1.2) and sl.param("t").check(-0.1) and sl.param("t").check(0.5) is None
    assert ms.requires_base and ms.min_models == 2 and ms.param("filter_wise").default is False
    assert not pt.requires_base and pt.min_models == pt.max_models == 1 and pt.param("scale").default is None
    assert not any(get_method(n).randomized for n in ("linear", "slerp", "model_stock", "passthrough"))


# ---- linear --------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(chunking, normalize):
    _, xs = family(3)
    ws = [0.2, 1.5, -0.3]
    got = run("linear", None, xs, [{"weight": w} for w in ws], normalize=normalize)
    want = sum(w * x for w, x in zip(ws, xs))
    assert_close(got, want / sum(ws) if normalize else want)


def test_linear_zero_weight_sum_is_an_error():
    _, xs = family(2)
    with pytest.raises(RecipeError, match="sum to 0"):
        run("linear", None, xs, [{"weight": 1.0}, {"weight": -1.0}])
    assert_close(run("linear", None, xs, [{"weight": 1.0}, {"weight": -1.0}], normalize=False), xs[0] - xs[1])


# ---- task arithmetic family (deterministic sparsification) -------------------------------------
@pytest.mark.parametrize("n_experts", [1, 2, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(chunking, n_experts, normalize):
    base, xs = family(n_experts, seed=n_experts)
    ws = [0.7, -0.4, 1.3][:n_experts]
    got = run("task_arithmetic", base, xs, [{"weight": w} for w in ws], normalize=normalize, **{"lambda": 0.6})
    want = ref_gta(base, xs, ws, [1] * n_experts, consensus=False, normalize=normalize, lam=0.6)
    assert_close(got, want)


def test_task_arithmetic_ignores_density_and_guards_zero_weight_sum():
    base, xs = family(2)
    mps = [{"weight": 1.0, "density": 0.1}, {"weight": -1.0, "density": 0.1}]
    got = run("task_arithmetic", base, xs, mps, normalize=True)  # sum of weights 0 -> divisor 1
    assert_close(got, base + (xs[0] - base) - (xs[1] - base))


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("n_experts", [1, 2, 3])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("integers", [False, True])
def test_deterministic_sparsifying_methods(chunking, name, n_experts, normalize, integers):
    base, xs = family(n_experts, seed=10 * n_experts + integers, integers=integers)
    ws = [1.0, 0.5, 2.0][:n_experts]
    ds = [0.3, 0.55, 0.8][:n_experts]
    gs = [0.05, 0.0, 0.1][:n_experts]
    mps = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(ws, ds, gs)]
    if name == "ties":
        mask = lambda d, dens: ref_topk_mask(d, dens)  # noqa: E731
        mps = [{"weight": w, "density": d} for w, d in zip(ws, ds)]
    else:
        gammas = iter(gs * 2)
        mask = lambda d, dens: ref_breadcrumbs_mask(d, dens, next(gammas))  # noqa: E731
    got = run(name, base, xs, mps, normalize=normalize, **{"lambda": 1.7})
    want = ref_gta(base, xs, ws, ds, sparsify_mask=mask, consensus=name != "breadcrumbs", normalize=normalize, lam=1.7)
    assert_close(got, want)


def test_ties_sign_election_uses_weighted_deltas_and_agreeing_weights():
    base = torch.zeros(4)
    e1 = torch.tensor([1.0, 1.0, -2.0, 0.0])
    e2 = torch.tensor([-1.0, -3.0, 1.0, 0.0])
    mps = [{"weight": 3.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    got = run("ties", base, [e1, e2], mps)
    # weighted: [3, 3, -6, 0] and [-1, -3, 1, 0]; sums 2, 0, -5, 0 -> signs +, +, -, +
    # entry 1: the sum is exactly 0, which elects +; entry 3: nothing agrees, divisor 0 -> 1
    assert torch.equal(got, torch.tensor([3.0 / 3, 3.0 / 3, -6.0 / 3, 0.0]))
    got = run("ties", base, [e1, e2], mps, normalize=False, **{"lambda": 0.5})
    assert torch.equal(got, torch.tensor([1.5, 1.5, -3.0, 0.0]))


def test_ties_with_negative_weights_uses_the_general_divisor(chunking):
    base, xs = family(3, seed=4)
    ws, ds = [1.0, -0.5, 0.0], [0.5, 0.5, 0.5]
    got = run("ties", base, xs, [{"weight": w, "density": d} for w, d in zip(ws, ds)])
    want = ref_gta(base, xs, ws, ds, sparsify_mask=ref_topk_mask, consensus=True, normalize=True, lam=1.0)
    assert_close(got, want)
    # weights of opposite sign whose weighted deltas agree: divisor 0 -> 1, the sum stays
    base = torch.zeros(3)
    got = run(
        "ties",
        base,
        [torch.tensor([1.0, 2, 3]), torch.tensor([-1.0, -2, -3])],
        [{"weight": 1.0, "density": 1.0}, {"weight": -1.0, "density": 1.0}],
    )
    assert torch.equal(got, torch.tensor([2.0, 4, 6]))


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_rescale_option_keeps_each_task_vectors_l1(name):
    base, xs = family(2, seed=9)
    mps = [{"weight": 1.0, "density": 0.4, "gamma": 0.02}, {"weight": 0.5, "density": 0.6, "gamma": 0.02}]
    mask = (
        (lambda d, dens: ref_topk_mask(d, dens))
        if name == "ties"
        else (lambda d, dens: ref_breadcrumbs_mask(d, dens, 0.02))
    )
    got = run(name, base, xs, mps, rescale=True)
    want = ref_gta(
        base,
        xs,
        [1.0, 0.5],
        [0.4, 0.6],
        sparsify_mask=mask,
        consensus=True,
        normalize=name == "ties",
        lam=1.0,
        rescale=True,
    )
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_zero_size_and_zero_delta_tensors():
    for name in GTA + ["model_stock", "slerp"]:
        base = torch.empty(0, 8)
        out = run(
            name,
            base,
            [torch.empty(0, 8), torch.empty(0, 8)][: 1 if name == "slerp" else 2],
            [{"weight": 1.0, "density": 0.5}] * (1 if name == "slerp" else 2),
            generator=gen(0),
            **({"t": 0.5} if name == "slerp" else {}),
        )
        assert out.shape == (0, 8)
    base = torch.randn(6, 5)
    for name in GTA:  # experts equal to the base: the base comes back
        out = run(name, base, [base.clone(), base.clone()], [{"weight": 1.0, "density": 0.5}] * 2, generator=gen(0))
        assert torch.equal(out, base), name


# ---- random methods: the family's wiring, checked with the sparsify primitive's own draws --------
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
@pytest.mark.parametrize("normalize", [None, True, False])
def test_random_methods_follow_the_math(chunking, name, normalize):
    base, xs = family(3, shape=(31, 40), seed=7)
    ws, ds, eps = [1.0, 0.6, 1.4], [0.3, 0.5, 0.7], [0.1, 0.2, 0.25]
    mps = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(ws, ds, eps)]
    m = get_method(name)
    norm = m.param("normalize").default if normalize is None else normalize
    got = run(name, base, xs, mps, generator=gen(11), normalize=norm, **{"lambda": 0.9})
    # the same draws: one generator, consumed expert by expert in recipe order
    g = gen(11)
    method = "random" if name.startswith("dare") else "della_magprune"
    deltas = [sparsify(x - base, d, method, epsilon=e, rescale=True, generator=g) for x, d, e in zip(xs, ds, eps)]
    want = ref_combine(base, deltas, ws, consensus=name in ("dare_ties", "della"), normalize=norm, lam=0.9)
    assert_close(got, want)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_repeat_under_a_seed(name):
    base, xs = family(2, shape=(50, 40), seed=3)
    mps = [{"weight": 1.0, "density": 0.4}, {"weight": 0.7, "density": 0.6}]
    a = run(name, base, xs, mps, generator=gen(123))
    b = run(name, base, xs, mps, generator=gen(123))
    c = run(name, base, xs, mps, generator=gen(124))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_linear_keep_fraction_and_rescale():
    base = torch.randn(300, 200)
    x = base + torch.randn(300, 200)
    d = 0.25
    got = run("dare_linear", base, [x], [{"weight": 1.0, "density": d}], generator=gen(5))
    delta = got - base
    kept = delta != 0
    assert abs(kept.float().mean().item() - d) < 5 * math.sqrt(d * (1 - d) / x.numel())
    scale = (x - base).abs().sum() / (x - base)[kept].abs().sum()  # L1 of the task vector kept
    assert_close(delta, (x - base) * kept * scale, rtol=1e-5, atol=1e-5)
    assert abs(delta.abs().sum().item() / (x - base).abs().sum().item() - 1) < 1e-3
    plain = run("dare_linear", base, [x], [{"weight": 1.0, "density": d}], generator=gen(5), rescale=False)
    assert torch.equal(plain != base, kept) and torch.allclose((plain - base)[kept], (x - base)[kept], atol=1e-6)


def test_della_bad_epsilon_names_the_tensor():
    base, xs = family(1)
    with pytest.raises(RecipeError, match="della.*up_proj.*density \\+/- epsilon"):
        run("della", base, xs, [{"weight": 1.0, "density": 0.9}], generator=gen(0))


def test_dare_ties_at_density_one_is_ties_without_trimming():
    base, xs = family(3, seed=8)
    mps = [{"weight": w, "density": 1.0} for w in (1.0, 0.5, 0.8)]
    assert_close(run("dare_ties", base, xs, mps, generator=gen(0)), run("ties", base, xs, mps, normalize=False))


# ---- slerp -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp(chunking, t):
    g = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(40, 30, generator=g), torch.randn(40, 30, generator=g) * 3
    got = run("slerp", v0, [v1], t=t)
    assert_close(got, ref_slerp(t, v0, v1), rtol=1e-5, atol=1e-5)
    if t == 0:
        assert torch.equal(got, v0)
    if t == 1:
        assert torch.equal(got, v1)


def test_slerp_is_spherical_and_near_parallel_falls_back_to_lerp(chunking):
    e0, e1 = torch.zeros(100), torch.zeros(100)
    e0[0], e1[1] = 1.0, 1.0
    mid = run("slerp", e0, [e1], t=0.5)
    assert abs(mid.norm().item() - 1.0) < 1e-6 and abs(mid[0].item() - math.sqrt(0.5)) < 1e-6
    g = torch.Generator().manual_seed(2)
    v0 = torch.randn(50, 20, generator=g)
    v1 = v0 * 2 + 1e-3 * torch.randn(50, 20, generator=g)  # |cos| > 0.9995
    assert_close(run("slerp", v0, [v1], t=0.3), 0.7 * v0 + 0.3 * v1)
    assert_close(run("slerp", v0, [-v1], t=0.3), 0.7 * v0 - 0.3 * v1)  # antiparallel: lerp too
    # just inside and just outside the threshold: lerp (a chord) and slerp (an arc) differ by ~1e-4
    u0, u1 = torch.zeros(64), torch.zeros(64)
    u0[0], u1[1] = 1.0, 1.0
    for cos, spherical in ((0.9997, False), (0.999, True)):
        th = math.acos(cos)
        a, b = 3 * u0, 3 * (cos * u0 + math.sin(th) * u1)
        want = (math.sin(0.5 * th) * (a + b) / math.sin(th)) if spherical else 0.5 * (a + b)
        got = run("slerp", a, [b], t=0.5)
        assert_close(got, want, rtol=0, atol=2e-6)
        assert abs(got.norm().item() - 3) < 1e-5 if spherical else got.norm().item() < 3 - 1e-4
    z = torch.zeros(50, 20)  # zero norm: not normalized
    assert_close(run("slerp", z, [v1], t=0.5), ref_slerp(0.5, z, v1))


# ---- model stock -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_experts", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(24, 16), (30,), (3, 4, 5)])
def test_model_stock(chunking, n_experts, filter_wise, shape):
    g = torch.Generator().manual_seed(n_experts)
    base = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g) * 0.3
    xs = [base + common + torch.randn(shape, generator=g) * 0.2 for _ in range(n_experts)]
    got = run("model_stock", base, xs, filter_wise=filter_wise)
    assert_close(got, ref_model_stock(base, xs, filter_wise), rtol=1e-5, atol=1e-5)


def test_model_stock_interpolation_factor():
    # two experts at 60 degrees: c = 0.5, t = 2c / (1 + c) = 2/3
    base = torch.zeros(3)
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    got = run("model_stock", base, [e1, e2])
    assert_close(got, (2 / 3) * (e1 + e2) / 2)
    # opposite deltas: 1 + c = 0, no finite estimate: the base
    assert torch.equal(run("model_stock", base + 1, [base + 1 + e1, base + 1 - e1]), base + 1)


# ---- passthrough ---------------------------------------------------------------------------------
def test_passthrough():
    x = torch.randn(5, 6)
    assert torch.equal(run("passthrough", None, [x]), x)
    assert torch.equal(run("passthrough", None, [x], [{"scale": 0.5}]), x * 0.5)


# ---- in place, one thread count or another, the same bits ---------------------------------------------
def test_methods_work_in_place_and_do_not_depend_on_threads(monkeypatch):
    monkeypatch.setattr(chunks, "CPU_CHUNK", 61)
    base, xs = family(3, shape=(40, 25), seed=12, integers=True)
    old = torch.get_num_threads()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            res = {}
            for name in GTA:
                mps = [{"weight": w, "density": 0.4} for w in (1.0, 0.5, 0.8)]
                res[name] = run(name, base, xs, mps, generator=gen(2))
            res["model_stock"] = run("model_stock", base, xs)
            res["slerp"] = run("slerp", base, xs[:1], t=0.4)
            res["linear"] = run("linear", None, xs, [{"weight": 1.0}] * 3)
            results.append(res)
        finally:
            torch.set_num_threads(old)
    for name, a in results[0].items():
        assert torch.equal(a, results[1][name]), name
    b, e = base.clone(), [x.clone() for x in xs]
    task = TensorTask(
        "w",
        b,
        e,
        [{"weight": 1.0, "density": 0.5, "gamma": 0.01, "epsilon": 0.15}] * 3,
        {"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False},
    )
    assert get_method("ties")().merge(task) is b  # the result is the base's own buffer
