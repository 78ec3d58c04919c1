"""Checkpoint I/O: lazy sharded reading, streaming sharded writing, refusal of bad folders."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from merge_dag.core.checkpoint import (
    INDEX_NAME,
    Checkpoint,
    CheckpointWriter,
    OutTensor,
    clean_stale_temporaries,
    parse_size,
)
from merge_dag.core.errors import CheckpointError
from merge_dag.core.fingerprint import checkpoint_fingerprint, file_fingerprint

from _models import base_state, tiny_config, write_model


@pytest.fixture(scope="module")
def state():
    return base_state()


def test_reads_sharded_folder_lazily(tmp_path, state):
    folder = write_model(tmp_path / "m", state, tiny_config(), torch.bfloat16, shards=3)
    ck = Checkpoint(folder)
    assert set(ck.tensor_names) == set(state)
    assert len({i.file for i in ck.tensors.values()}) == 3
    for name, t in state.items():
        got = ck.get(name)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, t.to(torch.bfloat16)), name
        assert torch.equal(ck.get(name, dtype=torch.float32), t.to(torch.bfloat16).float())


def test_writer_shards_by_size_and_writes_index(tmp_path, state):
    tensors = [OutTensor(n, tuple(t.shape), torch.float32) for n, t in state.items()]
    total = sum(t.nbytes for t in tensors)
    out = tmp_path / "out"
    with CheckpointWriter(out, tensors, max_shard_bytes=total // 3) as w:
        for n, t in state.items():
            w.write(n, t.float())
        assert not out.exists(), "nothing may stand at the target before commit"
        w.commit()
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(state)
    loaded = {}
    for f in shards:
        loaded.update(load_file(str(f)))  # the reference library accepts our files
    for n, t in state.items():
        assert torch.equal(loaded[n], t.float())
    assert Checkpoint(out).tensor_names  # and our reader too
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_writer_abort_leaves_nothing(tmp_path, state):
    tensors = [OutTensor(n, tuple(t.shape), torch.float32) for n, t in state.items()]
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with CheckpointWriter(out, tensors, 10**9) as w:
            w.write(tensors[0].name, state[tensors[0].name].float())
            raise ValueError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_incomplete(tmp_path, state):
    tensors = [OutTensor(n, tuple(t.shape), torch.float32) for n, t in state.items()]
    w = CheckpointWriter(tmp_path / "out", tensors, 10**9)
    w.write(tensors[0].name, state[tensors[0].name].float())
    with pytest.raises(RuntimeError, match="never written"):
        w.commit()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_pickle_only_folder_is_refused_with_conversion_hint(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"pickled weights \(pytorch_model.bin\).*save_pretrained") as e:
        Checkpoint(folder, name="legacy")
    assert "legacy" in str(e.value) and "safe_serialization=True" in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"model 'ghost': path does not exist: .*nowhere"):
        Checkpoint(tmp_path / "nowhere", name="ghost")


def test_truncated_file_is_refused(tmp_path, state):
    folder = write_model(tmp_path / "m", state, tiny_config())
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: truncated safetensors file: tensor '.*' needs bytes"
    ):
        Checkpoint(folder)


def test_corrupt_header_is_refused(tmp_path, state):
    folder = write_model(tmp_path / "m", state, tiny_config())
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint(folder)
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpoint(folder)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")


def test_fingerprint_ignores_sharding_and_sees_any_change(tmp_path, state, monkeypatch):
    monkeypatch.setenv("MERGE_DAG_CACHE", str(tmp_path / "cache"))
    a = write_model(tmp_path / "a", state, tiny_config(), shards=1)
    b = write_model(tmp_path / "b", state, tiny_config(), shards=3)
    fa, fb = checkpoint_fingerprint(a), checkpoint_fingerprint(b)
    assert fa == fb and fa.startswith("sha256:")
    assert checkpoint_fingerprint(a) == fa  # from the cache
    changed = dict(state)
    name = next(iter(changed))
    changed[name] = changed[name].clone()
    changed[name].view(-1)[0] += 1.0
    c = write_model(tmp_path / "c", changed, tiny_config())
    assert checkpoint_fingerprint(c) != fa
    # rewriting a file in place (new mtime) invalidates the cache entry
    write_model(tmp_path / "a", changed, tiny_config())
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(c)
    assert file_fingerprint(a / "config.json") == file_fingerprint(b / "config.json")


def test_clean_stale_temporaries_keeps_live_writers(tmp_path):
    dead = tmp_path / ".out.tmp-999999999-abcdef12"
    live = tmp_path / f".out.tmp-{__import__('os').getpid()}-abcdef12"
    dead.mkdir()
    live.mkdir()
    removed = clean_stale_temporaries(tmp_path / "out")
    assert removed == [dead]
    assert live.exists() and not dead.exists()
