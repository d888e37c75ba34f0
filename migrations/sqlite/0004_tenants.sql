-- Tenants: users, their tokens, the projects they are members of, and the
-- images their projects built. Identity stays in the database; what users
-- declare (projects, apps) is in the meta repository.
CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    login       TEXT NOT NULL,              -- GitHub login, or a local name
    github_id   TEXT NOT NULL DEFAULT '',   -- GitHub's numeric user id
    created_at  INTEGER NOT NULL
);
CREATE UNIQUE INDEX users_github ON users (github_id) WHERE github_id <> '';

-- A user token belongs to a user; each user token made before tenants
-- becomes a user of its own.
ALTER TABLE tokens ADD COLUMN user_id TEXT;
INSERT INTO users (id, login, github_id, created_at)
    SELECT 'usr-' || lower(id), name, '', created_at FROM tokens WHERE kind = 'user';
UPDATE tokens SET user_id = 'usr-' || lower(id) WHERE kind = 'user';

CREATE TABLE project_members (
    project_id  TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    role        TEXT NOT NULL,              -- owner | member
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX project_members_user ON project_members (user_id);

-- The projects whose builds made an image (images are content-addressed:
-- two projects may build the same one).
CREATE TABLE image_projects (
    digest      TEXT NOT NULL,
    project_id  TEXT NOT NULL,
    PRIMARY KEY (digest, project_id)
);

-- GitHub sign-in puts whoever is not allowed in on the waitlist, until an
-- admin admits them.
ALTER TABLE waitlist ADD COLUMN github_login TEXT NOT NULL DEFAULT '';
ALTER TABLE waitlist ADD COLUMN github_id TEXT NOT NULL DEFAULT '';
ALTER TABLE waitlist ADD COLUMN admitted_at INTEGER;
