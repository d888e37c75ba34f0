//! Reading a push in progress, from a `pre-receive` hook. git keeps the
//! pushed objects in a quarantine directory that only its environment
//! (`GIT_OBJECT_DIRECTORY`, `GIT_ALTERNATE_OBJECT_DIRECTORIES`) names, and
//! gix does not read those: so this runs the `git` binary, which does.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::MetaTree;
use crate::repo::{RepoError, Result};

fn git_out(git_dir: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .args(args)
        .output()
        .map_err(|e| RepoError::GitCommand {
            op: args.join(" "),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(RepoError::GitCommand {
            op: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// path -> blob id of every file of `commit`, pushed or not.
pub fn list_tree(git_dir: &Path, commit: &str) -> Result<BTreeMap<String, String>> {
    let out = git_out(git_dir, &["ls-tree", "-r", "-z", "--full-tree", commit])?;
    let mut files = BTreeMap::new();
    for entry in out.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((meta, path)) = entry.split_once('\t') else {
            return Err(RepoError::GitCommand {
                op: "ls-tree".into(),
                detail: format!("unexpected line {entry:?}"),
            });
        };
        let mut parts = meta.split(' ');
        let (_mode, kind, oid) = (parts.next(), parts.next(), parts.next());
        if kind == Some("blob")
            && let Some(oid) = oid
        {
            files.insert(path.to_string(), oid.to_string());
        }
    }
    Ok(files)
}

/// The bytes of `files` (from [`list_tree`]) with one `git cat-file --batch`.
pub fn read_blobs(git_dir: &Path, files: &BTreeMap<String, String>) -> Result<MetaTree> {
    let git_err = |e: std::io::Error| RepoError::GitCommand {
        op: "cat-file --batch".into(),
        detail: e.to_string(),
    };
    let mut child = Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(git_err)?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| git_err(std::io::Error::other("no stdin")))?;
    let ids: Vec<String> = files.values().cloned().collect();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for id in ids {
            writeln!(stdin, "{id}")?;
        }
        Ok(())
    });
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| git_err(std::io::Error::other("no stdout")))?;
    let mut r = std::io::BufReader::new(stdout);
    let mut tree = MetaTree::new();
    for path in files.keys() {
        let mut header = String::new();
        r.read_line(&mut header).map_err(git_err)?;
        let size: usize = header
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| RepoError::GitCommand {
                op: "cat-file --batch".into(),
                detail: format!("unexpected header {header:?} for {path}"),
            })?;
        let mut buf = vec![0u8; size + 1];
        std::io::Read::read_exact(&mut r, &mut buf).map_err(git_err)?;
        buf.truncate(size);
        tree.insert(path.clone(), buf);
    }
    writer
        .join()
        .map_err(|_| git_err(std::io::Error::other("writer thread panicked")))?
        .map_err(git_err)?;
    child.wait().map_err(git_err)?;
    Ok(tree)
}

/// From a pre-receive hook: push the pushed commit `new` on to `branch` of
/// the remote at `url` (without force), so that a push to a captain whose
/// meta repository is a remote lands there first; the local ref moves only
/// when this succeeds. git reads the quarantined objects.
pub fn push_through(git_dir: &Path, url: &str, new: &str, branch: &str) -> Result<()> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .args([
            "push",
            "--quiet",
            "--",
            url,
            &format!("{new}:refs/heads/{branch}"),
        ])
        .output()
        .map_err(|e| RepoError::GitCommand {
            op: "push".into(),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RepoError::Refused {
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
