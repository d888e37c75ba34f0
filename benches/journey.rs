//! The journey, measured (BENCH.md): under `zw up` with the `process`
//! runtime, on loopback.
//!
//! - commit -> new version serving, minus the app's own start time (the same
//!   busybox httpd started by hand and polled the same way): target <= 1 s;
//! - deploy v1 -> v2 -> rollback (`git revert` pushed) under continuous
//!   requests: failed requests (target 0) and the longest gap between two
//!   successful responses (target < 100 ms);
//! - RSS of the idle `zw up` process with one app of 3 instances deployed
//!   (instances are separate processes, so excluded): target < 64 MiB.
//!
//!     cargo bench -p zw --bench journey --profile dev   (or --release)

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Time for the app alone: busybox httpd on the host, polled until it
/// answers, the way the edge path is polled.
fn app_start_time(dir: &std::path::Path) -> Duration {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "version-x").unwrap();
    let port = free_port();
    let start = Instant::now();
    let mut child = Command::new("/bin/busybox")
        .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(&www)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "busybox httpd did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
    let t = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    t
}

fn serving_after(up: &Up, want: &str, start: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if get_page(up.http).is_ok_and(|p| p.contains(want)) {
            return start.elapsed();
        }
        assert!(Instant::now() < deadline, "{want} never served");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("zw");
    let (api_port, http) = (free_port(), free_port());
    let up = Up::start(&data, api_port, http);
    setup_app(&up);
    let v1 = build(tmp.path(), &data, "v1", "<h1>version-1</h1>", None);
    let v2 = build(tmp.path(), &data, "v2", "<h1>version-2</h1>", None);
    let app = app_start_time(tmp.path());

    // Commit -> serving, first deploy (3 instances from nothing).
    let t = Instant::now();
    up.api(
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"app_id": "hello.production", "image_digest": v1, "port": 8080, "health_check_path": "/healthz"})),
    );
    let first = serving_after(&up, "version-1", t);

    // Idle footprint of zw up itself.
    std::thread::sleep(Duration::from_secs(5));
    let rss = rss_kib(up.pid());

    // v1 -> v2 under load; commit -> serving for a rollout.
    let load = Load::start(http);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let d2 = deploy(&up, &v2);
    let rollout = serving_after(&up, "version-2", t);
    std::thread::sleep(Duration::from_millis(500));

    // Rollback by git revert, pushed over /meta.git.
    let clone = tmp.path().join("meta-clone");
    let url = format!("http://zw:{}@127.0.0.1:{api_port}/meta.git", up.token);
    git(tmp.path(), &["clone", "-q", &url, clone.to_str().unwrap()]);
    git(
        &clone,
        &["revert", "--no-edit", d2["commit"].as_str().unwrap()],
    );
    let t = Instant::now();
    git(&clone, &["push", "-q", "origin", "main"]);
    let revert = serving_after(&up, "version-1", t);
    std::thread::sleep(Duration::from_millis(500));
    let r = load.finish();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("app's own start (busybox httpd by hand): {:.1} ms", ms(app));
    println!(
        "commit -> serving: first deploy {:.0} ms, rollout v2 {:.0} ms, git revert {:.0} ms",
        ms(first),
        ms(rollout),
        ms(revert)
    );
    println!(
        "deploy under load: {} requests, {} failed, longest gap between successes {:.1} ms, versions {:?}",
        r.requests,
        r.errors.len(),
        ms(r.max_gap),
        r.order
    );
    println!(
        "idle zw up RSS (3 instances deployed, instances excluded): {:.1} MiB",
        rss as f64 / 1024.0
    );
    let overhead = ms(rollout) - ms(app);
    println!(
        "{}",
        json!({"bench": "commit_to_serving_overhead_ms", "ours": overhead, "reference": ms(app), "ratio": ms(rollout) / ms(app).max(0.001), "target_ms": 1000})
    );
    println!(
        "{}",
        json!({"bench": "deploy_under_load", "failed_requests": r.errors.len(), "requests": r.requests, "longest_gap_ms": ms(r.max_gap), "target_gap_ms": 100})
    );
    println!(
        "{}",
        json!({"bench": "zw_up_idle_rss_mib", "ours": rss as f64 / 1024.0, "target": 64})
    );
}
