"""Build the expert zoo: tokenizer, base model, one fully fine-tuned expert per skill, data files.

Layout under ``out`` (default ``data/models``)::

    <out>/<size>/base/        Hugging Face folder (model.safetensors, config.json, tokenizer, ...)
    <out>/<size>/<skill>/     one expert per skill, fine-tuned from base
    <out>/<size>/zoo.json     the manifest: skills, seeds, settings, model paths, build time

Each model folder is written into a temporary folder beside it and renamed into place, so a
folder either is complete or does not exist. Each also holds ``zoo_model.json`` with the key of
the settings that produced it: an interrupted build resumes with the models already finished,
and a complete zoo with the same settings is reused without any work.

Everything is deterministic (seeded weights and data, deterministic kernels, a fixed thread
count): the same settings rebuild bit-identical files on the same machine and library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .skills import BASE_SKILLS, DATA_SEED, ZOO_SKILLS, get_skill, write_data_files
from .train import ModelShape, TrainSpec, deterministic, new_model, train

ZOO_FORMAT = 1  # bump when training code changes what a setting produces
MANIFEST = "zoo.json"
MODEL_META = "zoo_model.json"


@dataclass(frozen=True)
class ZooSettings:
    size: str
    skills: tuple[str, ...]
    shape: ModelShape
    base: TrainSpec
    expert: TrainSpec
    seed: int = 0
    data_seed: int = DATA_SEED
    threads: int = 1
    base_skills: tuple[str, ...] = ()  # the base's pretraining mixture (empty: `skills`)

    @property
    def pretrain_skills(self) -> tuple[str, ...]:
        return self.base_skills or self.skills

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skills"] = list(self.skills)
        d["base_skills"] = list(self.base_skills)
        return d

    def key(self) -> str:
        blob = json.dumps({"format": ZOO_FORMAT, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def expert_seed(self, skill: str) -> int:
        return self.seed + 100 + self.skills.index(skill)


_SHAPE_CI = ModelShape(hidden=128, layers=4, heads=4, intermediate=352)
# The base sees only short inputs (long_fraction 0): it half-knows every skill (right on short
# inputs, mostly wrong on long ones); each expert fine-tunes on its skill at every length with a
# low learning rate and few steps, so task vectors stay small.
SIZES: dict[str, ZooSettings] = {
    "ci": ZooSettings(
        size="ci",
        skills=ZOO_SKILLS,
        base_skills=BASE_SKILLS,
        shape=_SHAPE_CI,
        base=TrainSpec(steps=500, lr=3e-3, batch_size=64, warmup=50, long_fraction=0.0),
        expert=TrainSpec(steps=100, lr=3e-4, batch_size=64),
    ),
    "bench": ZooSettings(
        size="bench",
        skills=ZOO_SKILLS,
        base_skills=BASE_SKILLS,
        shape=ModelShape(hidden=192, layers=6, heads=6, intermediate=528),
        base=TrainSpec(steps=1500, lr=2e-3, batch_size=64, warmup=100, long_fraction=0.0),
        expert=TrainSpec(steps=200, lr=2e-4, batch_size=64),
    ),
    # a few seconds: for tests of the build machinery itself (determinism, layout), not quality
    "test": ZooSettings(
        size="test",
        skills=ZOO_SKILLS,
        base_skills=BASE_SKILLS,
        shape=ModelShape(hidden=32, layers=2, heads=2, intermediate=64),
        base=TrainSpec(steps=6, lr=3e-3, batch_size=16, warmup=2),
        expert=TrainSpec(steps=3, lr=1e-3, batch_size=16),
    ),
}


@dataclass
class ZooManifest:
    size: str
    root: str  # <out>/<size>, absolute
    skills: list[str]
    settings: dict
    settings_key: str
    models: dict[str, str]  # "base" and each skill -> folder (absolute)
    data_files: list[str] = field(default_factory=list)
    build_seconds: float = 0.0  # wall time of the build that produced the last missing model
    model_seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return Path(self.models["base"])

    def expert(self, skill: str) -> Path:
        try:
            return Path(self.models[skill])
        except KeyError:
            raise KeyError(f"zoo {self.root}: no expert for skill {skill!r}; skills: {self.skills}") from None

    @property
    def experts(self) -> dict[str, Path]:
        return {s: Path(self.models[s]) for s in self.skills}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: Path) -> "ZooManifest":
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read zoo manifest: {e}") from None
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{path}: not a zoo manifest: {e}") from None


def get_settings(size: str) -> ZooSettings:
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown zoo size {size!r}; choose one of {', '.join(SIZES)}") from None


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _model_key(settings: ZooSettings, name: str) -> str:
    return f"{settings.key()}:{name}"


def model_complete(folder: Path, settings: ZooSettings, name: str) -> bool:
    """True if ``folder`` is a finished model of ``name`` built with exactly ``settings``."""
    meta = folder / MODEL_META
    if not (
        meta.is_file()
        and (folder / "model.safetensors").is_file()
        and (folder / "config.json").is_file()
        and (folder / "tokenizer.json").is_file()
    ):
        return False
    try:
        return json.loads(meta.read_text()).get("key") == _model_key(settings, name)
    except (OSError, json.JSONDecodeError):
        return False


def _save_model(model, folder: Path, meta: dict) -> Path:
    """Write model + tokenizer into a temporary folder beside ``folder``, then rename it into place."""
    from ..core.checkpoint import atomic_replace_dir, clean_stale_temporaries
    from .tokenizer import save_tokenizer

    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.generation_config.do_sample = False
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tmp)
        (tmp / MODEL_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        atomic_replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _stable(log: dict) -> dict:
    """The training log without wall times, so model folders are byte-identical across rebuilds."""
    return {k: v for k, v in log.items() if k != "seconds"}


def _load(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype="float32")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _train_models(st: ZooSettings, folders: dict[str, Path], force: bool, progress: bool) -> dict[str, float]:
    """Train the base (on the pretraining skills) and each expert (from the base, on its skill) that is
    not complete yet (all with ``force``); returns the seconds each took."""
    seconds: dict[str, float] = {}
    with deterministic(st.threads):
        if force or not model_complete(folders["base"], st, "base"):
            t = time.perf_counter()
            model = new_model(st.shape, st.seed)
            n_params = sum(p.numel() for p in model.parameters())
            short = " (short inputs only)" if st.base.long_fraction == 0 else ""
            _log(
                progress,
                f"  base: {n_params / 1e6:.2f}M parameters, {st.base.steps} steps on "
                f"{', '.join(st.pretrain_skills)}{short}",
            )
            log = train(model, st.pretrain_skills, st.base, seed=st.seed + 1, label="base", progress=progress)
            _save_model(
                model,
                folders["base"],
                {
                    "key": _model_key(st, "base"),
                    "name": "base",
                    "skills": list(st.pretrain_skills),
                    "seed": st.seed,
                    "train": _stable(log),
                },
            )
            seconds["base"] = round(time.perf_counter() - t, 2)
        for skill in st.skills:
            if not force and model_complete(folders[skill], st, skill):
                continue
            t = time.perf_counter()
            model = _load(folders["base"])
            log = train(
                model, (skill,), st.expert, seed=st.expert_seed(skill), label=f"expert {skill}", progress=progress
            )
            _save_model(
                model,
                folders[skill],
                {
                    "key": _model_key(st, skill),
                    "name": skill,
                    "skills": [skill],
                    "seed": st.expert_seed(skill),
                    "train": _stable(log),
                },
            )
            seconds[skill] = round(time.perf_counter() - t, 2)
    return seconds


def build_zoo(
    size: str = "ci",
    out: Path = Path("data/models"),
    progress: bool = True,
    force: bool = False,
    *,
    data_dir: Optional[Path] = Path("data"),
    settings: Optional[ZooSettings] = None,
    overwrite_data: bool = True,
) -> ZooManifest:
    """Build (or reuse) the zoo of ``size`` under ``<out>/<size>``; returns its manifest.

    Models already complete with the same settings are reused (``force`` rebuilds them all).
    ``data_dir`` receives ``eval/``, ``calibration/`` and ``tasks/`` (regenerated identically;
    None skips them); ``overwrite_data=False`` writes only the files that are missing, so a user's
    edits survive (what `merge-dag demo` does; `merge-dag zoo` rewrites them). ``settings`` overrides the
    preset of ``size`` (tests use small ones).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the training lines
    st = settings if settings is not None else get_settings(size)
    for s in st.pretrain_skills + st.skills:
        get_skill(s)
    root = (Path(out) / st.size).absolute()
    t0 = time.perf_counter()

    files: list[str] = []
    if data_dir is not None:
        from .lmeval import write_task_files

        files = [str(p) for p in write_data_files(Path(data_dir), st.skills, st.data_seed, overwrite_data)]
        files += [str(p) for p in write_task_files(Path(data_dir) / "tasks", st.skills, overwrite_data)]

    names = ["base", *st.skills]
    folders = {n: root / n for n in names}
    manifest_path = root / MANIFEST
    if not force and manifest_path.is_file() and all(model_complete(folders[n], st, n) for n in names):
        try:
            man = ZooManifest.load(manifest_path)
            if man.settings_key == st.key():
                man.data_files = files
                _log(progress, f"zoo {st.size}: complete at {root} (settings {st.key()}), nothing to build")
                return man
        except ValueError:
            pass

    _log(
        progress,
        f"zoo {st.size}: building into {root} (settings {st.key()}; {st.shape}; skills {', '.join(st.skills)})",
    )
    seconds = _train_models(st, folders, force, progress)

    man = ZooManifest(
        size=st.size,
        root=str(root),
        skills=list(st.skills),
        settings=st.to_dict(),
        settings_key=st.key(),
        models={n: str(folders[n]) for n in names},
        data_files=files,
        build_seconds=round(time.perf_counter() - t0, 2),
        model_seconds=seconds,
        versions=_versions(),
    )
    tmp = manifest_path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(man.to_dict(), indent=2) + "\n")
    os.replace(tmp, manifest_path)
    _log(progress, f"zoo {st.size}: built in {man.build_seconds:.0f}s -> {root}")
    return man
