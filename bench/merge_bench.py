#!/usr/bin/env python
"""Merge benchmark: merge_dag (and optionally mergekit) on a ~370M-parameter Llama-shaped model.

    .venv/bin/python bench/merge_bench.py                       # merge_dag + read/write floor
    .venv/bin/python bench/merge_bench.py --mergekit-venv /path/to/mergekit-venv --parity

What it does
  1. Builds, once, into the cache folder (default bench/.cache/, git-ignored) a base checkpoint
     shaped exactly like transformers' LlamaForCausalLM (hidden 1024, 24 layers, intermediate
     2816, vocab 32000, 16 heads, untied lm_head, bf16; 374M parameters, 748 MB) and three experts
     = base + N(0, sigma^2) noise. Every tensor comes from its own fixed seed, so the models are the
     same on every machine and are generated one tensor at a time (memory stays small). The
     folders look like what `save_pretrained` writes: config.json from LlamaConfig, sharded
     safetensors and model.safetensors.index.json. No tokenizer (none is needed).
  2. Writes one recipe per method (mergekit's YAML shape, read unchanged by both tools) into
     the cache: three experts, weight 1.0, density 0.3 (task_arithmetic takes no density),
     `dtype: float32` (the arithmetic: mergekit computes in the recipe's dtype, merge_dag always in
     float32) and `out_dtype: bfloat16`, `seed: 0` (mergekit ignores that key; it gets
     `--random-seed 0` instead).
  3. Runs each merge as a child process and measures its wall time and its own peak RSS
     (os.wait4 on that one child: ru_maxrss of that process, not a maximum across runs).
     Before each run the inputs are read once (page cache warm for every tool alike) and
     `sync` flushes the previous run's writes. Outputs go to <cache>/out/<tool>/<method>.
  4. The "floor": this script's own `_floor` mode, run as a child the same way, reads every
     tensor of all four inputs (positioned reads into fresh buffers, like merge_dag; no mmap) and
     writes the base's tensor to a fresh sharded output, fsyncing it as merge_dag does. No
     arithmetic and no dtype conversion: the pure I/O a merge of these inputs cannot avoid.
  5. Prints a markdown table and writes JSON (default bench/results/merge_bench.json).
     With --repeat N each measurement runs N times; the table shows the MINIMUM wall time (or the
     median, --stat median) and the MAXIMUM peak RSS over the runs (every sample is in the JSON).
     The machine must be otherwise idle: each sample records the share of the CPUs other
     processes used during it (others_cpu_share), and --wait-idle waits for a quiet machine.
  6. --parity compares the two tools' outputs tensor by tensor (needs both outputs).

mergekit is not installed by this project (it is LGPL and has its own dependencies); make a
virtualenv for it yourself and pass its folder with --mergekit-venv (see the README).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CACHE = HERE / ".cache"
DEFAULT_JSON = HERE / "results" / "merge_bench.json"

METHODS = ("ties", "dare_ties", "task_arithmetic")


def known_methods() -> tuple[str, ...]:
    """The methods this bench writes recipes for: linear and the task-arithmetic family (weight, density)."""
    from merge_dag.core.methods.registry import COEFFICIENT_METHODS  # torch loads only when asked

    return ("linear",) + COEFFICIENT_METHODS


# the goals merge_dag is held to on this model (2 cores); the run reports each as met or not
TARGET_OVER_FLOOR = {"ties": 2.0, "task_arithmetic": 1.3}  # issue 14: wall / floor, same run
TARGET_PEAK_RSS_GB = 1.5

# ---- the model -----------------------------------------------------------------------------
SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    intermediate_size=2816,
    vocab_size=32000,
    num_attention_heads=16,
    num_key_value_heads=16,
)
BUILD_VERSION = 1
BASE_STD = 0.02
EXPERT_SIGMA = 0.002  # noise std of each expert's task vector (10% of the weights' std)
N_EXPERTS = 3
SHARD_BYTES = 400_000_000  # ~748 MB per model -> 2 shards, like a sharded HF checkpoint
GB = 1e9  # all sizes in the report are decimal GB


def llama_tensors(hidden: int, layers: int, inter: int, vocab: int, **_) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of LlamaForCausalLM's state dict (MHA, untied head), in its order."""
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (hidden, hidden)),
            (p + "self_attn.v_proj.weight", (hidden, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def model_tensors() -> list[tuple[str, tuple[int, ...]]]:
    return llama_tensors(
        SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- a minimal streaming safetensors writer (header first, then tensors in order) ----------
_ST_DTYPE = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}
_ELT = {"BF16": 2, "F16": 2, "F32": 4}


class ShardedWriter:
    """Writes tensors whose names/shapes/dtype are known up front into HF-style sharded safetensors."""

    def __init__(
        self,
        folder: Path,
        tensors: list[tuple[str, tuple[int, ...]]],
        dtype: str = "BF16",
        shard_bytes: int = SHARD_BYTES,
    ):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in tensors:
            nb = _numel(shape) * _ELT[dtype]
            if shards[-1] and size + nb > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += nb
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.dtype = dtype
        self.order = [(si, name, shape) for si, sh in enumerate(shards) for name, shape in sh]
        self.pos = 0
        self.cur = -1
        self.fh = None
        self.total = 0

    def _open(self, si: int) -> None:
        if self.fh is not None:
            self.fh.close()
        self.cur = si
        self.fh = open(self.folder / self.files[si], "wb")
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape in self.shards[si]:
            nb = _numel(shape) * _ELT[self.dtype]
            header[name] = {"dtype": self.dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self.fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, data) -> None:
        """data: a contiguous CPU torch tensor of the planned dtype, or a bytes-like object."""
        si, want, shape = self.order[self.pos]
        if name != want:
            raise RuntimeError(f"write order: got {name}, expected {want}")
        if si != self.cur:
            self._open(si)
        if hasattr(data, "numpy"):
            import torch

            if _ST_DTYPE[str(data.dtype)] != self.dtype or tuple(data.shape) != tuple(shape):
                raise RuntimeError(f"{name}: got {data.dtype} {tuple(data.shape)}, expected {self.dtype} {shape}")
            data = memoryview(data.contiguous().view(torch.uint8).reshape(-1).numpy())
        self.fh.write(data)
        self.total += _numel(shape) * _ELT[self.dtype]
        self.pos += 1

    def close(self, fsync: bool = False) -> None:
        if self.pos != len(self.order):
            raise RuntimeError("not every tensor was written")
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {name: self.files[si] for si, name, _ in self.order},
        }
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if fsync:
            for p in self.folder.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())


def _read_index(folder: Path) -> dict[str, tuple[Path, int, int, str, list[int]]]:
    """name -> (file, absolute start, end, dtype, shape) for an HF folder of safetensors."""
    out = {}
    idx = folder / "model.safetensors.index.json"
    files = (
        list(dict.fromkeys(json.loads(idx.read_text())["weight_map"].values()))
        if idx.exists()
        else sorted(p.name for p in folder.glob("*.safetensors"))
    )
    for fn in files:
        p = folder / fn
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, h in header.items():
            b, e = h["data_offsets"]
            out[name] = (p, 8 + n + b, 8 + n + e, h["dtype"], h["shape"])
    return out


# ---- building the models -------------------------------------------------------------------
def _seed(model: int, name: str) -> int:
    return (BUILD_VERSION * 1_000_003 + model * 7919) * 4_294_967_311 + zlib.crc32(name.encode())


def build_spec() -> dict:
    return {
        "version": BUILD_VERSION,
        "shape": SHAPE,
        "base_std": BASE_STD,
        "expert_sigma": EXPERT_SIGMA,
        "experts": N_EXPERTS,
        "dtype": "bfloat16",
        "shard_bytes": SHARD_BYTES,
    }


def model_dirs(cache: Path) -> tuple[Path, list[Path]]:
    root = cache / "models"
    return root / "base", [root / f"expert{i + 1}" for i in range(N_EXPERTS)]


def add_tokenizer_stub(cache: Path) -> None:
    """Give every bench model the same small tokenizer_config.json (merge_dag refuses a
    tokenizer_source without tokenizer files; the bench measures tensors, not tokenizers, and
    mergekit runs with --no-copy-tokenizer). Identical bytes in every input: nothing is loaded."""
    base, experts = model_dirs(cache)
    for f in [base] + experts:
        p = f / "tokenizer_config.json"
        if f.is_dir() and not p.exists():
            p.write_text(json.dumps({"model_max_length": 2048, "merge_dag_bench": "stub"}) + "\n")


def build_models(cache: Path, force: bool = False) -> dict:
    """Build base + experts once; a stamp file records the spec, a changed spec rebuilds."""
    info = _build_models(cache, force)
    add_tokenizer_stub(cache)
    return info


def _build_models(cache: Path, force: bool = False) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig

    root = cache / "models"
    stamp = root / "build.json"
    spec = build_spec()
    if not force and stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("spec") == spec:
                return json.loads(stamp.read_text())
        except json.JSONDecodeError:
            pass
    if root.exists():
        shutil.rmtree(root)
    tmp = cache / "models.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    names = model_tensors()
    cfg = LlamaConfig(
        **SHAPE,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    folders = [tmp / "base"] + [tmp / f"expert{i + 1}" for i in range(N_EXPERTS)]
    writers = []
    for f in folders:
        f.mkdir()
        c = LlamaConfig.from_dict(cfg.to_dict())
        if int(transformers.__version__.split(".")[0]) >= 5:
            c.dtype = torch.bfloat16
        else:
            c.torch_dtype = torch.bfloat16
        c.save_pretrained(f)
        writers.append(ShardedWriter(f, names))
    for name, shape in names:
        g = torch.Generator().manual_seed(_seed(0, name) % (2**63))
        if name.endswith("norm.weight"):
            base32 = torch.ones(shape)
        else:
            base32 = torch.randn(shape, generator=g).mul_(BASE_STD)
        base16 = base32.to(torch.bfloat16)
        writers[0].write(name, base16)
        base32 = base16.float()
        for e in range(N_EXPERTS):
            g = torch.Generator().manual_seed(_seed(e + 1, name) % (2**63))
            noise = torch.randn(shape, generator=g).mul_(EXPERT_SIGMA)
            writers[e + 1].write(name, noise.add_(base32).to(torch.bfloat16))
            del noise
    for w in writers:
        w.close()
    n_params = sum(_numel(s) for _, s in names)
    info = {
        "spec": spec,
        "params": n_params,
        "bytes_per_model": writers[0].total,
        "files": writers[0].files,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    os.rename(tmp, root)
    return info


# ---- recipes -------------------------------------------------------------------------------
def recipe_text(
    method: str, base: Path, experts: list[Path], density: float, weight: float, dtype: str, out_dtype: str
) -> str:
    from merge_dag.core.methods.registry import SPARSIFYING

    takes_density = method in SPARSIFYING
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for e in experts:
        params = f"weight: {weight}" + (f", density: {density}" if takes_density else "")
        lines += [f"  - model: {e}", f"    parameters: {{{params}}}"]
    lines += [
        f"dtype: {dtype}",
        f"out_dtype: {out_dtype}",
        "seed: 0  # merge_dag; mergekit ignores it and gets --random-seed 0",
    ]
    return "\n".join(lines) + "\n"


def write_recipes(
    cache: Path, methods: list[str], density: float, weight: float, dtype: str, out_dtype: str
) -> dict[str, Path]:
    base, experts = model_dirs(cache)
    d = cache / "recipes"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for m in methods:
        models = experts + [base] if m == "linear" else experts
        p = d / f"{m}.yaml"
        p.write_text(recipe_text(m, base, models, density, weight, dtype, out_dtype))
        out[m] = p
    return out


# ---- measuring a child ---------------------------------------------------------------------
def warm_inputs(folders: list[Path]) -> None:
    """Read every input file once so each run starts with the same (warm) page cache."""
    buf = bytearray(64 << 20)
    for folder in folders:
        for p in sorted(folder.glob("*.safetensors")):
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def _cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (0, 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            parts = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = sum(parts[:8])  # user nice system idle iowait irq softirq steal
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return (total - idle) / hz, total / hz


def machine_busy(window_s: float = 2.0) -> float:
    """Fraction of all CPUs busy over a short window (0..1)."""
    b0, t0 = _cpu_times()
    time.sleep(window_s)
    b1, t1 = _cpu_times()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def wait_idle(max_wait_s: float, busy_max: float = 0.15) -> float:
    """Wait (up to max_wait_s) until other processes use less than busy_max of the CPUs."""
    deadline = time.monotonic() + max_wait_s
    busy = machine_busy()
    while busy > busy_max and time.monotonic() < deadline:
        busy = machine_busy(5.0)
    return busy


def _raise_priority(nice: int) -> None:
    """In the child before exec: its own session, and that session's scheduling group and the
    process itself at `nice`. (With sched_autogroup, as on most Linux desktops and here, a plain
    nice value only counts within one session; the autogroup's nice counts across sessions.)"""
    os.setsid()
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass
    os.setpriority(os.PRIO_PROCESS, 0, nice)


def measure(cmd: list[str], log: Path, env: dict | None = None, nice: int = 0) -> dict:
    """Run cmd as a child; its wall time and its own peak RSS (wait4 -> ru_maxrss, KiB on Linux).

    Also records how much CPU everything else on the machine used meanwhile (others_cpu_share:
    the machine's busy CPU time during the run minus the child's, over wall x CPUs): timings
    taken while that is well above 0 are not comparable."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    with open(log, "wb") as lf:
        b0, _ = _cpu_times()
        t0 = time.perf_counter()
        pre = (lambda: _raise_priority(nice)) if nice else None
        proc = subprocess.Popen(
            cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=pre
        )
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        b1, _ = _cpu_times()
    proc.returncode = os.waitstatus_to_exitcode(status)
    child_cpu = ru.ru_utime + ru.ru_stime
    others = max(0.0, (b1 - b0) - child_cpu) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 3),
        "peak_rss_gb": round(ru.ru_maxrss * 1024 / GB, 4),
        "user_s": round(ru.ru_utime, 2),
        "sys_s": round(ru.ru_stime, 2),
        "others_cpu_share": round(others, 3),
        "loadavg_1min_before": round(load, 2),
        "log": str(log),
    }


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---- the read-and-write floor (run as a child: `merge_bench.py _floor OUT IN...`) ----------
def floor_main(out: Path, inputs: list[Path]) -> int:
    import torch  # imported like a merge tool would (its RSS is part of the floor)

    idx = [_read_index(p) for p in inputs]
    names = list(idx[0])
    # write in the base's order, as one merged output would be
    tensors = [(n, tuple(idx[0][n][4])) for n in names]
    dtype = idx[0][names[0]][3]
    if out.exists():
        shutil.rmtree(out)
    w = ShardedWriter(out, tensors, dtype=dtype, shard_bytes=2 * 10**9)
    fhs: dict[Path, object] = {}
    for n, _ in tensors:
        bufs = []
        for ix in idx:
            p, s, e, _, _ = ix[n]
            f = fhs.get(p) or fhs.setdefault(p, open(p, "rb", buffering=0))
            buf = torch.empty(e - s, dtype=torch.uint8)
            f.seek(s)
            got = f.readinto(memoryview(buf.numpy()))
            assert got == e - s, (n, got)
            bufs.append(buf)
        w.write(n, memoryview(bufs[0].numpy()))
        del bufs
    for f in fhs.values():
        f.close()
    shutil.copy2(inputs[0] / "config.json", out / "config.json")
    w.close(fsync=True)
    return 0


# ---- parity --------------------------------------------------------------------------------
def parity(
    base: Path, ours: Path, theirs: Path, experts: list[Path] | None = None, density: float | None = None
) -> dict:
    """Compare two merged outputs tensor by tensor; deltas are taken against the base.

    With `experts` and `density` (magnitude top-k methods: ties), also finds where each expert's
    |delta| equals its own top-k threshold: there the k kept entries are chosen among equal
    magnitudes, and the two tools break such ties differently (mergekit: torch.argsort order,
    merge_dag: position), so differences are expected there and only there. bf16 deltas are
    coarsely quantized, so such tie sets are large."""
    import torch
    from safetensors import safe_open

    def opener(folder: Path):
        idx = _read_index(folder)
        handles = {}

        def get(name):
            p = idx[name][0]
            if p not in handles:
                handles[p] = safe_open(str(p), framework="pt")
            return handles[p].get_tensor(name)

        return idx, get

    bidx, bget = opener(base)
    oidx, oget = opener(ours)
    tidx, tget = opener(theirs)
    egets = [opener(e)[1] for e in experts] if experts and density is not None else []
    tie_elems = diff_outside_ties = 0
    missing = sorted(set(oidx) ^ set(tidx))
    acc = dict(
        n=0,
        diff_elems=0,
        diff_sq=0.0,
        ref_delta_sq=0.0,
        our_delta_sq=0.0,
        max_abs=0.0,
        our_kept=0,
        their_kept=0,
        max_rel_tensor=0.0,
        worst_tensor=None,
        over_1ulp=0,
    )
    for name in sorted(set(oidx) & set(tidx)):
        b = bget(name).float()
        o = oget(name)
        t = tget(name)
        dtypes = (str(o.dtype), str(t.dtype))
        o, t = o.float(), t.float()
        do, dt = o - b, t - b
        diff = o - t
        if egets:
            tied = torch.zeros(b.shape, dtype=torch.bool)
            for eget in egets:
                mag = (eget(name).float() - b).abs_().reshape(-1)
                n_el = mag.numel()
                k = max(1, int(density * n_el))
                if k < n_el:
                    thr = mag.kthvalue(n_el - k + 1).values  # the k-th largest magnitude
                    tied |= (mag == thr).reshape(b.shape)
                del mag
            tie_elems += int(tied.sum())
            diff_outside_ties += int(((diff != 0) & ~tied).sum())
            del tied
        acc["n"] += b.numel()
        acc["diff_elems"] += int((diff != 0).sum())
        # "more than one bf16 ulp" of the larger of the two values
        ulp = torch.maximum(o.abs(), t.abs()).clamp_min(1e-30) * 2.0**-7
        acc["over_1ulp"] += int((diff.abs() > ulp * 1.0001).sum())
        dsq = float(diff.double().pow(2).sum())
        tsq = float(dt.double().pow(2).sum())
        acc["diff_sq"] += dsq
        acc["ref_delta_sq"] += tsq
        acc["our_delta_sq"] += float(do.double().pow(2).sum())
        acc["max_abs"] = max(acc["max_abs"], float(diff.abs().max()))
        acc["our_kept"] += int((do != 0).sum())
        acc["their_kept"] += int((dt != 0).sum())
        rel = math.sqrt(dsq / tsq) if tsq > 0 else (0.0 if dsq == 0 else math.inf)
        if rel > acc["max_rel_tensor"]:
            acc["max_rel_tensor"], acc["worst_tensor"] = rel, name
        acc["dtypes"] = dtypes
    n = max(acc["n"], 1)
    return {
        "tensors_only_in_one": missing,
        "elements": acc["n"],
        "max_abs_diff": acc["max_abs"],
        "rel_l2_diff_of_delta": math.sqrt(acc["diff_sq"] / acc["ref_delta_sq"]) if acc["ref_delta_sq"] else None,
        "max_rel_l2_diff_one_tensor": acc["max_rel_tensor"],
        "worst_tensor": acc["worst_tensor"],
        "fraction_elements_differing": acc["diff_elems"] / n,
        "fraction_elements_over_1_bf16_ulp": acc["over_1ulp"] / n,
        "delta_norm_ratio_ours_over_mergekit": math.sqrt(acc["our_delta_sq"] / acc["ref_delta_sq"])
        if acc["ref_delta_sq"]
        else None,
        "kept_fraction_ours": acc["our_kept"] / n,
        "kept_fraction_mergekit": acc["their_kept"] / n,
        "output_dtypes": acc.get("dtypes"),
        **(
            {
                "fraction_elements_at_a_topk_tie": tie_elems / n,
                "elements_differing_outside_topk_ties": diff_outside_ties,
            }
            if egets
            else {}
        ),
    }


# ---- report --------------------------------------------------------------------------------
def _fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def summarize(samples: list[dict], stat: str = "min") -> dict | None:
    ok = [s for s in samples if s["rc"] == 0]
    if not ok:
        return None
    walls = [s["wall_s"] for s in ok]
    best = min(ok, key=lambda s: s["wall_s"])
    return {
        "wall_s": round(min(walls) if stat == "min" else statistics.median(walls), 2),
        "peak_rss_gb": round(max(s["peak_rss_gb"] for s in ok), 3),
        "cpu_s_of_fastest": round(best["user_s"] + best["sys_s"], 1),
        "others_cpu_share_of_fastest": best.get("others_cpu_share"),
        "runs": len(ok),
    }


def table(results: dict, methods: list[str], with_mk: bool) -> str:
    head = ["method", "merge_dag wall s", "merge_dag peak RSS GB"]
    if with_mk:
        head += ["mergekit wall s", "mergekit peak RSS GB", "wall mk/ours", "RSS mk/ours"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        ours = results["summary"].get("merge_dag", {}).get(m)
        mk = results["summary"].get("mergekit", {}).get(m)
        r = [m, _fmt(ours and ours["wall_s"]), _fmt(ours and ours["peak_rss_gb"], 2)]
        if with_mk:
            r += [_fmt(mk and mk["wall_s"]), _fmt(mk and mk["peak_rss_gb"], 2)]
            r += [
                f"{mk['wall_s'] / ours['wall_s']:.1f}×" if ours and mk else "—",
                f"{mk['peak_rss_gb'] / ours['peak_rss_gb']:.1f}×" if ours and mk else "—",
            ]
        rows.append("| " + " | ".join(r) + " |")
    fl = results["summary"].get("floor")
    if fl:
        r = ["read+write floor", _fmt(fl["wall_s"]), _fmt(fl["peak_rss_gb"], 2)]
        if with_mk:
            r += ["", "", "", ""]
        rows.append("| " + " | ".join(r) + " |")
    return "\n".join(rows)


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / GB, 1)
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def merge_dag_cmd(recipe: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "merge-dag"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "merge_dag.cli"]
    return base + ["merge", str(recipe), str(out), "--no-progress"]


def mergekit_cmd(venv: Path, recipe: Path, out: Path) -> list[str]:
    return [
        str(venv / "bin" / "mergekit-yaml"),
        str(recipe),
        str(out),
        "--random-seed",
        "0",
        "--no-copy-tokenizer",
        "--quiet",
    ]


def _version_of(venv: Path, pkg: str) -> str | None:
    try:
        return (
            subprocess.run(
                [str(venv / "bin" / "python"), "-c", f"import importlib.metadata as m; print(m.version('{pkg}'))"],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_floor":
        return floor_main(Path(argv[1]), [Path(a) for a in argv[2:]])

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated merge methods (default {','.join(METHODS)})"
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="folder for the generated models, recipes and outputs (default bench/.cache)",
    )
    ap.add_argument(
        "--mergekit-venv",
        type=Path,
        default=None,
        help="a virtualenv with mergekit installed: also run every recipe through its mergekit-yaml",
    )
    ap.add_argument(
        "--parity",
        action="store_true",
        help="compare merge_dag's and mergekit's outputs tensor by tensor (needs --mergekit-venv)",
    )
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results JSON")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per measurement; the table shows the MIN wall time (--stat) and the max peak RSS",
    )
    ap.add_argument(
        "--stat",
        choices=("min", "median"),
        default="min",
        help="how repeated wall times are summarized (default min: least disturbed by other load)",
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each run wait up to SECONDS until other processes use < 15%% of the CPUs",
    )
    ap.add_argument("--no-merge-dag", action="store_true", help="skip merge_dag's runs")
    ap.add_argument("--no-floor", action="store_true", help="skip the read-and-write floor")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling priority of every measured child (e.g. -15, needs root): on a shared "
        "machine this keeps other jobs from distorting the timings; same for every tool",
    )
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", help="recipe `dtype` (mergekit's arithmetic dtype; default float32)")
    ap.add_argument("--out-dtype", default="bfloat16", help="recipe `out_dtype` (default bfloat16)")
    ap.add_argument("--rebuild", action="store_true", help="regenerate the models even if cached")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged outputs (parity keeps them anyway)")
    args = ap.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = known_methods()
    for m in methods:
        if m not in known:
            ap.error(f"unknown method {m!r} (known: {', '.join(known)})")
    if args.parity and not args.mergekit_venv:
        ap.error("--parity needs --mergekit-venv")
    mk = args.mergekit_venv.absolute() if args.mergekit_venv else None
    if mk and not (mk / "bin" / "mergekit-yaml").exists():
        ap.error(f"{mk}/bin/mergekit-yaml not found: is mergekit installed in that virtualenv?")
    cache = args.cache.absolute()
    cache.mkdir(parents=True, exist_ok=True)

    print(f"models: building or reusing in {cache / 'models'} ...", flush=True)
    build = build_models(cache, force=args.rebuild)
    base, experts = model_dirs(cache)
    print(
        f"models: {build['params'] / 1e6:.1f}M parameters, {build['bytes_per_model'] / GB:.3f} GB each "
        f"(built in {build['build_seconds']} s)",
        flush=True,
    )
    recipes = write_recipes(cache, methods, args.density, args.weight, args.dtype, args.out_dtype)

    tools = []
    if not args.no_merge_dag:
        tools.append("merge_dag")
    if mk:
        tools.append("mergekit")
    results: dict = {
        "machine": machine_info(),
        "model": {"shape": SHAPE, **build, "base": str(base), "experts": [str(e) for e in experts]},
        "settings": {
            "methods": methods,
            "density": args.density,
            "weight": args.weight,
            "dtype": args.dtype,
            "out_dtype": args.out_dtype,
            "repeat": args.repeat,
            "aggregate": f"{args.stat} wall time, max peak RSS over repeats",
            "page_cache": "inputs read once before every run (warm); sync before every run",
            "nice": args.nice,
            "rss": "ru_maxrss of the child from os.wait4, decimal GB",
        },
        "recipes": {m: {"path": str(p), "text": p.read_text()} for m, p in recipes.items()},
        "commands": {},
        "samples": {},
        "summary": {},
    }
    if mk:
        results["mergekit"] = {
            "venv": str(mk),
            "version": _version_of(mk, "mergekit"),
            "torch": _version_of(mk, "torch"),
        }
    out_root = cache / "out"
    logs = cache / "logs"
    inputs = [base] + experts

    def run_one(tool: str, method: str, rep: int) -> dict:
        out = out_root / tool / method
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if tool == "merge_dag":
            cmd = merge_dag_cmd(recipes[method], out)
        elif tool == "mergekit":
            cmd = mergekit_cmd(mk, recipes[method], out)
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "_floor", str(out)] + [str(p) for p in inputs]
        results["commands"].setdefault(tool, {})[method] = " ".join(cmd)
        warm_inputs(inputs)
        os.sync()
        busy_before = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
        env = dict(os.environ)
        if tool == "mergekit":  # do not let the project's venv leak into mergekit's
            env.pop("PYTHONPATH", None)
            env["PATH"] = f"{mk / 'bin'}:{env.get('PATH', '')}"
            env["VIRTUAL_ENV"] = str(mk)
        s = measure(cmd, logs / f"{tool}-{method}-{rep}.log", env=env, nice=args.nice)
        s["machine_busy_before"] = None if busy_before is None else round(busy_before, 3)
        if tool == "merge_dag" and (out / "merge_dag.json").exists():
            try:  # which engine code produced this timing (the engine records its own source hash)
                s["code_version"] = json.loads((out / "merge_dag.json").read_text()).get("code_version")
            except (OSError, json.JSONDecodeError):
                pass
        tag = f"{tool:9s} {method:16s} run {rep + 1}/{args.repeat}"
        if s["others_cpu_share"] > 0.1:
            tag += f" [other processes used {s['others_cpu_share']:.0%} of the CPUs meanwhile]"
        if s["rc"] != 0:
            print(f"{tag}: FAILED (exit {s['rc']}); log {s['log']}:\n{_tail(Path(s['log']))}", flush=True)
        else:
            print(
                f"{tag}: {s['wall_s']:7.2f} s  peak RSS {s['peak_rss_gb']:.3f} GB  "
                f"(user {s['user_s']} s, sys {s['sys_s']} s)",
                flush=True,
            )
        results["samples"].setdefault(tool, {}).setdefault(method, []).append(s)
        return s

    for rep in range(args.repeat):
        if not args.no_floor:
            run_one("floor", "read_write", rep)
        for m in methods:
            for tool in tools:
                run_one(tool, m, rep)

    for tool, per in results["samples"].items():
        for m, samples in per.items():
            s = summarize(samples, args.stat)
            if s is None:
                continue
            if tool == "floor":
                results["summary"]["floor"] = s
            else:
                results["summary"].setdefault(tool, {})[m] = s

    ours = results["summary"].get("merge_dag", {})
    if ours:
        results["targets"] = {
            "over_floor_max": TARGET_OVER_FLOOR,
            "peak_rss_gb_max": TARGET_PEAK_RSS_GB,
            "rss_ok": {m: v["peak_rss_gb"] <= TARGET_PEAK_RSS_GB for m, v in ours.items()},
        }
        fl = results["summary"].get("floor")
        if fl:
            over = {m: round(v["wall_s"] / fl["wall_s"], 2) for m, v in ours.items()}
            results["targets"]["over_floor"] = over
            results["targets"]["over_floor_ok"] = {m: over[m] <= x for m, x in TARGET_OVER_FLOOR.items() if m in over}

    if args.parity:
        results["parity"] = {}
        for m in methods:
            a, b = out_root / "merge_dag" / m, out_root / "mergekit" / m
            if not (a.exists() and b.exists()):
                results["parity"][m] = {"error": "an output is missing"}
                continue
            print(f"parity: {m} ...", flush=True)
            magnitude_topk = m == "ties"
            results["parity"][m] = parity(
                base, a, b, experts if magnitude_topk else None, args.density if magnitude_topk else None
            )

    if not (args.keep_outputs or args.parity):
        shutil.rmtree(out_root, ignore_errors=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(
        f"{build['params'] / 1e6:.0f}M-parameter Llama, bf16, base + {N_EXPERTS} experts, density "
        f"{args.density}, recipe dtype {args.dtype} -> {args.out_dtype}; {results['machine'].get('cpus')} CPUs; "
        f"wall = {args.stat} of {args.repeat}, RSS = max"
    )
    print(table(results, methods, bool(mk)))
    if "targets" in results:
        t = results["targets"]
        over = "".join(
            f"; {m} / floor = {r}×" + (f" (goal <= {TARGET_OVER_FLOOR[m]}×)" if m in TARGET_OVER_FLOOR else "")
            for m, r in t.get("over_floor", {}).items()
        )
        print(f"\ntargets: every method <= {TARGET_PEAK_RSS_GB} GB: {all(t['rss_ok'].values())}{over}")
    if args.parity:
        print("\nparity (merge_dag vs mergekit, merged tensors; deltas against the base):")
        print(
            "| method | max abs diff | rel L2 diff of delta | elems > 1 bf16 ulp | kept ours | kept mergekit | "
            "‖Δ‖ ours/mk |"
        )
        print("|---|---|---|---|---|---|---|")
        for m, p in results["parity"].items():
            if "error" in p:
                print(f"| {m} | {p['error']} | | | | | |")
                continue
            print(
                f"| {m} | {p['max_abs_diff']:.3g} | {p['rel_l2_diff_of_delta']:.3g} | "
                f"{p['fraction_elements_over_1_bf16_ulp']:.2e} | {p['kept_fraction_ours']:.4f} | "
                f"{p['kept_fraction_mergekit']:.4f} | {p['delta_norm_ratio_ours_over_mergekit']:.4f} |"
            )
    print(f"\nJSON: {args.json}")
    failed = [(t, m) for t, per in results["samples"].items() for m, ss in per.items() if any(s["rc"] for s in ss)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
