//! The meta repository library against real git repositories: gix for our
//! side, the `git` binary for what a person does in a clone.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use meta_schema::layout::{env_path, release_path};
use meta_schema::pb;
use meta_schema::repo::{ChangeSet, LogFilter, MetaRepo, RepoError};
use meta_schema::{desired::desired_state, new_id, now_millis};
use prost::Message;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=Dev", "-c", "user.email=dev@example.com"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn env_file(name: &str) -> Vec<u8> {
    pb::Env {
        name: name.into(),
        domains: vec!["localhost".into()],
        ..Default::default()
    }
    .encode_to_vec()
}

fn release(env: &str, app: &str, tag: &str) -> (String, Vec<u8>) {
    let id = new_id();
    let r = pb::Release {
        id: id.clone(),
        app: app.into(),
        env: env.into(),
        image_digest: format!("sha256:{}", "a".repeat(64)),
        env_vars: [("VERSION".to_string(), tag.to_string())].into(),
        created_at: now_millis(),
        ..Default::default()
    };
    (release_path(env, app, &id), r.encode_to_vec())
}

fn active_version(repo: &MetaRepo, commit: &str) -> String {
    let tree = repo.tree_at(commit).unwrap();
    let state = desired_state(&tree, now_millis()).unwrap();
    let rel = state
        .app("prod", "web")
        .unwrap()
        .active_release
        .as_ref()
        .unwrap();
    rel.env_vars["VERSION"].clone()
}

fn new_repo(dir: &Path) -> MetaRepo {
    let repo = MetaRepo::init_bare(&dir.join("meta.git")).unwrap();
    repo.commit(
        "main",
        &ChangeSet::new().add(env_path("prod"), env_file("prod")),
        "env prod",
    )
    .unwrap();
    repo
}

#[test]
fn rollback_by_plain_git_revert_in_a_clone() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = new_repo(tmp.path());
    let mut release_commits = Vec::new();
    for v in ["v1", "v2", "v3"] {
        let (path, bytes) = release("prod", "web", v);
        release_commits.push(
            repo.commit(
                "main",
                &ChangeSet::new().add(path, bytes),
                &format!("release {v}"),
            )
            .unwrap(),
        );
    }
    assert_eq!(active_version(&repo, "main"), "v3");

    // A person clones, reverts the commit that added v3, pushes back.
    let clone = tmp.path().join("clone");
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            repo.path().to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    git(&clone, &["revert", "--no-edit", &release_commits[2]]);
    git(&clone, &["push", "-q", "origin", "main"]);

    let head = repo.head("main").unwrap().unwrap();
    assert_ne!(head, release_commits[2]);
    assert_eq!(active_version(&repo, &head), "v2");
    // The log of the app shows the revert on top.
    let log = repo
        .log(
            "main",
            &LogFilter {
                env: None,
                app: Some("web".into()),
            },
        )
        .unwrap();
    assert!(log[0].message.starts_with("Revert"), "{:?}", log[0]);
    assert_eq!(log.len(), 4);
}

#[test]
fn revert_with_gix_merge_trees() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = new_repo(tmp.path());
    let (p1, b1) = release("prod", "web", "v1");
    repo.commit("main", &ChangeSet::new().add(p1, b1), "v1")
        .unwrap();
    let (p2, b2) = release("prod", "web", "v2");
    let c2 = repo
        .commit("main", &ChangeSet::new().add(p2.clone(), b2), "v2")
        .unwrap();
    // An unrelated later commit does not stop the revert.
    let (p3, b3) = release("prod", "api", "a1");
    repo.commit("main", &ChangeSet::new().add(p3.clone(), b3), "api a1")
        .unwrap();

    let reverted = repo.revert("main", &c2).unwrap();
    let tree = repo.tree_at(&reverted).unwrap();
    assert!(!tree.contains(&p2));
    assert!(tree.contains(&p3));
    assert_eq!(active_version(&repo, &reverted), "v1");
    // Reverting the first commit is refused with a reason.
    let first = repo
        .log("main", &LogFilter::default())
        .unwrap()
        .last()
        .unwrap()
        .commit
        .clone();
    assert!(matches!(
        repo.revert("main", &first),
        Err(RepoError::CannotRevert { .. })
    ));
}

#[test]
fn invalid_pb_in_a_commit_is_named_and_desired_state_refuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = new_repo(tmp.path());
    let (good, good_bytes) = release("prod", "web", "v1");
    repo.commit("main", &ChangeSet::new().add(good, good_bytes), "v1")
        .unwrap();

    // Our writer refuses an invalid file.
    let bad_path = release_path("prod", "web", &new_id());
    let err = repo
        .commit(
            "main",
            &ChangeSet::new().add(bad_path.clone(), b"\xff\xff garbage".to_vec()),
            "bad",
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RepoError::Invalid(_)), "{err}");
    assert!(msg.contains(&bad_path), "{msg}");

    // A person commits one anyway with plain git: validation names it, and
    // desired_state of that commit is an error, not a partial state.
    let clone = tmp.path().join("clone");
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            repo.path().to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    let full = clone.join(&bad_path);
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    std::fs::write(&full, b"\x0a\x05\xff\xfe\xfd").unwrap();
    // And a release whose port is out of range.
    let port_id = new_id();
    let bad_port = pb::Release {
        id: port_id.clone(),
        app: "web".into(),
        env: "prod".into(),
        image_digest: format!("sha256:{}", "b".repeat(64)),
        port: 70000,
        created_at: now_millis(),
        ..Default::default()
    };
    let port_path = release_path("prod", "web", &port_id);
    std::fs::write(clone.join(&port_path), bad_port.encode_to_vec()).unwrap();
    git(&clone, &["add", "."]);
    git(&clone, &["commit", "-qm", "bad files"]);
    let head = git(&clone, &["rev-parse", "HEAD"]);
    git(&clone, &["push", "-q", "origin", "main"]);

    let tree = repo.tree_at(&head).unwrap();
    let err = meta_schema::validate::validate_tree(&tree).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&bad_path) && text.contains("not a valid protobuf"),
        "{text}"
    );
    assert!(
        text.contains(&port_path) && text.contains("`port`") && text.contains("1-65535"),
        "{text}"
    );
    assert!(desired_state(&tree, now_millis()).is_err());
}

#[test]
fn adding_an_existing_file_is_refused_and_immutables_cannot_be_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = new_repo(tmp.path());
    let (path, bytes) = release("prod", "web", "v1");
    repo.commit(
        "main",
        &ChangeSet::new().add(path.clone(), bytes.clone()),
        "v1",
    )
    .unwrap();
    let head = repo.head("main").unwrap();
    let err = repo
        .commit(
            "main",
            &ChangeSet::new().add(path.clone(), bytes.clone()),
            "again",
        )
        .unwrap_err();
    assert!(
        matches!(err, RepoError::AlreadyExists { path: ref p } if *p == path),
        "{err}"
    );
    let err = repo
        .commit(
            "main",
            &ChangeSet::new().replace(path.clone(), bytes),
            "replace",
        )
        .unwrap_err();
    assert!(matches!(err, RepoError::Immutable { .. }), "{err}");
    assert_eq!(repo.head("main").unwrap(), head, "nothing was committed");
    // A mutable document can be replaced whole.
    let mut env = pb::Env::decode(
        repo.tree_at("main")
            .unwrap()
            .get(&env_path("prod"))
            .unwrap(),
    )
    .unwrap();
    env.domains.push("example.com".into());
    repo.commit(
        "main",
        &ChangeSet::new().replace(env_path("prod"), env.encode_to_vec()),
        "domain",
    )
    .unwrap();
}

#[test]
fn racing_commits_are_all_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Arc::new(new_repo(tmp.path()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let repo = repo.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|i| {
                        // Each thread opens its own handle, as separate
                        // processes would.
                        let repo = MetaRepo::open(repo.path()).unwrap();
                        let (p, b) = release("prod", &format!("app{t}"), &format!("v{i}"));
                        repo.commit("main", &ChangeSet::new().add(p.clone(), b), "race")
                            .unwrap();
                        p
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let paths: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let tree = repo.tree_at("main").unwrap();
    for p in &paths {
        assert!(tree.contains(p), "lost {p}");
    }
    assert_eq!(paths.len(), 40);
    // 40 commits + env + init, in one linear history.
    let log = repo.log("main", &LogFilter::default()).unwrap();
    assert_eq!(log.len(), 42);
    assert!(log.iter().all(|e| e.parents.len() <= 1));
    meta_schema::validate::validate_tree(&tree).unwrap();
}

#[test]
fn force_pushed_older_head_is_not_a_descendant() {
    let tmp = tempfile::tempdir().unwrap();
    // The origin is a plain bare repo that accepts force pushes.
    let origin = tmp.path().join("origin.git");
    git(
        tmp.path(),
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            origin.to_str().unwrap(),
        ],
    );
    let writer = MetaRepo::init_bare(&tmp.path().join("writer.git")).unwrap();
    writer
        .commit(
            "main",
            &ChangeSet::new().add(env_path("prod"), env_file("prod")),
            "env",
        )
        .unwrap();
    let (p1, b1) = release("prod", "web", "v1");
    let old = writer
        .commit("main", &ChangeSet::new().add(p1, b1), "v1")
        .unwrap();
    writer.push(origin.to_str().unwrap(), "main").unwrap();

    let follower = MetaRepo::init_bare(&tmp.path().join("follower.git")).unwrap();
    let url = format!("file://{}", origin.display());
    let first = follower.fetch(&url, "main").unwrap().unwrap();
    assert_eq!(first, old);

    let (p2, b2) = release("prod", "web", "v2");
    let new = writer
        .commit("main", &ChangeSet::new().add(p2, b2), "v2")
        .unwrap();
    writer.push(origin.to_str().unwrap(), "main").unwrap();
    let fetched = follower.fetch(&url, "main").unwrap().unwrap();
    assert_eq!(fetched, new);
    assert!(follower.is_ancestor(&first, &fetched).unwrap());

    // Someone force-pushes the older head.
    let clone = tmp.path().join("clone");
    git(
        tmp.path(),
        &[
            "clone",
            "-q",
            origin.to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    git(&clone, &["reset", "-q", "--hard", &old]);
    git(&clone, &["push", "-q", "--force", "origin", "main"]);
    let forced = follower.fetch(&url, "main").unwrap().unwrap();
    assert_eq!(forced, old);
    assert!(
        !follower.is_ancestor(&fetched, &forced).unwrap(),
        "older head must not count as a descendant"
    );

    // A meta repository made by `init_bare` refuses such a push outright.
    let out = Command::new("git")
        .current_dir(&clone)
        .args([
            "push",
            "-q",
            "--force",
            writer.path().to_str().unwrap(),
            &format!("{old}:refs/heads/main"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "non-fast-forward push was accepted");
    assert_eq!(writer.head("main").unwrap(), Some(new));
}

/// A new meta repository (a remote nothing was pushed to yet, e.g. a new
/// GitHub repository) has no head to fetch: that is `None`, not an error,
/// and the first push fills it.
#[test]
fn fetching_an_empty_remote_is_nothing_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = tmp.path().join("origin.git");
    git(
        tmp.path(),
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            origin.to_str().unwrap(),
        ],
    );
    let url = format!("file://{}", origin.display());
    let clone = MetaRepo::init_empty_bare(&tmp.path().join("clone.git")).unwrap();
    assert_eq!(clone.fetch(&url, "main").unwrap(), None);
    clone
        .commit(
            "main",
            &ChangeSet::new().add(env_path("prod"), env_file("prod")),
            "env",
        )
        .unwrap();
    clone.push(origin.to_str().unwrap(), "main").unwrap();
    let head = clone.head("main").unwrap();
    assert_eq!(clone.fetch(&url, "main").unwrap(), head);
}

/// The first commit of a captain to a new remote is a root commit pushed
/// there (a new GitHub repository as the meta remote works from the start).
#[test]
fn the_first_commit_and_push_to_an_empty_remote_creates_its_branch() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = tmp.path().join("origin.git");
    git(
        tmp.path(),
        &[
            "init",
            "-q",
            "--bare",
            "-b",
            "main",
            origin.to_str().unwrap(),
        ],
    );
    let remote = meta_schema::repo::Remote::new(format!("file://{}", origin.display()));
    let clone = MetaRepo::init_empty_bare(&tmp.path().join("clone.git")).unwrap();
    let first = clone
        .commit_and_push(
            &remote,
            "main",
            &ChangeSet::new().add(env_path("prod"), env_file("prod")),
            "env",
            &meta_schema::repo::Identity::default(),
        )
        .unwrap();
    assert_eq!(git(&origin, &["rev-parse", "main"]).trim(), first);
    let (p, b) = release("prod", "web", "v1");
    let second = clone
        .commit_and_push(
            &remote,
            "main",
            &ChangeSet::new().add(p, b),
            "v1",
            &meta_schema::repo::Identity::default(),
        )
        .unwrap();
    assert_eq!(git(&origin, &["rev-parse", "main"]).trim(), second);
    assert!(clone.is_ancestor(&first, &second).unwrap());
}

#[test]
fn a_urls_password_is_removed_from_text_about_it() {
    use meta_schema::repo::redact_url_in;
    let url = "https://ci:s3cret@git.example/web.git";
    assert_eq!(
        redact_url_in(
            &format!("fatal: unable to access '{url}/': 403 (s3cret)"),
            url
        ),
        "fatal: unable to access 'https://ci:<redacted>@git.example/web.git/': 403 (<redacted>)"
    );
    let plain = "https://git.example/web.git";
    assert_eq!(
        redact_url_in("no such repo s3cret", plain),
        "no such repo s3cret"
    );
}
