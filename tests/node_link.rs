//! The captain's link to its followers, in one process: a real captain
//! (SQLite, its own meta repository) and real followers with the `process`
//! runtime. A follower's API accepts the `api_key` of its current
//! registration and nothing else of the captain's (a wrong key, or the key
//! of a previous registration, is a 401); `GET /v1/apps/{id}/logs` merges
//! the lines of an app's instances on two nodes, paged by time with no
//! line twice or missing, and names a node that stopped answering while
//! still returning the others' lines; a follower polling only every 60 s
//! fetches a captain commit at once because the captain notifies it.
//!
//! Every address is on loopback; every wait is bounded.

#[path = "common/secrets.rs"]
mod secrets_common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use follower::image::{ImageConfig, LocalDirImageSource};
use follower::runtime::RuntimeChoice;
use secrets_common::*;
use serde_json::{Value, json};

/// An image whose app writes a line every 100 ms and logs every request
/// (busybox httpd -v); in the object-store layout under `store`.
fn logging_image(store: &Path) -> String {
    let rootfs = busybox_rootfs();
    let config = ImageConfig {
        entrypoint: vec!["/bin/busybox".into(), "sh".into(), "-c".into()],
        cmd: vec![
            "i=0; while :; do i=$((i+1)); echo \"tick $i\"; /bin/busybox sleep 0.1; done & exec /bin/busybox httpd -f -v -p 8080 -h /www"
                .into(),
        ],
        env: [("PATH".to_string(), "/bin".to_string())]
            .into_iter()
            .collect(),
        workdir: "/www".into(),
        user: "root".into(),
        exposed_ports: vec![8080],
        rootfs_bytes: 16 << 20,
    };
    let cfg = serde_json::to_vec(&config).unwrap();
    let hex = sha256_hex(&[rootfs.as_slice(), &cfg].concat());
    let dir = store.join("images").join(&hex);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rootfs.ext4"), rootfs).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    format!("sha256:{hex}")
}

/// The key the captain calls `node` with now.
async fn current_key(captain: &captain::Captain, data: &Path, node: &str) -> Option<String> {
    let reg = captain
        .state()
        .db
        .node_registrations()
        .await
        .unwrap()
        .get(node)?
        .clone();
    Some(
        captain::nodelink::issue_key(&data.join(captain::nodelink::LINK_SECRET_FILE), node, &reg)
            .unwrap(),
    )
}

/// The key of `node`'s registration, once the captain issued it (the node
/// row is written before the token).
async fn wait_key(captain: &captain::Captain, data: &Path, node: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(k) = current_key(captain, data, node).await {
            return k;
        }
        assert!(Instant::now() < deadline, "{node} never got a key");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn node_info_status(http: &reqwest::Client, f: &follower::Follower, key: &str) -> u16 {
    http.get(format!("http://{}/v1/node/info", f.api_addr))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn wait_registered(api: &Api, nodes: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = api.ok(reqwest::Method::GET, "/v1/nodes", None).await;
        let online = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["state"] == "online" && n["api_url"] != "")
            .filter(|n| nodes.contains(&n["id"].as_str().unwrap()))
            .count();
        if online == nodes.len() {
            return;
        }
        assert!(Instant::now() < deadline, "nodes never registered: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Page {
    lines: Vec<Value>,
    last: u64,
    unreachable: Option<String>,
}

async fn logs(api: &Api, app: &str, query: &str) -> Page {
    let r = api
        .http
        .get(format!("{}/v1/apps/{app}/logs?{query}", api.base))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let lines: Vec<Value> = r.json().await.unwrap();
    Page {
        lines,
        last: h["x-last-log-nano"].to_str().unwrap().parse().unwrap(),
        unreachable: h
            .get("x-log-unreachable")
            .map(|v| v.to_str().unwrap().to_string()),
    }
}

fn key_of(l: &Value) -> (u64, String, String) {
    (
        l["t"].as_u64().unwrap(),
        l["instance"].as_str().unwrap().to_string(),
        l["line"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_logs_merge_instances_of_two_nodes() {
    let _logs = log_buffer();
    let tmp = tempfile::tempdir().unwrap();
    let Setup {
        data,
        store,
        captain,
        api,
        app_id,
        ..
    } = captain_with_web_app(tmp.path()).await;
    let digest = logging_image(&store);
    let meta = data.join("meta.git");
    let fa = start_follower(&tmp.path().join("a"), "node-a", &api, &meta, &store).await;
    let fb = start_follower(&tmp.path().join("b"), "node-b", &api, &meta, &store).await;
    wait_registered(&api, &["node-a", "node-b"]).await;

    // The captain's key opens node-a's API; nothing else of it does.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let key = wait_key(&captain, &data, "node-a").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_info_status(&http, &fa, &key).await != 200 {
        assert!(Instant::now() < deadline, "node-a never accepted its key");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(node_info_status(&http, &fa, &"0".repeat(64)).await, 401);
    let other = wait_key(&captain, &data, "node-b").await;
    assert_eq!(
        node_info_status(&http, &fa, &other).await,
        401,
        "node-b's key opens node-a"
    );

    api.ok(
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"app_id": app_id, "image_digest": digest, "port": 8080, "health_check_path": "/"})),
    )
    .await;
    // Three healthy instances over the two nodes.
    let deadline = Instant::now() + Duration::from_secs(90);
    let instances: BTreeSet<String> = loop {
        let v = api.ok(reqwest::Method::GET, "/v1/instances", None).await;
        let healthy: BTreeSet<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == "healthy")
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        if healthy.len() == 3 {
            break healthy;
        }
        assert!(Instant::now() < deadline, "never 3 healthy instances: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Page through with small pages until every instance spoke.
    let mut paged: Vec<Value> = Vec::new();
    let mut from = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = logs(&api, &app_id, &format!("from={from}&limit=7")).await;
        assert_eq!(p.unreachable, None);
        assert!(p.lines.len() <= 7);
        let ts: Vec<u64> = p.lines.iter().map(|l| l["t"].as_u64().unwrap()).collect();
        assert!(ts.iter().all(|t| *t > from), "{ts:?} not after {from}");
        assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
        assert_eq!(p.last, ts.last().copied().unwrap_or(from));
        for l in &p.lines {
            assert!(instances.contains(l["instance"].as_str().unwrap()), "{l}");
        }
        paged.extend(p.lines);
        from = p.last;
        let seen: BTreeSet<&str> = paged
            .iter()
            .map(|l| l["instance"].as_str().unwrap())
            .collect();
        if seen.len() == 3 && paged.len() >= 60 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instances that spoke: {seen:?}, {} lines",
            paged.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Exactly the lines one big read has up to there: none twice, none lost.
    let all = logs(&api, &app_id, "from=0&limit=10000").await;
    let upto: Vec<_> = all
        .lines
        .iter()
        .filter(|l| l["t"].as_u64().unwrap() <= from)
        .map(key_of)
        .collect();
    let paged_keys: Vec<_> = paged.iter().map(key_of).collect();
    assert_eq!(paged_keys, upto);
    assert!(
        paged
            .iter()
            .any(|l| l["line"].as_str().unwrap().starts_with("tick "))
    );

    // One instance only.
    let one = instances.iter().next().unwrap();
    let p = logs(&api, &app_id, &format!("from=0&instance={one}")).await;
    assert!(!p.lines.is_empty());
    assert!(p.lines.iter().all(|l| l["instance"] == one.as_str()));

    // Latency of a page over the 3 instances (2 nodes).
    let (mut times, mut n) = (Vec::new(), 0);
    for _ in 0..9 {
        let t = Instant::now();
        n = logs(&api, &app_id, "from=0&limit=1000").await.lines.len();
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "logs page over 3 instances on 2 nodes ({n} lines): median {:?} (min {:?}, max {:?})",
        times[4], times[0], times[8]
    );

    // node-b stops answering (its instances keep running): its lines are
    // left out and it is named; node-a's lines still come.
    let on_a: BTreeSet<String> = fa.reconciler.instances.borrow().keys().cloned().collect();
    let b_dir = tmp.path().join("b");
    fb.shutdown().await;
    let t = Instant::now();
    let p = logs(&api, &app_id, "from=0&limit=10000").await;
    let took = t.elapsed();
    assert_eq!(p.unreachable.as_deref(), Some("node-b"));
    assert!(!p.lines.is_empty());
    assert!(
        p.lines
            .iter()
            .all(|l| on_a.contains(l["instance"].as_str().unwrap())),
        "a line of node-b's instances while it is down"
    );
    eprintln!("logs page with node-b down: {took:?}");

    // Cleanup: a follower on node-b's data dir stops what it left running.
    let fb = start_follower(&b_dir, "node-b", &api, &meta, &store).await;
    fb.shutdown_and_stop_instances().await;
    fa.shutdown_and_stop_instances().await;
    captain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotates_and_a_slow_poller_hears_of_commits() {
    let _logs = log_buffer();
    let tmp = tempfile::tempdir().unwrap();
    let Setup {
        data,
        store,
        captain,
        api,
        project_id,
        ..
    } = captain_with_web_app(tmp.path()).await;
    let meta = data.join("meta.git");
    // A follower that polls the meta repo only every 60 s.
    let mut fcfg = follower::FollowerConfig::new(tmp.path().join("n"), meta.display().to_string());
    fcfg.node_id = Some("node-n".into());
    fcfg.captain_url = Some(api.base.clone());
    fcfg.token = api.token.clone();
    fcfg.runtime = RuntimeChoice::Process;
    fcfg.instance_range = Some(instance_range());
    fcfg.images = Some(Arc::new(LocalDirImageSource::new(&store)));
    fcfg.poll_interval = Duration::from_secs(60);
    fcfg.reconcile_interval = Duration::from_millis(200);
    fcfg.heartbeat_interval = Duration::from_millis(300);
    let f = follower::Follower::start(fcfg).await.unwrap();
    wait_registered(&api, &["node-n"]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let k1 = wait_key(&captain, &data, "node-n").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_info_status(&http, &f, &k1).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the follower never accepted its key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node_info_status(&http, &f, "wrong").await, 401);
    assert_eq!(node_info_status(&http, &f, &k1[1..]).await, 401);
    let token1 = std::fs::read_to_string(tmp.path().join("n/captain-node-token")).unwrap();
    assert_eq!(node_info_status(&http, &f, token1.trim()).await, 200);

    // A commit (a new env for the app) reaches the follower at once.
    let head = || async { captain.state().meta.head().await.unwrap().unwrap() };
    let applied = || f.follow.borrow().applied.clone();
    api.ok(
        reqwest::Method::POST,
        &format!("/v1/projects/{project_id}/apps"),
        Some(json!({"name": "web", "env": "staging"})),
    )
    .await;
    let committed = Instant::now();
    let want = head().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while applied().as_deref() != Some(want.as_str()) {
        assert!(
            Instant::now() < deadline,
            "the follower did not fetch {want} (it has {:?})",
            applied()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "captain commit -> follower (60 s poll) applied it: {:?}",
        committed.elapsed()
    );

    // The node is removed: its next heartbeat is refused, it registers
    // again and gets a new key; the old key and token stop working here.
    let (s, body) = api
        .call(reqwest::Method::DELETE, "/v1/nodes/node-n", None)
        .await;
    assert_eq!(s, 204, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let k2 = loop {
        if let Some(k) = current_key(&captain, &data, "node-n").await
            && k != k1
        {
            break k;
        }
        assert!(Instant::now() < deadline, "node-n never registered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_info_status(&http, &f, &k2).await != 200 {
        assert!(Instant::now() < deadline, "the new key was never accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node_info_status(&http, &f, &k1).await, 401);
    assert_eq!(node_info_status(&http, &f, token1.trim()).await, 401);

    f.shutdown_and_stop_instances().await;
    captain.shutdown().await;
}
