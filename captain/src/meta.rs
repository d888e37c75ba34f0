//! The captain's side of the meta repository: writing desired state as
//! commits, following an external origin, and the mirror that indexes the
//! repository into the database.
//!
//! The repository is the truth; the database is an index of it. Each sync
//! reads the branch head, and (when the head moved since the last sync)
//! rebuilds projects, apps and release rows from the head's tree, marks
//! releases no longer present (reverted or removed) and records every
//! commit in `meta_commits`. Syncs are serialised and idempotent: running
//! one twice, or after wiping the database, gives the same rows.
//!
//! How projects live in the repository: a project *is* a git source (repo
//! URL + branch). Each Release records it in `source`, the project id is a
//! hash of (repo, branch) and the app -> project link is rebuilt from the
//! newest release of the app. A project or app without any release is not
//! desired state (nothing runs for it) and lives only in the database.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use meta_schema::MetaTree;
use meta_schema::pb;
use meta_schema::repo::{ChangeSet, DEFAULT_BRANCH, MetaRepo, RepoError};
use sha2::{Digest, Sha256};

use crate::db::{AppRow, CommitRow, Db, DbError, DeploymentRow, ProjectRow};
use api_types::Status;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("meta repository: {op}")]
    Repo {
        op: String,
        #[source]
        source: RepoError,
    },
    #[error("meta repository task panicked or was cancelled")]
    Join(#[from] tokio::task::JoinError),
    #[error("git {op} failed: {detail}")]
    Git { op: String, detail: String },
    #[error("the meta repository head {commit} is invalid: {errors}")]
    InvalidHead {
        commit: String,
        errors: meta_schema::validate::ValidationErrors,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl MetaError {
    /// The repository error underneath, if any.
    pub fn repo_error(&self) -> Option<&RepoError> {
        match self {
            MetaError::Repo { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn repo_err(op: impl Into<String>) -> impl FnOnce(RepoError) -> MetaError {
    let op = op.into();
    move |source| MetaError::Repo { op, source }
}

/// Where the meta repository is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// A bare repository on this machine (created if absent).
    Local(PathBuf),
    /// An external git server the captain follows as origin; the captain
    /// keeps a bare clone at the path and pushes its commits there.
    Remote { url: String, clone: PathBuf },
}

impl MetaLocation {
    /// `--meta-remote` (a git remote every captain commits to and follows),
    /// else `--meta-repo` as given: a URL (scheme://) or a path; none =
    /// `D/meta.git`.
    pub fn of(remote: Option<&str>, repo: Option<&str>, data_dir: &Path) -> MetaLocation {
        match remote {
            Some(url) => MetaLocation::Remote {
                url: url.to_string(),
                clone: data_dir.join("meta-remote.git"),
            },
            None => MetaLocation::from_arg(repo, data_dir),
        }
    }

    /// `--meta-repo` as given: a URL (scheme://) or a path; none = `D/meta.git`.
    pub fn from_arg(arg: Option<&str>, data_dir: &Path) -> MetaLocation {
        match arg {
            Some(a) if a.contains("://") => MetaLocation::Remote {
                url: a.to_string(),
                clone: data_dir.join("meta-origin.git"),
            },
            Some(a) => MetaLocation::Local(PathBuf::from(a)),
            None => MetaLocation::Local(data_dir.join("meta.git")),
        }
    }
}

/// Where the captain is in following its origin (a meta remote).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginState {
    /// The origin's head at the last fetch.
    pub fetched: Option<String>,
    /// A head of the origin the captain refused to follow, and why (it is
    /// invalid, or does not descend from the last valid head, which keeps
    /// serving).
    pub refused: Option<(String, String)>,
    /// Why the last fetch failed, if it did.
    pub error: Option<String>,
}

/// The meta repository as the captain uses it.
pub struct MetaStore {
    repo: MetaRepo,
    origin: Option<String>,
    origin_state: Mutex<OriginState>,
    envs: Mutex<BTreeSet<String>>,
    /// Serialises fetch-commit-push against an origin, and mirror syncs.
    write_lock: tokio::sync::Mutex<()>,
    sync_lock: tokio::sync::Mutex<()>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, MetaError> + Send + 'static,
) -> Result<T, MetaError> {
    tokio::task::spawn_blocking(f).await?
}

impl MetaStore {
    /// Open (or create) the repository of `location`. Blocking.
    pub fn open(location: &MetaLocation) -> Result<MetaStore, MetaError> {
        let (repo, origin) = match location {
            MetaLocation::Local(path) => (
                MetaRepo::open_or_init(path)
                    .map_err(repo_err(format!("opening {}", path.display())))?,
                None,
            ),
            MetaLocation::Remote { url, clone } => {
                let repo = if clone.join("HEAD").exists() {
                    MetaRepo::open(clone)
                } else {
                    MetaRepo::init_empty_bare(clone)
                }
                .map_err(repo_err(format!("opening {}", clone.display())))?;
                (repo, Some(url.clone()))
            }
        };
        let store = MetaStore {
            repo,
            origin,
            origin_state: Mutex::new(OriginState::default()),
            envs: Mutex::new(BTreeSet::new()),
            write_lock: tokio::sync::Mutex::new(()),
            sync_lock: tokio::sync::Mutex::new(()),
        };
        if store.origin.is_some() {
            store.follow_origin_blocking()?;
        }
        Ok(store)
    }

    pub fn git_dir(&self) -> PathBuf {
        self.repo.git_dir()
    }

    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// Where following the origin stands.
    pub fn origin_state(&self) -> OriginState {
        self.origin_state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn set_origin_state(&self, f: impl FnOnce(&mut OriginState)) {
        if let Ok(mut s) = self.origin_state.lock() {
            f(&mut s);
        }
    }

    /// Fetch the origin and fast-forward the local branch to its head, if
    /// that head is valid and descends from the local one; else refuse it
    /// (recorded in [`MetaStore::origin_state`]) and keep the last valid
    /// head. Blocking.
    fn follow_origin_blocking(&self) -> Result<bool, MetaError> {
        let Some(url) = &self.origin else {
            return Ok(false);
        };
        let fetched = match self.repo.fetch(url, DEFAULT_BRANCH) {
            Ok(f) => f,
            Err(e) => {
                let msg = zw_util::error_chain(&e);
                self.set_origin_state(|s| s.error = Some(msg));
                return Err(MetaError::Repo {
                    op: format!("fetching {}", meta_schema::repo::redact_url(url)),
                    source: e,
                });
            }
        };
        self.set_origin_state(|s| {
            s.fetched = fetched.clone();
            s.error = None;
        });
        let Some(fetched) = fetched else {
            return Ok(false);
        };
        let local = self
            .repo
            .head(DEFAULT_BRANCH)
            .map_err(repo_err("reading head"))?;
        if local.as_deref() == Some(fetched.as_str()) {
            self.set_origin_state(|s| s.refused = None);
            return Ok(false);
        }
        let refuse = |reason: String| {
            tracing::warn!(origin = %fetched, %reason, "not following the meta repository origin; the last valid head keeps serving");
            crate::metrics::origin_refused(true);
            self.set_origin_state(|s| s.refused = Some((fetched.clone(), reason)));
            Ok(false)
        };
        if let Some(l) = &local
            && !self
                .repo
                .is_ancestor(l, &fetched)
                .map_err(repo_err("comparing heads"))?
        {
            return refuse(format!("it does not descend from the last valid head {l}"));
        }
        let tree = self
            .repo
            .tree_at(&fetched)
            .map_err(repo_err("reading the origin's head"))?;
        if let Err(errors) = meta_schema::validate::validate_tree(&tree) {
            return refuse(format!("it is invalid: {errors}"));
        }
        let moved = self
            .repo
            .set_branch(DEFAULT_BRANCH, &fetched, local.as_deref())
            .map_err(repo_err("fast-forwarding to the origin"))?;
        crate::metrics::origin_refused(false);
        self.set_origin_state(|s| s.refused = None);
        Ok(moved)
    }

    /// Follow the origin (no-op for a local repository).
    pub async fn follow_origin(self: &std::sync::Arc<Self>) -> Result<bool, MetaError> {
        if self.origin.is_none() {
            return Ok(false);
        }
        let _g = self.write_lock.lock().await;
        let me = self.clone();
        blocking(move || me.follow_origin_blocking()).await
    }

    pub async fn head(self: &std::sync::Arc<Self>) -> Result<Option<String>, MetaError> {
        let me = self.clone();
        blocking(move || {
            me.repo
                .head(DEFAULT_BRANCH)
                .map_err(repo_err("reading head"))
        })
        .await
    }

    pub async fn tree(self: &std::sync::Arc<Self>, commit: String) -> Result<MetaTree, MetaError> {
        let me = self.clone();
        blocking(move || {
            me.repo
                .tree_at(&commit)
                .map_err(repo_err(format!("reading tree of {commit}")))
        })
        .await
    }

    /// Commit `changes` to the branch (and push it to the origin when
    /// following one). Returns the commit id.
    pub async fn commit(
        self: &std::sync::Arc<Self>,
        changes: ChangeSet,
        message: String,
    ) -> Result<String, MetaError> {
        let me = self.clone();
        if self.origin.is_none() {
            let c = blocking(move || {
                me.repo
                    .commit(DEFAULT_BRANCH, &changes, &message)
                    .map_err(repo_err("committing"))
            })
            .await?;
            crate::metrics::commit_written();
            return Ok(c);
        }
        let _g = self.write_lock.lock().await;
        let c = blocking(move || {
            let url = me.origin.clone().unwrap_or_default();
            me.repo
                .commit_and_push(
                    &meta_schema::repo::Remote::new(url.clone()),
                    DEFAULT_BRANCH,
                    &changes,
                    &message,
                    &meta_schema::repo::Identity::default(),
                )
                .map_err(|source| MetaError::Repo {
                    op: format!(
                        "committing and pushing to {}",
                        meta_schema::repo::redact_url(&url)
                    ),
                    source,
                })
        })
        .await?;
        crate::metrics::commit_written();
        Ok(c)
    }

    /// Holds off the mirror: a change to the database rows the mirror also
    /// writes (deleting an app) is made under it, so a sync of an older
    /// head cannot bring the rows back.
    pub async fn mirror_guard(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.sync_lock.lock().await
    }

    /// An env whose `env.pb` is known to exist (cached by
    /// `app::envs::ensure_env`).
    pub fn env_known(&self, env: &str) -> bool {
        self.envs.lock().map(|s| s.contains(env)).unwrap_or(false)
    }

    pub fn mark_env_known(&self, env: &str) {
        if let Ok(mut s) = self.envs.lock() {
            s.insert(env.to_string());
        }
    }

    /// Release files of one app at the head.
    pub async fn release_paths(
        self: &std::sync::Arc<Self>,
        env: &str,
        app: &str,
    ) -> Result<Vec<String>, MetaError> {
        let Some(h) = self.head().await? else {
            return Ok(vec![]);
        };
        let prefix = format!("{}/releases/", meta_schema::layout::app_dir(env, app));
        Ok(self
            .tree(h)
            .await?
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .map(|(p, _)| p.to_string())
            .collect())
    }
}

/// The row of a project document.
pub fn project_row(p: &pb::Project) -> ProjectRow {
    let src = p.source.clone().unwrap_or_default();
    let build = p.build.clone().unwrap_or_default();
    ProjectRow {
        id: p.id.clone(),
        name: p.name.clone(),
        repo: src.repo,
        branch: src.branch,
        created_at: p.created_at,
        dockerfile: build.dockerfile,
        build_args: serde_json::to_string(&build.build_args).expect("a map serializes"),
    }
}

/// A new project id: `prj-` and a lower-case ULID.
pub fn new_project_id() -> String {
    format!("prj-{}", meta_schema::new_id().to_ascii_lowercase())
}

/// The id of the project derived from a git source, for apps declared only
/// by their releases (before projects were documents).
pub fn project_id(repo: &str, branch: &str) -> String {
    let h = Sha256::digest(format!("{repo}\n{branch}").as_bytes());
    format!("prj-{}", &hex::encode(h)[..20])
}

/// The id of an app: `<name>.<env>` (both DNS labels).
pub fn app_id(env: &str, name: &str) -> String {
    format!("{name}.{env}")
}

/// A project name for a source seen only in the repository: the last path
/// segment of the repo URL without `.git`, as a DNS label.
pub fn derived_project_name(repo: &str) -> String {
    let last = repo
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("")
        .trim_end_matches(".git")
        .to_ascii_lowercase();
    let cleaned: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cleaned = cleaned
        .trim_matches('-')
        .chars()
        .take(63)
        .collect::<String>();
    if cleaned.is_empty() {
        "unlinked".into()
    } else {
        cleaned
    }
}

/// The status a release row starts with: what its rollouts in the repo say,
/// else `starting` when its image is known, else `pending`.
pub async fn initial_status(
    db: &Db,
    release: &pb::Release,
    rollouts: &[&pb::Deployment],
) -> Result<(Status, String), DbError> {
    if let Some(d) = rollouts
        .iter()
        .filter(|d| d.release.as_ref().is_some_and(|r| r.id == release.id))
        .max_by(|a, b| a.id.cmp(&b.id))
    {
        return Ok(
            match pb::DeploymentState::try_from(d.state).unwrap_or(pb::DeploymentState::Unspecified)
            {
                pb::DeploymentState::Promoted => (Status::Running, String::new()),
                pb::DeploymentState::Failed => (Status::Failed, d.reason.clone()),
                _ => (Status::Starting, String::new()),
            },
        );
    }
    if !release.image_digest.is_empty() && db.image(&release.image_digest).await?.is_some() {
        return Ok((Status::Starting, String::new()));
    }
    Ok((Status::Pending, String::new()))
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub head: Option<String>,
    pub changed: bool,
    pub releases: usize,
    pub commits_indexed: usize,
    pub marked_absent: usize,
}

const MIRROR_HEAD: &str = "mirror_head";
const COMMIT_BATCH: usize = 256;

/// Up to `n` commits reachable from `head`, newest first, after `skip`.
fn commits_batch(
    repo: &MetaRepo,
    head: &str,
    skip: usize,
    n: usize,
) -> Result<Vec<CommitRow>, MetaError> {
    Ok(repo
        .history(head, skip, n)
        .map_err(repo_err("reading history"))?
        .into_iter()
        .map(|c| CommitRow {
            id: c.id,
            author: c.author,
            time: c.time,
            message: c.subject,
        })
        .collect())
}

/// Index the head of the meta repository into the database.
pub async fn sync(store: &std::sync::Arc<MetaStore>, db: &Db) -> Result<SyncReport, MetaError> {
    let _g = store.sync_lock.lock().await;
    // Rows already present need no write: a sync costs what changed. Read
    // them *before* the head: a release the API commits and records after
    // this point is not in this set, so an older head can never mark it
    // absent.
    let present_before: BTreeSet<String> = db.present_deployment_ids().await?.into_iter().collect();
    let apps_before: Vec<String> = db.apps().await?.into_iter().map(|a| a.id).collect();
    let projects_before: Vec<String> = db.projects().await?.into_iter().map(|p| p.id).collect();
    let Some(head) = store.head().await? else {
        return Ok(SyncReport::default());
    };
    if db.setting(MIRROR_HEAD).await?.as_deref() == Some(head.as_str())
        && db.commit_indexed(&head).await?
    {
        return Ok(SyncReport {
            head: Some(head),
            ..Default::default()
        });
    }
    let now = meta_schema::now_millis();
    let tree = store.tree(head.clone()).await?;
    let loaded = meta_schema::validate::load(&tree).map_err(|errors| MetaError::InvalidHead {
        commit: head.clone(),
        errors,
    })?;
    let mut report = SyncReport {
        head: Some(head.clone()),
        changed: true,
        ..Default::default()
    };
    // Projects: their documents, and (for apps declared only by their
    // releases, before projects were documents) one derived from the
    // newest release's source.
    let mut projects_seen = BTreeSet::new();
    for (id, p) in &loaded.projects {
        db.upsert_project(&project_row(p)).await?;
        projects_seen.insert(id.clone());
    }
    let mut app_keys: BTreeSet<&(String, String)> = loaded.apps.keys().collect();
    app_keys.extend(loaded.releases.keys());
    let empty_r = BTreeMap::new();
    let empty_d = BTreeMap::new();
    let mut present = BTreeSet::new();
    let mut apps_seen = BTreeSet::new();
    for key in app_keys {
        let (env, app) = key;
        let releases = loaded.releases.get(key).unwrap_or(&empty_r);
        let aid = app_id(env, app);
        let row = match loaded.apps.get(key) {
            Some(doc) => AppRow {
                id: aid.clone(),
                project_id: doc.project.clone(),
                env: env.clone(),
                name: app.clone(),
                created_at: doc.created_at,
                domains: serde_json::to_string(&doc.domains).expect("a list serializes"),
            },
            None => {
                let Some((_, newest)) = releases.last_key_value() else {
                    continue;
                };
                let src = newest.source.clone().unwrap_or_default();
                let pid = project_id(&src.repo, &src.branch);
                if !projects_seen.contains(&pid) {
                    db.upsert_project(&ProjectRow {
                        id: pid.clone(),
                        name: derived_project_name(&src.repo),
                        repo: src.repo.clone(),
                        branch: src.branch.clone(),
                        created_at: newest.created_at,
                        dockerfile: String::new(),
                        build_args: "{}".into(),
                    })
                    .await?;
                    projects_seen.insert(pid.clone());
                }
                AppRow {
                    id: aid.clone(),
                    project_id: pid,
                    env: env.clone(),
                    name: app.clone(),
                    created_at: releases
                        .first_key_value()
                        .map(|(_, r)| r.created_at)
                        .unwrap_or(now),
                    domains: "[]".into(),
                }
            }
        };
        db.upsert_app(&row).await?;
        apps_seen.insert(aid.clone());
        let rollouts: Vec<&pb::Deployment> = loaded
            .deployments
            .get(key)
            .unwrap_or(&empty_d)
            .values()
            .collect();
        for (id, rel) in releases {
            if present_before.contains(id) {
                present.insert(id.clone());
                continue;
            }
            let (status, reason) = initial_status(db, rel, &rollouts).await?;
            let rsrc = rel.source.clone().unwrap_or_default();
            db.upsert_deployment(&DeploymentRow {
                id: id.clone(),
                app_id: aid.clone(),
                project_id: row.project_id.clone(),
                env: env.clone(),
                app: app.clone(),
                image_digest: rel.image_digest.clone(),
                source_commit: rsrc.commit.clone(),
                min_instances: i64::from(rel.instances()),
                status: status.as_str().to_string(),
                reason,
                present: true,
                commit_id: head.clone(),
                created_at: rel.created_at,
                updated_at: now,
            })
            .await?;
            present.insert(id.clone());
            report.releases += 1;
        }
    }
    // Projects and apps whose documents (and releases) are gone. Only rows
    // that existed before the head was read: a project the API commits and
    // records meanwhile is at a newer head.
    for a in apps_before {
        if !apps_seen.contains(&a) {
            db.delete_app(&a, now).await?;
        }
    }
    for p in projects_before {
        if !projects_seen.contains(&p) {
            db.delete_project(&p).await?;
        }
    }
    for id in present_before {
        if !present.contains(&id) {
            db.set_deployment_present(&id, false, now).await?;
            report.marked_absent += 1;
        }
    }
    // Commits newest first, in batches, until a batch reaches commits
    // indexed before.
    let mut head_time = now / 1000;
    let mut skip = 0usize;
    loop {
        let batch = {
            let me = store.clone();
            let h = head.clone();
            blocking(move || commits_batch(&me.repo, &h, skip, COMMIT_BATCH)).await?
        };
        if batch.is_empty() {
            break;
        }
        skip += batch.len();
        let mut reached_indexed = false;
        for c in &batch {
            if c.id == head {
                head_time = c.time;
            }
            if db.insert_commit(c, now).await? {
                report.commits_indexed += 1;
            } else {
                reached_indexed = true;
            }
        }
        if reached_indexed || batch.len() < COMMIT_BATCH {
            break;
        }
    }
    db.set_setting(MIRROR_HEAD, &head).await?;
    crate::metrics::mirror_synced(now / 1000 - head_time);
    tracing::info!(head = %head, releases = report.releases, commits = report.commits_indexed, absent = report.marked_absent, "meta repository indexed");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_derived_from_the_source() {
        assert_eq!(app_id("production", "web"), "web.production");
        let a = project_id("https://github.com/acme/shop.git", "main");
        assert_eq!(a, project_id("https://github.com/acme/shop.git", "main"));
        assert_ne!(a, project_id("https://github.com/acme/shop.git", "dev"));
        assert!(a.starts_with("prj-") && a.len() == 24);
        assert_eq!(
            derived_project_name("https://github.com/acme/Shop_App.git"),
            "shop-app"
        );
        assert_eq!(derived_project_name("git@github.com:acme/shop.git"), "shop");
        assert_eq!(derived_project_name("/srv/code/api/"), "api");
        assert_eq!(derived_project_name(""), "unlinked");
    }

    #[test]
    fn meta_repo_argument() {
        let d = Path::new("/d");
        assert_eq!(
            MetaLocation::from_arg(None, d),
            MetaLocation::Local("/d/meta.git".into())
        );
        assert_eq!(
            MetaLocation::from_arg(Some("/srv/meta.git"), d),
            MetaLocation::Local("/srv/meta.git".into())
        );
        assert_eq!(
            MetaLocation::from_arg(Some("https://git.example.com/meta.git"), d),
            MetaLocation::Remote {
                url: "https://git.example.com/meta.git".into(),
                clone: "/d/meta-origin.git".into()
            }
        );
    }
}
