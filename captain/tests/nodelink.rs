//! The captain's side of the node link, against SQLite and Postgres: the
//! `api_key` of a registration (derived from the link secret and the
//! registration's node token, never stored; rotated by registering again;
//! gone with the node) and `GET /v1/apps/{id}/logs` where no follower
//! answers (unknown app, unknown instance, a node that is down). Lines
//! from real followers are tested in the workspace's `tests/node_link.rs`.

mod common;

use common::{Backend, Env};
use serde_json::{Value, json};

#[test]
#[ignore = "run by the meta repository's pre-receive hook, not by the test runner"]
fn pre_receive_hook_entry() {
    if std::env::var_os(common::HOOK_MODE_ENV).is_some() {
        std::process::exit(captain::hooks::main_entry());
    }
}

fn node(id: &str, api_url: &str) -> Value {
    json!({"id": id, "address": "127.0.0.1", "cpus": 1, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 30, "api_url": api_url})
}

/// The key the captain would call `node` with now (None: no live
/// registration).
async fn current_key(env: &Env, node: &str) -> Option<String> {
    let st = env.captain.as_ref().unwrap().state();
    let reg = st.db.node_registrations().await.unwrap().get(node)?.clone();
    Some(
        captain::nodelink::issue_key(
            &env.data_dir().join(captain::nodelink::LINK_SECRET_FILE),
            node,
            &reg,
        )
        .unwrap(),
    )
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn get_raw(env: &Env, path: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = env
        .http
        .get(format!("{}{path}", env.base))
        .bearer_auth(&env.token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap())
}

async fn api_key_follows_registrations(backend: Backend) {
    let mut env = Env::start(backend).await;
    let (s, r1) = env
        .post("/v1/nodes", node("n1", "http://127.0.0.1:1"))
        .await;
    assert_eq!(s, 201, "{r1}");
    let k1 = r1["api_key"].as_str().unwrap().to_string();
    assert_eq!(k1.len(), 64);
    assert!(k1.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(current_key(&env, "n1").await.as_deref(), Some(k1.as_str()));
    // The link secret: one file, 0600; the database has no key.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.data_dir().join(captain::nodelink::LINK_SECRET_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let st = env.captain.as_ref().unwrap().state();
    let hashes: Vec<String> = sqlx::query_scalar("SELECT hash FROM tokens")
        .fetch_all(st.db.pool())
        .await
        .unwrap();
    assert!(!hashes.iter().any(|h| h.contains(&k1)));

    // Another node, another key.
    let (s, r2) = env
        .post("/v1/nodes", node("n2", "http://127.0.0.1:1"))
        .await;
    assert_eq!(s, 201, "{r2}");
    assert_ne!(r2["api_key"], r1["api_key"]);

    // Registering again rotates it.
    let (s, again) = env
        .post("/v1/nodes", node("n1", "http://127.0.0.1:1"))
        .await;
    assert_eq!(s, 200, "{again}");
    let k1b = again["api_key"].as_str().unwrap().to_string();
    assert_ne!(k1b, k1);
    assert_eq!(current_key(&env, "n1").await.as_deref(), Some(k1b.as_str()));

    // A restart re-derives the same key (secret file and token row kept).
    env.restart(false).await;
    assert_eq!(current_key(&env, "n1").await.as_deref(), Some(k1b.as_str()));

    // A removed node has no key.
    let (s, v) = env.req(reqwest::Method::DELETE, "/v1/nodes/n1", None).await;
    assert_eq!(s, 204, "{v}");
    assert_eq!(current_key(&env, "n1").await, None);
    env.stop().await;
}

async fn app_logs_without_answering_followers(backend: Backend) {
    let env = Env::start(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;

    // Unknown app: 404 in the API's error shape.
    let (s, _, v) = get_raw(&env, "/v1/apps/nope.production/logs").await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "not_found", "{v}");

    // No instances: an empty page, the next `from` is `from`.
    let (s, h, v) = get_raw(&env, &format!("/v1/apps/{app}/logs?from=42")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, json!([]));
    assert_eq!(h["x-last-log-nano"], "42");
    assert!(h.get("x-log-unreachable").is_none());

    // An instance on a node whose API does not answer: still 200, the
    // node named in X-Log-Unreachable.
    let url = format!("http://127.0.0.1:{}", closed_port());
    let (s, v) = env.post("/v1/nodes", node("down", &url)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = env
        .post(
            "/v1/instances",
            json!({"id": "i-down-1", "node_id": "down", "env": "production", "app": "web", "release_id": "r1", "state": "failed"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // A stopped instance is gone from its node: not asked.
    let url2 = format!("http://127.0.0.1:{}", closed_port());
    let (s, v) = env.post("/v1/nodes", node("gone", &url2)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = env
        .post(
            "/v1/instances",
            json!({"id": "i-gone-1", "node_id": "gone", "env": "production", "app": "web", "release_id": "r1", "state": "stopped"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let started = std::time::Instant::now();
    let (s, h, v) = get_raw(&env, &format!("/v1/apps/{app}/logs?from=7&limit=5")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, json!([]));
    assert_eq!(h["x-last-log-nano"], "7");
    assert_eq!(h["x-log-unreachable"], "down");
    // Refused at once; never more than the link's timeouts.
    assert!(started.elapsed() < std::time::Duration::from_secs(6));

    // ?instance= restricts to one instance of the app; another is a 404.
    let (s, h, _) = get_raw(&env, &format!("/v1/apps/{app}/logs?instance=i-down-1")).await;
    assert_eq!(s, 200);
    assert_eq!(h["x-log-unreachable"], "down");
    let (s, _, v) = get_raw(&env, &format!("/v1/apps/{app}/logs?instance=i-other")).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    // Malformed paging: 400, not 500.
    let (s, _, v) = get_raw(&env, &format!("/v1/apps/{app}/logs?from=-1")).await;
    assert_eq!(s, 400, "{v}");
    env.stop().await;
}

both!(api_key, api_key_follows_registrations);
both!(app_logs, app_logs_without_answering_followers);
