//! Validation of pushes to the meta repository (the `pre-receive` hook).
//!
//! The captain writes `scripts/pre-receive.sh` into the bare repository's
//! `hooks/`; the script execs the command in `ZW_PRE_RECEIVE_HOOK`, which
//! in production is `zw captain-pre-receive` (a hidden subcommand calling
//! [`main_entry`]). Objects are read with `meta_schema::pushed`, which
//! honours the quarantine environment of a push in progress.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use meta_schema::layout::MetaPath;
use meta_schema::pushed;
use meta_schema::repo::DEFAULT_BRANCH;

/// The hook script, installed into every meta repository the captain serves.
pub const PRE_RECEIVE_SCRIPT: &str = include_str!("../../scripts/pre-receive.sh");

/// The environment variable the hook script execs (one argument per line).
pub const HOOK_ENV: &str = "ZW_PRE_RECEIVE_HOOK";

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
    #[error("commit {commit} would make the meta repository invalid:\n{errors}")]
    Invalid {
        commit: String,
        errors: meta_schema::validate::ValidationErrors,
    },
    #[error("reading the pushed commits")]
    Repo(#[source] meta_schema::repo::RepoError),
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
/// unchanged, and the new tree valid by `meta_schema`.
pub fn pre_receive(stdin: impl BufRead, git_dir: &Path) -> Result<(), HookError> {
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
        if !is_zero(old) {
            let old_files = pushed::list_tree(git_dir, old).map_err(HookError::Repo)?;
            for (path, oid) in &old_files {
                let immutable = MetaPath::parse(path).is_some_and(|p| p.is_immutable());
                if immutable && new_files.get(path).is_some_and(|n| n != oid) {
                    return Err(HookError::Immutable { path: path.clone() });
                }
            }
        }
        let tree = pushed::read_blobs(git_dir, &new_files).map_err(HookError::Repo)?;
        meta_schema::validate::validate_tree(&tree).map_err(|errors| HookError::Invalid {
            commit: new.to_string(),
            errors,
        })?;
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
    match pre_receive(std::io::stdin().lock(), &git_dir) {
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
