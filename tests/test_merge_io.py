"""The merge's I/O paths: the fingerprint cache spares the hashing of unchanged inputs, the output's
digests come from the bytes written, and reused buffers never change a byte of the output."""

import os
import shutil
import textwrap

import pytest
import torch

from merge_dag.core import merge as merge_mod
from merge_dag.core.checkpoint import Checkpoint
from merge_dag.core.engine import merge
from merge_dag.core.errors import MergeInputError
from merge_dag.core.fingerprint import cache_dir, checkpoint_fingerprint

pytestmark = pytest.mark.usefixtures("fp_cache")


@pytest.fixture()
def family(tmp_path):
    from _models import make_family

    return make_family(tmp_path / "models", n_experts=2, layers=2, shards=2)


def ties_recipe(tmp_path, fam, e1=None) -> str:
    p = tmp_path / "ties.yaml"
    p.write_text(
        textwrap.dedent(f"""
        merge_method: ties
        base_model: {fam["base"]}
        models:
          - model: {fam["e0"]}
            parameters: {{weight: 1.0, density: 0.3}}
          - model: {e1 or fam["e1"]}
            parameters: {{weight: 1.0, density: 0.3}}
        out_dtype: bfloat16
    """)
    )
    return str(p)


def count_hashes(monkeypatch) -> list[int]:
    calls = [0]
    real = merge_mod.tensor_sha256

    def counting(t):
        calls[0] += 1
        return real(t)

    monkeypatch.setattr(merge_mod, "tensor_sha256", counting)
    return calls


def test_second_merge_hashes_only_its_output(tmp_path, family, monkeypatch):
    recipe = ties_recipe(tmp_path, family)
    calls = count_hashes(monkeypatch)
    first = merge(recipe, tmp_path / "out1")
    n_out = first.tensor_count
    n_in = sum(len(Checkpoint(family[k]).tensors) for k in ("base", "e0", "e1"))
    assert calls[0] == n_in + n_out  # cold cache: every input tensor once, every output tensor once
    calls[0] = 0
    second = merge(recipe, tmp_path / "out2")
    assert calls[0] == n_out  # the inputs' digests came from the cache
    assert second.fingerprints == first.fingerprints
    assert second.output_fingerprint == first.output_fingerprint


def test_output_fingerprint_equals_a_cold_one(tmp_path, family, monkeypatch):
    res = merge(ties_recipe(tmp_path, family), tmp_path / "out")
    # recompute from the file's bytes, with an empty cache
    monkeypatch.setenv("MERGE_DAG_CACHE", str(tmp_path / "fresh-cache"))
    assert not cache_dir().exists()
    assert checkpoint_fingerprint(Checkpoint(tmp_path / "out")) == res.output_fingerprint
    cold = sorted(checkpoint_fingerprint(Checkpoint(family[n])) for n in ("base", "e0", "e1"))
    assert sorted(res.fingerprints.values()) == cold


def test_rewritten_input_is_hashed_again(tmp_path, family, monkeypatch):
    recipe = ties_recipe(tmp_path, family)
    merge(recipe, tmp_path / "out1")
    # rewrite one shard of e1 with other weights: its cached digests no longer apply
    ck = Checkpoint(family["e1"])
    shard = sorted({i.file for i in ck.tensors.values()})[0]
    data = bytearray(shard.read_bytes())
    info = next(i for i in ck.tensors.values() if i.file == shard and i.nbytes >= 2)
    data[info.start] ^= 0x01
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(1, 1))
    calls = count_hashes(monkeypatch)
    again = merge(recipe, tmp_path / "out2")
    n_shard = sum(1 for i in ck.tensors.values() if i.file == shard)
    assert calls[0] == again.tensor_count + n_shard
    fresh = checkpoint_fingerprint(Checkpoint(family["e1"]))
    assert again.fingerprints[next(k for k in again.fingerprints if k.endswith("e1"))] == fresh


def test_identical_inputs_are_found_from_cached_digests(tmp_path, family, monkeypatch):
    twin = tmp_path / "models" / "e0-copy"
    shutil.copytree(family["e0"], twin)
    merge(ties_recipe(tmp_path, family), tmp_path / "out1")  # caches base's and e0's digests
    merge(ties_recipe(tmp_path, {**family, "e0": twin}), tmp_path / "out2")  # and the copy's
    calls = count_hashes(monkeypatch)
    with pytest.raises(MergeInputError, match="identical weights"):
        merge(ties_recipe(tmp_path, family, e1=twin), tmp_path / "out3")
    assert calls[0] == Checkpoint(tmp_path / "out1").tensors.__len__()  # only outputs were hashed
    assert not (tmp_path / "out3").exists()


def test_reused_buffers_give_the_bytes_of_fresh_ones(tmp_path, family, monkeypatch):
    recipe = ties_recipe(tmp_path, family)
    pooled = merge(recipe, tmp_path / "pooled")
    monkeypatch.setattr(merge_mod, "Buffers", lambda device: None)  # the plain .to() path
    fresh = merge(recipe, tmp_path / "fresh")
    assert pooled.output_fingerprint == fresh.output_fingerprint
    for name in Checkpoint(tmp_path / "pooled").tensors:
        assert torch.equal(Checkpoint(tmp_path / "pooled").get(name), Checkpoint(tmp_path / "fresh").get(name))
