//! Access to a meta repository with gix.
//!
//! Gaps of gix (0.90) and how they are covered:
//! - no push and no server side: [`MetaRepo::push`] runs the `git` binary,
//!   and serving (smart HTTP) is `git http-backend` in the captain;
//! - no revert command: [`MetaRepo::revert`] is a three-way `merge_trees`
//!   (ancestor = the reverted commit's tree, ours = the branch head,
//!   theirs = the reverted commit's parent) plus a commit;
//! - fetching from `file://` spawns `git-upload-pack`; the HTTP transport
//!   is blocking. Every method here blocks: call it from async code through
//!   `tokio::task::spawn_blocking`.
//!
//! Commits are made without a worktree: blobs and trees are written
//! straight into the object database and the branch is moved with a
//! compare-and-swap on its previous value. A commit that loses a race is
//! rebuilt on the new head and tried again, so two writers never lose each
//! other's change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use gix::ObjectId;
use gix::bstr::ByteSlice;

use crate::MetaTree;
use crate::layout::{self, MetaPath};
use crate::validate::{ValidationErrors, validate_tree};

/// The branch every component follows unless told otherwise.
pub const DEFAULT_BRANCH: &str = "main";

const README: &str = include_str!("../assets/README.meta.md");
const GITATTRIBUTES: &str = include_str!("../assets/gitattributes");

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "{path} already exists in the meta repository; meta files are immutable, a change is a new file"
    )]
    AlreadyExists { path: String },
    #[error("{path} is immutable (releases and deployments are never replaced)")]
    Immutable { path: String },
    #[error("{path} does not exist in the meta repository")]
    NotFound { path: String },
    #[error("the change would make the meta repository invalid: {0}")]
    Invalid(ValidationErrors),
    #[error(
        "fenced: a leader of epoch {written} wrote the meta repository after this leader (epoch {mine}) lost its lease"
    )]
    Fenced { mine: u64, written: u64 },
    #[error("branch {branch} does not exist")]
    NoBranch { branch: String },
    #[error("commit {commit} not found")]
    NoCommit { commit: String },
    #[error("commit {commit} cannot be reverted: {reason}")]
    CannotRevert { commit: String, reason: String },
    #[error(
        "gave up committing to {branch} after {attempts} attempts: the branch kept moving or stayed locked"
    )]
    Contended { branch: String, attempts: u32 },
    #[error("git {op} failed: {detail}")]
    GitCommand { op: String, detail: String },
    /// The remote refused the push because it does not descend from its
    /// branch (someone else pushed first): fetch, re-apply, push again.
    #[error("the push was refused: the remote moved on ({detail})")]
    Rejected { detail: String },
    /// The remote (its pre-receive hook) refused what was pushed.
    #[error("the remote refused the push: {detail}")]
    Refused { detail: String },
    #[error("{op} at {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}")]
    Gix {
        op: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn gix_err<E: std::error::Error + Send + Sync + 'static>(
    op: impl Into<String>,
) -> impl FnOnce(E) -> RepoError {
    let op = op.into();
    move |e| RepoError::Gix {
        op,
        source: Box::new(e),
    }
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// Git's id of a blob holding `bytes` (what `git hash-object` prints): a
/// release names its secrets file by it (`secrets_blob`).
pub fn blob_id(bytes: &[u8]) -> String {
    gix::objs::compute_hash(gix::hash::Kind::Sha1, gix::objs::Kind::Blob, bytes)
        .expect("sha1 of an in-memory buffer cannot fail")
        .to_string()
}

/// A set of file changes applied atomically in one commit.
#[derive(Debug, Clone, Default)]
pub struct ChangeSet {
    /// New files; refused if the path exists.
    pub add: Vec<(String, Vec<u8>)>,
    /// Whole-file replacement of a mutable document (env.pb, nodes,
    /// channels, secrets); refused for releases and deployments.
    pub replace: Vec<(String, Vec<u8>)>,
    /// Files to delete; refused if absent.
    pub remove: Vec<String>,
    /// Written by a leader of this epoch: refused when the base's
    /// `cluster/leader.pb` holds a higher one, else that file is set to it.
    pub fence: Option<(u64, String)>,
}

impl ChangeSet {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn add(mut self, path: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        self.add.push((path.into(), bytes.into()));
        self
    }
    pub fn replace(mut self, path: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        self.replace.push((path.into(), bytes.into()));
        self
    }
    pub fn remove(mut self, path: impl Into<String>) -> Self {
        self.remove.push(path.into());
        self
    }
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.replace.is_empty() && self.remove.is_empty()
    }
    /// Fence the commit with the leader's lease `epoch` (captain `who`).
    pub fn fenced(mut self, epoch: u64, who: impl Into<String>) -> Self {
        self.fence = Some((epoch, who.into()));
        self
    }
}

/// Who a commit is by.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub email: String,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            name: "zeitwork captain".into(),
            email: "captain@zeitwork.invalid".into(),
        }
    }
}

/// Which commits [`MetaRepo::log`] lists.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub env: Option<String>,
    pub app: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub commit: String,
    pub parents: Vec<String>,
    /// Commit time, unix seconds.
    pub time: i64,
    pub author: String,
    pub message: String,
    /// Paths added, changed or removed relative to the first parent.
    pub paths: Vec<String>,
}

/// One commit of a branch's history ([`MetaRepo::history`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub id: String,
    /// `name <email>`.
    pub author: String,
    /// Commit time, unix seconds.
    pub time: i64,
    /// The first line of the message.
    pub subject: String,
}

/// How to reach a remote: its URL and, for smart HTTP, a header to send
/// (`Authorization: Bearer ...`). The header goes to git through its
/// environment, never its arguments (which other users can read).
#[derive(Clone, Default)]
pub struct Remote {
    pub url: String,
    pub header: Option<String>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &redact_url(&self.url))
            .field("header", &self.header.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Remote {
    pub fn new(url: impl Into<String>) -> Remote {
        Remote {
            url: url.into(),
            header: None,
        }
    }

    /// A remote reached with `Authorization: Bearer <token>`.
    pub fn with_bearer(url: impl Into<String>, token: &str) -> Remote {
        Remote {
            url: url.into(),
            header: Some(format!("Authorization: Bearer {token}")),
        }
    }

    /// `git` with this remote's header in its environment.
    fn git(&self) -> Command {
        let mut c = Command::new("git");
        c.env("GIT_TERMINAL_PROMPT", "0");
        if let Some(h) = &self.header {
            c.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", h);
        }
        c
    }
}

/// A URL with any password (`https://user:secret@host/...`) replaced, for
/// logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let slash = if rest.contains('/') { "/" } else { "" };
            format!("{scheme}://{user}:<redacted>@{host}{slash}{path}")
        }
        None => url.to_string(),
    }
}

/// `text` (an error or log line about `url`) with `url`'s password
/// removed wherever it appears: as part of the URL or on its own (git and
/// curl quote URLs in their own ways).
pub fn redact_url_in(text: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => text.replace(url, &redact_url(url)).replace(p, "<redacted>"),
        None => text.to_string(),
    }
}

/// A meta repository on disk (bare or not).
#[derive(Clone)]
pub struct MetaRepo {
    path: PathBuf,
    repo: gix::ThreadSafeRepository,
}

impl std::fmt::Debug for MetaRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaRepo")
            .field("path", &self.path)
            .finish()
    }
}

impl MetaRepo {
    /// Create a bare meta repository with a first commit on `main` holding a
    /// README and the `.gitattributes` that make `git log -p` readable.
    pub fn init_bare(path: &Path) -> Result<MetaRepo> {
        std::fs::create_dir_all(path).map_err(|source| RepoError::Io {
            op: "creating the meta repository directory",
            path: path.into(),
            source,
        })?;
        let repo =
            gix::init_bare(path).map_err(gix_err(format!("initialising {}", path.display())))?;
        // A meta repository only ever moves forward.
        let config = repo.path().join("config");
        let mut text = std::fs::read_to_string(&config).map_err(|source| RepoError::Io {
            op: "reading git config",
            path: config.clone(),
            source,
        })?;
        text.push_str("[receive]\n\tdenyNonFastForwards = true\n\tdenyDeletes = true\n");
        std::fs::write(&config, text).map_err(|source| RepoError::Io {
            op: "writing git config",
            path: config.clone(),
            source,
        })?;
        std::fs::write(
            repo.path().join("HEAD"),
            format!("ref: refs/heads/{DEFAULT_BRANCH}\n"),
        )
        .map_err(|source| RepoError::Io {
            op: "writing HEAD",
            path: repo.path().join("HEAD"),
            source,
        })?;
        let meta = MetaRepo::open(path)?;
        meta.commit(
            DEFAULT_BRANCH,
            &ChangeSet::new()
                .add("README.md", README)
                .add(".gitattributes", GITATTRIBUTES),
            "Initialise meta repository",
        )?;
        Ok(meta)
    }

    pub fn open(path: &Path) -> Result<MetaRepo> {
        let repo = gix::open(path).map_err(gix_err(format!(
            "opening meta repository {}",
            path.display()
        )))?;
        Ok(MetaRepo {
            path: path.to_path_buf(),
            repo: repo.into_sync(),
        })
    }

    /// Create an empty bare repository (no commit, no settings of a meta
    /// repository): a clone to fetch into.
    pub fn init_empty_bare(path: &Path) -> Result<MetaRepo> {
        std::fs::create_dir_all(path).map_err(|source| RepoError::Io {
            op: "creating a repository directory",
            path: path.into(),
            source,
        })?;
        let repo =
            gix::init_bare(path).map_err(gix_err(format!("initialising {}", path.display())))?;
        std::fs::write(
            repo.path().join("HEAD"),
            format!("ref: refs/heads/{DEFAULT_BRANCH}\n"),
        )
        .map_err(|source| RepoError::Io {
            op: "writing HEAD",
            path: repo.path().join("HEAD"),
            source,
        })?;
        MetaRepo::open(path)
    }

    /// Open the repository at `path`, creating it (bare) if absent.
    pub fn open_or_init(path: &Path) -> Result<MetaRepo> {
        if path.join("HEAD").exists() || path.join(".git").exists() {
            MetaRepo::open(path)
        } else {
            MetaRepo::init_bare(path)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The git directory (the repository itself when bare).
    pub fn git_dir(&self) -> PathBuf {
        self.repo.to_thread_local().path().to_path_buf()
    }

    fn local(&self) -> gix::Repository {
        let mut r = self.repo.to_thread_local();
        r.object_cache_size_if_unset(8 * 1024 * 1024);
        r
    }

    /// Commit id a full or short ref name points at (`main`,
    /// `refs/remotes/origin/main`).
    pub fn resolve_ref(&self, name: &str) -> Result<Option<String>> {
        let repo = self.local();
        let full = if name.starts_with("refs/") {
            name.to_string()
        } else {
            format!("refs/heads/{name}")
        };
        Ok(ref_target(&repo, &full)?.map(|id| id.to_string()))
    }

    /// Head commit of `branch`, if the branch exists.
    pub fn head(&self, branch: &str) -> Result<Option<String>> {
        self.resolve_ref(&format!("refs/heads/{branch}"))
    }

    /// Apply `changes` on top of `branch` as one commit by the default
    /// identity.
    pub fn commit(&self, branch: &str, changes: &ChangeSet, message: &str) -> Result<String> {
        self.commit_by(branch, changes, message, &Identity::default())
    }

    /// Apply `changes` on top of `branch` as one commit: atomic, validated,
    /// retried on top of a concurrent commit.
    pub fn commit_by(
        &self,
        branch: &str,
        changes: &ChangeSet,
        message: &str,
        who: &Identity,
    ) -> Result<String> {
        let repo = self.local();
        let refname = format!("refs/heads/{branch}");
        self.with_cas_retry(
            &repo,
            branch,
            |repo, head| {
                let base_tree = match head {
                    Some(c) => commit_tree(repo, c)?,
                    None => ObjectId::empty_tree(repo.object_hash()),
                };
                let existing = flat_tree(repo, base_tree)?;
                for (path, _) in &changes.add {
                    if existing.contains_key(path.as_str()) {
                        return Err(RepoError::AlreadyExists { path: path.clone() });
                    }
                }
                for (path, _) in &changes.replace {
                    if MetaPath::parse(path).is_some_and(|p| p.is_immutable()) {
                        return Err(RepoError::Immutable { path: path.clone() });
                    }
                }
                for path in &changes.remove {
                    if !existing.contains_key(path.as_str()) {
                        return Err(RepoError::NotFound { path: path.clone() });
                    }
                }
                let mut fence_file = Vec::new();
                if let Some((mine, who)) = &changes.fence {
                    let written = match existing.get(layout::FENCE_PATH) {
                        Some(oid) => {
                            let blob = repo
                                .find_blob(*oid)
                                .map_err(gix_err("reading the leader fence"))?;
                            <crate::pb::LeaderFence as prost::Message>::decode(&blob.data[..])
                                .map(|f| f.epoch)
                                .unwrap_or(0)
                        }
                        None => 0,
                    };
                    if written > *mine {
                        return Err(RepoError::Fenced {
                            mine: *mine,
                            written,
                        });
                    }
                    if written < *mine || !existing.contains_key(layout::FENCE_PATH) {
                        fence_file.push((
                            layout::FENCE_PATH.to_string(),
                            prost::Message::encode_to_vec(&crate::pb::LeaderFence {
                                epoch: *mine,
                                captain: who.clone(),
                                updated_at: crate::now_millis(),
                            }),
                        ));
                    }
                }
                let mut editor = repo.edit_tree(base_tree).map_err(gix_err("editing tree"))?;
                for (path, bytes) in changes
                    .add
                    .iter()
                    .chain(changes.replace.iter())
                    .chain(fence_file.iter())
                {
                    let blob = repo
                        .write_blob(bytes)
                        .map_err(gix_err("writing blob"))?
                        .detach();
                    editor
                        .upsert(path.as_str(), gix::object::tree::EntryKind::Blob, blob)
                        .map_err(gix_err(format!("adding {path}")))?;
                }
                for path in &changes.remove {
                    editor
                        .remove(path.as_str())
                        .map_err(gix_err(format!("removing {path}")))?;
                }
                let tree = editor.write().map_err(gix_err("writing tree"))?.detach();
                let files = read_tree(repo, tree)?;
                validate_tree(&files).map_err(RepoError::Invalid)?;
                Ok((tree, message.to_string()))
            },
            who,
            &refname,
        )
    }

    /// Build a tree with `build` on the current head and move the branch to
    /// a commit of it, retrying while another writer wins the race.
    fn with_cas_retry(
        &self,
        repo: &gix::Repository,
        branch: &str,
        mut build: impl FnMut(&gix::Repository, Option<ObjectId>) -> Result<(ObjectId, String)>,
        who: &Identity,
        refname: &str,
    ) -> Result<String> {
        const ATTEMPTS: u32 = 200;
        for attempt in 0..ATTEMPTS {
            let head = ref_target(repo, refname)?;
            let (tree, message) = build(repo, head)?;
            let sig = signature(who);
            let mut buf = gix::date::parse::TimeBuf::default();
            let sig_ref = sig.to_ref(&mut buf);
            match repo.commit_as(sig_ref, sig_ref, refname, &message, tree, head) {
                Ok(id) => return Ok(id.to_string()),
                Err(e) => {
                    tracing::debug!(branch, attempt, error = %e, "meta commit lost a race, retrying");
                    // Jittered backoff: lock holders finish in well under a
                    // millisecond; spread retries so writers don't collide
                    // in lock step.
                    let jitter = (rand_u64() % 4000) + u64::from(attempt.min(20)) * 500;
                    std::thread::sleep(Duration::from_micros(jitter));
                }
            }
        }
        Err(RepoError::Contended {
            branch: branch.to_string(),
            attempts: ATTEMPTS,
        })
    }

    /// Every file of `commit` (hex id or ref name).
    pub fn tree_at(&self, commit: &str) -> Result<MetaTree> {
        let repo = self.local();
        let id = resolve(&repo, commit)?;
        let tree = commit_tree(&repo, id)?;
        read_tree(&repo, tree)
    }

    /// Commits of `branch`, newest first, touching the filtered paths.
    pub fn log(&self, branch: &str, filter: &LogFilter) -> Result<Vec<LogEntry>> {
        let repo = self.local();
        let Some(head) = ref_target(&repo, &format!("refs/heads/{branch}"))? else {
            return Err(RepoError::NoBranch {
                branch: branch.to_string(),
            });
        };
        let prefix = |p: &str| -> bool {
            match MetaPath::parse(p) {
                Some(MetaPath::Release { env, app, .. })
                | Some(MetaPath::Deployment { env, app, .. })
                | Some(MetaPath::App { env, app })
                | Some(MetaPath::Secrets { env, app }) => {
                    filter.env.as_ref().is_none_or(|e| *e == env)
                        && filter.app.as_ref().is_none_or(|a| *a == app)
                }
                Some(MetaPath::Env { env }) => {
                    filter.app.is_none() && filter.env.as_ref().is_none_or(|e| *e == env)
                }
                _ => filter.env.is_none() && filter.app.is_none(),
            }
        };
        let walk = repo
            .rev_walk([head])
            .sorting(gix::revision::walk::Sorting::ByCommitTime(
                Default::default(),
            ))
            .all()
            .map_err(gix_err("walking history"))?;
        let mut out = Vec::new();
        // In a linear history, a commit's parent is the next commit walked:
        // its flattened tree is kept so each tree is flattened once.
        let mut parent_flat: Option<(ObjectId, BTreeMap<String, ObjectId>)> = None;
        for info in walk {
            let info = info.map_err(gix_err("walking history"))?;
            let commit = repo
                .find_commit(info.id)
                .map_err(gix_err("reading commit"))?;
            let parents: Vec<ObjectId> = commit.parent_ids().map(|p| p.detach()).collect();
            let tree_id = commit
                .tree_id()
                .map_err(gix_err("reading commit"))?
                .detach();
            let new = match parent_flat.take() {
                Some((id, flat)) if id == tree_id => flat,
                _ => flat_tree(&repo, tree_id)?,
            };
            let parent_tree = parents
                .first()
                .map(|p| commit_tree(&repo, *p))
                .transpose()?;
            let old = match parent_tree {
                Some(t) => flat_tree(&repo, t)?,
                None => BTreeMap::new(),
            };
            let mut paths: Vec<String> = new
                .iter()
                .filter(|(k, v)| old.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .chain(old.keys().filter(|k| !new.contains_key(*k)).cloned())
                .collect();
            paths.sort();
            parent_flat = parent_tree.map(|t| (t, old));
            if (filter.env.is_some() || filter.app.is_some()) && !paths.iter().any(|p| prefix(p)) {
                continue;
            }
            let decoded = commit.decode().map_err(gix_err("decoding commit"))?;
            let author = decoded.author().map_err(gix_err("decoding commit"))?;
            out.push(LogEntry {
                commit: info.id.to_string(),
                parents: parents.iter().map(|p| p.to_string()).collect(),
                time: author.time().map(|t| t.seconds).unwrap_or(0),
                author: format!("{} <{}>", author.name, author.email),
                message: decoded.message.to_str_lossy().trim_end().to_string(),
                paths,
            });
        }
        Ok(out)
    }

    /// Is `ancestor` reachable from `descendant` (or equal to it)?
    pub fn is_ancestor(&self, ancestor: &str, descendant: &str) -> Result<bool> {
        let repo = self.local();
        let a = resolve(&repo, ancestor)?;
        let d = resolve(&repo, descendant)?;
        if a == d {
            return Ok(true);
        }
        let base = repo
            .merge_base(a, d)
            .map_err(gix_err("computing merge base"))?;
        Ok(base.is_some_and(|b| b.detach() == a))
    }

    /// Move `branch` to `new` if it is at `expected` now (`None`: the branch
    /// must not exist). Compare-and-swap: false when it was elsewhere.
    pub fn set_branch(&self, branch: &str, new: &str, expected: Option<&str>) -> Result<bool> {
        use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
        let repo = self.local();
        let new = resolve(&repo, new)?;
        let expected = match expected {
            Some(e) => {
                PreviousValue::MustExistAndMatch(gix::refs::Target::Object(resolve(&repo, e)?))
            }
            None => PreviousValue::MustNotExist,
        };
        let name = format!("refs/heads/{branch}");
        let edit = RefEdit {
            change: Change::Update {
                log: LogChange {
                    mode: RefLog::AndReference,
                    force_create_reflog: false,
                    message: "zeitwork: move branch".into(),
                },
                expected,
                new: gix::refs::Target::Object(new),
            },
            name: name
                .as_str()
                .try_into()
                .map_err(gix_err(format!("ref name {name}")))?,
            deref: false,
        };
        match repo.edit_reference(edit) {
            Ok(_) => Ok(true),
            Err(e) => {
                let now = ref_target(&repo, &name)?;
                if now == Some(new) {
                    return Ok(true);
                }
                tracing::debug!(branch, error = %e, "branch moved meanwhile");
                Ok(false)
            }
        }
    }

    /// Up to `n` commits reachable from `head`, newest first (by commit
    /// time), after skipping `skip`.
    pub fn history(&self, head: &str, skip: usize, n: usize) -> Result<Vec<CommitInfo>> {
        let repo = self.local();
        let head = resolve(&repo, head)?;
        let walk = repo
            .rev_walk([head])
            .sorting(gix::revision::walk::Sorting::ByCommitTime(
                Default::default(),
            ))
            .all()
            .map_err(gix_err("walking history"))?;
        let mut out = Vec::new();
        for info in walk.skip(skip).take(n) {
            let info = info.map_err(gix_err("walking history"))?;
            let commit = repo
                .find_commit(info.id)
                .map_err(gix_err("reading commit"))?;
            let decoded = commit.decode().map_err(gix_err("decoding commit"))?;
            let author = decoded.author().map_err(gix_err("decoding commit"))?;
            let message = decoded.message.to_str_lossy();
            out.push(CommitInfo {
                id: info.id.to_string(),
                author: format!("{} <{}>", author.name, author.email),
                time: decoded
                    .committer()
                    .ok()
                    .and_then(|c| c.time().ok())
                    .map(|t| t.seconds)
                    .unwrap_or(0),
                subject: message.lines().next().unwrap_or("").to_string(),
            });
        }
        Ok(out)
    }

    /// The bytes of `path` at `commit` (hex id or ref name), if present.
    pub fn blob_at(&self, commit: &str, path: &str) -> Result<Option<Vec<u8>>> {
        let repo = self.local();
        let id = resolve(&repo, commit)?;
        let tree = repo
            .find_tree(commit_tree(&repo, id)?)
            .map_err(gix_err("reading tree"))?;
        let Some(entry) = tree
            .lookup_entry_by_path(path)
            .map_err(gix_err(format!("looking up {path}")))?
        else {
            return Ok(None);
        };
        if !entry.mode().is_blob() {
            return Ok(None);
        }
        let blob = repo
            .find_blob(entry.oid())
            .map_err(gix_err(format!("reading {path}")))?;
        Ok(Some(blob.data.clone()))
    }

    /// Apply `changes` on top of `branch` of `remote` and push, without
    /// force: fetch, commit on the fetched head, push; when the push is
    /// rejected because someone else pushed first, fetch again and re-apply
    /// on the new head (the compare-and-swap of [`MetaRepo::commit_by`],
    /// across machines). The commit is built on a scratch branch
    /// (`zw-push-<branch>`): the local `branch` moves only to a commit the
    /// remote accepted. Returns the pushed commit.
    pub fn commit_and_push(
        &self,
        remote: &Remote,
        branch: &str,
        changes: &ChangeSet,
        message: &str,
        who: &Identity,
    ) -> Result<String> {
        const ATTEMPTS: u32 = 20;
        let scratch = format!("zw-push-{branch}");
        for attempt in 0..ATTEMPTS {
            match self.fetch_remote(remote, branch)? {
                Some(fetched) => self.force_branch(&scratch, &fetched)?,
                // A new remote (nothing pushed yet): the first commit is a
                // root commit; a push of another captain's first commit
                // wins the race like any other and this one re-applies.
                None if self.head(branch)?.is_none() => self.delete_branch(&scratch)?,
                None => {
                    return Err(RepoError::NoBranch {
                        branch: format!("{branch} on {}", redact_url(&remote.url)),
                    });
                }
            }
            let c = self.commit_by(&scratch, changes, message, who)?;
            match self.push_ref(remote, &scratch, branch) {
                Ok(()) => {
                    let local = self.head(branch)?;
                    self.set_branch(branch, &c, local.as_deref())?;
                    return Ok(c);
                }
                Err(RepoError::Rejected { detail }) => {
                    tracing::debug!(attempt, %detail, "push lost a race; re-applying on the new head");
                    std::thread::sleep(Duration::from_millis(
                        10 + rand_u64() % (50 * u64::from(attempt + 1)),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Err(RepoError::Contended {
            branch: branch.to_string(),
            attempts: ATTEMPTS,
        })
    }

    /// Remove `branch` (nothing when it does not exist).
    pub fn delete_branch(&self, branch: &str) -> Result<()> {
        use gix::refs::transaction::{Change, PreviousValue, RefEdit, RefLog};
        let repo = self.local();
        let name = format!("refs/heads/{branch}");
        if ref_target(&repo, &name)?.is_none() {
            return Ok(());
        }
        let edit = RefEdit {
            change: Change::Delete {
                expected: PreviousValue::Any,
                log: RefLog::AndReference,
            },
            name: name
                .as_str()
                .try_into()
                .map_err(gix_err(format!("ref name {name}")))?,
            deref: false,
        };
        repo.edit_reference(edit)
            .map_err(gix_err(format!("deleting {name}")))?;
        Ok(())
    }

    /// Point `branch` at `commit`, wherever it was.
    pub fn force_branch(&self, branch: &str, commit: &str) -> Result<()> {
        let now = self.head(branch)?;
        if self.set_branch(branch, commit, now.as_deref())? {
            Ok(())
        } else {
            Err(RepoError::Contended {
                branch: branch.to_string(),
                attempts: 1,
            })
        }
    }

    /// Fetch `branch` of `remote` (its header, if any, sent with every
    /// request) into `refs/remotes/origin/<branch>`; the fetched head.
    pub fn fetch_remote(&self, remote: &Remote, branch: &str) -> Result<Option<String>> {
        if remote.header.is_none() {
            return self.fetch(&remote.url, branch);
        }
        let out = remote
            .git()
            .arg("--git-dir")
            .arg(self.git_dir())
            .args([
                "fetch",
                "--quiet",
                "--no-tags",
                "--",
                &remote.url,
                &format!("+refs/heads/{branch}:refs/remotes/origin/{branch}"),
            ])
            .output()
            .map_err(|source| RepoError::Io {
                op: "running git fetch",
                path: self.path.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(RepoError::GitCommand {
                op: format!("fetch from {}", redact_url(&remote.url)),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        self.resolve_ref(&format!("refs/remotes/origin/{branch}"))
    }

    /// Push `branch` to `remote` without force.
    pub fn push_remote(&self, remote: &Remote, branch: &str) -> Result<()> {
        self.push_ref(remote, branch, branch)
    }

    /// Push local branch `from` to branch `to` of `remote`, without force.
    pub fn push_ref(&self, remote: &Remote, from: &str, to: &str) -> Result<()> {
        let out = remote
            .git()
            .arg("--git-dir")
            .arg(self.git_dir())
            .args([
                "push",
                "--quiet",
                "--porcelain",
                "--",
                &remote.url,
                &format!("refs/heads/{from}:refs/heads/{to}"),
            ])
            .output()
            .map_err(|source| RepoError::Io {
                op: "running git push",
                path: self.path.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let both = format!("{stdout}\n{stderr}");
        if both.contains("non-fast-forward")
            || both.contains("fetch first")
            || both.contains("[rejected]") && both.contains("(stale info)")
        {
            return Err(RepoError::Rejected {
                detail: stderr.trim().to_string(),
            });
        }
        let detail: Vec<&str> = both
            .lines()
            .map(|l| l.trim_start_matches("remote:").trim())
            .filter(|l| {
                !l.is_empty()
                    && !l.starts_with("To ")
                    && !l.starts_with("error: failed to push")
                    && !l.starts_with("Done")
                    && !l.starts_with('!')
            })
            .collect();
        Err(RepoError::Refused {
            detail: detail.join("; "),
        })
    }

    /// Fetch `branch` of `url` (file://, http(s)://, or a path) into
    /// `refs/remotes/origin/<branch>` and return the fetched head. Forced:
    /// the caller decides with [`MetaRepo::is_ancestor`] whether to follow.
    pub fn fetch(&self, url: &str, branch: &str) -> Result<Option<String>> {
        let repo = self.local();
        let spec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
        let remote = repo
            .remote_at(url)
            .map_err(gix_err(format!("remote {url}")))?
            .with_refspecs(Some(spec.as_str()), gix::remote::Direction::Fetch)
            .map_err(gix_err("refspec"))?;
        let conn = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(gix_err(format!("connecting to {url}")))?;
        let prepared = conn
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(gix_err(format!("fetching from {url}")))?;
        // An empty remote (a new meta repository: nothing pushed yet) or
        // one without the branch has nothing to fetch; that is no error.
        if prepared.ref_map().is_missing_required_mapping() {
            return Ok(None);
        }
        prepared
            .receive(gix::progress::Discard, &AtomicBool::new(false))
            .map_err(gix_err(format!("fetching from {url}")))?;
        self.resolve_ref(&format!("refs/remotes/origin/{branch}"))
    }

    /// Push `branch` to `url` with the git binary (gix cannot push).
    pub fn push(&self, url: &str, branch: &str) -> Result<()> {
        self.push_remote(&Remote::new(url), branch)
    }

    /// Undo `commit` on top of `branch` with a new commit.
    pub fn revert(&self, branch: &str, commit: &str) -> Result<String> {
        self.revert_by(branch, commit, &Identity::default())
    }

    pub fn revert_by(&self, branch: &str, commit: &str, who: &Identity) -> Result<String> {
        let repo = self.local();
        let target = resolve(&repo, commit)?;
        let c = repo
            .find_commit(target)
            .map_err(gix_err("reading commit"))?;
        let parents: Vec<ObjectId> = c.parent_ids().map(|p| p.detach()).collect();
        let parent = match parents.as_slice() {
            [p] => *p,
            [] => {
                return Err(RepoError::CannotRevert {
                    commit: commit.into(),
                    reason: "it is the first commit".into(),
                });
            }
            _ => {
                return Err(RepoError::CannotRevert {
                    commit: commit.into(),
                    reason: "it is a merge commit".into(),
                });
            }
        };
        let reverted_tree = commit_tree(&repo, target)?;
        let parent_tree = commit_tree(&repo, parent)?;
        let subject = c
            .message()
            .map(|m| m.summary().to_str_lossy().into_owned())
            .unwrap_or_default();
        let refname = format!("refs/heads/{branch}");
        let message = format!("Revert \"{subject}\"\n\nThis reverts commit {target}.\n");
        self.with_cas_retry(
            &repo,
            branch,
            |repo, head| {
                let Some(head) = head else {
                    return Err(RepoError::NoBranch {
                        branch: branch.to_string(),
                    });
                };
                let ours = commit_tree(repo, head)?;
                let options = repo
                    .tree_merge_options()
                    .map_err(gix_err("merge options"))?;
                let labels = gix::merge::blob::builtin_driver::text::Labels {
                    ancestor: Some("reverted".into()),
                    current: Some("head".into()),
                    other: Some("parent".into()),
                };
                let mut outcome = repo
                    .merge_trees(reverted_tree, ours, parent_tree, labels, options)
                    .map_err(gix_err("merging trees"))?;
                if outcome.has_unresolved_conflicts(gix::merge::tree::TreatAsUnresolved::default())
                {
                    return Err(RepoError::CannotRevert {
                        commit: commit.into(),
                        reason: "later commits conflict with it".into(),
                    });
                }
                let tree = outcome
                    .tree
                    .write()
                    .map_err(gix_err("writing tree"))?
                    .detach();
                validate_tree(&read_tree(repo, tree)?).map_err(RepoError::Invalid)?;
                Ok((tree, message.clone()))
            },
            who,
            &refname,
        )
    }
}

fn signature(who: &Identity) -> gix::actor::Signature {
    gix::actor::Signature {
        name: who.name.as_str().into(),
        email: who.email.as_str().into(),
        time: gix::date::Time::now_local_or_utc(),
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

fn ref_target(repo: &gix::Repository, full: &str) -> Result<Option<ObjectId>> {
    match repo
        .try_find_reference(full)
        .map_err(gix_err(format!("reading {full}")))?
    {
        None => Ok(None),
        Some(mut r) => Ok(Some(
            r.peel_to_id()
                .map_err(gix_err(format!("peeling {full}")))?
                .detach(),
        )),
    }
}

fn resolve(repo: &gix::Repository, spec: &str) -> Result<ObjectId> {
    if let Ok(id) = ObjectId::from_hex(spec.as_bytes()) {
        if repo.find_object(id).is_ok() {
            return Ok(id);
        }
        return Err(RepoError::NoCommit {
            commit: spec.into(),
        });
    }
    let id = repo
        .rev_parse_single(spec)
        .map_err(|_| RepoError::NoCommit {
            commit: spec.into(),
        })?;
    Ok(id.detach())
}

fn commit_tree(repo: &gix::Repository, commit: ObjectId) -> Result<ObjectId> {
    let c = repo.find_commit(commit).map_err(|_| RepoError::NoCommit {
        commit: commit.to_string(),
    })?;
    Ok(c.tree_id()
        .map_err(gix_err("reading commit tree"))?
        .detach())
}

/// Path -> blob id of every blob in a tree.
fn flat_tree(repo: &gix::Repository, tree: ObjectId) -> Result<BTreeMap<String, ObjectId>> {
    let tree = repo.find_tree(tree).map_err(gix_err("reading tree"))?;
    let mut rec = gix::traverse::tree::Recorder::default();
    tree.traverse()
        .breadthfirst(&mut rec)
        .map_err(gix_err("walking tree"))?;
    Ok(rec
        .records
        .into_iter()
        .filter(|e| e.mode.is_blob())
        .map(|e| (e.filepath.to_str_lossy().into_owned(), e.oid))
        .collect())
}

fn read_tree(repo: &gix::Repository, tree: ObjectId) -> Result<MetaTree> {
    let mut out = MetaTree::new();
    for (path, oid) in flat_tree(repo, tree)? {
        let blob = repo
            .find_blob(oid)
            .map_err(gix_err(format!("reading {path}")))?;
        out.insert(path, blob.data.clone());
    }
    Ok(out)
}

/// The commit `branch` (or HEAD when none) of the repository at `url`
/// points at now (`git ls-remote`); `None` when it has no such branch.
pub fn remote_commit(url: &str, branch: Option<&str>) -> Result<Option<String>> {
    let refname = branch.map_or_else(|| "HEAD".to_string(), |b| format!("refs/heads/{b}"));
    let out = Remote::new(url)
        .git()
        .args(["ls-remote", "--", url, &refname])
        .output()
        .map_err(|source| RepoError::Io {
            op: "running git ls-remote",
            path: PathBuf::from(url),
            source,
        })?;
    if !out.status.success() {
        return Err(RepoError::GitCommand {
            op: format!("ls-remote {}", redact_url(url)),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().find_map(|l| {
        let (sha, name) = l.split_once('\t')?;
        (name == refname).then(|| sha.to_string())
    }))
}

/// The HEAD commit of the git work tree at `dir` when it has no change
/// (tracked or untracked), else `None` (not a repository, no commit, or
/// dirty): what a build of that directory can honestly record.
pub fn clean_head(dir: &Path) -> Option<String> {
    let run = |args: &[&str]| {
        Command::new("git")
            .current_dir(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match (run(&["rev-parse", "HEAD"]), run(&["status", "--porcelain"])) {
        (Some(head), Some(dirty)) if dirty.is_empty() => Some(head),
        _ => None,
    }
}

/// The paths of a tree that are meta files (for listing).
pub fn meta_paths(tree: &MetaTree) -> impl Iterator<Item = (&str, MetaPath)> {
    tree.iter()
        .filter_map(|(p, _)| MetaPath::parse(p).map(|m| (p, m)))
}

/// Re-export for callers that build paths.
pub use layout::{deployment_path, release_path};
