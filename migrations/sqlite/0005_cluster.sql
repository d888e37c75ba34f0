-- Several captains on one database: leadership, build claims, captains,
-- join tokens, cluster secrets, node roles and drain.

-- The leader's lease: held by one captain, renewed before it expires;
-- `epoch` grows at every change of holder and fences the writes of a
-- leader that lost it.
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL      -- unix ms, the database's clock
);
INSERT INTO leases (name, holder, epoch, expires_at) VALUES ('leader', '', 0, 0);

-- Captains seen (each renews its row): the API behind api.<domain>.
CREATE TABLE captains (
    id          TEXT PRIMARY KEY,
    api_url     TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL
);

-- A build is claimed by one captain until claimed_until, renewed while it
-- runs; a claim that lapsed (its captain died) is taken over.
ALTER TABLE builds ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
ALTER TABLE builds ADD COLUMN claimed_until INTEGER NOT NULL DEFAULT 0;

-- Single-use, expiring tokens a host joins the cluster with.
CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,   -- hex sha256 of the secret
    role        TEXT NOT NULL,          -- worker | edge
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     TEXT NOT NULL DEFAULT ''
);

-- Secrets every captain shares (the cluster CA's key, sealed with the
-- cluster key each captain is given; the node link secret).
CREATE TABLE cluster_secrets (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Hosts that joined: their role and certificate; an edge has no node row.
CREATE TABLE members (
    id          TEXT PRIMARY KEY,       -- node id or edge name
    role        TEXT NOT NULL,          -- worker | edge
    token_id    TEXT NOT NULL,          -- its credential
    cert_serial TEXT NOT NULL,
    cert_expires_at INTEGER NOT NULL,
    joined_at   INTEGER NOT NULL,
    removed_at  INTEGER
);

-- A drain an admin asked for: the node's own heartbeats do not undo it.
ALTER TABLE nodes ADD COLUMN drain INTEGER NOT NULL DEFAULT 0;
