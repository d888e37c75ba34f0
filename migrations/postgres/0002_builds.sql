-- The build queue (issue 4): one row per requested build, claimed by a
-- captain build worker. Status: queued -> building -> succeeded | failed;
-- an infrastructure fault puts a build back to queued with a later
-- next_attempt_at, and a build found 'building' at start (the process died)
-- is queued again. Same columns as migrations/sqlite.

CREATE TABLE builds (
    id               TEXT PRIMARY KEY,
    app_id           TEXT NOT NULL,
    source_kind      TEXT NOT NULL,       -- git | upload
    source_url       TEXT NOT NULL,       -- git URL, or the object store key of the upload
    source_branch    TEXT NOT NULL,
    source_commit    TEXT NOT NULL,
    dockerfile       TEXT NOT NULL,
    build_args       TEXT NOT NULL,       -- JSON object
    deploy_spec      TEXT NOT NULL,       -- JSON object, '' = build only
    status           TEXT NOT NULL,
    attempts         BIGINT NOT NULL,
    next_attempt_at  BIGINT NOT NULL,
    error            TEXT NOT NULL,
    image_digest     TEXT NOT NULL,
    deployment_id    TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX builds_queue ON builds (status, next_attempt_at);
CREATE INDEX builds_app ON builds (app_id, id);

-- Build log lines, numbered per build from 1.
CREATE TABLE build_logs (
    build_id  TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    t         BIGINT NOT NULL,              -- unix nanoseconds
    stream    TEXT NOT NULL,            -- stdout | stderr | builder
    line      TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);
