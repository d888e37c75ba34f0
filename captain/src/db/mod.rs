//! The captain's mirror database: observed state (tokens, nodes, instances,
//! images, waitlist) and an index of the meta repository (projects, apps,
//! releases-as-deployments, commits).
//!
//! Why one `sqlx::Any` pool and one set of queries rather than one pool type
//! per backend behind a trait:
//! 1. Every query is written once with `$N` placeholders and `RETURNING`,
//!    which both SQLite and Postgres accept, so the two backends cannot drift.
//! 2. `Any` has no timestamp, uuid, json or SQLite-bool types, so the schema
//!    uses only what maps 1:1: times are integer unix milliseconds, ids TEXT,
//!    flags integer 0/1; nothing backend-specific leaks into Rust types.
//! 3. The two migration directories differ only in `INTEGER` vs `BIGINT`.
//! 4. The test suite runs the very same code against both; a trait would let
//!    two implementations disagree silently.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, Row};

pub mod builds;
pub mod cluster;
pub mod tenants;

pub use builds::BuildRow;

/// Which database a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        })
    }
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL {url:?}: expected sqlite:<path> or postgres://...")]
    UnsupportedUrl { url: String },
    #[error("connecting to the {backend} database")]
    Connect {
        backend: Backend,
        #[source]
        source: sqlx::Error,
    },
    #[error("running the {backend} migrations")]
    Migrate {
        backend: Backend,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("database query {op}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl DbError {
    /// Did a UNIQUE or PRIMARY KEY constraint refuse the write?
    pub fn is_unique_violation(&self) -> bool {
        match self {
            DbError::Query {
                source: sqlx::Error::Database(e),
                ..
            } => e.is_unique_violation(),
            _ => false,
        }
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

const PROJECT_COLS: &str = "id, name, repo, branch, created_at, dockerfile, build_args";
const APP_COLS: &str = "id, project_id, env, name, created_at, domains";

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { op, source }
}

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "captain",
        include_str!("../../../migrations/sqlite/0001_captain.sql"),
    ),
    (
        2,
        "builds",
        include_str!("../../../migrations/sqlite/0002_builds.sql"),
    ),
    (
        3,
        "documents",
        include_str!("../../../migrations/sqlite/0003_documents.sql"),
    ),
    (
        4,
        "tenants",
        include_str!("../../../migrations/sqlite/0004_tenants.sql"),
    ),
    (
        5,
        "cluster",
        include_str!("../../../migrations/sqlite/0005_cluster.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "captain",
        include_str!("../../../migrations/postgres/0001_captain.sql"),
    ),
    (
        2,
        "builds",
        include_str!("../../../migrations/postgres/0002_builds.sql"),
    ),
    (
        3,
        "documents",
        include_str!("../../../migrations/postgres/0003_documents.sql"),
    ),
    (
        4,
        "tenants",
        include_str!("../../../migrations/postgres/0004_tenants.sql"),
    ),
    (
        5,
        "cluster",
        include_str!("../../../migrations/postgres/0005_cluster.sql"),
    ),
];

/// The migrations of `backend`, embedded from `migrations/<backend>/`.
pub fn migrator(backend: Backend) -> Migrator {
    let list = match backend {
        Backend::Sqlite => SQLITE_MIGRATIONS,
        Backend::Postgres => POSTGRES_MIGRATIONS,
    };
    Migrator::with_migrations(
        list.iter()
            .map(|(v, d, sql)| {
                Migration::new(
                    *v,
                    Cow::Borrowed(*d),
                    MigrationType::Simple,
                    sqlx::SqlSafeStr::into_sql_str(*sql),
                    false,
                )
            })
            .collect(),
    )
}

/// The mirror database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

// ---------------------------------------------------------------- rows

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub node_id: Option<String>,
    /// For user tokens: the user.
    pub user_id: Option<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRow {
    pub id: String,
    pub name: String,
    pub repo: String,
    pub branch: String,
    pub created_at: i64,
    /// Dockerfile path in the source; empty = `Dockerfile`.
    pub dockerfile: String,
    /// JSON object of build arguments.
    pub build_args: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRow {
    pub id: String,
    pub project_id: String,
    pub env: String,
    pub name: String,
    pub created_at: i64,
    /// JSON array of custom domains.
    pub domains: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRow {
    pub id: String,
    pub app_id: String,
    pub project_id: String,
    pub env: String,
    pub app: String,
    pub image_digest: String,
    pub source_commit: String,
    pub min_instances: i64,
    pub status: String,
    pub reason: String,
    pub present: bool,
    pub commit_id: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub address: String,
    pub region: String,
    pub cpus: i64,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
    pub age_recipient: String,
    pub api_url: String,
    pub proxy_addr: String,
    pub state: String,
    pub memory_used_bytes: i64,
    pub instances: i64,
    pub last_seen: i64,
    pub registered_at: i64,
    pub applied_commit: String,
    pub refused_commit: String,
    pub refused_reason: String,
    /// An admin asked to drain it.
    pub drain: bool,
}

/// A node heartbeat as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub state: String,
    /// (cpus, memory_bytes, disk_bytes, memory_used_bytes, instances)
    pub resources: Option<(i64, i64, i64, i64, i64)>,
    /// (applied commit, refused commit, refused reason)
    pub meta: Option<(String, String, String)>,
    /// (address, api_url, proxy_addr, age_recipient)
    pub endpoints: Option<(String, String, String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub id: String,
    pub node_id: String,
    pub env: String,
    pub app: String,
    pub rollout_id: String,
    pub release_id: String,
    pub state: String,
    pub reason: String,
    pub address: String,
    pub port: i64,
    pub attempts: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub id: String,
    pub digest: String,
    pub size_bytes: i64,
    pub source_commit: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRow {
    pub id: String,
    pub message: String,
    pub author: String,
    pub time: i64,
}

fn s(r: &AnyRow, c: &str) -> std::result::Result<String, sqlx::Error> {
    r.try_get::<String, _>(c)
}
fn i(r: &AnyRow, c: &str) -> std::result::Result<i64, sqlx::Error> {
    r.try_get::<i64, _>(c)
}

impl TokenRow {
    fn from_row(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(TokenRow {
            id: s(r, "id")?,
            kind: s(r, "kind")?,
            name: s(r, "name")?,
            node_id: r.try_get("node_id")?,
            user_id: r.try_get("user_id")?,
            created_at: i(r, "created_at")?,
            revoked_at: r.try_get("revoked_at")?,
        })
    }
}
impl ProjectRow {
    fn from_row(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(ProjectRow {
            id: s(r, "id")?,
            name: s(r, "name")?,
            repo: s(r, "repo")?,
            branch: s(r, "branch")?,
            created_at: i(r, "created_at")?,
            dockerfile: s(r, "dockerfile")?,
            build_args: s(r, "build_args")?,
        })
    }
}
impl AppRow {
    fn from_row(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(AppRow {
            id: s(r, "id")?,
            project_id: s(r, "project_id")?,
            env: s(r, "env")?,
            name: s(r, "name")?,
            created_at: i(r, "created_at")?,
            domains: s(r, "domains")?,
        })
    }
}
impl DeploymentRow {
    fn from_row(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(DeploymentRow {
            id: s(r, "id")?,
            app_id: s(r, "app_id")?,
            project_id: s(r, "project_id")?,
            env: s(r, "env")?,
            app: s(r, "app")?,
            image_digest: s(r, "image_digest")?,
            source_commit: s(r, "source_commit")?,
            min_instances: i(r, "min_instances")?,
            status: s(r, "status")?,
            reason: s(r, "reason")?,
            present: i(r, "present")? != 0,
            commit_id: s(r, "commit_id")?,
            created_at: i(r, "created_at")?,
            updated_at: i(r, "updated_at")?,
        })
    }
}
impl NodeRow {
    fn from_row(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(NodeRow {
            id: s(r, "id")?,
            address: s(r, "address")?,
            region: s(r, "region")?,
            cpus: i(r, "cpus")?,
            memory_bytes: i(r, "memory_bytes")?,
            disk_bytes: i(r, "disk_bytes")?,
            age_recipient: s(r, "age_recipient")?,
            api_url: s(r, "api_url")?,
            proxy_addr: s(r, "proxy_addr")?,
            state: s(r, "state")?,
            memory_used_bytes: i(r, "memory_used_bytes")?,
            instances: i(r, "instances")?,
            last_seen: i(r, "last_seen")?,
            registered_at: i(r, "registered_at")?,
            applied_commit: s(r, "applied_commit")?,
            refused_commit: s(r, "refused_commit")?,
            refused_reason: s(r, "refused_reason")?,
            drain: i(r, "drain")? != 0,
        })
    }
}
impl InstanceRow {
    fn from_row(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(InstanceRow {
            id: s(r, "id")?,
            node_id: s(r, "node_id")?,
            env: s(r, "env")?,
            app: s(r, "app")?,
            rollout_id: s(r, "rollout_id")?,
            release_id: s(r, "release_id")?,
            state: s(r, "state")?,
            reason: s(r, "reason")?,
            address: s(r, "address")?,
            port: i(r, "port")?,
            attempts: i(r, "attempts")?,
            created_at: i(r, "created_at")?,
            updated_at: i(r, "updated_at")?,
        })
    }
}
impl ImageRow {
    fn from_row(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(ImageRow {
            id: s(r, "id")?,
            digest: s(r, "digest")?,
            size_bytes: i(r, "size_bytes")?,
            source_commit: s(r, "source_commit")?,
            created_at: i(r, "created_at")?,
        })
    }
}

macro_rules! rows {
    ($ty:ty, $op:literal, $query:expr, $pool:expr) => {{
        let rows = $query.fetch_all($pool).await.map_err(q($op))?;
        rows.iter()
            .map(<$ty>::from_row)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(q($op))
    }};
}
macro_rules! row {
    ($ty:ty, $op:literal, $query:expr, $pool:expr) => {{
        match $query.fetch_optional($pool).await.map_err(q($op))? {
            Some(r) => Ok(Some(<$ty>::from_row(&r).map_err(q($op))?)),
            None => Ok(None),
        }
    }};
}

const DEPLOYMENT_COLS: &str = "id, app_id, project_id, env, app, image_digest, source_commit, min_instances, status, reason, present, commit_id, created_at, updated_at";

impl Db {
    /// Connect to `url` (sqlite:<path>?mode=rwc or postgres://...) and run
    /// the migrations of its backend.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let backend =
            Backend::of_url(url).ok_or_else(|| DbError::UnsupportedUrl { url: url.into() })?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|source| DbError::Connect { backend, source })?;
        migrator(backend)
            .run(&pool)
            .await
            .map_err(|source| DbError::Migrate { backend, source })?;
        Ok(Db { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await
    }

    // ------------------------------------------------------------ settings

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        let r = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a setting"))?;
        r.map(|r| s(&r, "value"))
            .transpose()
            .map_err(q("reading a setting"))
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(q("writing a setting"))?;
        Ok(())
    }

    // ------------------------------------------------------------ tokens

    pub async fn insert_token(&self, t: &TokenRow, hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, kind, name, hash, node_id, user_id, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)",
        )
        .bind(&t.id)
        .bind(&t.kind)
        .bind(&t.name)
        .bind(hash)
        .bind(t.node_id.clone())
        .bind(t.user_id.clone())
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a token"))?;
        Ok(())
    }

    /// The live (not revoked) token with this hash.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        row!(
            TokenRow,
            "looking up a token",
            sqlx::query(
                "SELECT id, kind, name, node_id, user_id, created_at, revoked_at FROM tokens WHERE hash = $1 AND revoked_at IS NULL"
            )
            .bind(hash),
            &self.pool
        )
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        rows!(
            TokenRow,
            "listing tokens",
            sqlx::query(
                "SELECT id, kind, name, node_id, user_id, created_at, revoked_at FROM tokens ORDER BY id"
            ),
            &self.pool
        )
    }

    pub async fn count_tokens(&self, kind: &str) -> Result<i64> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM tokens WHERE kind = $1")
            .bind(kind)
            .fetch_one(&self.pool)
            .await
            .map_err(q("counting tokens"))?;
        i(&r, "n").map_err(q("counting tokens"))
    }

    /// Revoke a token; false if it does not exist or was already revoked.
    pub async fn revoke_token(&self, id: &str, now: i64) -> Result<bool> {
        let r =
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(q("revoking a token"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn revoke_node_tokens(&self, node_id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE node_id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(node_id)
            .execute(&self.pool)
            .await
            .map_err(q("revoking node tokens"))?;
        Ok(())
    }

    // ------------------------------------------------------------ projects

    /// Insert or update a project as its document says.
    pub async fn upsert_project(&self, p: &ProjectRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO projects (id, name, repo, branch, created_at, dockerfile, build_args) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, repo = excluded.repo, branch = excluded.branch, \
             created_at = excluded.created_at, dockerfile = excluded.dockerfile, build_args = excluded.build_args",
        )
        .bind(&p.id)
        .bind(&p.name)
        .bind(&p.repo)
        .bind(&p.branch)
        .bind(p.created_at)
        .bind(&p.dockerfile)
        .bind(&p.build_args)
        .execute(&self.pool)
        .await
        .map_err(q("writing a project"))?;
        Ok(())
    }

    pub async fn project(&self, id: &str) -> Result<Option<ProjectRow>> {
        row!(
            ProjectRow,
            "reading a project",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {PROJECT_COLS} FROM projects WHERE id = $1"
            )))
            .bind(id),
            &self.pool
        )
    }

    pub async fn projects(&self) -> Result<Vec<ProjectRow>> {
        rows!(
            ProjectRow,
            "listing projects",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {PROJECT_COLS} FROM projects ORDER BY created_at, id"
            ))),
            &self.pool
        )
    }

    pub async fn projects_by_repo(&self, repo: &str, branch: &str) -> Result<Vec<ProjectRow>> {
        rows!(
            ProjectRow,
            "finding projects by repository",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {PROJECT_COLS} FROM projects WHERE repo = $1 AND branch = $2 ORDER BY id"
            )))
            .bind(repo)
            .bind(branch),
            &self.pool
        )
    }

    pub async fn delete_project(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM projects WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("deleting a project"))?;
        Ok(r.rows_affected() > 0)
    }

    // ------------------------------------------------------------ apps

    /// Insert or update an app as the meta repository declares it.
    pub async fn upsert_app(&self, a: &AppRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO apps (id, project_id, env, name, created_at, domains) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET project_id = excluded.project_id, domains = excluded.domains, \
             created_at = excluded.created_at",
        )
        .bind(&a.id)
        .bind(&a.project_id)
        .bind(&a.env)
        .bind(&a.name)
        .bind(a.created_at)
        .bind(&a.domains)
        .execute(&self.pool)
        .await
        .map_err(q("writing an app"))?;
        Ok(())
    }

    pub async fn app(&self, id: &str) -> Result<Option<AppRow>> {
        row!(
            AppRow,
            "reading an app",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {APP_COLS} FROM apps WHERE id = $1"
            )))
            .bind(id),
            &self.pool
        )
    }

    pub async fn apps(&self) -> Result<Vec<AppRow>> {
        rows!(
            AppRow,
            "listing apps",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {APP_COLS} FROM apps ORDER BY env, name"
            ))),
            &self.pool
        )
    }

    pub async fn apps_of_project(&self, project_id: &str) -> Result<Vec<AppRow>> {
        rows!(
            AppRow,
            "listing apps",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {APP_COLS} FROM apps WHERE project_id = $1 ORDER BY env, name"
            )))
            .bind(project_id),
            &self.pool
        )
    }

    /// Delete app `id`; its releases' rows are marked absent.
    pub async fn delete_app(&self, id: &str, now: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(q("deleting an app"))?;
        let r = sqlx::query("DELETE FROM apps WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("deleting an app"))?;
        sqlx::query("UPDATE deployments SET present = 0, updated_at = $1 WHERE app_id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("deleting an app"))?;
        tx.commit().await.map_err(q("deleting an app"))?;
        Ok(r.rows_affected() > 0)
    }

    // ------------------------------------------------------------ deployments

    /// Insert a deployment row; an existing row (same release id) is marked
    /// present again and otherwise kept.
    pub async fn upsert_deployment(&self, d: &DeploymentRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO deployments (id, app_id, project_id, env, app, image_digest, source_commit, min_instances, status, reason, present, commit_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (id) DO UPDATE SET present = excluded.present",
        )
        .bind(&d.id)
        .bind(&d.app_id)
        .bind(&d.project_id)
        .bind(&d.env)
        .bind(&d.app)
        .bind(&d.image_digest)
        .bind(&d.source_commit)
        .bind(d.min_instances)
        .bind(&d.status)
        .bind(&d.reason)
        .bind(i64::from(d.present))
        .bind(&d.commit_id)
        .bind(d.created_at)
        .bind(d.updated_at)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a deployment"))?;
        Ok(())
    }

    pub async fn deployment(&self, id: &str) -> Result<Option<DeploymentRow>> {
        row!(
            DeploymentRow,
            "reading a deployment",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {DEPLOYMENT_COLS} FROM deployments WHERE id = $1"
            )))
            .bind(id),
            &self.pool
        )
    }

    /// Deployments newest first, optionally of one app, ids below `before`.
    pub async fn deployments(
        &self,
        app_id: Option<&str>,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeploymentRow>> {
        rows!(
            DeploymentRow,
            "listing deployments",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {DEPLOYMENT_COLS} FROM deployments \
                 WHERE ($1 = '' OR app_id = $1) AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3"
            )))
            .bind(app_id.unwrap_or(""))
            .bind(before.unwrap_or(""))
            .bind(limit),
            &self.pool
        )
    }

    /// Deployments of the apps of the projects `user` is a member of.
    pub async fn deployments_of_user(
        &self,
        user: &str,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeploymentRow>> {
        rows!(
            DeploymentRow,
            "listing deployments",
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {DEPLOYMENT_COLS} FROM deployments \
                 WHERE app_id IN (SELECT a.id FROM apps a JOIN project_members m ON m.project_id = a.project_id WHERE m.user_id = $1) \
                 AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3"
            )))
            .bind(user)
            .bind(before.unwrap_or(""))
            .bind(limit),
            &self.pool
        )
    }

    /// Ids of every release the index holds as present.
    pub async fn present_deployment_ids(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT id FROM deployments WHERE present = 1")
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing present deployments"))?;
        rows.iter()
            .map(|r| s(r, "id"))
            .collect::<std::result::Result<_, _>>()
            .map_err(q("listing present deployments"))
    }

    pub async fn set_deployment_present(&self, id: &str, present: bool, now: i64) -> Result<()> {
        sqlx::query("UPDATE deployments SET present = $1, updated_at = $2 WHERE id = $3")
            .bind(i64::from(present))
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("marking a deployment"))?;
        Ok(())
    }

    /// Newest release of an app still present at the meta repo head.
    pub async fn active_release(&self, app_id: &str) -> Result<Option<String>> {
        let r =
            sqlx::query("SELECT MAX(id) AS id FROM deployments WHERE app_id = $1 AND present = 1")
                .bind(app_id)
                .fetch_one(&self.pool)
                .await
                .map_err(q("finding the active release"))?;
        r.try_get::<Option<String>, _>("id")
            .map_err(q("finding the active release"))
    }

    /// Compare-and-set the status: Ok(false) when the row's status is no
    /// longer `from` (another writer moved it).
    pub async fn set_deployment_status(
        &self,
        id: &str,
        from: &str,
        to: &str,
        reason: &str,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE deployments SET status = $1, reason = $2, updated_at = $3 WHERE id = $4 AND status = $5",
        )
        .bind(to)
        .bind(reason)
        .bind(now)
        .bind(id)
        .bind(from)
        .execute(&self.pool)
        .await
        .map_err(q("updating a deployment status"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn count_deployments(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM deployments")
            .fetch_one(&self.pool)
            .await
            .map_err(q("counting deployments"))?;
        i(&r, "n").map_err(q("counting deployments"))
    }

    // ------------------------------------------------------------ nodes

    pub async fn insert_node(&self, n: &NodeRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (id, address, region, cpus, memory_bytes, disk_bytes, age_recipient, api_url, proxy_addr, state, memory_used_bytes, instances, last_seen, registered_at, applied_commit, refused_commit, refused_reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, '', '', '')",
        )
        .bind(&n.id)
        .bind(&n.address)
        .bind(&n.region)
        .bind(n.cpus)
        .bind(n.memory_bytes)
        .bind(n.disk_bytes)
        .bind(&n.age_recipient)
        .bind(&n.api_url)
        .bind(&n.proxy_addr)
        .bind(&n.state)
        .bind(n.memory_used_bytes)
        .bind(n.instances)
        .bind(n.last_seen)
        .bind(n.registered_at)
        .execute(&self.pool)
        .await
        .map_err(q("inserting a node"))?;
        Ok(())
    }

    /// Re-registration of a known node (a restarted follower): new
    /// addresses and resources, online again. Ok(false) if unknown.
    pub async fn reregister_node(&self, n: &NodeRow) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE nodes SET address = $1, region = $2, cpus = $3, memory_bytes = $4, disk_bytes = $5, age_recipient = $6, api_url = $7, proxy_addr = $8, state = $9, last_seen = $10 WHERE id = $11",
        )
        .bind(&n.address)
        .bind(&n.region)
        .bind(n.cpus)
        .bind(n.memory_bytes)
        .bind(n.disk_bytes)
        .bind(&n.age_recipient)
        .bind(&n.api_url)
        .bind(&n.proxy_addr)
        .bind(&n.state)
        .bind(n.last_seen)
        .bind(&n.id)
        .execute(&self.pool)
        .await
        .map_err(q("re-registering a node"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn node(&self, id: &str) -> Result<Option<NodeRow>> {
        row!(
            NodeRow,
            "reading a node",
            sqlx::query(
                "SELECT id, address, region, cpus, memory_bytes, disk_bytes, age_recipient, api_url, proxy_addr, state, memory_used_bytes, instances, last_seen, registered_at, applied_commit, refused_commit, refused_reason, drain FROM nodes WHERE id = $1"
            )
            .bind(id),
            &self.pool
        )
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        rows!(
            NodeRow,
            "listing nodes",
            sqlx::query(
                "SELECT id, address, region, cpus, memory_bytes, disk_bytes, age_recipient, api_url, proxy_addr, state, memory_used_bytes, instances, last_seen, registered_at, applied_commit, refused_commit, refused_reason, drain FROM nodes ORDER BY id"
            ),
            &self.pool
        )
    }

    /// Record a heartbeat: state, optional resources, optional meta repo
    /// status, last_seen.
    pub async fn heartbeat(&self, id: &str, hb: &Heartbeat, now: i64) -> Result<bool> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("recording a heartbeat"))?;
        let r = sqlx::query("UPDATE nodes SET state = $1, last_seen = $2 WHERE id = $3")
            .bind(&hb.state)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("recording a heartbeat"))?;
        if let Some((cpus, mem, disk, used, inst)) = hb.resources {
            sqlx::query(
                "UPDATE nodes SET cpus = $1, memory_bytes = $2, disk_bytes = $3, memory_used_bytes = $4, instances = $5 WHERE id = $6",
            )
            .bind(cpus)
            .bind(mem)
            .bind(disk)
            .bind(used)
            .bind(inst)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("recording a heartbeat"))?;
        }
        if let Some((applied, refused, reason)) = &hb.meta {
            sqlx::query("UPDATE nodes SET applied_commit = $1, refused_commit = $2, refused_reason = $3 WHERE id = $4")
                .bind(applied)
                .bind(refused)
                .bind(reason)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(q("recording a heartbeat"))?;
        }
        if let Some((address, api_url, proxy_addr, age)) = &hb.endpoints {
            sqlx::query("UPDATE nodes SET address = $1, api_url = $2, proxy_addr = $3, age_recipient = $4 WHERE id = $5")
                .bind(address)
                .bind(api_url)
                .bind(proxy_addr)
                .bind(age)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(q("recording a heartbeat"))?;
        }
        tx.commit().await.map_err(q("recording a heartbeat"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Mark nodes not heard from since `cutoff` offline; returns their ids.
    pub async fn mark_stale_nodes_offline(&self, cutoff: i64) -> Result<Vec<String>> {
        let rows = sqlx::query("UPDATE nodes SET state = 'offline' WHERE state <> 'offline' AND last_seen < $1 RETURNING id")
            .bind(cutoff)
            .fetch_all(&self.pool)
            .await
            .map_err(q("marking stale nodes offline"))?;
        rows.iter()
            .map(|r| s(r, "id"))
            .collect::<std::result::Result<_, _>>()
            .map_err(q("marking stale nodes offline"))
    }

    pub async fn delete_node(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("deleting a node"))?;
        Ok(r.rows_affected() > 0)
    }

    // ------------------------------------------------------------ instances

    pub async fn upsert_instance(&self, x: &InstanceRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO instances (id, node_id, env, app, rollout_id, release_id, state, reason, address, port, attempts, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (id) DO UPDATE SET node_id = excluded.node_id, env = excluded.env, app = excluded.app, rollout_id = excluded.rollout_id, \
             release_id = excluded.release_id, state = excluded.state, reason = excluded.reason, address = excluded.address, port = excluded.port, \
             attempts = excluded.attempts, updated_at = excluded.updated_at",
        )
        .bind(&x.id)
        .bind(&x.node_id)
        .bind(&x.env)
        .bind(&x.app)
        .bind(&x.rollout_id)
        .bind(&x.release_id)
        .bind(&x.state)
        .bind(&x.reason)
        .bind(&x.address)
        .bind(x.port)
        .bind(x.attempts)
        .bind(x.created_at)
        .bind(x.updated_at)
        .execute(&self.pool)
        .await
        .map_err(q("recording an instance"))?;
        Ok(())
    }

    pub async fn instance(&self, id: &str) -> Result<Option<InstanceRow>> {
        row!(
            InstanceRow,
            "reading an instance",
            sqlx::query(
                "SELECT id, node_id, env, app, rollout_id, release_id, state, reason, address, port, attempts, created_at, updated_at FROM instances WHERE id = $1"
            )
            .bind(id),
            &self.pool
        )
    }

    pub async fn instances(&self, node_id: Option<&str>) -> Result<Vec<InstanceRow>> {
        rows!(
            InstanceRow,
            "listing instances",
            sqlx::query(
                "SELECT id, node_id, env, app, rollout_id, release_id, state, reason, address, port, attempts, created_at, updated_at FROM instances \
                 WHERE ($1 = '' OR node_id = $1) ORDER BY id"
            )
            .bind(node_id.unwrap_or("")),
            &self.pool
        )
    }

    pub async fn set_instance_state(
        &self,
        id: &str,
        state: &str,
        reason: &str,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE instances SET state = $1, reason = $2, updated_at = $3 WHERE id = $4",
        )
        .bind(state)
        .bind(reason)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(q("updating an instance"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn delete_instance(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("deleting an instance"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn healthy_instances_of_release(&self, release_id: &str) -> Result<i64> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM instances WHERE release_id = $1 AND state = 'healthy'",
        )
        .bind(release_id)
        .fetch_one(&self.pool)
        .await
        .map_err(q("counting healthy instances"))?;
        i(&r, "n").map_err(q("counting healthy instances"))
    }

    // ------------------------------------------------------------ images

    pub async fn insert_image(&self, x: &ImageRow) -> Result<()> {
        sqlx::query("INSERT INTO images (id, digest, size_bytes, source_commit, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&x.id)
            .bind(&x.digest)
            .bind(x.size_bytes)
            .bind(&x.source_commit)
            .bind(x.created_at)
            .execute(&self.pool)
            .await
            .map_err(q("inserting an image"))?;
        Ok(())
    }

    pub async fn image(&self, id: &str) -> Result<Option<ImageRow>> {
        row!(
            ImageRow,
            "reading an image",
            sqlx::query("SELECT id, digest, size_bytes, source_commit, created_at FROM images WHERE id = $1 OR digest = $1")
                .bind(id),
            &self.pool
        )
    }

    /// Images built by the projects `user` is a member of.
    pub async fn images_of_user(&self, user: &str) -> Result<Vec<ImageRow>> {
        rows!(
            ImageRow,
            "listing images",
            sqlx::query(
                "SELECT id, digest, size_bytes, source_commit, created_at FROM images WHERE digest IN \
                 (SELECT ip.digest FROM image_projects ip JOIN project_members m ON m.project_id = ip.project_id WHERE m.user_id = $1) \
                 ORDER BY id"
            )
            .bind(user),
            &self.pool
        )
    }

    pub async fn images(&self) -> Result<Vec<ImageRow>> {
        rows!(
            ImageRow,
            "listing images",
            sqlx::query(
                "SELECT id, digest, size_bytes, source_commit, created_at FROM images ORDER BY id"
            ),
            &self.pool
        )
    }

    pub async fn delete_image(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM images WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q("deleting an image"))?;
        Ok(r.rows_affected() > 0)
    }

    // ------------------------------------------------------------ waitlist

    /// Add an email; Ok(false) when it was on the list already.
    pub async fn join_waitlist(&self, id: &str, email: &str, now: i64) -> Result<bool> {
        let r = sqlx::query("INSERT INTO waitlist (id, email, created_at) VALUES ($1, $2, $3) ON CONFLICT (email) DO NOTHING")
            .bind(id)
            .bind(email)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(q("joining the waitlist"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn waitlist_len(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM waitlist")
            .fetch_one(&self.pool)
            .await
            .map_err(q("counting the waitlist"))?;
        i(&r, "n").map_err(q("counting the waitlist"))
    }

    // ------------------------------------------------------------ meta commits

    /// Record a commit; Ok(false) when it was indexed before.
    pub async fn insert_commit(&self, c: &CommitRow, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO meta_commits (id, message, author, time, indexed_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&c.id)
        .bind(&c.message)
        .bind(&c.author)
        .bind(c.time)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(q("indexing a commit"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn commit_indexed(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM meta_commits WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(q("checking a commit"))?;
        Ok(i(&r, "n").map_err(q("checking a commit"))? > 0)
    }

    pub async fn count_commits(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM meta_commits")
            .fetch_one(&self.pool)
            .await
            .map_err(q("counting commits"))?;
        i(&r, "n").map_err(q("counting commits"))
    }
}

/// Queries of the node link (`crate::nodelink`).
impl Db {
    /// The live registration of every node: node id -> id of its newest
    /// unrevoked node token. Node tokens are issued only by registration,
    /// which revokes the previous ones.
    pub async fn node_registrations(&self) -> Result<BTreeMap<String, String>, DbError> {
        let op = "reading node registrations";
        let rows = sqlx::query(
            "SELECT node_id, id FROM tokens WHERE kind = 'node' AND revoked_at IS NULL AND node_id IS NOT NULL ORDER BY id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(|source| DbError::Query { op, source })?;
        let mut out = BTreeMap::new();
        for r in rows {
            let node: String = r
                .try_get("node_id")
                .map_err(|source| DbError::Query { op, source })?;
            let id: String = r
                .try_get("id")
                .map_err(|source| DbError::Query { op, source })?;
            // Ordered by id (ULIDs): the newest wins.
            out.insert(node, id);
        }
        Ok(out)
    }

    /// (instance id, node id) of the reported instances of an app that its
    /// node still has (a follower deletes a stopped instance's directory,
    /// logs included), or of the one instance `only`, whatever its state.
    pub async fn instances_of_app(
        &self,
        env: &str,
        app: &str,
        only: Option<&str>,
    ) -> Result<Vec<(String, String)>, DbError> {
        let op = "listing the instances of an app";
        let rows = sqlx::query(
            "SELECT id, node_id FROM instances WHERE env = $1 AND app = $2 AND (id = $3 OR ($3 = '' AND state <> 'stopped')) ORDER BY id",
        )
        .bind(env)
        .bind(app)
        .bind(only.unwrap_or(""))
        .fetch_all(self.pool())
        .await
        .map_err(|source| DbError::Query { op, source })?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("node_id")?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(|source| DbError::Query { op, source })
    }
}
