"""The data-guided core (merge_dag.guidance) against direct computation on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from merge_dag.guidance import aim, lewis, regmean, sens
from merge_dag.guidance.activations import ActivationStats, collect_activation_stats
from merge_dag.guidance.calibration import load_batches, load_texts, load_tokenizer, make_batches
from merge_dag.guidance.errors import CalibrationError, GuidanceError
from merge_dag.guidance.model import linear_modules, load_model

from _models import save_hf_llama, tiny_config

TEXTS = [
    "add:13+46=59",
    "add:130+757=887",
    "rev:abc=cba",
    "sort:3,1,2=1,2,3",
    "count:aab a=2",
    "add:7+8=15",
    "rev:hello world=dlrow olleh",
    "add:680+633=1313",
    "sort:9,8=8,9",
    "add:1+1=2",
    "count:xyzzy z=2",
    "rev:merge dag=gad egrem",
]
LINEAR_TYPES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base + two experts (base + noise), each a saved HF folder with the zoo's tokenizer."""
    root = tmp_path_factory.mktemp("guidance")
    base = save_hf_llama(root / "base")
    out = {"base": root / "base"}
    for i, (seed, sigma) in enumerate([(100, 0.02), (101, 0.005)]):
        g = torch.Generator().manual_seed(seed)
        st = {k: v + sigma * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_hf_llama(root / f"e{i}", st)
        out[f"e{i}"] = root / f"e{i}"
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS) + "\n")
    out["calib"] = calib
    return out


@pytest.fixture(scope="module")
def batches(family):
    return load_batches(family["calib"], load_tokenizer(family["base"]), batch_size=4)


@pytest.fixture(scope="module")
def stats(family, batches):
    """Activation statistics (with Gram matrices) of every model on the calibration set."""
    return {n: collect_activation_stats(load_model(family[n]), batches, gram=True) for n in ("base", "e0", "e1")}


# ---------------------------------------------------------------------------------------------- calibration


def test_calibration_rows_and_errors(tmp_path):
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "a"}\n\n{"text": "bc", "id": 3}\n')
    assert load_texts(ok) == ["a", "bc"]
    assert load_texts(ok, max_rows=1) == ["a"]
    bad = {
        '{"text": "a"}\n{"text": \n': "invalid JSON",
        '{"text": "a"}\n["a"]\n': "expected a JSON object",
        '{"text": "a"}\n{"txt": "a"}\n': 'no "text", "prompt" \\+ "answer", or "messages" field',
        '{"text": "a"}\n{"text": 5}\n': "must be a string",
        '{"text": "a"}\n{"text": "  "}\n': "is empty",
        '{"text": "a"}\n{"text": "a", "prompt": "b", "answer": "c"}\n': "gives 'text' and 'prompt'",
        '{"text": "a"}\n{"prompt": "a"}\n': 'a "prompt" but no "answer"',
        '{"text": "a"}\n{"answer": "a"}\n': 'an "answer" but no "prompt"',
        '{"text": "a"}\n{"prompt": "a", "answer": " "}\n': '"answer" is empty',
        '{"text": "a"}\n{"messages": []}\n': '"messages" must be a non-empty list',
        '{"text": "a"}\n{"messages": [{"role": "user"}]}\n': "messages\\[0\\] must be an object",
    }
    for i, (content, msg) in enumerate(bad.items()):
        p = tmp_path / f"bad{i}.jsonl"
        p.write_text(content)
        with pytest.raises(CalibrationError, match=msg) as e:
            load_texts(p)
        assert f"{p}:2:" in str(e.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationError, match="no calibration rows"):
        load_texts(empty)


def test_batches_are_padded_with_a_mask(family, batches):
    tok = load_tokenizer(family["base"])
    assert len(batches) == 3 and [b.input_ids.shape[0] for b in batches] == [4, 4, 4]
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    got = [int(n) for b in batches for n in b.attention_mask.sum(1)]
    assert got == lengths
    for b in batches:
        assert b.input_ids.shape[1] == int(b.attention_mask.sum(1).max())
        assert (b.input_ids[b.attention_mask == 0] == tok.pad_token_id).all()
        assert (b.labels()[b.attention_mask == 0] == -100).all()
    assert any((b.attention_mask == 0).any() for b in batches)  # the tests below do see padding


CHAT = (
    "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _bos_tokenizer(chat=True):
    """The zoo's character tokenizer, made to add BOS itself and (chat) with a template that writes BOS."""
    from tokenizers.processors import TemplateProcessing

    from merge_dag.zoo.tokenizer import BOS, build_tokenizer

    tok = build_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.convert_tokens_to_ids(BOS))]
    )
    if chat:
        tok.chat_template = CHAT
    return tok


def _rows_file(tmp_path, rows, name="rows.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_rows_render_with_one_bos_and_mark_the_answer(tmp_path):
    from merge_dag.guidance.calibration import load_rows

    tok = _bos_tokenizer()
    bos = tok.bos_token_id
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    chat = [{"role": "user", "content": "add:1+2="}, {"role": "assistant", "content": "3"}]
    path = _rows_file(
        tmp_path,
        [
            {"text": "add:1+1=2"},
            {"text": "<bos>add:1+1=2"},
            {"prompt": "add:1+2=", "answer": "3"},
            {"messages": chat},
            {"prompt": "add:1+2=", "answer": "3", "id": 7},
        ],
    )
    rows = load_rows(path)
    assert [r.has_answer for r in rows] == [False, False, True, True, True]
    all_b = make_batches(rows[:4], tok, batch_size=1)
    ids = [b.input_ids[0].tolist() for b in all_b]
    assert ids[0] == [bos] + enc("add:1+1=2")  # the tokenizer adds BOS ...
    assert ids[1] == ids[0]  # ... but not to a text that starts with it: one BOS, never two
    assert ids[2] == [bos] + enc("add:1+2=3")
    assert ids[3] == [bos] + enc("user:add:1+2=\nassistant:3\n")  # the chat template writes BOS; once
    assert all(i.count(bos) == 1 for i in ids) and all(b.answer_mask is None for b in all_b)
    # tokens="answer": the answer's tokens (the chat's answer is what follows "assistant:")
    ans = make_batches(rows[2:], tok, batch_size=1, tokens="answer")
    assert ans[0].answer_mask[0].tolist() == [0] * 9 + [1]
    n = len(ids[3])
    assert ans[1].answer_mask[0].tolist() == [0] * (n - 2) + [1, 1]
    # chat_template=True renders a prompt/answer row as [user, assistant]: the same tokens as the chat row
    as_chat = make_batches(rows[4:], tok, batch_size=1, tokens="answer", chat_template=True)
    assert torch.equal(as_chat[0].input_ids, ans[1].input_ids)
    assert torch.equal(as_chat[0].answer_mask, ans[1].answer_mask)
    # padding: the answer mask is padded like the attention mask (either side)
    both = make_batches(rows[2:4], tok, batch_size=2, tokens="answer")[0]
    assert both.answer_mask[0].tolist() == [0] * 9 + [1] + [0] * (n - 10)
    assert both.labels()[0].tolist() == [-100] * 9 + [enc("3")[0]] + [-100] * (n - 10)
    tok.padding_side = "left"
    left = make_batches(rows[2:4], tok, batch_size=2, tokens="answer")[0]
    assert left.attention_mask[0].tolist() == [0] * (n - 10) + [1] * 10
    assert left.answer_mask[0].tolist() == [0] * (n - 1) + [1]
    assert left.input_ids[0].tolist()[n - 10 :] == ids[2]
    # errors name the file and line
    with pytest.raises(CalibrationError, match=f"{path}:1: answer-only calibration"):
        make_batches(rows, tok, tokens="answer")
    with pytest.raises(CalibrationError, match=f"{path}:3: no answer token within max_length 5"):
        make_batches(rows[2:3], tok, tokens="answer", max_length=5)
    with pytest.raises(CalibrationError, match=f"{path}:4: a chat row needs a tokenizer with a chat template"):
        make_batches(rows[3:4], _bos_tokenizer(chat=False))
    with pytest.raises(CalibrationError, match="tokens must be one of all, answer"):
        make_batches(rows, tok, tokens="prompt")
    assert load_texts(_rows_file(tmp_path, [{"prompt": "a", "answer": "b"}], "pa.jsonl")) == ["ab"]


def answer_rows(texts):
    """Each zoo text as a prompt (up to and including '=') and its answer."""
    return [{"prompt": t[: t.index("=") + 1], "answer": t[t.index("=") + 1 :]} for t in texts]


@pytest.fixture(scope="module")
def answer_batches(family, tmp_path_factory):
    path = _rows_file(tmp_path_factory.mktemp("rows"), answer_rows(TEXTS))
    tok = load_tokenizer(family["base"])
    return load_batches(path, tok, batch_size=4), load_batches(path, tok, batch_size=4, tokens="answer")


def test_answer_only_statistics_equal_the_answer_positions_by_hand(family, batches, stats, answer_batches):
    whole, ans = answer_batches
    for a, b in zip(whole, batches):  # prompt + answer rows, all tokens: the same batches as the texts
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    for b, w in zip(ans, whole):
        assert torch.equal(b.input_ids, w.input_ids)
        assert not (b.answer_mask.bool() & ~b.attention_mask.bool()).any()
    model = load_model(family["base"])
    got = collect_activation_stats(model, ans, gram=True)
    mods = linear_modules(model)
    captured = {n: [] for n in mods}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: captured[n].append(args[0].detach().clone()))
        for n, (_, m) in mods.items()
    ]
    with torch.no_grad():
        for b in ans:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    for h in handles:
        h.remove()
    n_answer = sum(len(r["answer"]) for r in answer_rows(TEXTS))
    assert got.meta["selected_tokens"] == n_answer and got.meta["tokens"] == sum(b.tokens for b in ans)
    for n in mods:
        x = torch.cat([c[b.answer_mask.bool()] for c, b in zip(captured[n], ans)]).double()
        assert x.shape[0] == got.count[n] == n_answer
        torch.testing.assert_close(got.sumsq[n].double(), (x * x).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.sumabs[n].double(), x.abs().sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.maxabs[n].double(), x.abs().amax(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.gram_sum(n).double(), x.T @ x, rtol=1e-5, atol=1e-4)
        assert got.count[n] < stats["base"].count[n]
    every = collect_activation_stats(model, whole)  # tokens "all": the statistics of the plain texts
    for n in mods:
        assert every.count[n] == stats["base"].count[n]
        torch.testing.assert_close(every.sumsq[n], stats["base"].sumsq[n])


def test_answer_only_sens_loss_and_alignment_by_hand(family, answer_batches):
    _, ans = answer_batches
    model = load_model(family["e0"])
    got = sens.sensitivity(model, ans)
    want = [0.0, 0.0]
    for b in ans:
        logp = F.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double(), -1)
        terms = [
            -logp[r, t, b.input_ids[r, t + 1]]
            for r in range(b.input_ids.shape[0])
            for t in range(b.input_ids.shape[1] - 1)
            if b.answer_mask[r, t + 1]
        ]
        loss = torch.stack(terms).mean()
        for li, layer in enumerate(model.model.layers):
            ps = list(layer.parameters())
            gs = torch.autograd.grad(loss, ps, retain_graph=True)
            want[li] += sum(float((p.detach().double() * g.double()).abs().sum()) for p, g in zip(ps, gs))
    for li in (0, 1):
        assert got[li] == pytest.approx(want[li] / len(ans), rel=1e-4)
    other = load_model(family["e1"])
    kls = []
    with torch.no_grad():
        for b in ans:
            p = torch.softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double(), -1)
            q = torch.softmax(other(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double(), -1)
            kl = (p * (p.log() - q.log())).sum(-1)
            kls += [kl[r, t] for r in range(kl.shape[0]) for t in range(kl.shape[1] - 1) if b.answer_mask[r, t + 1]]
    assert sens.logit_kl(model, other, ans) == pytest.approx(float(torch.stack(kls).mean()), rel=1e-4)


# ---------------------------------------------------------------------------------------------- activations


def test_hook_statistics_equal_direct_computation(family, batches, stats):
    model = load_model(family["base"])
    mods = linear_modules(model)
    assert len(mods) == 2 * 7 and {lewis.module_type(n) for n in mods} == LINEAR_TYPES
    captured = {n: [] for n in mods}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: captured[n].append(args[0].detach().clone()))
        for n, (_, m) in mods.items()
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    for h in handles:
        h.remove()
    st = stats["base"]
    assert sorted(st.names) == sorted(mods)
    total = sum(b.tokens for b in batches)
    for n in mods:
        x = torch.cat([c[b.attention_mask.bool()] for c, b in zip(captured[n], batches)]).double()
        assert x.shape[0] == total == st.count[n]
        torch.testing.assert_close(st.sumsq[n].double(), (x * x).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.sumabs[n].double(), x.abs().sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.maxabs[n].double(), x.abs().amax(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.gram_sum(n).double(), x.T @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(st.mean_sq(n), st.sumsq[n] / total)
    # padding is excluded: one text per batch (no padding at all) gives the same statistics
    single = make_batches(TEXTS, load_tokenizer(family["base"]), batch_size=1)
    alone = collect_activation_stats(model, single)
    assert not alone.has_gram
    for n in mods:
        assert alone.count[n] == st.count[n]
        torch.testing.assert_close(alone.sumsq[n], st.sumsq[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.maxabs[n], st.maxabs[n], rtol=1e-4, atol=1e-5)


def test_statistics_save_and_load(tmp_path, stats):
    st = stats["base"]
    folder = st.save(tmp_path / "stats")
    raw = load_file(str(folder / "stats.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight::sumsq" in raw
    assert "model.layers.1.mlp.down_proj.weight::gram" in raw
    assert raw["model.layers.1.mlp.down_proj.weight::gram"].shape == (64, 64)
    meta = json.loads((folder / "stats.json").read_text())
    assert meta["gram"] is True and meta["tokens"] == st.count["model.layers.0.self_attn.q_proj.weight"]
    back = ActivationStats.load(folder)
    assert back.count == st.count and back.has_gram and back.shared == st.shared
    for n in st.names:
        for kind in ("sumsq", "sumabs", "maxabs"):
            assert torch.equal(getattr(back, kind)[n], getattr(st, kind)[n])
        assert torch.equal(back.gram_sum(n), st.gram_sum(n))
    with pytest.raises(GuidanceError, match="no entry for tensor 'nope'"):
        back.mean_sq("nope")
    with pytest.raises(GuidanceError, match="stats.safetensors: activation statistics file is missing"):
        ActivationStats.load(tmp_path / "absent")


def test_grams_are_stored_once_per_distinct_linear_input(tmp_path, family, batches, stats):
    """q/k/v read one input and gate/up another: one Gram each, found from every weight, equal to the
    Gram of that weight's own input; the file holds 4 Grams per layer instead of 7."""
    st = stats["base"]
    want_shared = {}
    for li in range(2):
        p = f"model.layers.{li}."
        want_shared |= {p + f"self_attn.{k}_proj.weight": p + "self_attn.q_proj.weight" for k in "kv"}
        want_shared[p + "mlp.up_proj.weight"] = p + "mlp.gate_proj.weight"
    assert st.shared == want_shared
    assert sorted(st.gram) == sorted(n for n in st.names if n not in want_shared)
    for f, lead in want_shared.items():
        assert st.gram_sum(f) is st.gram_sum(lead)
    # bit for bit the per-linear Grams of before: each linear's own input, accumulated batch by batch in fp32
    model = load_model(family["base"])
    mods = linear_modules(model)
    own = {n: torch.zeros(m.in_features, m.in_features) for n, (_, m) in mods.items()}
    mask: list = []

    def grab(n):
        def hook(_m, args):
            r = args[0].detach()[mask[0]].to(torch.float32)
            own[n] += r.T @ r

        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, (_, m) in mods.items()]
    with torch.no_grad():
        for b in batches:
            mask[:] = [b.select]
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    for h in handles:
        h.remove()
    for n in mods:
        assert torch.equal(st.gram_sum(n), own[n]), n
    folder = st.save(tmp_path / "stats")
    raw = load_file(str(folder / "stats.safetensors"))
    grams = {k: v for k, v in raw.items() if k.endswith("::gram")}
    assert len(grams) == 2 * 4
    per_linear = sum(m.in_features**2 * 4 for _, m in linear_modules(load_model(family["base"])).values())
    stored = sum(v.numel() * v.element_size() for v in grams.values())
    assert stored == 2 * (3 * 32 * 32 + 64 * 64) * 4 < per_linear == 2 * (6 * 32 * 32 + 64 * 64) * 4
    assert json.loads((folder / "stats.json").read_text())["gram_shared"] == want_shared
    # a statistics file whose sharing map names a missing leader is refused, naming the file
    meta = json.loads((folder / "stats.json").read_text())
    meta["gram_shared"]["model.layers.0.mlp.down_proj.weight"] = "nope"
    (folder / "stats.json").write_text(json.dumps(meta))
    with pytest.raises(GuidanceError, match="stats.json: gram_shared maps .*down_proj.weight' to 'nope'"):
        ActivationStats.load(folder)


# ---------------------------------------------------------------------------------------------- LEWIS


def test_lewis_importance_and_allocation_follow_the_formulas(family, stats):
    imps = {n: lewis.importance(stats[n], family[n]) for n in ("base", "e0", "e1")}
    for n in imps:
        w = load_file(str(family[n] / "model.safetensors"))
        for t, v in imps[n].items():
            s = stats[n].sumsq[t].double() / stats[n].count[t]
            direct = torch.sqrt(((w[t].double().abs() * s.sqrt()[None, :]) ** 2).sum())
            assert v == pytest.approx(float(direct), rel=1e-5)
    names = list(load_file(str(family["base"] / "model.safetensors")))
    alloc = lewis.allocate(
        imps["base"], {"e0": imps["e0"], "e1": imps["e1"]}, gamma=0.3, epsilon=0.8, tensor_names=names
    )
    for e in ("e0", "e1"):
        d = {t: abs(imps[e][t] - imps["base"][t]) for t in imps["base"]}
        for mt in LINEAR_TYPES:
            ts = [t for t in d if t.endswith(mt + ".weight")]
            tot = sum(d[t] for t in ts)
            for t in ts:
                d[t] /= tot
        lo, hi = min(d.values()), max(d.values())
        for t in names:
            want = 0.3 + (d[t] - lo) / (hi - lo) * 0.5 if t in d else 1.0
            assert alloc[e][t] == pytest.approx(want, rel=1e-9)
        lin = [alloc[e][t] for t in d]
        assert min(lin) == pytest.approx(0.3) and max(lin) == pytest.approx(0.8)
        assert alloc[e]["model.embed_tokens.weight"] == 1.0 and alloc[e]["model.norm.weight"] == 1.0


def test_lewis_all_equal_and_bad_settings(family, stats):
    base = {"model.layers.0.mlp.up_proj.weight": 1.0, "model.layers.1.mlp.up_proj.weight": 2.0}
    same = lewis.allocate(base, {"e": dict(base)}, gamma=0.2, epsilon=0.6)
    assert same == {"e": {t: pytest.approx(0.4) for t in base}}
    even = lewis.allocate(base, {"e": {t: v + 1 for t, v in base.items()}}, gamma=0.2, epsilon=0.6)
    assert list(even["e"].values()) == [pytest.approx(0.4)] * 2
    with pytest.raises(GuidanceError, match="gamma <= epsilon"):
        lewis.allocate(base, {"e": base}, gamma=0.9, epsilon=0.5)
    with pytest.raises(GuidanceError, match="'model.layers.1.mlp.up_proj.weight'"):
        lewis.allocate(base, {"e": {"model.layers.0.mlp.up_proj.weight": 1.0}})
    wrong = ActivationStats(
        {"model.layers.0.mlp.down_proj.weight": 5},
        {"model.layers.0.mlp.down_proj.weight": torch.ones(32)},
        {"model.layers.0.mlp.down_proj.weight": torch.ones(32)},
        {"model.layers.0.mlp.down_proj.weight": torch.ones(32)},
    )
    with pytest.raises(GuidanceError, match="down_proj.weight' has shape \\[32, 64\\]"):
        lewis.importance(wrong, family["base"])


def test_sequential_wanda_variant(family, batches, stats):
    plain = stats["base"]
    unpruned = lewis.sequential_wanda_stats(load_model(family["base"]), batches, sparsity=0.0)
    for n in plain.names:
        torch.testing.assert_close(unpruned.sumsq[n], plain.sumsq[n], rtol=1e-5, atol=1e-6)
    model = load_model(family["base"])
    seq = lewis.sequential_wanda_stats(model, batches, sparsity=0.5)
    assert seq.meta["sequential_wanda_sparsity"] == 0.5
    # layer 0 sees unpruned inputs; every linear of every layer ends half pruned per row
    ref = load_model(family["base"])
    for n, (li, m) in linear_modules(model).items():
        zeros = (m.weight == 0).sum(1)
        assert (zeros == m.in_features // 2).all(), n
        if li == 0:
            torch.testing.assert_close(seq.sumsq[n], plain.sumsq[n], rtol=1e-5, atol=1e-6)
            # direct Wanda pruning of layer 0 in a fresh copy
            w = linear_modules(ref)[n][1].weight
            score = w.abs() * plain.mean_sq(n).sqrt()[None, :]
            keep = torch.ones_like(w, dtype=torch.bool)
            keep.scatter_(1, score.argsort(dim=1)[:, : w.shape[1] // 2], False)
            with torch.no_grad():
                w.mul_(keep)
            assert torch.equal(m.weight, w)
    layer1 = collect_activation_stats(ref, batches, layers=[1])
    assert sorted(layer1.names) == sorted(n for n in seq.names if ".layers.1." in n)
    for n in layer1.names:
        torch.testing.assert_close(seq.sumsq[n], layer1.sumsq[n], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(seq.sumsq[n], plain.sumsq[n], rtol=1e-3)


def test_lewis_robust_scalings_follow_their_formulas():
    g = torch.Generator().manual_seed(3)
    vals = torch.rand(20, generator=g, dtype=torch.float64).tolist() + [100.0]  # one massive outlier
    d = {f"t{i}": v for i, v in enumerate(vals)}
    t = torch.tensor(vals, dtype=torch.float64)
    gamma, eps = 0.2, 0.9
    mm = lewis.rescale(d, gamma, eps)  # faithful: the outlier squeezes the others near gamma
    assert mm["t20"] == pytest.approx(eps) and max(v for k, v in mm.items() if k != "t20") < gamma + 0.01
    rank = lewis.rescale(d, gamma, eps, scaling="rank")
    want = gamma + t.argsort().argsort().double() / (len(vals) - 1) * (eps - gamma)
    assert list(rank.values()) == pytest.approx(want.tolist(), rel=1e-12)
    for q in (0.05, 0.2):
        got = lewis.rescale(d, gamma, eps, scaling="quantile", quantile=q)
        lo, hi = torch.quantile(t, q), torch.quantile(t, 1 - q)
        want = gamma + ((t - lo) / (hi - lo)).clamp(0, 1) * (eps - gamma)
        assert list(got.values()) == pytest.approx(want.tolist(), rel=1e-12)
        assert got["t20"] == pytest.approx(eps)  # the outlier saturates instead of squeezing the rest
    # ties share their mean rank; all equal -> the midpoint under every scaling
    assert lewis.rescale({"a": 1.0, "b": 1.0, "c": 2.0}, 0.2, 0.8, "rank") == pytest.approx(
        {"a": 0.2 + 0.25 * 0.6, "b": 0.2 + 0.25 * 0.6, "c": 0.8}
    )
    for sc in lewis.SCALINGS:
        assert lewis.rescale({"a": 0.3, "b": 0.3}, 0.2, 0.6, sc) == pytest.approx({"a": 0.4, "b": 0.4})
        assert lewis.rescale({"a": 0.3}, 0.2, 0.6, sc) == pytest.approx({"a": 0.4})
    # the mean-density constraint holds exactly under every scaling
    sizes = {k: 100 * (i + 1) for i, k in enumerate(d)}
    for sc in lewis.SCALINGS:
        m = lewis.match_mean(lewis.rescale(d, gamma, eps, sc), sizes, 0.35)
        assert lewis.weighted_mean(m, sizes) == pytest.approx(0.35, abs=1e-9)
    with pytest.raises(GuidanceError, match="scaling must be one of minmax, rank, quantile"):
        lewis.rescale(d, gamma, eps, "zscore")
    with pytest.raises(GuidanceError, match="quantile must be in"):
        lewis.rescale(d, gamma, eps, "quantile", quantile=0.5)
    from merge_dag.core.recipe import SparsityGuidance

    with pytest.raises(ValueError, match="quantile applies to scaling: quantile"):
        SparsityGuidance(quantile=0.1)


def test_lewis_clipped_importance_and_allocation_options(family, stats):
    q = 0.75
    imps = {n: lewis.importance(stats[n], family[n], clip_quantile=q) for n in ("base", "e0")}
    w = load_file(str(family["e0"] / "model.safetensors"))
    for t, v in imps["e0"].items():
        s = stats["e0"].sumsq[t].double() / stats["e0"].count[t]
        s = torch.minimum(s, torch.quantile(s, q))
        assert v == pytest.approx(float(torch.sqrt(((w[t].double().abs() * s.sqrt()[None, :]) ** 2).sum())), rel=1e-5)
    plain = lewis.importance(stats["e0"], family["e0"])
    assert all(imps["e0"][t] < plain[t] for t in plain)  # the top quarter of channels was clipped
    alloc = lewis.allocate(imps["base"], {"e0": imps["e0"]}, 0.3, 0.8, scaling="rank")
    assert alloc["e0"] == lewis.rescale(lewis.shifts(imps["base"], imps["e0"]), 0.3, 0.8, "rank")
    with pytest.raises(GuidanceError, match="clip_quantile must be in"):
        lewis.clip_channels(torch.ones(3), 0.0)


def test_sens_normalisations_follow_their_formulas():
    s = {"a": {0: 1.0, 1: 2.0, 2: 4.0}, "b": {0: 3.0, 1: 1.0, 2: 0.5}, "c": {0: 0.0, 1: 0.0, 2: 0.0}}
    taus = {"a": 1.2, "b": 0.8, "c": 1.0}
    S = torch.tensor([[s[n][layer] for layer in range(3)] for n in "abc"], dtype=torch.float64)
    tau_t = torch.tensor([taus[n] for n in "abc"], dtype=torch.float64)[:, None]
    l2 = S / S.norm(dim=1, keepdim=True).clamp_min(1e-300)
    rms = S / (S.pow(2).mean(1, keepdim=True).sqrt()).clamp_min(1e-300)
    layer = rms / rms.mean(0, keepdim=True)
    for name, al in (("l2", l2), ("rms", rms), ("layer", layer)):
        got = sens.alphas(s, name)
        table = torch.tensor([[got[n][li] for li in range(3)] for n in "abc"], dtype=torch.float64)
        torch.testing.assert_close(table, al, rtol=1e-12, atol=1e-15)
        sig = torch.softmax(al * tau_t / 0.5, dim=0)
        c = sens.coefficients(s, taus, temperature=0.5, normalize=name)
        table = torch.tensor([[c[n][li] for li in range(3)] for n in "abc"], dtype=torch.float64)
        torch.testing.assert_close(table, sig, rtol=1e-12, atol=1e-15)
    assert sens.coefficients(s, taus, 0.5) == sens.coefficients(s, taus, 0.5, "l2")  # l2 is the default
    # depth: the same profile over twice the layers keeps "rms" alphas, while "l2" shrinks by sqrt(2)
    twice = {n: {li: v for li, v in enumerate(list(p.values()) * 2)} for n, p in s.items()}
    assert sens.alphas(twice, "rms")["a"][3] == pytest.approx(sens.alphas(s, "rms")["a"][0])
    assert sens.alphas(twice, "l2")["a"][3] == pytest.approx(sens.alphas(s, "l2")["a"][0] / math.sqrt(2))
    # "layer": experts with proportional profiles have alpha 1 everywhere: only tau tells them apart
    prop = {"a": {0: 1.0, 1: 3.0}, "b": {0: 10.0, 1: 30.0}}
    assert all(v == pytest.approx(1.0) for a in sens.alphas(prop, "layer").values() for v in a.values())
    zero = sens.alphas({"a": {0: 0.0}, "b": {0: 0.0}}, "layer")
    assert zero == {"a": {0: 1.0}, "b": {0: 1.0}}
    with pytest.raises(GuidanceError, match="normalize must be one of l2, rms, layer"):
        sens.coefficients(s, taus, normalize="zscore")


# ---------------------------------------------------------------------------------------------- Sens-Merging


def test_sensitivity_equals_direct_first_order_taylor(family, batches):
    model = load_model(family["e0"])
    got = sens.sensitivity(model, batches)
    assert all(p.grad is None for p in model.parameters())
    layers = model.model.layers
    want = [0.0, 0.0]
    for b in batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        logp = F.log_softmax(logits.double(), -1)
        terms = []
        for r in range(b.input_ids.shape[0]):
            for t in range(b.input_ids.shape[1] - 1):
                if b.attention_mask[r, t + 1]:
                    terms.append(-logp[r, t, b.input_ids[r, t + 1]])
        loss = torch.stack(terms).mean()
        for li, layer in enumerate(layers):
            ps = list(layer.parameters())
            gs = torch.autograd.grad(loss, ps, retain_graph=True)
            want[li] += sum(float((p.detach().double() * g.double()).abs().sum()) for p, g in zip(ps, gs))
    assert sorted(got) == [0, 1]
    for li in (0, 1):
        assert got[li] == pytest.approx(want[li] / len(batches), rel=1e-4)
    a = sens.alpha(got)
    assert math.hypot(*a.values()) == pytest.approx(1.0)


def test_sens_coefficients_follow_the_formula():
    s = {"a": {0: 1.0, 1: 2.0, 2: 2.0}, "b": {0: 3.0, 1: 1.0, 2: 0.5}}
    taus = {"a": 1.2, "b": 0.8}
    got = sens.coefficients(s, taus, temperature=0.5)
    na, nb = math.sqrt(1 + 4 + 4), math.sqrt(9 + 1 + 0.25)
    for layer in range(3):
        za, zb = s["a"][layer] / na * 1.2 / 0.5, s["b"][layer] / nb * 0.8 / 0.5
        assert got["a"][layer] == pytest.approx(math.exp(za) / (math.exp(za) + math.exp(zb)), rel=1e-12)
        assert got["a"][layer] + got["b"][layer] == pytest.approx(1.0)
    # equal sensitivities and equal tau: uniform 1/K, so the merge is plain task arithmetic
    eq = sens.coefficients({e: {0: 2.0, 1: 5.0} for e in "xyz"}, {e: 1.0 for e in "xyz"}, temperature=3)
    assert all(v == pytest.approx(1 / 3) for c in eq.values() for v in c.values())
    w = sens.tensor_weights(eq, ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"])
    assert all(v == pytest.approx(1.0) for c in w.values() for v in c.values())
    w2 = sens.tensor_weights(got, ["model.norm.weight", "model.layers.2.self_attn.q_proj.weight"])
    assert w2["b"] == {
        "model.norm.weight": 1.0,
        "model.layers.2.self_attn.q_proj.weight": pytest.approx(2 * got["b"][2]),
    }
    with pytest.raises(GuidanceError, match="layer 7"):
        sens.tensor_weights(got, ["model.layers.7.mlp.up_proj.weight"])
    with pytest.raises(GuidanceError, match="temperature"):
        sens.coefficients(s, taus, temperature=0)


def test_tau_rewards_alignment():
    g = {"a": {"a": 0.0, "b": 0.1, "c": 0.2}, "b": {"a": 0.9, "b": 0.0, "c": 1.0}, "c": {"a": 0.3, "b": 0.3, "c": 0.0}}
    t = sens.tau(g)
    a = {"a": (math.exp(-0.1) + math.exp(-0.2)) / 2, "b": (math.exp(-0.9) + math.exp(-1.0)) / 2, "c": math.exp(-0.3)}
    mean = sum(a.values()) / 3
    assert t == {k: pytest.approx(v / mean) for k, v in a.items()}
    assert t["a"] > t["c"] > t["b"]  # the best-aligned expert gets the largest factor
    assert sens.tau({"a": {"a": 0.0}}) == {"a": 1.0}
    assert list(sens.tau({"a": {"a": 0, "b": 2.0}, "b": {"a": 2.0, "b": 0}}).values()) == [pytest.approx(1.0)] * 2


def test_alignment_is_token_mean_kl(family, batches):
    models = {"e0": load_model(family["e0"]), "e1": load_model(family["e1"])}
    tasks = {"e0": batches[:2], "e1": batches[2:]}
    g = sens.alignment(models, tasks)
    assert g["e0"]["e0"] == 0.0 and g["e1"]["e1"] == 0.0
    with torch.no_grad():
        for i, j in (("e0", "e1"), ("e1", "e0")):
            kls = []
            for b in tasks[j]:
                p = torch.softmax(models[j](input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double(), -1)
                q = torch.softmax(models[i](input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double(), -1)
                kl = (p * (p.log() - q.log())).sum(-1)
                kls.append(kl[b.attention_mask.bool()])
            assert g[i][j] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)
            assert g[i][j] > 0
    assert sens.logit_kl(models["e0"], models["e0"], batches[:1]) == pytest.approx(0.0, abs=1e-6)


def test_streamed_alignment_equals_the_in_memory_one_holding_one_model(family, batches, tmp_path):
    import gc
    import weakref

    names = ("e0", "e1", "base")
    tasks = {"e0": batches[:2], "e1": batches[2:], "base": batches[1:]}
    want = sens.alignment({n: load_model(family[n]) for n in names}, tasks)
    held: list = []
    loads = []

    def load(n):
        gc.collect()
        assert all(r() is None for r in held), "a previous model is still alive"
        m = load_model(family[n])
        held.append(weakref.ref(m))
        loads.append(n)
        return m

    got = sens.alignment_streamed(load, tasks, tmp_path / "scratch")
    assert got == want  # the same numbers, bit for bit
    assert loads == list(names) * 2 and not (tmp_path / "scratch").exists()
    assert sens.alignment_streamed(load, {"e0": batches[:1]}, tmp_path / "one") == {"e0": {"e0": 0.0}}


# ---------------------------------------------------------------------------------------------- AIM


def test_aim_relaxes_per_input_channel(tmp_path, family, stats):
    g = torch.Generator().manual_seed(0)
    delta, m = torch.randn(5, 4, generator=g), torch.tensor([0.5, 2.0, 0.0, 1.0])
    got = aim.aim_relax(delta, m, omega=0.4)
    want = delta * (1 - (m / 2.0) * 0.6)[None, :]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[:, 1], 0.4 * delta[:, 1])  # the most active channel keeps omega
    torch.testing.assert_close(got[:, 2], delta[:, 2])  # a silent channel keeps everything
    torch.testing.assert_close(aim.aim_relax(delta, torch.zeros(4)), delta)
    with pytest.raises(GuidanceError, match="omega"):
        aim.aim_factor(m, omega=1.5)
    with pytest.raises(GuidanceError, match="'w'"):
        aim.aim_relax(delta, torch.ones(3), name="w")

    out = aim.aim_checkpoint(family["base"], family["e0"], stats["base"], tmp_path / "aim", omega=0.4)
    res, b, e = (
        load_file(str(p))
        for p in (
            next(out.glob("*.safetensors")),
            family["base"] / "model.safetensors",
            family["e0"] / "model.safetensors",
        )
    )
    assert set(res) == set(e)
    for t in e:
        if t in stats["base"].count:
            mean_abs = stats["base"].sumabs[t] / stats["base"].count[t]
            want = b[t] + (e[t] - b[t]) * (1 - mean_abs / mean_abs.max() * 0.6)[None, :]
            torch.testing.assert_close(res[t], want, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(res[t], e[t])
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


# ---------------------------------------------------------------------------------------------- RegMean


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / (3 * n)


def test_regmean_tensor_math():
    g = torch.Generator().manual_seed(1)
    w1, w2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    g1, g2 = _spd(5, 2), _spd(5, 3)
    for a in (1.0, 0.5, 0.0):  # one expert: its own W whatever a
        torch.testing.assert_close(
            regmean.regmean_tensor([w1.float()], [g1.float()], a=a), w1.float(), rtol=1e-4, atol=1e-5
        )
    got = regmean.regmean_tensor([w1.float(), w2.float()], [g1.float(), g2.float()], a=1.0)
    torch.testing.assert_close(got.double(), (w1 @ g1 + w2 @ g2) @ torch.linalg.inv(g1 + g2), rtol=1e-4, atol=1e-5)
    a = 0.3
    s1, s2 = (a * g + (1 - a) * torch.diag(torch.diag(g)) for g in (g1, g2))
    got = regmean.regmean_tensor([w1.float(), w2.float()], [g1.float(), g2.float()], a=a)
    torch.testing.assert_close(got.double(), (w1 @ s1 + w2 @ s2) @ torch.linalg.inv(s1 + s2), rtol=1e-4, atol=1e-5)
    d1, d2 = torch.diag(g1), torch.diag(g2)  # a = 0: a per-input-channel weighted mean
    got = regmean.regmean_tensor([w1.float(), w2.float()], [g1.float(), g2.float()], a=0.0)
    torch.testing.assert_close(got.double(), (w1 * d1 + w2 * d2) / (d1 + d2), rtol=1e-5, atol=1e-6)
    got = regmean.regmean_tensor([w1.float(), w2.float()], [g1.float(), g1.float()], a=1.0)
    torch.testing.assert_close(got.double(), (w1 + w2) / 2, rtol=1e-4, atol=1e-5)
    with pytest.raises(GuidanceError, match="'q'.*singular"):
        regmean.regmean_tensor([w1.float()], [torch.zeros(5, 5)], name="q")
    with pytest.raises(GuidanceError, match="'q'.*Gram"):
        regmean.regmean_tensor([w1.float()], [torch.eye(4)], name="q")


def test_regmean_checkpoint(tmp_path, family, stats):
    out = regmean.regmean_checkpoint([family["e0"], family["e1"]], [stats["e0"], stats["e1"]], tmp_path / "rm", a=0.9)
    res = load_file(str(next(out.glob("*.safetensors"))))
    e0, e1 = (load_file(str(family[n] / "model.safetensors")) for n in ("e0", "e1"))
    assert set(res) == set(e0)
    for t in e0:
        if t in stats["e0"].count:
            gs = []
            for st in (stats["e0"], stats["e1"]):
                gm = st.gram_sum(t).double() / st.count[t]
                gs.append(0.9 * gm + 0.1 * torch.diag(torch.diag(gm)))
            want = (e0[t].double() @ gs[0] + e1[t].double() @ gs[1]) @ torch.linalg.inv(gs[0] + gs[1])
            torch.testing.assert_close(res[t].double(), want, rtol=1e-3, atol=1e-4)
        else:
            torch.testing.assert_close(res[t], (e0[t] + e1[t]) / 2)
    no_gram = collect_activation_stats(load_model(family["e1"]), make_batches(TEXTS[:2], load_tokenizer(family["e1"])))
    with pytest.raises(GuidanceError, match="no Gram matrix for tensor 'model.layers.0"):
        regmean.regmean_checkpoint([family["e0"], family["e1"]], [stats["e0"], no_gram], tmp_path / "rm2")
    assert not (tmp_path / "rm2").exists()


def test_match_mean_shifts_to_the_weighted_target():
    d = {"a": 0.3, "b": 0.5, "c": 0.9}
    sizes = {"a": 100, "b": 300, "c": 600}
    got = lewis.match_mean(d, sizes, 0.5)
    assert lewis.weighted_mean(got, sizes) == pytest.approx(0.5, abs=1e-9)
    assert got["b"] - got["a"] == pytest.approx(0.2) and got["c"] - got["b"] == pytest.approx(0.4)
    clipped = lewis.match_mean(d, sizes, 0.99)  # needs clipping at 1: still hits the mean
    assert max(clipped.values()) == 1.0 and lewis.weighted_mean(clipped, sizes) == pytest.approx(0.99, abs=1e-9)
    with pytest.raises(GuidanceError, match="no element count for tensor 'a'"):
        lewis.match_mean(d, {"b": 1}, 0.5)


def test_sum_stats_adds_counts_and_sums_and_takes_the_max(stats):
    from merge_dag.guidance.activations import sum_stats

    stats = stats["base"]
    both = sum_stats([stats, stats])
    n = stats.names[0]
    assert both.count[n] == 2 * stats.count[n]
    torch.testing.assert_close(both.mean_sq(n), stats.mean_sq(n))
    torch.testing.assert_close(both.maxabs[n], stats.maxabs[n])
    torch.testing.assert_close(both.gram_mean(n), stats.gram_mean(n))
    other = ActivationStats({n: 1}, {n: stats.sumsq[n]}, {n: stats.sumabs[n]}, {n: stats.maxabs[n]}, source="x")
    with pytest.raises(GuidanceError, match="differ in tensor"):
        sum_stats([stats, other])


def test_guided_recipe_replaces_density_and_scales_weight(tmp_path):
    from merge_dag.core import params as pmap
    from merge_dag.core.recipe import parse_recipe
    from merge_dag.guidance.apply import guided_recipe

    for n in ("b", "x", "y"):
        (tmp_path / n).mkdir()
    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [
                {"model": "x", "parameters": {"weight": [1.0, 2.0], "density": 0.4}},
                {"model": "y", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}},
            ],
            "parameters": {"density": 0.7},
        },
        root=tmp_path,
    )
    t0, t1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    g = guided_recipe(
        recipe,
        densities={"x": {t0: 0.9}},
        weights={"x": {t0: 2.0, t1: 0.5, "model.norm.weight": 1.0}, "y": {t0: 3.0, t1: 1.0}},
        num_layers=2,
    )
    assert g.guidance is None and recipe.models[0].parameters["density"] == 0.4  # the original is untouched
    x, y = g.models[0].parameters, g.models[1].parameters
    assert pmap.evaluate(x["density"], t0, 0.0) == 0.9
    assert pmap.evaluate(x["density"], t1, 1.0) == 0.4  # unscored: the recipe's own density
    assert pmap.evaluate(x["weight"], t0, 0.0) == pytest.approx(1.0 * 2.0)  # gradient at layer 0 x Sens weight
    assert pmap.evaluate(x["weight"], t1, 1.0) == pytest.approx(2.0 * 0.5)  # gradient at layer 1
    assert pmap.evaluate(x["weight"], "model.norm.weight", 0.0) == 1.0  # outside the layers: recipe's value
    assert pmap.evaluate(y["weight"], t0, 0.0) == pytest.approx(0.5 * 3.0)  # the recipe's filter still counts
    assert pmap.evaluate(y["weight"], "model.layers.11.mlp.up_proj.weight", 0.0) == 0.5
    assert "density" not in y  # no map given for y: unchanged
    with pytest.raises(GuidanceError, match="map for 'z', which the recipe does not merge"):
        guided_recipe(recipe, densities={"z": {t0: 0.5}})


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_model_reads_each_tensor_into_the_working_dtype_like_from_pretrained(tmp_path, tied, dtype):
    """The statistics loader (parameters on meta, each read straight into the working dtype) gives the
    model transformers' from_pretrained gives: same tensors, tied weights one tensor, same logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from merge_dag.core.checkpoint import Checkpoint
    from merge_dag.guidance.model import _load_streamed

    torch.manual_seed(3)
    cfg = LlamaConfig(**{**tiny_config(layers=2, hidden=32, vocab=64), "tie_word_embeddings": tied})
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path))
    assert _load_streamed(Checkpoint(tmp_path), "cpu", dtype) is not None  # not the from_pretrained fallback
    got = load_model(tmp_path, dtype=dtype)
    want = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=dtype).eval()
    assert {p.dtype for p in got.parameters()} == {dtype}
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied
    sg, sw = got.state_dict(), want.state_dict()
    assert set(sg) == set(sw) and all(torch.equal(sg[k], sw[k]) for k in sw)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    assert torch.equal(got(ids).logits, want(ids).logits)
