-- Export jobs: long exports of a run or a workflow execution (events with their hashes and the
-- proof up to a signed checkpoint) built in the background. A job's row holds its request, its
-- progress (events written of the total) and its outcome; the file itself is kept in parts of
-- whole NDJSON lines, downloaded one part per request. A job left unfinished by a stopped
-- process is taken over and built again from the start (attempts counts the runs); after
-- MAX_ATTEMPTS it fails, naming why, instead of being lost.

CREATE SCHEMA IF NOT EXISTS audit_replay;

CREATE TABLE audit_replay.export_jobs (
    job_id        text        PRIMARY KEY,
    tenant_id     text        NOT NULL,
    subject_type  text        NOT NULL CHECK (subject_type IN ('run', 'execution')),
    subject_id    text        NOT NULL,
    requested_by  text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    done          bigint      NOT NULL DEFAULT 0,
    total         bigint      NOT NULL DEFAULT 0,
    bytes         bigint      NOT NULL DEFAULT 0,
    parts         integer     NOT NULL DEFAULT 0,
    attempts      integer     NOT NULL DEFAULT 0,
    checkpoint_seq bigint,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX export_jobs_unfinished ON audit_replay.export_jobs (heartbeat_at)
    WHERE status IN ('queued', 'running');
CREATE INDEX export_jobs_by_tenant ON audit_replay.export_jobs (tenant_id, created_at DESC);

CREATE TABLE audit_replay.export_parts (
    job_id  text    NOT NULL REFERENCES audit_replay.export_jobs (job_id) ON DELETE CASCADE,
    seq     integer NOT NULL,
    data    bytea   NOT NULL,
    PRIMARY KEY (job_id, seq)
);

SELECT eventstore.hand_over_schema('audit_replay', 'mc_audit_replay');
