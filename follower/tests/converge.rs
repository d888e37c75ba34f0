//! A real follower (process runtime) driven through a real meta repo:
//! converge to 3 healthy instances, replace them with a new release, stop
//! them when the releases are removed; reports to a recording captain; the
//! node API and its log paging.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use follower::image::LocalDirImageSource;
use follower::reconciler::{InstanceRecord, Phase};
use follower::runtime::RuntimeChoice;
use follower::{Follower, FollowerConfig};
use meta_schema::pb::DeploymentState;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("follower=info")
        .try_init();
}

fn config(
    tmp: &std::path::Path,
    meta: &common::Meta,
    store: &std::path::Path,
    node: &str,
) -> FollowerConfig {
    let mut cfg = FollowerConfig::new(tmp.join(node), meta.url());
    cfg.node_id = Some(node.into());
    cfg.runtime = RuntimeChoice::Process;
    cfg.instance_range = Some(common::random_range());
    cfg.images = Some(Arc::new(LocalDirImageSource::new(store)));
    cfg.poll_interval = Duration::from_millis(300);
    cfg.reconcile_interval = Duration::from_millis(300);
    cfg.heartbeat_interval = Duration::from_millis(300);
    cfg
}

fn snapshot(f: &Follower) -> BTreeMap<String, InstanceRecord> {
    f.reconciler.instances.borrow().clone()
}

fn all_healthy_of(
    f: &Follower,
    release: &str,
    n: usize,
) -> Option<BTreeMap<String, InstanceRecord>> {
    let s = snapshot(f);
    (s.len() == n
        && s.values()
            .all(|r| r.release_id == release && r.phase == Phase::Healthy))
    .then_some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_replaces_and_stops_through_the_meta_repo() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let v1 = common::busybox_image(&store, &common::httpd_config(8080));
    let mut c2 = common::httpd_config(8080);
    c2.env.insert("VERSION".into(), "2".into());
    let v2 = common::busybox_image(&store, &c2);
    let meta = common::Meta::new(tmp.path());
    let captain = common::RecordingCaptain::start().await;
    let mut cfg = config(tmp.path(), &meta, &store, "node-a");
    cfg.captain_url = Some(captain.url.clone());
    cfg.token = "captain-token".into();
    let f = Follower::start(cfg).await.unwrap();

    // Release 1, three instances on this node (and one elsewhere, ignored).
    let r1 = meta.release("web", &v1, 8080);
    let mut d1 = meta.deployment(&r1, DeploymentState::RollingOut, None, "node-a", 3);
    d1.instances.push(meta_schema::pb::Placement {
        instance_id: meta_schema::new_id(),
        node: "node-b".into(),
    });
    meta.commit(&[&r1], &[&d1], &[], "deploy r1");
    f.notify.notify_one();
    let first = common::wait_for(60, "3 healthy instances of r1", || {
        all_healthy_of(&f, &r1.id, 3)
    })
    .await;
    let mut ips = std::collections::BTreeSet::new();
    for r in first.values() {
        let addr = std::net::SocketAddr::new(r.ip.into(), r.port);
        assert_eq!(
            common::http_get(addr, "/").await.unwrap(),
            (200, "hello from zeitwork\n".into())
        );
        assert!(ips.insert(r.ip), "each instance has its own address");
    }

    // Node API: token required, instances listed, logs paged by time.
    let http = reqwest::Client::new();
    let api = format!("http://{}", f.api_addr);
    assert_eq!(
        http.get(format!("{api}/v1/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{api}/v1/instances"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let wrong = http
        .get(format!("{api}/v1/instances"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let issued = common::issued_token(1);
    for token in ["captain-token", f.node_token.as_str(), issued.as_str()] {
        let list: Vec<InstanceRecord> = http
            .get(format!("{api}/v1/instances"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list.len(), 3, "token {token}");
    }
    let info: serde_json::Value = http
        .get(format!("{api}/v1/node/info"))
        .bearer_auth(&f.node_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["node"]["id"], "node-a");
    assert_eq!(info["node"]["runtime"], "process");
    let res: serde_json::Value = http
        .get(format!("{api}/v1/node/resources"))
        .bearer_auth(&f.node_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(res["instances"], 3);
    assert!(res["memory_bytes"].as_u64().unwrap() > 0);
    let id = first.keys().next().unwrap().clone();
    let one = http
        .get(format!("{api}/v1/instances/{id}"))
        .bearer_auth(&f.node_token)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let missing = http
        .get(format!("{api}/v1/instances/nope"))
        .bearer_auth(&f.node_token)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut from = 0u64;
    for _ in 0..3 {
        let resp = http
            .get(format!("{api}/v1/instances/{id}/logs?from={from}&limit=2"))
            .bearer_auth(&f.node_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let last: u64 = resp.headers()["x-last-log-nano"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let lines: Vec<serde_json::Value> = resp.json().await.unwrap();
        for l in &lines {
            seen.push((
                l["t"].as_u64().unwrap(),
                l["line"].as_str().unwrap().to_string(),
            ));
        }
        assert!(last >= from);
        from = last;
        // Health checks keep adding request lines between pages.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        seen.iter()
            .any(|(_, l)| l.contains("NOT a VM") || l.contains("not a VM")),
        "{seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "no line twice, in order: {seen:?}"
    );

    // DELETE restarts an instance (a new process); PUT state holds and
    // releases it.
    let old_pid = first[&id].handle.as_ref().unwrap().pid;
    let resp = http
        .delete(format!("{api}/v1/instances/{id}"))
        .bearer_auth(&f.node_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    common::wait_for(30, "restarted and healthy", || {
        let s = snapshot(&f);
        let r = s.get(&id)?;
        (r.phase == Phase::Healthy && r.handle.as_ref()?.pid != old_pid).then_some(())
    })
    .await;
    let state_url = format!("{api}/v1/instances/{id}/state");
    let held = http
        .put(&state_url)
        .bearer_auth(&f.node_token)
        .json(&serde_json::json!({"state": "stopped"}));
    assert_eq!(held.send().await.unwrap().status(), 202);
    let mut pass = f.reconciler.status.clone();
    let seen_pass = pass.borrow_and_update().pass;
    common::wait_for(30, "two passes after the hold", || {
        (pass.borrow_and_update().pass >= seen_pass + 2).then_some(())
    })
    .await;
    let r = snapshot(&f)[&id].clone();
    assert!(
        r.held && r.handle.is_none(),
        "a held instance is not restarted: {r:?}"
    );
    let bad = http
        .put(&state_url)
        .bearer_auth(&f.node_token)
        .json(&serde_json::json!({"state": "paused"}));
    assert_eq!(bad.send().await.unwrap().status(), 400);
    let release = http
        .put(&state_url)
        .bearer_auth(&f.node_token)
        .json(&serde_json::json!({"state": "running"}));
    assert_eq!(release.send().await.unwrap().status(), 202);
    common::wait_for(30, "healthy again after the release", || {
        all_healthy_of(&f, &r1.id, 3)
    })
    .await;

    // Release 2 rolls out beside release 1, then is promoted: 1 goes.
    let p1 = meta.deployment(&r1, DeploymentState::Promoted, Some(&d1), "node-a", 3);
    let r2 = meta.release("web", &v2, 8080);
    let d2 = meta.deployment(&r2, DeploymentState::RollingOut, None, "node-a", 3);
    meta.commit(&[&r2], &[&p1, &d2], &[], "deploy r2");
    f.notify.notify_one();
    common::wait_for(60, "r1 and r2 side by side, all healthy", || {
        let s = snapshot(&f);
        (s.len() == 6 && s.values().all(|r| r.phase == Phase::Healthy)).then_some(())
    })
    .await;
    let p2 = meta.deployment(&r2, DeploymentState::Promoted, Some(&d2), "node-a", 3);
    meta.commit(&[], &[&p2], &[], "promote r2");
    f.notify.notify_one();
    let second = common::wait_for(60, "only r2, healthy", || all_healthy_of(&f, &r2.id, 3)).await;
    for old in first.values() {
        let h = old.handle.as_ref().unwrap();
        assert!(
            !follower::runtime::pid_is(h.pid, h.pid_start_ticks),
            "old instance {} still runs",
            old.instance_id
        );
    }

    // Removing the releases (a revert) stops everything.
    meta.commit(
        &[],
        &[],
        &[
            meta_schema::layout::release_path("prod", "web", &r1.id),
            meta_schema::layout::release_path("prod", "web", &r2.id),
        ],
        "remove web",
    );
    f.notify.notify_one();
    common::wait_for(60, "no instances", || snapshot(&f).is_empty().then_some(())).await;
    for r in second.values() {
        let h = r.handle.as_ref().unwrap();
        assert!(!follower::runtime::pid_is(h.pid, h.pid_start_ticks));
        assert!(
            !r.work_dir.exists(),
            "work dir of a stopped instance is removed"
        );
    }

    // What the captain heard, bodies checked.
    common::wait_for(10, "a heartbeat after the removal", || {
        captain
            .all()
            .iter()
            .any(|r| {
                r.method == "PUT"
                    && r.body["resources"]["instances"] == 0
                    && r.body["meta"]["applied_commit"].is_string()
            })
            .then_some(())
    })
    .await;
    let reqs = captain.all();
    let reg = reqs
        .iter()
        .find(|r| r.method == "POST" && r.path == "/v1/nodes")
        .expect("registered");
    assert_eq!(reg.auth, "Bearer captain-token");
    assert_eq!(reg.body["id"], "node-a");
    assert_eq!(reg.body["region"], "local");
    assert!(reg.body["cpus"].as_u64().unwrap() >= 1);
    assert!(reg.body["memory_bytes"].as_u64().unwrap() > 0);
    assert!(reg.body["disk_bytes"].as_u64().unwrap() > 0);
    assert_eq!(reg.body["api_url"], format!("http://{}", f.api_addr));
    let hb = reqs.iter().find(|r| r.method == "PUT").expect("heartbeats");
    assert_eq!(hb.path, "/v1/nodes/node-a/state");
    assert_eq!(
        hb.auth,
        format!("Bearer {}", common::issued_token(1)),
        "the issued token replaces the bootstrap one"
    );
    assert_eq!(hb.body["state"], "online");
    let reports: Vec<&common::Recorded> =
        reqs.iter().filter(|r| r.path == "/v1/instances").collect();
    for inst in first.values().chain(second.values()) {
        let mine: Vec<&serde_json::Value> = reports
            .iter()
            .map(|r| &r.body)
            .filter(|b| b["id"] == inst.instance_id.as_str())
            .collect();
        let states: Vec<&str> = mine.iter().map(|b| b["state"].as_str().unwrap()).collect();
        assert!(
            states.contains(&"healthy") && states.last() == Some(&"stopped"),
            "{}: {states:?}",
            inst.instance_id
        );
        let healthy = mine.iter().find(|b| b["state"] == "healthy").unwrap();
        assert_eq!(healthy["node_id"], "node-a");
        assert_eq!(healthy["env"], "prod");
        assert_eq!(healthy["app"], "web");
        assert_eq!(healthy["release_id"], inst.release_id.as_str());
        assert_eq!(healthy["rollout_id"], inst.rollout_id.as_str());
        assert_eq!(healthy["address"], inst.ip.to_string());
        assert_eq!(healthy["port"], 8080);
        assert_eq!(healthy["attempts"], 1);
    }
    f.shutdown_and_stop_instances().await;
}
