//! Validation of pushes to the meta repository (the `pre-receive` hook).
//!
//! The captain writes `scripts/pre-receive.sh` into the bare repository's
//! `hooks/`; the script execs the command in `ZW_PRE_RECEIVE_HOOK`, which
//! in production is `zw captain-pre-receive` (a hidden subcommand calling
//! [`main_entry`]). Objects are read with `meta_schema::pushed`, which
//! honours the quarantine environment of a push in progress.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use meta_schema::layout::MetaPath;
use meta_schema::pushed;
use meta_schema::repo::DEFAULT_BRANCH;

/// The hook script, installed into every meta repository the captain serves.
pub const PRE_RECEIVE_SCRIPT: &str = include_str!("../../scripts/pre-receive.sh");

/// The environment variable the hook script execs (one argument per line).
pub const HOOK_ENV: &str = "ZW_PRE_RECEIVE_HOOK";
/// Who pushes: `admin` or `user` (set by `githttp` for the hook).
pub const PUSHER_ROLE_ENV: &str = "ZW_PUSHER_ROLE";
/// For a user: the apps (`env/app`, comma-separated) of their projects.
pub const PUSHER_APPS_ENV: &str = "ZW_PUSHER_APPS";
/// For a user: the ids of their projects, comma-separated.
pub const PUSHER_PROJECTS_ENV: &str = "ZW_PUSHER_PROJECTS";
/// With a meta remote: its URL; an accepted push is pushed on to it first.
pub const META_REMOTE_ENV: &str = "ZW_META_REMOTE";
/// Largest file a push may add or change.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most bytes of new or changed files one push may bring.
pub const MAX_PUSH_BYTES: usize = 16 << 20;

/// Who pushes, and what they may write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pusher {
    /// Anything valid.
    Admin,
    /// Release files, `app.pb` and the secrets file of these apps
    /// (`(env, app)`); the documents of these projects.
    User {
        apps: BTreeSet<(String, String)>,
        projects: BTreeSet<String>,
    },
}

impl Pusher {
    /// From the hook's environment (set by the captain); none = refuse.
    pub fn from_env() -> Option<Pusher> {
        let list = |k: &str| -> Vec<String> {
            std::env::var(k)
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        match std::env::var(PUSHER_ROLE_ENV).ok()?.as_str() {
            "admin" => Some(Pusher::Admin),
            "user" => Some(Pusher::User {
                apps: list(PUSHER_APPS_ENV)
                    .into_iter()
                    .filter_map(|a| {
                        a.split_once('/')
                            .map(|(e, a)| (e.to_string(), a.to_string()))
                    })
                    .collect(),
                projects: list(PUSHER_PROJECTS_ENV).into_iter().collect(),
            }),
            _ => None,
        }
    }

    /// May this pusher make `change` (added, changed or removed) to `path`?
    fn may(&self, path: &str, change: Change) -> Result<(), String> {
        let mp = MetaPath::parse(path);
        if mp.is_none() && !meta_schema::layout::OTHER_FILES.contains(&path) {
            return Err("it is not part of the meta layout".into());
        }
        let Pusher::User { apps, projects } = self else {
            return Ok(());
        };
        let own_app = |env: &str, app: &str| apps.contains(&(env.to_string(), app.to_string()));
        match (mp, change) {
            (Some(MetaPath::Release { env, app, .. }), Change::Added | Change::Removed)
                if own_app(&env, &app) =>
            {
                Ok(())
            }
            (Some(MetaPath::App { env, app }), Change::Changed)
            | (Some(MetaPath::Secrets { env, app }), _)
                if own_app(&env, &app) =>
            {
                Ok(())
            }
            (Some(MetaPath::Project { id }), Change::Changed) if projects.contains(&id) => Ok(()),
            (Some(MetaPath::Release { .. }), _)
            | (Some(MetaPath::App { .. }), _)
            | (Some(MetaPath::Secrets { .. }), _)
            | (Some(MetaPath::Project { .. }), _) => Err(
                "a user may add or remove release files, and change the app and secrets files, of apps of their own projects only (and change their own projects' documents)".into(),
            ),
            (Some(_), _) | (None, _) => Err(
                "deployment files, env.pb, nodes/, channels/ and the repository's own files are written by the captain (and admins) only".into(),
            ),
        }
    }
}

/// What a push does to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Added,
    Changed,
    Removed,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("reading the pushed refs from stdin")]
    Stdin(#[source] std::io::Error),
    #[error("malformed pre-receive line {0:?}")]
    Line(String),
    #[error("only refs/heads/{DEFAULT_BRANCH} may be pushed to the meta repository, not {0}")]
    Ref(String),
    #[error("deleting refs/heads/{DEFAULT_BRANCH} is refused")]
    Delete,
    #[error("{path} was changed; releases and deployments are immutable (add a new file instead)")]
    Immutable { path: String },
    #[error("you may not change {path}: {reason}")]
    NotAllowed { path: String, reason: String },
    #[error("{path} is {size} bytes; a meta file is at most {MAX_FILE_BYTES}")]
    FileTooLarge { path: String, size: usize },
    #[error("the push changes {size} bytes of files; at most {MAX_PUSH_BYTES} per push")]
    PushTooLarge { size: usize },
    #[error(
        "the push is not from a caller the captain knows (no pusher in the hook's environment)"
    )]
    NoPusher,
    #[error("commit {commit} would make the meta repository invalid:\n{errors}")]
    Invalid {
        commit: String,
        errors: meta_schema::validate::ValidationErrors,
    },
    #[error("reading the pushed commits")]
    Repo(#[source] meta_schema::repo::RepoError),
    #[error("the meta remote refused the push (fetch and try again)")]
    Remote(#[source] meta_schema::repo::RepoError),
    #[error("installing the pre-receive hook at {path}")]
    Install {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn is_zero(id: &str) -> bool {
    id.bytes().all(|b| b == b'0')
}

/// Validate the refs of a push (the `pre-receive` lines on `stdin`) in the
/// repository `git_dir`: only `main`, no deletion, immutable files
/// unchanged, every changed path one the pusher may write, files and the
/// push within their size limits, and the new tree valid by `meta_schema`.
pub fn pre_receive(stdin: impl BufRead, git_dir: &Path, pusher: &Pusher) -> Result<(), HookError> {
    for line in stdin.lines() {
        let line = line.map_err(HookError::Stdin)?;
        if line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [old, new, refname] = parts.as_slice() else {
            return Err(HookError::Line(line));
        };
        if *refname != format!("refs/heads/{DEFAULT_BRANCH}") {
            return Err(HookError::Ref(refname.to_string()));
        }
        if is_zero(new) {
            return Err(HookError::Delete);
        }
        let new_files = pushed::list_tree(git_dir, new).map_err(HookError::Repo)?;
        let old_files = if is_zero(old) {
            Default::default()
        } else {
            pushed::list_tree(git_dir, old).map_err(HookError::Repo)?
        };
        let mut changed = Vec::new();
        for (path, oid) in &old_files {
            match new_files.get(path) {
                None => changed.push((path.clone(), Change::Removed)),
                Some(n) if n != oid => {
                    if MetaPath::parse(path).is_some_and(|p| p.is_immutable()) {
                        return Err(HookError::Immutable { path: path.clone() });
                    }
                    changed.push((path.clone(), Change::Changed));
                }
                Some(_) => {}
            }
        }
        for path in new_files.keys() {
            if !old_files.contains_key(path) {
                changed.push((path.clone(), Change::Added));
            }
        }
        for (path, change) in &changed {
            pusher
                .may(path, *change)
                .map_err(|reason| HookError::NotAllowed {
                    path: path.clone(),
                    reason,
                })?;
        }
        let tree = pushed::read_blobs(git_dir, &new_files).map_err(HookError::Repo)?;
        let mut total = 0;
        for (path, change) in &changed {
            if *change == Change::Removed {
                continue;
            }
            let size = tree.get(path).map_or(0, |b| b.len());
            if size > MAX_FILE_BYTES {
                return Err(HookError::FileTooLarge {
                    path: path.clone(),
                    size,
                });
            }
            total += size;
        }
        if total > MAX_PUSH_BYTES {
            return Err(HookError::PushTooLarge { size: total });
        }
        meta_schema::validate::validate_tree(&tree).map_err(|errors| HookError::Invalid {
            commit: new.to_string(),
            errors,
        })?;
        if let Some(remote) = std::env::var(META_REMOTE_ENV)
            .ok()
            .filter(|r| !r.is_empty())
        {
            pushed::push_through(git_dir, &remote, new, DEFAULT_BRANCH)
                .map_err(HookError::Remote)?;
        }
    }
    Ok(())
}

/// Entry point of the hook process (`zw captain-pre-receive`): validates
/// stdin against `$GIT_DIR` (or the working directory, where git runs
/// hooks), prints the reason of a refusal, returns the exit code.
pub fn main_entry() -> i32 {
    let git_dir = std::env::var_os("GIT_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_else(|| PathBuf::from("."));
    let result = match Pusher::from_env() {
        Some(pusher) => pre_receive(std::io::stdin().lock(), &git_dir, &pusher),
        None => Err(HookError::NoPusher),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("zeitwork: push refused: {}", zw_util::ErrorChain(&e));
            1
        }
    }
}

/// Write the hook script into `git_dir/hooks/pre-receive` (mode 0755).
pub fn install(git_dir: &Path) -> Result<(), HookError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = git_dir.join("hooks");
    let path = dir.join("pre-receive");
    let io = |source| HookError::Install {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    std::fs::write(&path, PRE_RECEIVE_SCRIPT).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    Ok(())
}
