-- Projects and apps are documents of the meta repository
-- (projects/<id>.pb, envs/<env>/apps/<app>/app.pb); these rows mirror them.
-- A project id is no longer derived from its source, so two projects (of two
-- tenants) may build the same repository and branch: SQLite cannot drop a
-- table constraint, so the table is made again.
CREATE TABLE projects_new (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    repo        TEXT NOT NULL,
    branch      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    dockerfile  TEXT NOT NULL DEFAULT '',
    build_args  TEXT NOT NULL DEFAULT '{}'   -- JSON object
);
INSERT INTO projects_new (id, name, repo, branch, created_at)
    SELECT id, name, repo, branch, created_at FROM projects;
DROP TABLE projects;
ALTER TABLE projects_new RENAME TO projects;
CREATE INDEX projects_source ON projects (repo, branch);

ALTER TABLE apps ADD COLUMN domains TEXT NOT NULL DEFAULT '[]';   -- JSON array
