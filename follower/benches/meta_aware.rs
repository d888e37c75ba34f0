//! commit -> follower aware: how long after a commit lands in the meta repo
//! the follower has applied it, when the captain notifies it
//! (`POST /v1/notify`) versus when it only polls; and gix's fetch against
//! `git fetch` of the same commits. Prints one JSON line (see BENCH.md).
//!
//! Run (as root, the follower's runtime probe needs it):
//!   cargo bench -p follower --bench meta_aware --profile dev

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use follower::image::LocalDirImageSource;
use follower::runtime::RuntimeChoice;
use follower::{Follower, FollowerConfig};
use meta_schema::repo::{ChangeSet, MetaRepo};

const SAMPLES: usize = 15;
const POLL: Duration = Duration::from_millis(1000);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn follower(dir: &std::path::Path, name: &str, url: &str, poll: Duration) -> Follower {
    let mut cfg = FollowerConfig::new(dir.join(name), url);
    cfg.node_id = Some(name.into());
    cfg.runtime = RuntimeChoice::Process;
    cfg.images = Some(Arc::new(LocalDirImageSource::new(dir.join("store"))));
    cfg.poll_interval = poll;
    Follower::start(cfg).await.expect("follower starts")
}

fn commit(repo: &MetaRepo, i: usize) -> String {
    let cs = ChangeSet::new().add(
        format!("bench/{i}-{}", meta_schema::new_id()),
        b"x".to_vec(),
    );
    repo.commit("main", &cs, "bench").expect("commit")
}

async fn aware(f: &Follower, commit: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut rx = f.follow.clone();
    let r =
        tokio::time::timeout(limit, rx.wait_for(|s| s.applied.as_deref() == Some(commit))).await;
    assert!(matches!(r, Ok(Ok(_))), "follower never applied {commit}");
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let upstream = tmp.path().join("upstream.git");
    let repo = MetaRepo::init_bare(&upstream).expect("init");
    let url = upstream.to_string_lossy().into_owned();

    // Notified: polling far too slow to matter; the notify is the HTTP call.
    let notified = follower(tmp.path(), "notified", &url, Duration::from_secs(3600)).await;
    let http = reqwest::Client::new();
    let notify_url = format!("http://{}/v1/notify", notified.api_addr);
    let mut ours = Vec::new();
    for i in 0..SAMPLES {
        let c = commit(&repo, i);
        let start = Instant::now();
        let resp = http
            .post(&notify_url)
            .bearer_auth(&notified.node_token)
            .send()
            .await
            .expect("notify");
        assert_eq!(resp.status(), 202);
        let _ = aware(&notified, &c, Duration::from_secs(30)).await;
        ours.push(ms(start.elapsed()));
    }
    notified.shutdown().await;

    // Poll-only.
    let polling = follower(tmp.path(), "polling", &url, POLL).await;
    let mut poll = Vec::new();
    for i in 0..SAMPLES {
        // Commit at a random phase of the poll cycle, as real commits do.
        let phase = (ulid::Ulid::new().random() % POLL.as_millis()) as u64;
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let c = commit(&repo, 1000 + i);
        poll.push(ms(aware(&polling, &c, POLL * 10).await));
    }
    polling.shutdown().await;

    // gix fetch vs git fetch of the same new commit, into separate copies.
    let gix_copy = tmp.path().join("gix-copy.git");
    let git_copy = tmp.path().join("git-copy.git");
    for p in [&gix_copy, &git_copy] {
        assert!(
            Command::new("git")
                .args(["init", "-q", "--bare"])
                .arg(p)
                .status()
                .unwrap()
                .success()
        );
    }
    let gix_repo = MetaRepo::open(&gix_copy).expect("open");
    let (mut gix, mut git) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let c = commit(&repo, 2000 + i);
        let (r, u) = (gix_repo.clone(), url.clone());
        let t = Instant::now();
        let head = tokio::task::spawn_blocking(move || r.fetch(&u, "main"))
            .await
            .unwrap()
            .expect("gix fetch");
        gix.push(ms(t.elapsed()));
        assert_eq!(head.as_deref(), Some(c.as_str()));
        let t = Instant::now();
        let st = Command::new("git")
            .arg("--git-dir")
            .arg(&git_copy)
            .args([
                "fetch",
                "-q",
                &url,
                "+refs/heads/main:refs/remotes/origin/main",
            ])
            .status()
            .unwrap();
        git.push(ms(t.elapsed()));
        assert!(st.success());
    }

    let (o, p, gx, gt) = (median(ours.clone()), median(poll), median(gix), median(git));
    let max = ours.iter().cloned().fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({
            "bench": "commit_to_follower_aware",
            "ours": o,
            "reference": p,
            "ratio": o / p,
            "unit": "ms, median",
            "ours_is": "notified (POST /v1/notify, then gix fetch + ancestry check + ledger write)",
            "reference_is": format!("poll-only, poll interval {} ms", POLL.as_millis()),
            "notified_max_ms": max,
            "samples": SAMPLES,
            "gix_fetch_ms": gx,
            "git_fetch_ms": gt,
            "gix_vs_git_ratio": gx / gt,
        })
    );
}
