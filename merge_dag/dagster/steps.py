"""What every merge_dag asset does around its real work: content-addressed caching and lineage.

    key      = sha256(kind, code version, settings, inputs' versions)
    artifact = <artifacts>/<kind>/<name>-<key[:16]>/
If the artifact exists, the step records a cache hit and returns it with the same data version;
otherwise it builds it (atomically) and records a materialization. Either way the artifact, its
input edges (role + fingerprint) and the event go to the DuckDB lineage store in one transaction.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import dagster as dg

from ..artifacts import Artifact, artifact_id, artifact_key, read_json
from ..lineage.batch import Batch
from .resources import MergeDagResource

META_FILE = "_artifact.json"


@dataclass
class Input:
    role: str  # base, expert, recipe, model, tasks, ...
    artifact_id: str  # the parent's id in lineage
    version: str  # fingerprint (sources) or key (artifacts)

    @classmethod
    def source(cls, role: str, kind: str, fingerprint: str) -> "Input":
        """An observed source (model, recipe, tasks, calibration) by its content fingerprint."""
        return cls(role, source_id(kind, fingerprint), fingerprint)

    @classmethod
    def model(cls, role: str, model) -> "Input":
        """A checkpoint folder (a path or a project ModelSource), by its content fingerprint (cached
        per shard: a stat when unchanged). A LoRA expert is its `lora` node (record_model records it
        with its base and adapter as parents), by the fingerprint covering both."""
        from ..core.fingerprint import checkpoint_fingerprint

        if getattr(model, "is_adapter", False):
            return cls.source(role, "lora", model.fingerprint())
        return cls.source(role, "model", checkpoint_fingerprint(getattr(model, "path", model)))

    @classmethod
    def artifact(cls, role: str, up: dict[str, Any]) -> "Input":
        """An upstream artifact, as `upstream()` / `latest()` return it."""
        return cls(role, up["artifact_id"], up["key"])


def source_id(kind: str, fingerprint: str) -> str:
    return artifact_id(kind, fingerprint.removeprefix("sha256:"))


def record_source(
    res: MergeDagResource,
    *,
    kind: str,
    name: str,
    fingerprint: str,
    path: Path,
    run_id: Optional[str],
    nbytes: Optional[int] = None,
) -> str:
    sid = source_id(kind, fingerprint)
    res.lineage().write(
        Batch()
        .artifact(
            artifact_id=sid,
            kind=kind,
            name=name,
            key_hash=fingerprint,
            path=str(path),
            bytes=nbytes,
            code_version="-",
            params={},
            run_id=run_id,
            data_version=fingerprint,
        )
        .event(artifact_id=sid, run_id=run_id, step=f"{kind}/{name}", event="observed")
    )
    return sid


def record_model(res: MergeDagResource, m, run_id: Optional[str]) -> str:
    """Record a project model (ModelSource) in lineage and return its fingerprint. A LoRA expert is
    three rows: its base (a model source), its adapter folder (an adapter source: config + weights)
    and the adapted model (kind lora, the fingerprint of both) with edges base -> lora, adapter -> lora,
    so `merge-dag audit` shows the base and the adapter under every expert that is one."""
    if not m.is_adapter:
        fp = m.fingerprint()
        record_source(
            res, kind="model", name=m.name, fingerprint=fp, path=m.path, run_id=run_id, nbytes=m.weight_bytes()
        )
        return fp
    from ..core.fingerprint import adapter_fingerprint, checkpoint_fingerprint

    ck = m.open()
    fp, bfp, afp = m.fingerprint(), checkpoint_fingerprint(ck.base), adapter_fingerprint(ck)
    cfg = {
        k: ck.adapter_config.get(k)
        for k in (
            "r",
            "lora_alpha",
            "use_rslora",
            "fan_in_fan_out",
            "target_modules",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
        )
        if ck.adapter_config.get(k) not in (None, {}, [])
    }
    bid, aid, lid = source_id("model", bfp), source_id("adapter", afp), source_id("lora", fp)
    base_name = m.base_name or m.base.name
    res.lineage().write(
        Batch()
        .artifact(
            artifact_id=bid,
            kind="model",
            name=base_name,
            key_hash=bfp,
            path=str(m.base),
            bytes=sum(f.stat().st_size for f in m.base.glob("*.safetensors")),
            code_version="-",
            params={},
            run_id=run_id,
            data_version=bfp,
        )
        .artifact(
            artifact_id=aid,
            kind="adapter",
            name=m.name,
            key_hash=afp,
            path=str(m.path),
            bytes=m.weight_bytes(),
            code_version="-",
            params=cfg,
            run_id=run_id,
            data_version=afp,
        )
        .artifact(
            artifact_id=lid,
            kind="lora",
            name=m.name,
            key_hash=fp,
            path=str(m.path),
            bytes=m.weight_bytes(),
            code_version="-",
            params={"lora": cfg},
            run_id=run_id,
            data_version=fp,
        )
        .edge(parent_id=bid, child_id=lid, role="base", fingerprint=bfp)
        .edge(parent_id=aid, child_id=lid, role="adapter", fingerprint=afp)
        .event(artifact_id=lid, run_id=run_id, step=f"model/{m.name}", event="observed")
    )
    return fp


def shown_path(res: MergeDagResource, path: str | Path) -> str:
    """A path as metadata shows it: relative to the project root when inside it (the UI shows no
    absolute paths of the machine that built it); absolute otherwise."""
    p = Path(path)
    try:
        return str(p.relative_to(res.root_path.absolute()))
    except ValueError:
        return str(p)


def resolve_path(root: str | Path, shown: str) -> str:
    """The absolute path of a `shown_path` (relative to the project root, or already absolute)."""
    return str(Path(root) / shown)


def latest(context, key: list[str]) -> dict[str, Any] | None:
    """The artifact an asset last materialized (its id, key and absolute path from its metadata), or
    None if it never was (e.g. the asset of a new glob match, known to this freshly imported step but
    never built)."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(key))
    if event is None or event.asset_materialization is None:
        return None
    md = event.asset_materialization.metadata
    out = {k: md[k].value for k in ("artifact_id", "key", "path") if k in md}
    if "path" in out:
        out["path"] = resolve_path(context.resources.merge_dag.root, out["path"])
    return out


def upstream(context: dg.AssetExecutionContext, key: list[str]) -> dict[str, Any]:
    """latest(), required: a clear failure if the upstream asset has never been materialized."""
    up = latest(context, key)
    if up is None:
        raise dg.Failure(f"{dg.AssetKey(key).to_user_string()} has never been materialized; materialize it first")
    return up


@dataclass
class Outcome:
    artifact: Artifact
    key: str
    event: str  # materialized | cache_hit
    info: dict[str, Any]
    seconds: float


def step_key(kind: str, code_version: str, settings: dict[str, Any], inputs: list[Input]) -> str:
    """The cache key of a step's artifact (what cached_step looks up and builds under)."""
    return artifact_key(kind, code_version, settings, {f"{i.role}:{n}": i.version for n, i in enumerate(inputs)})


def cached_step(
    context: dg.AssetExecutionContext,
    res: MergeDagResource,
    *,
    kind: str,
    name: str,
    code_version: str,
    settings: dict[str, Any],
    inputs: list[Input],
    build: Callable[[Path, Artifact], dict[str, Any]],
) -> Outcome:
    """Build (or find) one content-addressed artifact and record it in lineage; no Dagster event."""
    key = step_key(kind, code_version, settings, inputs)
    art = res.store().artifact(kind, name, key)
    t0 = time.perf_counter()
    if art.exists:
        info = read_json(art.path / META_FILE) or {}
        event = "cache_hit"
        context.log.info(f"{kind}/{name}: cache hit {art.id} ({art.path})")
    else:

        def builder(tmp: Path) -> dict[str, Any]:
            out = build(tmp, art)
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / META_FILE).write_text(json.dumps(out, indent=2, default=str) + "\n")
            return out

        info = res.store().build(art, builder)
        event = "materialized"
        context.log.info(f"{kind}/{name}: built {art.id} in {time.perf_counter() - t0:.1f} s")
    seconds = time.perf_counter() - t0
    run_id = context.run.run_id
    batch = (
        Batch()
        .artifact(
            artifact_id=art.id,
            kind=kind,
            name=name,
            key_hash=key,
            path=str(art.path),
            bytes=art.size_bytes(),
            code_version=code_version,
            params=settings,
            run_id=run_id,
            data_version=key,
        )
        .event(artifact_id=art.id, run_id=run_id, step=f"{kind}/{name}", event=event, seconds=seconds)
        .run(run_id=run_id, started_at=None, status="running", job=context.job_name)
    )
    for i in inputs:
        batch.edge(parent_id=i.artifact_id, child_id=art.id, role=i.role, fingerprint=i.version)
    for task, metric, value, stderr, n in info.get("metrics", []):
        batch.metric(
            artifact_id=art.id, task=task, metric=metric, value=value, stderr=stderr, n=n, model=info.get("model")
        )
    res.lineage().write(batch)
    return Outcome(art, key, event, info, seconds)


def short(version: str, n: int = 12) -> str:
    """A fingerprint or key, shortened for display: sha256:0123456789abcdef... -> sha256:0123456789ab."""
    prefix, _, rest = version.rpartition(":")
    return f"{prefix}:{rest[:n]}" if prefix else version[:n]


def inputs_table(res: MergeDagResource, inputs: list[Input]) -> dg.TableMetadataValue:
    """Every input of a step (a role may have many: a merge's experts, a leaderboard's evals) as a table:
    role, name (kind/name from lineage), short fingerprint or key."""
    ids = [i.artifact_id for i in inputs]
    rows = (
        res.lineage().query("SELECT artifact_id, kind, name FROM artifacts WHERE list_contains(?, artifact_id)", [ids])
        if ids
        else []
    )
    names = {r["artifact_id"]: f"{r['kind']}/{r['name']}" for r in rows}
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("role", "string"),
            dg.TableColumn("name", "string"),
            dg.TableColumn("fingerprint", "string"),
        ]
    )
    return dg.MetadataValue.table(
        [
            dg.TableRecord(
                {"role": i.role, "name": names.get(i.artifact_id, i.artifact_id), "fingerprint": short(i.version)}
            )
            for i in inputs
        ],
        schema=schema,
    )


def run_step(
    context: dg.AssetExecutionContext,
    res: MergeDagResource,
    *,
    kind: str,
    name: str,
    code_version: str,
    settings: dict[str, Any],
    inputs: list[Input],
    build: Callable[[Path, Artifact], dict[str, Any]],
    metadata: Callable[[Artifact, dict[str, Any]], dict[str, Any]] | None = None,
) -> dg.MaterializeResult:
    """cached_step, reported to Dagster: data version = the key, metadata for the UI."""
    out = cached_step(
        context, res, kind=kind, name=name, code_version=code_version, settings=settings, inputs=inputs, build=build
    )
    art, key, event, info, seconds = out.artifact, out.key, out.event, out.info, out.seconds
    md: dict[str, Any] = {
        "artifact_id": art.id,
        "key": key,
        "path": dg.MetadataValue.path(shown_path(res, art.path)),
        "cache": "hit" if event == "cache_hit" else "miss",
        "seconds": round(seconds, 3),
        "bytes": art.size_bytes(),
        # the step process's peak resident memory (with the multiprocess executor: this step's own)
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "code_version": code_version,
        "inputs": inputs_table(res, inputs),
    }
    if metadata is not None:  # the asset's own story first (tables, pictures), then the bookkeeping
        own = metadata(art, info)
        md = {**own, **{k: v for k, v in md.items() if k not in own}}
    return dg.MaterializeResult(data_version=dg.DataVersion(key), metadata=md)
