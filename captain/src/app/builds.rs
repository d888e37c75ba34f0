//! Builds: queueing (`POST /v1/builds`, the GitHub webhook), uploaded
//! sources, and running a claimed build (the `build-worker-N` background
//! tasks).
//!
//! - **Statuses.** `queued -> building -> succeeded | failed`. A fault of the
//!   build infrastructure that outlasts the builder's own per-step retries
//!   puts the build back to `queued` with a later `next_attempt_at` (backoff,
//!   up to [`crate::config::Config::build_max_attempts`] attempts); a fault of
//!   the user's code or input fails at once, with the last log lines in
//!   `error`.
//! - **Restart.** A build found `building` when the captain starts was cut
//!   short by the previous process: it is queued again (or failed, when it
//!   has used its attempts). A single captain owns the queue.
//! - **Logs.** Lines go to `build_logs` in batches (at most
//!   [`MAX_LOG_LINES`] per build); `GET /v1/builds/{id}/logs` streams or
//!   pages them.
//! - **Deploy.** With `deploy`, the image is released as a deployment
//!   whose unset fields (port, env vars, instances, health check) come from
//!   the app's active release.
//! - **Sources.** A git URL (branch or commit), or a gzip'd tarball uploaded
//!   first ([`store_source`]), kept content-addressed in the object store
//!   (`sources/<hex>.tar.gz`) so a retried build finds it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use api_types::builds::{BuildLogLine, DeploySpec};
use api_types::tokens::TokenKind;
use builder::{BuildError, BuildOptions, Builder, ChannelLog, GitRev, LogEvent, Source};
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::deploy::NewRelease;
use super::validate::check_commit;
use super::{AppError, Result};
use crate::auth::Caller;
use crate::db::{AppRow, BuildRow, ImageRow};
use crate::state::AppState;

/// Log lines kept per build; later lines are dropped (and counted).
pub const MAX_LOG_LINES: i64 = 20_000;

/// The object store key of an uploaded source.
fn source_key(id: &zw_util::Sha256Digest) -> String {
    format!("sources/{}.tar.gz", id.hex())
}

fn builder_of(st: &AppState) -> Result<&Arc<Builder>> {
    st.config.builder.as_ref().ok_or_else(|| {
        AppError::NotConfigured(
            "this captain runs no builder (start it with a build backend: buildah, or docker)"
                .into(),
        )
    })
}

/// Removes a file when dropped (an upload that failed half way).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An uploaded source, stored.
pub struct StoredSource {
    /// `sha256:<hex>` of the tarball: what a build names as its source.
    pub id: String,
    pub size_bytes: u64,
}

/// Store an uploaded source: a gzip'd tarball of a build context, every
/// entry under one top-level directory, streamed in `body` (at most
/// `max_source_bytes`). Content-addressed: the same upload twice is stored
/// once.
pub async fn store_source<E: std::fmt::Display>(
    st: &AppState,
    content_type: &str,
    body: impl Stream<Item = std::result::Result<Bytes, E>>,
) -> Result<StoredSource> {
    let builder = builder_of(st)?.clone();
    if !matches!(
        content_type,
        "application/gzip" | "application/x-gzip" | "application/x-compressed-tar"
    ) {
        return Err(AppError::UnsupportedMediaType(format!(
            "a source upload is a gzip'd tar (Content-Type: application/gzip), not {content_type:?}"
        )));
    }
    let limit = st.config.max_source_bytes;
    let dir = st.config.data_dir.join("uploads");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| AppError::internal("creating the upload directory", e))?;
    let tmp = TempFile(dir.join(format!("{}.part", meta_schema::new_id())));
    let mut f = tokio::fs::File::create(&tmp.0)
        .await
        .map_err(|e| AppError::internal("creating an upload file", e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut magic: Vec<u8> = Vec::with_capacity(2);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| AppError::BadRequest(format!("reading the upload: {e}")))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(AppError::TooLarge(format!(
                "the source is larger than this captain's limit of {limit} bytes"
            )));
        }
        if magic.len() < 2 {
            magic.extend(chunk.iter().take(2 - magic.len()));
        }
        hasher.update(&chunk);
        f.write_all(&chunk)
            .await
            .map_err(|e| AppError::internal("writing an upload file", e))?;
    }
    f.flush()
        .await
        .map_err(|e| AppError::internal("writing an upload file", e))?;
    drop(f);
    if size < 2 {
        return Err(AppError::BadRequest("the upload is empty".into()));
    }
    if magic != [0x1f, 0x8b] {
        return Err(AppError::BadRequest(
            "the upload is not gzip data (a source is a .tar.gz)".into(),
        ));
    }
    let id = zw_util::Sha256Digest::from_hasher(hasher);
    let key = source_key(&id);
    let store = builder.store();
    if !store.exists(&key).await.unwrap_or(false) {
        store.put_file(&key, &tmp.0).await.map_err(|e| {
            AppError::internal(format!("storing the source in {}", store.describe()), e)
        })?;
    }
    Ok(StoredSource {
        id: id.to_string(),
        size_bytes: size,
    })
}

/// Where a build's source comes from.
#[derive(Debug, Clone)]
pub enum NewSource {
    Git {
        url: String,
        branch: Option<String>,
        commit: Option<String>,
    },
    /// An uploaded source (`sha256:<hex>`), and the commit it is.
    Upload { id: String, commit: Option<String> },
}

/// A build to queue.
#[derive(Debug, Clone)]
pub struct NewBuild {
    pub source: NewSource,
    /// Dockerfile path inside the source (default `Dockerfile`).
    pub dockerfile: Option<String>,
    pub build_args: BTreeMap<String, String>,
    /// Deploy the image when the build succeeds.
    pub deploy: Option<DeploySpec>,
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

async fn enqueue(st: &AppState, row: &BuildRow, app: &str) -> Result<()> {
    st.db.insert_build(row).await?;
    st.builds_wake.notify_one();
    st.build_events.send_modify(|n| *n += 1);
    tracing::info!(build = %row.id, app, source = %meta_schema::repo::redact_url(&row.source_url), "build queued");
    Ok(())
}

/// Queue a build of `project`'s repository at `commit` for `app`, with the
/// project's Dockerfile path and build arguments (the GitHub webhook).
pub async fn queue_git_build(
    st: &AppState,
    app: &AppRow,
    project: &crate::db::ProjectRow,
    commit: &str,
    deploy: Option<DeploySpec>,
) -> Result<BuildRow> {
    check_commit("commit", commit)?;
    let dockerfile = if project.dockerfile.is_empty() {
        "Dockerfile".to_string()
    } else {
        project.dockerfile.clone()
    };
    let row = new_row(
        &app.id,
        "git",
        project.repo.clone(),
        String::new(),
        commit.into(),
        dockerfile,
        project.build_args.clone(),
        deploy.as_ref(),
    );
    enqueue(st, &row, &app.name).await?;
    Ok(row)
}

/// Queue a build for app `app_id`.
pub async fn queue(st: &AppState, caller: &Caller, app_id: &str, b: NewBuild) -> Result<BuildRow> {
    let app = super::access::app(st, caller, app_id).await?;
    let builder = builder_of(st)?.clone();
    let (kind, url, branch, commit) = match b.source {
        NewSource::Git {
            url,
            branch,
            commit,
        } => {
            if !builder::source::looks_like_git_url(&url) {
                return Err(AppError::BadRequest(format!(
                    "source.git.url {url:?} is not a git URL (https://, ssh://, git@host:path or file://)"
                )));
            }
            // A file:// URL (or a path) reads the captain's own disk:
            // admins only.
            let remote = ["https://", "http://", "ssh://", "git://", "git@"]
                .iter()
                .any(|p| url.starts_with(p));
            if !remote && caller.kind != TokenKind::Admin {
                return Err(AppError::Forbidden(format!(
                    "source.git.url {url:?} is on the captain's own disk; only an admin token may build it"
                )));
            }
            let commit = commit.unwrap_or_default();
            check_commit("commit", &commit)?;
            let branch = branch.unwrap_or_default();
            if branch.starts_with('-')
                || branch.contains("..")
                || branch.contains(char::is_whitespace)
            {
                return Err(AppError::BadRequest(format!(
                    "source.git.branch {branch:?} is not a branch name"
                )));
            }
            ("git", url, branch, commit)
        }
        NewSource::Upload { id, commit } => {
            let digest: zw_util::Sha256Digest = id.parse().map_err(|_| {
                AppError::BadRequest(format!(
                    "source.upload {id:?} is not the sha256:<hex> id POST /v1/sources answered"
                ))
            })?;
            let key = source_key(&digest);
            match builder.store().exists(&key).await {
                Ok(true) => {}
                Ok(false) => return Err(AppError::not_found("uploaded source", id)),
                Err(e) => {
                    return Err(AppError::internal(
                        format!("looking up the source in {}", builder.store().describe()),
                        e,
                    ));
                }
            }
            let commit = commit.unwrap_or_default();
            check_commit("source_commit", &commit)?;
            ("upload", key, String::new(), commit)
        }
    };
    let dockerfile = b.dockerfile.unwrap_or_else(|| "Dockerfile".into());
    if dockerfile.is_empty() || Path::new(&dockerfile).is_absolute() {
        return Err(AppError::BadRequest(format!(
            "dockerfile {dockerfile:?} must be a path inside the source"
        )));
    }
    for k in b.build_args.keys() {
        if k.is_empty() || k.contains('=') {
            return Err(AppError::BadRequest(format!(
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
    enqueue(st, &row, &app.name).await?;
    Ok(row)
}

/// How long a build's claim lasts without renewal; renewed every third of
/// it while the build runs.
pub const CLAIM: Duration = Duration::from_secs(10);

/// Claim due builds and run them one after the other until none is due;
/// returns the ids run. Any captain's workers claim from the one queue; a
/// claim is renewed while its build runs, and a build whose claim could not
/// be renewed (another captain took it over) is abandoned at once, so a
/// build never runs twice at the same time.
pub async fn run_due(st: &AppState, builder: &Builder) -> Result<Vec<String>> {
    let mut ran = Vec::new();
    let by = st.leader.id.clone();
    let claim_ms = i64::try_from(CLAIM.as_millis()).unwrap_or(10_000);
    let max = i64::from(st.config.build_max_attempts.max(1));
    while let Some(b) = st.db.claim_build(&by, claim_ms, max).await? {
        let id = b.id.clone();
        st.build_events.send_modify(|n| *n += 1);
        let renew = async {
            loop {
                tokio::time::sleep(CLAIM / 3).await;
                match st.db.renew_build_claim(&id, &by, claim_ms).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!(build = %id, error = %e, "renewing a build claim"),
                }
            }
        };
        tokio::select! {
            // Cancel-safe: a build cut short is retried by whoever claims it.
            _ = execute(st, builder, b) => {}
            _ = renew => {
                tracing::error!(build = %id, "the build's claim was taken over: abandoned here");
            }
        }
        st.build_events.send_modify(|n| *n += 1);
        ran.push(id);
    }
    Ok(ran)
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

pub async fn execute(st: &AppState, builder: &Builder, b: BuildRow) {
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
        Ok(built) => {
            if let Some(e) = &built.not_deployed {
                log.builder(format!("not deployed: {e}"));
            } else if let Some(d) = &built.deployment {
                log.builder(format!("deployment {d} created"));
            }
            Outcome::Done {
                status: "succeeded",
                error: built
                    .not_deployed
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                digest: built.digest,
                deployment_id: built.deployment.unwrap_or_default(),
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
        Outcome::Retry { at, error } => {
            st.db
                .requeue_build(&id, &st.leader.id, *at, error, now)
                .await
        }
        Outcome::Done {
            status,
            error,
            digest,
            deployment_id,
        } => {
            tracing::info!(build = %id, status, image = %digest, "build finished");
            st.db
                .finish_build(
                    &id,
                    &st.leader.id,
                    status,
                    error,
                    digest,
                    deployment_id,
                    now,
                )
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

/// What one successful attempt made.
struct Built {
    digest: String,
    /// The deployment made from the image, when one was asked for.
    deployment: Option<String>,
    /// Why a requested deployment was refused.
    not_deployed: Option<AppError>,
}

/// One attempt: source, build, image row, deployment.
async fn run_attempt(
    st: &AppState,
    builder: &Builder,
    b: &BuildRow,
    work: &Path,
    log: &dyn builder::LogSink,
) -> Result<Built, BuildError> {
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
    st.db
        .add_image_project(&art.digest, &app.project_id)
        .await
        .map_err(|e| BuildError::infra(Stage::Upload, "recording the image's project", e))?;
    if b.deploy_spec.is_empty() {
        return Ok(Built {
            digest: art.digest,
            deployment: None,
            not_deployed: None,
        });
    }
    let spec: DeploySpec = serde_json::from_str(&b.deploy_spec).unwrap_or_default();
    let spec = inherit(st, &app, spec).await;
    let req = NewRelease {
        image_digest: Some(art.digest.clone()),
        commit: (!b.source_commit.is_empty()).then(|| b.source_commit.clone()),
        port: spec.port,
        env_vars: spec.env_vars,
        min_instances: spec.min_instances,
        health_check_path: spec.health_check_path,
    };
    Ok(match super::deploy::create_release(st, &app, req).await {
        Ok(d) => Built {
            digest: art.digest,
            deployment: Some(d.id),
            not_deployed: None,
        },
        Err(e) => Built {
            digest: art.digest,
            deployment: None,
            not_deployed: Some(e),
        },
    })
}

/// Fills what `spec` leaves open from the app's active release, so a new
/// image keeps the app's port, env vars, instance count and health check
/// (as `zw deploy` does when it copies the active release).
async fn inherit(st: &AppState, app: &AppRow, mut spec: DeploySpec) -> DeploySpec {
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
