//! The whole journey under `zw up` with the `process` runtime, through the
//! real binary: build with buildah, deploy v1, request it through the edge;
//! deploy v2 while a client sends requests (0 failures, answers switch);
//! `git revert` the v2 release in a clone of the meta repo and push (v1
//! serves again, 0 failures); a release that never becomes healthy is
//! failed while v1 keeps serving; `kill -9` of `zw up` mid-rollout and a
//! restart finish the rollout without duplicate or orphaned instances;
//! `zw logs --json` prints the app's lines through the captain.
//! Every address is on loopback; every loop is bounded.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

#[test]
fn journey_deploy_rollout_revert_and_failed_deploy_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("zw");
    let (api_port, http) = (free_port(), free_port());
    let up = Up::start(&data, api_port, http);
    setup_app(&up);
    let v1 = build(tmp.path(), &data, "v1", "<h1>hello version-1</h1>", None);
    let v2 = build(tmp.path(), &data, "v2", "<h1>hello version-2</h1>", None);
    let bad = build(
        tmp.path(),
        &data,
        "bad",
        "<h1>never served</h1>",
        Some(r#"["/bin/busybox", "false"]"#),
    );

    deploy(&up, &v1);
    wait_for_page(&up, "version-1", 60);
    zw_logs_of_the_app(&up, tmp.path());

    let load = Load::start(http);
    std::thread::sleep(Duration::from_millis(300));
    let d2 = deploy(&up, &v2);
    wait_for_page(&up, "version-2", 60);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        load.failures.load(Ordering::Relaxed),
        0,
        "failures during v1 -> v2"
    );

    // Rollback by git: revert the commit that added the v2 release, in a
    // clone of the captain's meta repo over smart HTTP, and push.
    let clone = tmp.path().join("meta-clone");
    let url = format!("http://zw:{}@127.0.0.1:{api_port}/meta.git", up.token);
    git(tmp.path(), &["clone", "-q", &url, clone.to_str().unwrap()]);
    git(
        &clone,
        &["revert", "--no-edit", d2["commit"].as_str().unwrap()],
    );
    git(&clone, &["push", "-q", "origin", "main"]);
    wait_for_page(&up, "version-1", 60);
    std::thread::sleep(Duration::from_millis(300));
    let LoadResult {
        requests,
        order,
        errors,
        ..
    } = load.finish();
    assert_eq!(
        errors,
        Vec::<String>::new(),
        "failed requests out of {requests}"
    );
    assert_eq!(
        order,
        ["version-1", "version-2", "version-1"],
        "answers switched v1 -> v2 -> v1 ({requests} requests)"
    );

    // A release that never becomes healthy is failed; v1 keeps serving.
    let load = Load::start(http);
    let d3 = deploy(&up, &bad);
    let id = d3["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while deployment_status(&up, id) != "failed" {
        assert!(
            Instant::now() < deadline,
            "bad release not failed:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let LoadResult {
        requests,
        order,
        errors,
        ..
    } = load.finish();
    assert_eq!(
        errors,
        Vec::<String>::new(),
        "failed requests out of {requests} during the failed deploy"
    );
    assert_eq!(order, ["version-1"]);
    let reason =
        up.api(reqwest::Method::GET, &format!("/v1/deployments/{id}"), None)["reason"].to_string();
    assert!(reason.contains("failed"), "{reason}");
    drop(up);
    // Ctrl-C stopped every instance it started.
    assert!(
        running_instances(&data).is_empty(),
        "instances left after Ctrl-C: {:?}",
        running_instances(&data)
    );
}

/// `zw logs --json` through the captain: the lines of the app's instances
/// (busybox httpd -v logs every request, health checks included), each
/// naming a reported instance, oldest first; a read from the last stamp
/// repeats none.
fn zw_logs_of_the_app(up: &Up, home: &std::path::Path) {
    let read = |from: u64| -> Vec<Value> {
        let out = std::process::Command::new(zw())
            .args(["logs", "--json", "--app", "hello", "--from"])
            .arg(from.to_string())
            .args(["--api", &up.api, "--token", &up.token])
            .env("HOME", home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("ZW_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "zw logs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let reported: Vec<String> = up
        .api(reqwest::Method::GET, "/v1/instances", None)
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let lines = read(0);
        if !lines.is_empty() {
            break lines;
        }
        assert!(Instant::now() < deadline, "zw logs printed no line");
        std::thread::sleep(Duration::from_millis(200));
    };
    let ts: Vec<u64> = lines.iter().map(|l| l["t"].as_u64().unwrap()).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
    for l in &lines {
        let i = l["instance"].as_str().unwrap();
        assert!(
            reported.iter().any(|r| r == i),
            "{l} of an unknown instance"
        );
        assert!(l["line"].is_string());
    }
    let last = *ts.last().unwrap();
    assert!(read(last).iter().all(|l| l["t"].as_u64().unwrap() > last));
}

#[test]
fn journey_kill_9_of_zw_up_mid_rollout_then_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("zw");
    let (api_port, http) = (free_port(), free_port());
    let mut up = Up::start(&data, api_port, http);
    setup_app(&up);
    let v1 = build(tmp.path(), &data, "v1", "<h1>hello version-1</h1>", None);
    let v2 = build(tmp.path(), &data, "v2", "<h1>hello version-2</h1>", None);
    deploy(&up, &v1);
    wait_for_page(&up, "version-1", 60);
    deploy(&up, &v2);
    // Kill as soon as the v2 rollout has started some instance.
    let deadline = Instant::now() + Duration::from_secs(30);
    while running_instances(&data).len() < 4 {
        assert!(
            Instant::now() < deadline,
            "v2 rollout never started:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    up.kill9();
    let before = running_instances(&data);

    let up = Up::start(&data, api_port, http);
    wait_for_page(&up, "version-2", 90);
    // Converged: v2 serving (3) and v1 draining (3); nothing more, and
    // every instance alive before the kill was adopted or stopped, none
    // started twice.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = running_instances(&data);
        if now.len() == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected 6 instances, have {}: {now:?}\nbefore kill: {before:?}\n{}",
            now.len(),
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let reported = up.api(reqwest::Method::GET, "/v1/instances", None);
    let live: Vec<&Value> = reported
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] != "stopped" && i["state"] != "failed")
        .collect();
    assert_eq!(live.len(), 6, "{reported}");
    drop(up);
    assert!(
        running_instances(&data).is_empty(),
        "instances left after Ctrl-C"
    );
}
