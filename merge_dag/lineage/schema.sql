-- merge_dag lineage: every table of the lineage database lives in this one file.
-- Run whole on first use by every process (merge_dag/lineage/store.py); each statement is idempotent.
-- Timestamps are naive UTC (TIMESTAMP, not TIMESTAMPTZ: no ICU extension needed).
-- No foreign keys (an edge may name a parent recorded later) and no secondary indexes: DuckDB
-- scans these small tables faster than it maintains ART indexes, and PK upserts stay simple.

CREATE TABLE IF NOT EXISTS meta (
    key             VARCHAR PRIMARY KEY,
    value           VARCHAR
);
INSERT INTO meta VALUES ('schema_version', '1') ON CONFLICT (key) DO NOTHING;

-- One row per content-addressed artifact: sources (model, recipe, tasks, calibration) and products
-- (task_vector, merged, eval, leaderboard, ...). artifact_id = <kind>-<key_hash[:16]> for products,
-- <kind>-<fingerprint hex[:16]> for sources. Upserted: created_at and run_id are the first sighting,
-- last_seen_at the latest (a cache hit or a repeat observation refreshes it).
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id     VARCHAR PRIMARY KEY,
    kind            VARCHAR NOT NULL,
    name            VARCHAR NOT NULL,
    key_hash        VARCHAR NOT NULL,      -- content key (products) or content fingerprint (sources)
    path            VARCHAR,               -- absolute folder/file on disk, when there is one
    bytes           BIGINT,
    data_version    VARCHAR,               -- Dagster data version of the asset that produced it
    created_at      TIMESTAMP NOT NULL,
    last_seen_at    TIMESTAMP NOT NULL,
    run_id          VARCHAR,               -- the run that first recorded it
    code_version    VARCHAR,
    params_json     VARCHAR                -- settings that went into the key, JSON
);

-- parent --role--> child. fingerprint: the parent's version the child was built from (a source's
-- content fingerprint, an artifact's key). seq keeps insertion order (the recipe's expert order).
CREATE SEQUENCE IF NOT EXISTS edge_seq;
CREATE TABLE IF NOT EXISTS edges (
    parent_id       VARCHAR NOT NULL,
    child_id        VARCHAR NOT NULL,
    role            VARCHAR NOT NULL,      -- base, expert, recipe, model, tasks, calibration, allocation, ...
    fingerprint     VARCHAR,
    seq             BIGINT NOT NULL DEFAULT nextval('edge_seq'),
    created_at      TIMESTAMP NOT NULL,
    PRIMARY KEY (parent_id, child_id, role)
);

-- One row per occurrence: every materialization, every cache hit, every observation of a source.
CREATE SEQUENCE IF NOT EXISTS event_seq;
CREATE TABLE IF NOT EXISTS events (
    id              BIGINT PRIMARY KEY DEFAULT nextval('event_seq'),
    artifact_id     VARCHAR NOT NULL,
    run_id          VARCHAR,
    step            VARCHAR NOT NULL,      -- e.g. merged/ties
    event           VARCHAR NOT NULL,      -- materialized | cache_hit | observed
    seconds         DOUBLE,
    recorded_at     TIMESTAMP NOT NULL     -- (`at` is a keyword in DuckDB 2.0)
);

-- Metrics of an artifact (an eval artifact's results; model = the label of the evaluated model).
-- Upserted per (artifact, task, metric): an artifact is immutable, so a repeat is the same number.
CREATE TABLE IF NOT EXISTS metrics (
    artifact_id     VARCHAR NOT NULL,
    model           VARCHAR,
    task            VARCHAR NOT NULL,
    metric          VARCHAR NOT NULL,
    value           DOUBLE NOT NULL,
    stderr          DOUBLE,
    n               BIGINT,
    created_at      TIMESTAMP NOT NULL,
    PRIMARY KEY (artifact_id, task, metric)
);

CREATE TABLE IF NOT EXISTS runs (
    run_id          VARCHAR PRIMARY KEY,
    job             VARCHAR,
    started_at      TIMESTAMP,
    finished_at     TIMESTAMP,
    status          VARCHAR NOT NULL,
    updated_at      TIMESTAMP NOT NULL
);

-- Spooled lineage files (lineage/spool.py) already written into this database: one row per file,
-- inserted in the same transaction as the file's records, so a file is ingested exactly once.
CREATE TABLE IF NOT EXISTS spool_ingested (
    spool_id        VARCHAR PRIMARY KEY,
    file            VARCHAR NOT NULL,
    ingested_at     TIMESTAMP NOT NULL
);

-- Every run that recorded anything, with its cache hits and recomputations (from events; a run seen
-- only in events, never in runs, still appears).
CREATE OR REPLACE VIEW run_stats AS
WITH ev AS (
    SELECT run_id,
           count(*) FILTER (WHERE event = 'materialized') AS recomputed,
           count(*) FILTER (WHERE event = 'cache_hit')    AS cache_hits,
           count(*) FILTER (WHERE event = 'observed')     AS observed,
           coalesce(sum(seconds) FILTER (WHERE event = 'materialized'), 0) AS compute_seconds,
           min(recorded_at) AS first_event_at,
           max(recorded_at) AS last_event_at
    FROM events
    WHERE run_id IS NOT NULL
    GROUP BY run_id
)
SELECT coalesce(r.run_id, ev.run_id)               AS run_id,
       r.job                                       AS job,
       coalesce(r.started_at, ev.first_event_at)   AS started_at,
       r.finished_at                               AS finished_at,
       coalesce(r.status, 'unknown')               AS status,
       coalesce(ev.recomputed, 0)                  AS recomputed,
       coalesce(ev.cache_hits, 0)                  AS cache_hits,
       coalesce(ev.observed, 0)                    AS observed,
       coalesce(ev.compute_seconds, 0)             AS compute_seconds,
       ev.last_event_at                            AS last_event_at
FROM runs r
FULL OUTER JOIN ev ON ev.run_id = r.run_id;
