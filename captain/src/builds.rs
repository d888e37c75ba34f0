//! The build queue: `POST /v1/builds` records a build in the database,
//! a worker of this captain claims it, runs the [`builder::Builder`], stores
//! its log lines and, when asked, deploys the image it made.
//!
//! - **Statuses.** `queued -> building -> succeeded | failed`. A fault of the
//!   build infrastructure that outlasts the builder's own per-step retries
//!   puts the build back to `queued` with a later `next_attempt_at` (backoff,
//!   up to [`crate::Config::build_max_attempts`] attempts); a fault of the
//!   user's code or input fails at once, with the last log lines in `error`.
//! - **Restart.** A build found `building` when the captain starts was cut
//!   short by the previous process: it is queued again (or failed, when it
//!   has used its attempts). A single captain owns the queue.
//! - **Logs.** Lines go to `build_logs` in batches (at most
//!   [`MAX_LOG_LINES`] per build), and `GET /v1/builds/{id}/logs` streams
//!   them as server-sent events while the build runs (`Accept:
//!   text/event-stream`), or pages them as JSON by `?from=<seq>`.
//! - **Deploy.** With `deploy`, the image is released as a deployment
//!   whose unset fields (port, env vars, instances, health check) come from
//!   the app's active release.
//! - **Sources.** A git URL (branch or commit), or a gzip'd tarball uploaded
//!   first with `POST /v1/sources`, kept content-addressed in the object
//!   store (`sources/<hex>.tar.gz`) so a retried build finds it again.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use builder::{BuildError, BuildOptions, Builder, ChannelLog, GitRev, LogEvent, Source};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::Row as _;
use sqlx::any::AnyRow;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::AppState;
use crate::api::CreateDeployment;
use crate::db::{Db, DbError, ImageRow};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, Code};

/// Log lines kept per build; later lines are dropped (and counted).
pub const MAX_LOG_LINES: i64 = 20_000;
/// Default largest uploaded source (gzip'd tar), in bytes.
pub const DEFAULT_MAX_SOURCE_BYTES: u64 = 1 << 30;

// ---------------------------------------------------------------- rows

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRow {
    pub id: String,
    pub app_id: String,
    /// `git` or `upload`.
    pub source_kind: String,
    /// The git URL, or the store key of the uploaded tarball.
    pub source_url: String,
    pub source_branch: String,
    pub source_commit: String,
    pub dockerfile: String,
    /// JSON object of build arguments.
    pub build_args: String,
    /// JSON [`DeploySpec`], empty = build only.
    pub deploy_spec: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub error: String,
    pub image_digest: String,
    pub deployment_id: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

const BUILD_COLS: &str = "id, app_id, source_kind, source_url, source_branch, source_commit, dockerfile, build_args, deploy_spec, status, attempts, next_attempt_at, error, image_digest, deployment_id, created_at, started_at, finished_at, updated_at";

impl BuildRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(BuildRow {
            id: r.try_get("id")?,
            app_id: r.try_get("app_id")?,
            source_kind: r.try_get("source_kind")?,
            source_url: r.try_get("source_url")?,
            source_branch: r.try_get("source_branch")?,
            source_commit: r.try_get("source_commit")?,
            dockerfile: r.try_get("dockerfile")?,
            build_args: r.try_get("build_args")?,
            deploy_spec: r.try_get("deploy_spec")?,
            status: r.try_get("status")?,
            attempts: r.try_get("attempts")?,
            next_attempt_at: r.try_get("next_attempt_at")?,
            error: r.try_get("error")?,
            image_digest: r.try_get("image_digest")?,
            deployment_id: r.try_get("deployment_id")?,
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }

    fn is_terminal(&self) -> bool {
        self.status == "succeeded" || self.status == "failed"
    }
}

/// One stored line of a build log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BuildLogLine {
    /// 1-based number of the line in its build's log.
    pub seq: i64,
    /// Unix nanoseconds when the captain received it.
    pub t: i64,
    /// `stdout`, `stderr` or `builder` (the builder's own messages).
    pub stream: String,
    pub line: String,
}

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { op, source }
}

/// Queries of the build queue.
impl Db {
    pub async fn insert_build(&self, b: &BuildRow) -> Result<(), DbError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO builds ({BUILD_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
        )))
        .bind(&b.id)
        .bind(&b.app_id)
        .bind(&b.source_kind)
        .bind(&b.source_url)
        .bind(&b.source_branch)
        .bind(&b.source_commit)
        .bind(&b.dockerfile)
        .bind(&b.build_args)
        .bind(&b.deploy_spec)
        .bind(&b.status)
        .bind(b.attempts)
        .bind(b.next_attempt_at)
        .bind(&b.error)
        .bind(&b.image_digest)
        .bind(&b.deployment_id)
        .bind(b.created_at)
        .bind(b.started_at)
        .bind(b.finished_at)
        .bind(b.updated_at)
        .execute(self.pool())
        .await
        .map_err(q("inserting a build"))?;
        Ok(())
    }

    pub async fn build(&self, id: &str) -> Result<Option<BuildRow>, DbError> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {BUILD_COLS} FROM builds WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(q("reading a build"))?;
        r.as_ref()
            .map(BuildRow::from_row)
            .transpose()
            .map_err(q("reading a build"))
    }

    /// Newest first; `app_id` filters.
    pub async fn builds(&self, app_id: Option<&str>, limit: i64) -> Result<Vec<BuildRow>, DbError> {
        let rows = match app_id {
            Some(a) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {BUILD_COLS} FROM builds WHERE app_id = $1 ORDER BY id DESC LIMIT $2"
            )))
            .bind(a)
            .bind(limit),
            None => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {BUILD_COLS} FROM builds ORDER BY id DESC LIMIT $1"
            )))
            .bind(limit),
        }
        .fetch_all(self.pool())
        .await
        .map_err(q("listing builds"))?;
        rows.iter()
            .map(BuildRow::from_row)
            .collect::<Result<_, _>>()
            .map_err(q("listing builds"))
    }

    /// Takes the oldest queued build that is due, marking it `building`.
    /// The status test in the outer `WHERE` makes two claimers of the same
    /// row exclusive.
    pub async fn claim_build(&self, now: i64) -> Result<Option<BuildRow>, DbError> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE builds SET status = 'building', attempts = attempts + 1, started_at = $1, updated_at = $1 \
             WHERE status = 'queued' AND id = (SELECT id FROM builds WHERE status = 'queued' AND next_attempt_at <= $1 ORDER BY id LIMIT 1) \
             RETURNING {BUILD_COLS}"
        )))
        .bind(now)
        .fetch_optional(self.pool())
        .await
        .map_err(q("claiming a build"))?;
        r.as_ref()
            .map(BuildRow::from_row)
            .transpose()
            .map_err(q("claiming a build"))
    }

    /// When the next queued build is due, if any is queued.
    pub async fn next_build_due(&self) -> Result<Option<i64>, DbError> {
        let r =
            sqlx::query("SELECT MIN(next_attempt_at) AS due FROM builds WHERE status = 'queued'")
                .fetch_one(self.pool())
                .await
                .map_err(q("reading the build queue"))?;
        r.try_get::<Option<i64>, _>("due")
            .map_err(q("reading the build queue"))
    }

    /// Builds left `building` by a previous process: queued again, or
    /// failed once they have used `max_attempts`. Returns (requeued, failed).
    pub async fn recover_interrupted_builds(
        &self,
        now: i64,
        max_attempts: i64,
    ) -> Result<(u64, u64), DbError> {
        let failed = sqlx::query(
            "UPDATE builds SET status = 'failed', finished_at = $1, updated_at = $1, \
             error = 'the captain stopped during every attempt of this build' \
             WHERE status = 'building' AND attempts >= $2",
        )
        .bind(now)
        .bind(max_attempts)
        .execute(self.pool())
        .await
        .map_err(q("failing interrupted builds"))?
        .rows_affected();
        let requeued = sqlx::query(
            "UPDATE builds SET status = 'queued', next_attempt_at = $1, updated_at = $1, \
             error = 'interrupted: the captain stopped during the build; retrying' \
             WHERE status = 'building'",
        )
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(q("re-queueing interrupted builds"))?
        .rows_affected();
        Ok((requeued, failed))
    }

    /// Puts a claimed build back in the queue after an infrastructure fault.
    pub async fn requeue_build(
        &self,
        id: &str,
        next_attempt_at: i64,
        error: &str,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE builds SET status = 'queued', next_attempt_at = $2, error = $3, updated_at = $4 WHERE id = $1 AND status = 'building'",
        )
        .bind(id)
        .bind(next_attempt_at)
        .bind(error)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(q("re-queueing a build"))?;
        Ok(())
    }

    /// Ends a claimed build.
    pub async fn finish_build(
        &self,
        id: &str,
        status: &str,
        error: &str,
        image_digest: &str,
        deployment_id: &str,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE builds SET status = $2, error = $3, image_digest = $4, deployment_id = $5, finished_at = $6, updated_at = $6 WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(error)
        .bind(image_digest)
        .bind(deployment_id)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(q("finishing a build"))?;
        Ok(())
    }

    pub async fn insert_build_logs(
        &self,
        build_id: &str,
        lines: &[BuildLogLine],
    ) -> Result<(), DbError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(q("storing build log lines"))?;
        for l in lines {
            sqlx::query("INSERT INTO build_logs (build_id, seq, t, stream, line) VALUES ($1, $2, $3, $4, $5)")
                .bind(build_id)
                .bind(l.seq)
                .bind(l.t)
                .bind(&l.stream)
                .bind(&l.line)
                .execute(&mut *tx)
                .await
                .map_err(q("storing build log lines"))?;
        }
        tx.commit().await.map_err(q("storing build log lines"))?;
        Ok(())
    }

    /// Lines after `after` (a seq), oldest first.
    pub async fn build_logs(
        &self,
        build_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BuildLogLine>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, t, stream, line FROM build_logs WHERE build_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(build_id)
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(q("reading build log lines"))?;
        rows.iter()
            .map(|r| {
                Ok(BuildLogLine {
                    seq: r.try_get("seq")?,
                    t: r.try_get("t")?,
                    stream: r.try_get("stream")?,
                    line: r.try_get("line")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(q("reading build log lines"))
    }

    /// The highest seq stored for a build (0 when none).
    pub async fn last_build_log_seq(&self, build_id: &str) -> Result<i64, DbError> {
        let r = sqlx::query("SELECT MAX(seq) AS m FROM build_logs WHERE build_id = $1")
            .bind(build_id)
            .fetch_one(self.pool())
            .await
            .map_err(q("reading build log lines"))?;
        Ok(r.try_get::<Option<i64>, _>("m")
            .map_err(q("reading build log lines"))?
            .unwrap_or(0))
    }
}

// ---------------------------------------------------------------- API types

/// Where a build's source comes from: exactly one of `git` and `upload`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildSource {
    pub git: Option<GitSource>,
    /// The id `POST /v1/sources` answered (`sha256:<hex>`).
    pub upload: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    pub url: String,
    /// Branch to build (default: the remote's default branch).
    pub branch: Option<String>,
    /// Commit to build (wins over `branch`).
    pub commit: Option<String>,
}

/// What to deploy once the image is built (the fields of a deployment).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    pub port: Option<u32>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub min_instances: Option<u32>,
    pub health_check_path: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBuild {
    pub app_id: String,
    pub source: BuildSource,
    /// The commit the uploaded source is (recorded in the release).
    pub source_commit: Option<String>,
    /// Dockerfile path inside the source (default `Dockerfile`).
    pub dockerfile: Option<String>,
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// Deploy the image when the build succeeds.
    pub deploy: Option<DeploySpec>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BuildView {
    pub id: String,
    pub app_id: String,
    /// queued | building | succeeded | failed
    pub status: String,
    pub attempts: i64,
    pub source_kind: String,
    pub source_url: String,
    pub source_branch: String,
    pub source_commit: String,
    pub dockerfile: String,
    /// Why it failed (with the last log lines), or the last retried fault.
    pub error: String,
    pub image_digest: String,
    /// The deployment made from the image, when one was asked for.
    pub deployment_id: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

impl From<BuildRow> for BuildView {
    fn from(b: BuildRow) -> Self {
        BuildView {
            id: b.id,
            app_id: b.app_id,
            status: b.status,
            attempts: b.attempts,
            source_kind: b.source_kind,
            source_url: b.source_url,
            source_branch: b.source_branch,
            source_commit: b.source_commit,
            dockerfile: b.dockerfile,
            error: b.error,
            image_digest: b.image_digest,
            deployment_id: b.deployment_id,
            created_at: b.created_at,
            started_at: b.started_at,
            finished_at: b.finished_at,
            updated_at: b.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SourceView {
    /// `sha256:<hex>` of the uploaded tarball: give it as `source.upload`.
    pub id: String,
    pub size_bytes: u64,
}

fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

fn source_key(id: &str) -> String {
    format!(
        "sources/{}.tar.gz",
        id.strip_prefix("sha256:").unwrap_or(id)
    )
}

fn builder_of(st: &AppState) -> Result<&Arc<Builder>, ApiError> {
    st.config.builder.as_ref().ok_or_else(|| {
        ApiError::new(
            Code::NotConfigured,
            "this captain runs no builder (start it with a build backend: buildah, or docker)",
        )
    })
}

// ---------------------------------------------------------------- handlers

/// `POST /v1/sources`: a gzip'd tarball of a build context, every entry
/// under one top-level directory (`tar czf - -C dir --transform 's,^,src/,' .`).
pub async fn upload_source(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let builder = builder_of(&st)?.clone();
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !matches!(
        ct.as_str(),
        "application/gzip" | "application/x-gzip" | "application/x-compressed-tar"
    ) {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            format!("a source upload is a gzip'd tar (Content-Type: application/gzip), not {ct:?}"),
        ));
    }
    let limit = st.config.max_source_bytes;
    let dir = st.config.data_dir.join("uploads");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::internal("creating the upload directory", &e))?;
    let tmp = TempFile(dir.join(format!("{}.part", meta_schema::new_id())));
    let mut f = tokio::fs::File::create(&tmp.0)
        .await
        .map_err(|e| ApiError::internal("creating an upload file", &e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::new(
                Code::PayloadTooLarge,
                format!("the source is larger than this captain's limit of {limit} bytes"),
            ));
        }
        hasher.update(&chunk);
        f.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal("writing an upload file", &e))?;
    }
    f.flush()
        .await
        .map_err(|e| ApiError::internal("writing an upload file", &e))?;
    drop(f);
    if size < 2 {
        return Err(ApiError::bad_request("the upload is empty"));
    }
    let mut magic = [0u8; 2];
    {
        use std::io::Read as _;
        std::fs::File::open(&tmp.0)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| ApiError::internal("reading an upload file", &e))?;
    }
    if magic != [0x1f, 0x8b] {
        return Err(ApiError::bad_request(
            "the upload is not gzip data (a source is a .tar.gz)",
        ));
    }
    let id = format!("sha256:{}", hex::encode(hasher.finalize()));
    let key = source_key(&id);
    let store = builder.store();
    let present = store.exists(&key).await.unwrap_or(false);
    if !present {
        store.put_file(&key, &tmp.0).await.map_err(|e| {
            ApiError::new(
                Code::Internal,
                format!("storing the source in {}: {e}", store.describe()),
            )
        })?;
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(SourceView {
            id,
            size_bytes: size,
        }),
    )
        .into_response())
}

/// Removes a file when dropped (an upload that failed half way).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check_commit(c: &str) -> Result<(), ApiError> {
    let ok = (4..=64).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_hexdigit());
    if !c.is_empty() && !ok {
        return Err(ApiError::bad_request(format!(
            "commit {c:?} is not a git commit id"
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn new_row(
    app_id: &str,
    kind: &str,
    url: String,
    branch: String,
    commit: String,
    dockerfile: String,
    build_args: String,
    deploy: Option<&DeploySpec>,
) -> BuildRow {
    let now = meta_schema::now_millis();
    BuildRow {
        id: meta_schema::new_id(),
        app_id: app_id.into(),
        source_kind: kind.into(),
        source_url: url,
        source_branch: branch,
        source_commit: commit,
        dockerfile,
        build_args,
        deploy_spec: match deploy {
            Some(d) => serde_json::to_string(d).expect("a spec serializes"),
            None => String::new(),
        },
        status: "queued".into(),
        attempts: 0,
        next_attempt_at: now,
        error: String::new(),
        image_digest: String::new(),
        deployment_id: String::new(),
        created_at: now,
        started_at: None,
        finished_at: None,
        updated_at: now,
    }
}

async fn enqueue(st: &AppState, row: &BuildRow, app: &str) -> Result<(), ApiError> {
    st.db.insert_build(row).await?;
    st.builds_wake.notify_one();
    st.build_events.send_modify(|n| *n += 1);
    tracing::info!(build = %row.id, app, source = %row.source_url, "build queued");
    Ok(())
}

/// Queues a build of `url` at `commit` for `app` (the GitHub webhook).
pub async fn queue_git_build(
    st: &AppState,
    app: &crate::db::AppRow,
    url: &str,
    commit: &str,
    deploy: Option<DeploySpec>,
) -> Result<BuildView, ApiError> {
    check_commit(commit)?;
    let row = new_row(
        &app.id,
        "git",
        url.into(),
        String::new(),
        commit.into(),
        "Dockerfile".into(),
        "{}".into(),
        deploy.as_ref(),
    );
    enqueue(st, &row, &app.name).await?;
    Ok(row.into())
}

/// `POST /v1/builds`.
pub async fn create_build(
    State(st): State<AppState>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    ApiJson(b): ApiJson<CreateBuild>,
) -> Result<Response, ApiError> {
    let builder = builder_of(&st)?.clone();
    let app = st
        .db
        .app(&b.app_id)
        .await?
        .ok_or_else(|| ApiError::not_found("app", &b.app_id))?;
    let (kind, url, branch, commit) = match (b.source.git, b.source.upload) {
        (Some(g), None) => {
            if !builder::source::looks_like_git_url(&g.url) {
                return Err(ApiError::bad_request(format!(
                    "source.git.url {:?} is not a git URL (https://, ssh://, git@host:path or file://)",
                    g.url
                )));
            }
            // A file:// URL (or a path) reads the captain's own disk:
            // admins only.
            let remote = ["https://", "http://", "ssh://", "git://", "git@"]
                .iter()
                .any(|p| g.url.starts_with(p));
            if !remote && caller.kind != crate::auth::TokenKind::Admin {
                return Err(ApiError::new(
                    Code::Forbidden,
                    format!(
                        "source.git.url {:?} is on the captain's own disk; only an admin token may build it",
                        g.url
                    ),
                ));
            }
            let commit = g.commit.unwrap_or_default();
            check_commit(&commit)?;
            let branch = g.branch.unwrap_or_default();
            if branch.starts_with('-')
                || branch.contains("..")
                || branch.contains(char::is_whitespace)
            {
                return Err(ApiError::bad_request(format!(
                    "source.git.branch {branch:?} is not a branch name"
                )));
            }
            ("git", g.url, branch, commit)
        }
        (None, Some(id)) => {
            if !is_sha256(&id) {
                return Err(ApiError::bad_request(format!(
                    "source.upload {id:?} is not the sha256:<hex> id POST /v1/sources answered"
                )));
            }
            let key = source_key(&id);
            match builder.store().exists(&key).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(ApiError::not_found("uploaded source", &id));
                }
                Err(e) => {
                    return Err(ApiError::new(
                        Code::Internal,
                        format!(
                            "looking up the source in {}: {e}",
                            builder.store().describe()
                        ),
                    ));
                }
            }
            let commit = b.source_commit.clone().unwrap_or_default();
            check_commit(&commit)?;
            ("upload", key, String::new(), commit)
        }
        _ => {
            return Err(ApiError::bad_request(
                "source needs exactly one of git and upload",
            ));
        }
    };
    let dockerfile = b.dockerfile.unwrap_or_else(|| "Dockerfile".into());
    if dockerfile.is_empty() || Path::new(&dockerfile).is_absolute() {
        return Err(ApiError::bad_request(format!(
            "dockerfile {dockerfile:?} must be a path inside the source"
        )));
    }
    for k in b.build_args.keys() {
        if k.is_empty() || k.contains('=') {
            return Err(ApiError::bad_request(format!(
                "build argument name {k:?} is empty or contains '='"
            )));
        }
    }
    let row = new_row(
        &app.id,
        kind,
        url,
        branch,
        commit,
        dockerfile,
        serde_json::to_string(&b.build_args).expect("a map serializes"),
        b.deploy.as_ref(),
    );
    enqueue(&st, &row, &app.name).await?;
    Ok((StatusCode::CREATED, axum::Json(BuildView::from(row))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildsQuery {
    app_id: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/builds`.
pub async fn list_builds(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<BuildsQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1-1000"));
    }
    let v: Vec<BuildView> = st
        .db
        .builds(q.app_id.as_deref(), limit)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(axum::Json(v).into_response())
}

/// `GET /v1/builds/{id}`.
pub async fn get_build(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let b = st
        .db
        .build(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("build", &id))?;
    Ok(axum::Json(BuildView::from(b)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Lines after this seq (default 0: from the first).
    from: Option<i64>,
    limit: Option<i64>,
}

/// `GET /v1/builds/{id}/logs`: JSON lines after `?from=`, with
/// `X-Last-Log-Seq`; or, with `Accept: text/event-stream`, every line
/// (`event: line`, `id: <seq>`) as it is stored, then `event: end` with the
/// build once it has finished. `Last-Event-ID` resumes a stream.
pub async fn build_logs(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if st.db.build(&id).await?.is_none() {
        return Err(ApiError::not_found("build", &id));
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let from = resume.or(q.from).unwrap_or(0).max(0);
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if !wants_sse {
        let limit = q.limit.unwrap_or(1000);
        if !(1..=10_000).contains(&limit) {
            return Err(ApiError::bad_request("limit must be 1-10000"));
        }
        let lines = st.db.build_logs(&id, from, limit).await?;
        let last = lines.last().map_or(from, |l| l.seq);
        let mut h = HeaderMap::new();
        h.insert("X-Last-Log-Seq", HeaderValue::from(last));
        return Ok((h, axum::Json(lines)).into_response());
    }
    let events = st.build_events.subscribe();
    let s = futures::stream::unfold(Some((st, id, from, events)), |state| async move {
        let (st, id, mut after, mut events) = state?;
        loop {
            // Status first, then lines: a build ends only after all its
            // lines are stored, so "ended and nothing after" is final.
            let b = match st.db.build(&id).await {
                Ok(Some(b)) => b,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, build = %id, "streaming build logs");
                    return None;
                }
            };
            let lines = match st.db.build_logs(&id, after, 500).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, build = %id, "streaming build logs");
                    return None;
                }
            };
            if let Some(last) = lines.last() {
                after = last.seq;
                let evs: Vec<Result<Event, Infallible>> = lines
                    .iter()
                    .map(|l| {
                        Ok(Event::default()
                            .event("line")
                            .id(l.seq.to_string())
                            .data(serde_json::to_string(l).expect("a line serializes")))
                    })
                    .collect();
                return Some((futures::stream::iter(evs), Some((st, id, after, events))));
            }
            if b.is_terminal() {
                let end = Event::default()
                    .event("end")
                    .data(serde_json::to_string(&BuildView::from(b)).expect("a build serializes"));
                return Some((futures::stream::iter(vec![Ok(end)]), None));
            }
            // Wait for new lines or a status change (or re-check).
            let _ = tokio::time::timeout(Duration::from_secs(2), events.changed()).await;
        }
    })
    .flatten();
    Ok(Sse::new(s)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keepalive"),
        )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadQuery {
    /// `rootfs` (default: the ext4 image) or `config` (config.json).
    part: Option<String>,
}

/// `GET /v1/images/{id}/download`: streams the image's ext4 root
/// filesystem (or `?part=config`, its config.json) from the object store.
pub async fn download_image(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<DownloadQuery>,
) -> Result<Response, ApiError> {
    let store = st.config.image_store().ok_or_else(|| {
        ApiError::new(
            Code::NotConfigured,
            "this captain has no object store to serve images from",
        )
    })?;
    let img = st
        .db
        .image(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("image", &id))?;
    let hex = builder::image::digest_hex(&img.digest)
        .ok_or_else(|| ApiError::bad_request(format!("{} is not a sha256 digest", img.digest)))?;
    let (key, ctype) = match q.part.as_deref().unwrap_or("rootfs") {
        "rootfs" => (builder::image::rootfs_key(hex), "application/octet-stream"),
        "config" => (builder::image::config_key(hex), "application/json"),
        other => {
            return Err(ApiError::bad_request(format!(
                "part {other:?} is not rootfs or config"
            )));
        }
    };
    let stream = match store.get_stream(&key).await {
        Ok(s) => s,
        Err(e) if e.is_not_found() => {
            return Err(ApiError::new(
                Code::NotFound,
                format!(
                    "image {} is recorded but {key} is not in {}",
                    img.digest,
                    store.describe()
                ),
            ));
        }
        Err(e) => {
            return Err(ApiError::new(
                Code::Internal,
                format!("reading {key} from {}: {e}", store.describe()),
            ));
        }
    };
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Ok(v) = HeaderValue::from_str(&img.digest) {
        h.insert("X-Image-Digest", v);
    }
    Ok((h, Body::from_stream(stream)).into_response())
}

// ---------------------------------------------------------------- worker

/// Runs claimed builds one at a time until `stop`.
pub async fn run_worker(st: AppState, builder: Arc<Builder>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        let now = meta_schema::now_millis();
        match st.db.claim_build(now).await {
            Ok(Some(b)) => {
                let id = b.id.clone();
                st.build_events.send_modify(|n| *n += 1);
                tokio::select! {
                    _ = stop.changed() => {
                        tracing::info!(build = %id, "stopping during a build: it is retried at the next start");
                        return;
                    }
                    _ = execute(&st, &builder, b) => {}
                }
                st.build_events.send_modify(|n| *n += 1);
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "claiming a build"),
        }
        let wait = match st.db.next_build_due().await {
            Ok(Some(due)) => (due - now).clamp(0, 5_000),
            _ => 5_000,
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = st.builds_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())) => {}
        }
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Stores the lines of one build attempt in batches; returns when the
/// sink is dropped and every line is written.
async fn store_logs(
    st: AppState,
    build_id: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<LogEvent>,
    mut seq: i64,
) {
    let mut batch: Vec<BuildLogLine> = Vec::new();
    let mut dropped = 0u64;
    let mut open = true;
    while open {
        let deadline = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        let (stream, line) = match ev {
                            LogEvent::Line(l) => (
                                match l.stream {
                                    builder::LogStream::Stdout => "stdout",
                                    builder::LogStream::Stderr => "stderr",
                                    builder::LogStream::Builder => "builder",
                                },
                                l.text,
                            ),
                            LogEvent::Stage(s) => ("builder", format!("stage: {s}")),
                        };
                        if seq >= MAX_LOG_LINES {
                            dropped += 1;
                            continue;
                        }
                        seq += 1;
                        batch.push(BuildLogLine { seq, t: now_nanos(), stream: stream.into(), line });
                        if batch.len() >= 200 {
                            break;
                        }
                    }
                    None => {
                        open = false;
                        break;
                    }
                },
                _ = &mut deadline => break,
            }
        }
        if !batch.is_empty() {
            if let Err(e) = st.db.insert_build_logs(&build_id, &batch).await {
                tracing::error!(error = %e, build = %build_id, lines = batch.len(), "storing build log lines");
            }
            batch.clear();
            st.build_events.send_modify(|n| *n += 1);
        }
    }
    if dropped > 0 && seq < MAX_LOG_LINES + 1 {
        let l = BuildLogLine {
            seq: seq + 1,
            t: now_nanos(),
            stream: "builder".into(),
            line: format!("{dropped} more lines were not kept (a build keeps {MAX_LOG_LINES})"),
        };
        let _ = st.db.insert_build_logs(&build_id, &[l]).await;
    }
}

/// The store key of an upload → a directory holding the extracted source.
async fn fetch_upload(builder: &Builder, key: &str, dir: &Path) -> Result<PathBuf, BuildError> {
    use builder::Stage;
    let archive = dir.join("source.tar.gz");
    let store = builder.store();
    let mut stream = store
        .get_stream(key)
        .await
        .map_err(|e| BuildError::store(Stage::Source, e))?;
    let mut f = tokio::fs::File::create(&archive)
        .await
        .map_err(|e| BuildError::infra(Stage::Source, "writing the uploaded source", e))?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BuildError::store(Stage::Source, e))?;
        f.write_all(&chunk)
            .await
            .map_err(|e| BuildError::infra(Stage::Source, "writing the uploaded source", e))?;
    }
    f.flush()
        .await
        .map_err(|e| BuildError::infra(Stage::Source, "writing the uploaded source", e))?;
    drop(f);
    let dest = dir.join("src");
    let limit = builder.config().max_context_bytes;
    let (a, d) = (archive.clone(), dest.clone());
    tokio::task::spawn_blocking(move || {
        builder::source::extract_tarball(&a, &d, limit, "the uploaded source")
    })
    .await
    .map_err(|e| BuildError::infra(Stage::Source, "extracting the uploaded source", e))??;
    Ok(dest)
}

async fn execute(st: &AppState, builder: &Builder, b: BuildRow) {
    let id = b.id.clone();
    let seq = st.db.last_build_log_seq(&id).await.unwrap_or(0);
    let (sink, rx) = ChannelLog::new();
    let writer = tokio::spawn(store_logs(st.clone(), id.clone(), rx, seq));
    let log: &dyn builder::LogSink = &sink;
    log.builder(format!("build {id}, attempt {}", b.attempts));
    let work = TempDir(st.config.data_dir.join("build-work").join(&id));
    let result = run_attempt(st, builder, &b, &work.0, log).await;
    drop(work);
    let outcome = match result {
        Ok((digest, deployment_id, deploy_error)) => {
            if !deploy_error.is_empty() {
                log.builder(format!("not deployed: {deploy_error}"));
            } else if !deployment_id.is_empty() {
                log.builder(format!("deployment {deployment_id} created"));
            }
            Outcome::Done {
                status: "succeeded",
                error: deploy_error,
                digest,
                deployment_id,
            }
        }
        Err(e) => {
            let max = i64::from(st.config.build_max_attempts.max(1));
            if e.is_retryable() && b.attempts < max {
                let backoff = st.config.build_retry_backoff.as_millis() as i64
                    * (1i64 << (b.attempts - 1).clamp(0, 10));
                log.builder(format!(
                    "infrastructure fault, attempt {} of {max}; retrying in {} ms: {e}",
                    b.attempts, backoff
                ));
                Outcome::Retry {
                    at: meta_schema::now_millis() + backoff,
                    error: e.to_string(),
                }
            } else {
                log.builder(format!("build failed: {e}"));
                Outcome::Done {
                    status: "failed",
                    error: e.to_string(),
                    digest: String::new(),
                    deployment_id: String::new(),
                }
            }
        }
    };
    drop(sink);
    let _ = writer.await;
    let now = meta_schema::now_millis();
    let r = match &outcome {
        Outcome::Retry { at, error } => st.db.requeue_build(&id, *at, error, now).await,
        Outcome::Done {
            status,
            error,
            digest,
            deployment_id,
        } => {
            tracing::info!(build = %id, status, image = %digest, "build finished");
            st.db
                .finish_build(&id, status, error, digest, deployment_id, now)
                .await
        }
    };
    if let Err(e) = r {
        tracing::error!(error = %e, build = %id, "recording the end of a build");
    }
}

enum Outcome {
    Retry {
        at: i64,
        error: String,
    },
    Done {
        status: &'static str,
        error: String,
        digest: String,
        deployment_id: String,
    },
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One attempt: source, build, image row, deployment. Returns the digest,
/// the deployment id (empty when none was asked for) and why a requested
/// deployment was refused (empty when it was made).
async fn run_attempt(
    st: &AppState,
    builder: &Builder,
    b: &BuildRow,
    work: &Path,
    log: &dyn builder::LogSink,
) -> Result<(String, String, String), BuildError> {
    use builder::Stage;
    let app = match st.db.app(&b.app_id).await {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(BuildError::User {
                message: format!("app {} was deleted before its build ran", b.app_id),
                log_tail: Vec::new(),
            });
        }
        Err(e) => return Err(BuildError::infra(Stage::Source, "reading the app", e)),
    };
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)
        .map_err(|e| BuildError::infra(Stage::Source, "creating the build work directory", e))?;
    let source = match b.source_kind.as_str() {
        "upload" => Source::Local(fetch_upload(builder, &b.source_url, work).await?),
        _ => Source::Git {
            url: b.source_url.clone(),
            rev: if !b.source_commit.is_empty() {
                GitRev::Commit(b.source_commit.clone())
            } else if !b.source_branch.is_empty() {
                GitRev::Branch(b.source_branch.clone())
            } else {
                GitRev::DefaultBranch
            },
        },
    };
    let args: BTreeMap<String, String> = serde_json::from_str(&b.build_args).unwrap_or_default();
    let opts = BuildOptions {
        app: Some(app.name.clone()),
        dockerfile: PathBuf::from(&b.dockerfile),
        build_args: args.into_iter().collect(),
    };
    let art = builder.build(source, opts, log).await?;
    log.builder(format!("image {}", art.digest));
    let image = ImageRow {
        id: meta_schema::new_id(),
        digest: art.digest.clone(),
        size_bytes: i64::try_from(art.config.rootfs_bytes).unwrap_or(i64::MAX),
        source_commit: b.source_commit.clone(),
        created_at: meta_schema::now_millis(),
    };
    match st.db.insert_image(&image).await {
        Ok(()) => {}
        Err(e) if e.is_unique_violation() => {}
        Err(e) => return Err(BuildError::infra(Stage::Upload, "recording the image", e)),
    }
    if b.deploy_spec.is_empty() {
        return Ok((art.digest, String::new(), String::new()));
    }
    let spec: DeploySpec = serde_json::from_str(&b.deploy_spec).unwrap_or_default();
    let spec = inherit(st, &app, spec).await;
    let req = CreateDeployment {
        app_id: app.id.clone(),
        image_digest: Some(art.digest.clone()),
        commit: (!b.source_commit.is_empty()).then(|| b.source_commit.clone()),
        port: spec.port,
        env_vars: spec.env_vars,
        min_instances: spec.min_instances,
        health_check_path: spec.health_check_path,
    };
    match crate::api::deploy(st, &app, req).await {
        Ok(d) => Ok((art.digest, d.id, String::new())),
        Err(e) => Ok((art.digest, String::new(), e.message)),
    }
}

/// Fills what `spec` leaves open from the app's active release, so a new
/// image keeps the app's port, env vars, instance count and health check
/// (as `zw deploy` does when it copies the active release).
async fn inherit(st: &AppState, app: &crate::db::AppRow, mut spec: DeploySpec) -> DeploySpec {
    use prost::Message as _;
    let Ok(Some(id)) = st.db.active_release(&app.id).await else {
        return spec;
    };
    let Ok(Some(head)) = st.meta.head().await else {
        return spec;
    };
    let Ok(tree) = st.meta.tree(head).await else {
        return spec;
    };
    let path = meta_schema::layout::release_path(&app.env, &app.name, &id);
    let Some(r) = tree
        .get(&path)
        .and_then(|b| meta_schema::pb::Release::decode(b).ok())
    else {
        return spec;
    };
    if spec.port.is_none() && r.port != 0 {
        spec.port = Some(r.port);
    }
    if spec.env_vars.is_none() {
        spec.env_vars = Some(r.env_vars.into_iter().collect());
    }
    if spec.min_instances.is_none() && r.min_instances != 0 {
        spec.min_instances = Some(r.min_instances);
    }
    if spec.health_check_path.is_none()
        && let Some(meta_schema::pb::HealthCheck {
            kind: Some(meta_schema::pb::health_check::Kind::HttpPath(p)),
            ..
        }) = r.health_check
    {
        spec.health_check_path = Some(p);
    }
    spec
}
