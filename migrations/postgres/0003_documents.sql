-- Projects and apps are documents of the meta repository
-- (projects/<id>.pb, envs/<env>/apps/<app>/app.pb); these rows mirror them.
-- A project id is no longer derived from its source, so two projects (of two
-- tenants) may build the same repository and branch.
ALTER TABLE projects DROP CONSTRAINT IF EXISTS projects_repo_branch_key;
ALTER TABLE projects ADD COLUMN dockerfile TEXT NOT NULL DEFAULT '';
ALTER TABLE projects ADD COLUMN build_args TEXT NOT NULL DEFAULT '{}';
CREATE INDEX projects_source ON projects (repo, branch);

ALTER TABLE apps ADD COLUMN domains TEXT NOT NULL DEFAULT '[]';
