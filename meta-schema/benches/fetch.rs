//! One new commit into a follower's copy: gix fetch (MetaRepo::fetch) vs
//! `git fetch`, same origin, same commit, in the same run. Target ratio
//! <= 1.0. The origin holds 1,000 releases so the fetch negotiates over a
//! realistic history.
//!
//!     cargo bench -p meta-schema --bench fetch

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use meta_schema::layout::{env_path, release_path};
use meta_schema::pb;
use meta_schema::repo::{ChangeSet, MetaRepo};
use meta_schema::{new_id, now_millis};
use prost::Message;

fn release(app: &str) -> (String, Vec<u8>) {
    let r = pb::Release {
        id: new_id(),
        app: app.into(),
        env: "prod".into(),
        image_digest: format!("sha256:{}", "e".repeat(64)),
        created_at: now_millis(),
        ..Default::default()
    };
    (release_path("prod", app, &r.id), r.encode_to_vec())
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = MetaRepo::init_bare(&tmp.path().join("origin.git")).unwrap();
    let env = pb::Env {
        name: "prod".into(),
        ..Default::default()
    };
    origin
        .commit(
            "main",
            &ChangeSet::new().add(env_path("prod"), env.encode_to_vec()),
            "env",
        )
        .unwrap();
    for i in 0..1000 {
        let (p, b) = release(&format!("app-{}", i % 50));
        origin
            .commit("main", &ChangeSet::new().add(p, b), "release")
            .unwrap();
    }
    let url = format!("file://{}", origin.path().display());
    let ours = MetaRepo::init_bare(&tmp.path().join("gix.git")).unwrap();
    ours.fetch(&url, "main").unwrap();
    let theirs = tmp.path().join("git.git");
    git(
        tmp.path(),
        &["init", "-q", "--bare", theirs.to_str().unwrap()],
    );
    let refspec = "+refs/heads/main:refs/remotes/origin/main";
    git(&theirs, &["fetch", "-q", &url, refspec]);

    let (mut t_gix, mut t_git) = (Vec::new(), Vec::new());
    for i in 0..15 {
        let (p, b) = release("bench");
        let head = origin
            .commit("main", &ChangeSet::new().add(p, b), "one more")
            .unwrap();
        // Alternate the order so neither side always gets a warm cache.
        let mut run_gix = || {
            let s = Instant::now();
            let got = ours.fetch(&url, "main").unwrap();
            t_gix.push(s.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(got.as_deref(), Some(head.as_str()));
        };
        let mut run_git = || {
            let s = Instant::now();
            git(&theirs, &["fetch", "-q", &url, refspec]);
            t_git.push(s.elapsed().as_secs_f64() * 1000.0);
        };
        if i % 2 == 0 {
            run_gix();
            run_git();
        } else {
            run_git();
            run_gix();
        }
    }
    let (g, r) = (median(t_gix), median(t_git));
    println!(
        "fetch one new commit (file://, 1,000-commit history): gix {g:.2} ms, git fetch {r:.2} ms (median of 15)"
    );
    println!(
        "{}",
        serde_json::json!({"bench": "meta_fetch_one_commit_ms", "ours": g, "reference": r, "ratio": g / r})
    );
}
