-- Captain mirror database (Postgres). Same tables and column names as
-- migrations/sqlite: times are unix milliseconds (BIGINT), ids TEXT, flags
-- BIGINT 0/1, so one set of queries runs on both through sqlx's Any driver.

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,          -- admin | user | node
    name        TEXT NOT NULL,
    hash        TEXT NOT NULL UNIQUE,   -- hex sha256 of the secret token
    node_id     TEXT,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE projects (
    id          TEXT PRIMARY KEY,       -- derived from (repo, branch)
    name        TEXT NOT NULL,
    repo        TEXT NOT NULL,
    branch      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (repo, branch)
);

CREATE TABLE apps (
    id          TEXT PRIMARY KEY,       -- <name>.<env>
    project_id  TEXT NOT NULL,
    env         TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (env, name)
);
CREATE INDEX apps_project ON apps (project_id);

-- One row per Release file of the meta repo (id = release id).
CREATE TABLE deployments (
    id             TEXT PRIMARY KEY,
    app_id         TEXT NOT NULL,
    project_id     TEXT NOT NULL,
    env            TEXT NOT NULL,
    app            TEXT NOT NULL,
    image_digest   TEXT NOT NULL,
    source_commit  TEXT NOT NULL,
    min_instances  BIGINT NOT NULL,
    status         TEXT NOT NULL,
    reason         TEXT NOT NULL,
    present        BIGINT NOT NULL,     -- 1 while the release file is at the head
    commit_id      TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE INDEX deployments_app ON deployments (app_id, id);

CREATE TABLE nodes (
    id                 TEXT PRIMARY KEY,
    address            TEXT NOT NULL,
    region             TEXT NOT NULL,
    cpus               BIGINT NOT NULL,
    memory_bytes       BIGINT NOT NULL,
    disk_bytes         BIGINT NOT NULL,
    age_recipient      TEXT NOT NULL,
    api_url            TEXT NOT NULL,
    proxy_addr         TEXT NOT NULL,
    state              TEXT NOT NULL,
    memory_used_bytes  BIGINT NOT NULL,
    instances          BIGINT NOT NULL,
    last_seen          BIGINT NOT NULL,
    registered_at      BIGINT NOT NULL,
    -- What the node's follower last reported about the meta repo.
    applied_commit     TEXT NOT NULL DEFAULT '',
    refused_commit     TEXT NOT NULL DEFAULT '',
    refused_reason     TEXT NOT NULL DEFAULT ''
);

CREATE TABLE instances (
    id          TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL,
    env         TEXT NOT NULL,
    app         TEXT NOT NULL,
    rollout_id  TEXT NOT NULL,
    release_id  TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    address     TEXT NOT NULL,
    port        BIGINT NOT NULL,
    attempts    BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX instances_release ON instances (release_id, state);

CREATE TABLE images (
    id             TEXT PRIMARY KEY,
    digest         TEXT NOT NULL UNIQUE,
    size_bytes     BIGINT NOT NULL,
    source_commit  TEXT NOT NULL,
    created_at     BIGINT NOT NULL
);

CREATE TABLE waitlist (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

-- Every meta repo commit the mirror has seen, by commit id.
CREATE TABLE meta_commits (
    id          TEXT PRIMARY KEY,
    message     TEXT NOT NULL,
    author      TEXT NOT NULL,
    time        BIGINT NOT NULL,
    indexed_at  BIGINT NOT NULL
);
