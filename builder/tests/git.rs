//! Git sources: a real repository served over file:// (gix spawns
//! git-upload-pack), at the default branch, a branch and a commit.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use builder::{
    BuildError, BuildOptions, GitRev, InputError, LocalStore, MemoryLog, Source, fetch_image,
};
use common::*;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=zw",
            "-c",
            "user.email=zw@example.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn git_sources_at_branch_and_commit() {
    require_tools(&["git", "buildah", "mkfs.ext4", "debugfs"]);
    let tmp = tempfile::tempdir().unwrap();
    let repo = busybox_context(
        &tmp.path().join("repo"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY version.txt /version.txt\nCMD [\"/bin/busybox\", \"cat\", \"/version.txt\"]\n",
    );
    std::fs::write(repo.join("version.txt"), "one\n").unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let first = git(&repo, &["rev-parse", "HEAD"]);
    std::fs::write(repo.join("version.txt"), "two\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "two"]);
    git(&repo, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(repo.join("version.txt"), "feature\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "feature"]);
    git(&repo, &["checkout", "-q", "main"]);
    let url = format!("file://{}", repo.display());

    let store = Arc::new(LocalStore::new(tmp.path().join("store")));
    let (builder, _) = buildah_builder(store.clone(), &tmp.path().join("data"));
    let cache = tmp.path().join("cache");
    let mut versions = Vec::new();
    for rev in [
        GitRev::DefaultBranch,
        GitRev::Branch("feature".into()),
        GitRev::Commit(first.clone()),
    ] {
        let a = builder
            .build(
                Source::Git {
                    url: url.clone(),
                    rev: rev.clone(),
                },
                BuildOptions::default(),
                &MemoryLog::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("{rev}: {e}"));
        let (dir, _) = fetch_image(store.as_ref(), &a.digest, &cache)
            .await
            .unwrap();
        versions.push(
            debugfs(&dir.join("rootfs.ext4"), "cat /version.txt")
                .trim()
                .to_string(),
        );
    }
    assert_eq!(versions, vec!["two", "feature", "one"]);

    // The same tree from git and from the local directory gives the same image.
    let from_git = builder
        .build(
            Source::Git {
                url: url.clone(),
                rev: GitRev::DefaultBranch,
            },
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap();
    let from_dir = builder
        .build(
            Source::Local(repo.clone()),
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap();
    assert_eq!(from_git.digest, from_dir.digest);
    assert!(!from_dir.uploaded);

    let err = builder
        .build(
            Source::Git {
                url: url.clone(),
                rev: GitRev::Branch("no-such-branch".into()),
            },
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Input(
                InputError::GitRevisionNotFound { .. } | InputError::GitUnreachable { .. }
            )
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("no-such-branch") || err.to_string().contains("not found"),
        "{err}"
    );
}
