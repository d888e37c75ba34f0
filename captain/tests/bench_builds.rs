//! Benchmark: a build through the captain's queue (upload the source,
//! `POST /v1/builds`, wait for `succeeded`: database, worker, log storage)
//! vs `Builder::build` of the same kind of source called directly, in the
//! same run, on SQLite. Each round builds a new image (a fresh stamp file)
//! on both sides; rounds alternate. Prints one JSON line.
//!
//! `cargo test -p captain --test bench_builds -- --ignored --nocapture`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use builder::store::ObjectStore;
use builder::{BuildOptions, LocalStore, NullLog, Source};
use common::builds::{make_builder, source_tarball};
use common::{Backend, Env};
use serde_json::json;

const ROUNDS: usize = 5;
const DOCKERFILE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY stamp /stamp\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox cat /stamp > /stamp2\"]\nCMD [\"/bin/busybox\", \"cat\", \"/stamp2\"]\n";

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn captain_build_queue_vs_direct_builder() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::start_with(Backend::Sqlite, |d| {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(d.join("store")));
        Some(make_builder(d, store))
    })
    .await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let direct_store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("store")));
    let direct = make_builder(&tmp.path().join("direct"), direct_store);

    let (mut ours, mut reference) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Through the captain.
        let dir = tmp.path().join(format!("q{round}"));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/stamp"), format!("queue {round}\n")).unwrap();
        let tarball = source_tarball(&dir, DOCKERFILE);
        let t = Instant::now();
        let r = env
            .http
            .post(format!("{}/v1/sources", env.base))
            .bearer_auth(&env.token)
            .header("content-type", "application/gzip")
            .body(tarball)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let src: serde_json::Value = r.json().await.unwrap();
        let (s, b) = env
            .post(
                "/v1/builds",
                json!({"app_id": app, "source": {"upload": src["id"]}}),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let id = b["id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, b) = env.get(&format!("/v1/builds/{id}")).await;
            if b["status"] == "succeeded" {
                break;
            }
            assert_ne!(b["status"], "failed", "{b}");
            assert!(Instant::now() < deadline, "{b}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ours.push(t.elapsed());

        // Directly.
        let dir = tmp.path().join(format!("d{round}"));
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/stamp"), format!("direct {round}\n")).unwrap();
        source_tarball(&dir, DOCKERFILE);
        let t = Instant::now();
        direct
            .build(
                Source::Local(dir.join("src")),
                BuildOptions::default(),
                &NullLog,
            )
            .await
            .unwrap();
        reference.push(t.elapsed());
    }
    let (o, r) = (median(ours), median(reference));
    println!(
        "{}",
        json!({"bench": "build through the captain queue vs Builder::build (median ms, SQLite)",
               "rounds": ROUNDS, "ours": o, "reference": r, "ratio": o / r})
    );
    env.stop().await;
}
