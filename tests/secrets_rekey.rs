//! Secrets files follow their env's recipients, in one process: a real
//! captain (SQLite, its own meta repository) and two real followers with the
//! `process` runtime, each with its own data dir and age identity. The
//! captain cannot decrypt; the followers re-encrypt.
//!
//! - Node A registers; a secret is set and an instance on A serves it.
//! - The captain's `PUT /v1/apps/{id}/secrets/file` refuses what it can
//!   check without decrypting (not sops, other recipients, other names) and
//!   accepts a file already right without a commit.
//! - Node B registers: A re-wraps the same data key for A and B, and B's
//!   identity (read from B's data dir) decrypts the file at the head.
//! - Node A is removed: B re-encrypts the file under a fresh data key, which
//!   A's identity cannot read and B's can.
//!
//! The value is never in the captured logs. Every address is on loopback;
//! every wait is bounded.

#[path = "common/secrets.rs"]
mod secrets_common;

use std::path::Path;
use std::time::Duration;

use meta_schema::sops::{Secrets, SopsFile};
use reqwest::Method as M;
use secrets_common::*;
use serde_json::json;

const SECRET: &str = "plaintext-rekey-9a1b2c3d-only-in-memory";
/// A valid age X25519 recipient of no node here (age's test vector).
const OTHER_RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
const PATH: &str = "envs/production/apps/web/secrets.sops.yaml";

/// The secrets file at the captain's meta head, and that head.
async fn head_file(captain: &captain::Captain) -> (String, String) {
    let meta = &captain.state().meta;
    let head = meta.head().await.unwrap().unwrap();
    let tree = meta.tree(head.clone()).await.unwrap();
    let yaml = String::from_utf8(tree.get(PATH).expect("a secrets file").to_vec()).unwrap();
    (head, yaml)
}

/// The age identity a follower keeps in its data dir.
fn identity_of(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("age-identity"))
        .unwrap()
        .trim()
        .to_string()
}

/// `API_KEY` of `yaml`, decrypted with `identity` (an `AGE-SECRET-KEY-1…`),
/// and the file's data key; the error text when it cannot.
fn open(yaml: &str, identity: &str) -> Result<(String, [u8; 32]), String> {
    // The identity type is inferred from `decrypt`: this crate does not
    // depend on `age` directly.
    let id = identity.parse().unwrap();
    let ids = std::slice::from_ref(&id);
    let f = SopsFile::parse(yaml).unwrap();
    let secrets = f.decrypt(ids).map_err(|e| e.to_string())?;
    let key = *f.data_key(ids).map_err(|e| e.to_string())?.expose();
    Ok((secrets.get("API_KEY").unwrap().expose().to_string(), key))
}

fn sorted(v: Vec<&str>) -> Vec<String> {
    let mut v: Vec<String> = v.into_iter().map(str::to_string).collect();
    v.sort();
    v
}

/// A sops file holding `names` (throwaway values), encrypted to `to`.
fn sops_file(names: &[&str], to: &[&str]) -> String {
    let mut s = Secrets::new();
    for n in names {
        s.insert(*n, "throwaway");
    }
    let mut keys = Vec::new();
    for r in to {
        keys.push(r.parse().unwrap());
    }
    meta_schema::sops::encrypt(&s, &keys, meta_schema::now_millis()).unwrap()
}

async fn put_file(api: &Api, app_id: &str, query: &str, yaml: String) -> (u16, String) {
    let r = api
        .http
        .put(format!("{}/v1/apps/{app_id}/secrets/file{query}", api.base))
        .bearer_auth(&api.token)
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_follow_nodes_joining_and_leaving() {
    let logs = log_buffer();
    let tmp = tempfile::tempdir().unwrap();
    let Setup {
        data,
        store,
        digest,
        captain,
        api,
        app_id,
        ..
    } = captain_with_web_app(tmp.path()).await;
    let meta_git = data.join("meta.git");
    assert_eq!(app_id, "web.production");

    // Node A registers; a secret set through the API reaches its instance.
    let dir_a = tmp.path().join("node-a");
    let a = start_follower(&dir_a, "node-a", &api, &meta_git, &store).await;
    let bridge_a = bridge(&captain, &a);
    let recipient_a = a.age_recipient.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env_recipients(&captain, "production").await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "node A never registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.ok(
        M::PUT,
        &format!("/v1/apps/{app_id}/secrets"),
        Some(json!({"secrets": {"API_KEY": SECRET}})),
    )
    .await;
    let d = api
        .ok(
            M::POST,
            "/v1/deployments",
            Some(json!({"app_id": app_id, "image_digest": digest, "port": 8080, "min_instances": 1, "health_check_path": "/"})),
        )
        .await;
    let r1 = d["id"].as_str().unwrap().to_string();
    let rec = wait_for(120, "the release healthy on A", || healthy_of(&a, &r1)).await;
    assert_eq!(page(&api.http, &rec).await, format!("{SECRET}\n"));
    let (head1, file1) = head_file(&captain).await;
    let (v, key1) = open(&file1, &identity_of(&dir_a)).unwrap();
    assert_eq!(v, SECRET);

    // What the captain can check without decrypting.
    let (s, body) = put_file(&api, &app_id, "", "not: [a sops file".into()).await;
    assert_eq!(s, 400, "{body}");
    let (s, body) = put_file(
        &api,
        &app_id,
        "",
        sops_file(&["API_KEY"], &[&recipient_a, OTHER_RECIPIENT]),
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("exactly the recipients"), "{body}");
    let (s, body) = put_file(&api, &app_id, "", sops_file(&["OTHER"], &[&recipient_a])).await;
    assert_eq!(s, 409, "{body}");
    assert!(
        body.contains("added: [OTHER], missing: [API_KEY]"),
        "{body}"
    );
    let (s, body) = put_file(
        &api,
        "nope.production",
        "",
        sops_file(&["API_KEY"], &[&recipient_a]),
    )
    .await;
    assert_eq!(s, 404, "{body}");
    // Already encrypted to the env's recipients: accepted, nothing written.
    let (s, body) = put_file(&api, &app_id, &format!("?base={head1}"), file1.clone()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        git_str(
            &meta_git,
            &["log", "-1", "--format=%H", "refs/heads/main", "--", PATH],
            None,
        ),
        git_str(
            &meta_git,
            &["log", "-1", "--format=%H", &head1, "--", PATH],
            None,
        ),
        "no commit"
    );

    // Node B joins: A can read the file and re-wraps its data key for B.
    let dir_b = tmp.path().join("node-b");
    let b = start_follower(&dir_b, "node-b", &api, &meta_git, &store).await;
    let bridge_b = bridge(&captain, &b);
    let id_b = identity_of(&dir_b);
    let file2 = wait_for_file(&captain, 60, "the file readable by B", |yaml| {
        open(yaml, &id_b).is_ok()
    })
    .await;
    let (v, key2) = open(&file2, &id_b).unwrap();
    assert_eq!(v, SECRET);
    assert_eq!(key2, key1, "joining re-wraps the same data key");
    assert_eq!(open(&file2, &identity_of(&dir_a)).unwrap().0, SECRET);
    assert_eq!(
        sorted(SopsFile::parse(&file2).unwrap().recipients()),
        sorted(vec![recipient_a.as_str(), b.age_recipient.as_str()])
    );
    // In one commit with a release naming the new file (the rollout of
    // that release may have committed since).
    let head2 = git_str(
        &meta_git,
        &["log", "-1", "--format=%H", "refs/heads/main", "--", PATH],
        None,
    );
    assert_eq!(
        git_str(
            &meta_git,
            &["cat-file", "blob", &format!("{head2}:{PATH}")],
            None
        ),
        file2.trim_end()
    );
    let changed = git_str(
        &meta_git,
        &["diff-tree", "--no-commit-id", "--name-only", "-r", &head2],
        None,
    );
    let release_path = changed
        .lines()
        .find(|l| l.contains("/releases/"))
        .unwrap_or_else(|| panic!("no release in {changed}"))
        .to_string();
    assert_eq!(changed.lines().count(), 2, "{changed}");
    assert!(changed.lines().any(|l| l == PATH), "{changed}");
    let blob = git_str(&meta_git, &["rev-parse", &format!("{head2}:{PATH}")], None);
    let rel = <meta_schema::pb::Release as prost::Message>::decode(
        git(
            &meta_git,
            &["cat-file", "blob", &format!("{head2}:{release_path}")],
            None,
        )
        .as_slice(),
    )
    .unwrap();
    assert_eq!(rel.secrets_blob, blob);
    assert_eq!(rel.secret_refs, ["API_KEY"]);
    assert_eq!(rel.image_digest, digest);

    // Node A leaves: stopped, then removed. B re-encrypts under a fresh
    // data key that A's identity cannot read.
    bridge_a.abort();
    a.shutdown_and_stop_instances().await;
    api.ok(M::DELETE, "/v1/nodes/node-a", None).await;
    let file3 = wait_for_file(&captain, 60, "the file without A", |yaml| {
        SopsFile::parse(yaml).unwrap().recipients() == [b.age_recipient.as_str()]
    })
    .await;
    let refused = open(&file3, &identity_of(&dir_a)).unwrap_err();
    assert!(
        refused.contains("none of the given age identities"),
        "{refused}"
    );
    let (v, key3) = open(&file3, &id_b).unwrap();
    assert_eq!(v, SECRET);
    assert_ne!(key3, key1, "a removed node's data key is not reused");

    // The value went nowhere: not in the logs, not in the repository.
    let objects = git(
        &meta_git,
        &["cat-file", "--batch-all-objects", "--batch"],
        None,
    );
    assert!(
        !contains(&objects, SECRET),
        "plaintext in the meta repository"
    );
    {
        let l = logs.lock().unwrap();
        assert!(
            contains(&l, "secrets file re-encrypted to the env's recipients"),
            "the log capture works"
        );
        assert!(!contains(&l, SECRET), "plaintext in the logs");
    }

    // With no follower running, the endpoint alone: a node joins, and a
    // file re-wrapped (here, by the test with B's identity) is refused when
    // read at a commit whose file is not the head's, committed once when it
    // is, and accepted without a commit when sent again.
    bridge_b.abort();
    let recipient_b = b.age_recipient.clone();
    b.shutdown_and_stop_instances().await;
    api.ok(
        M::POST,
        "/v1/nodes",
        Some(json!({"id": "node-x", "address": "127.0.0.1", "cpus": 1, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 30, "age_recipient": OTHER_RECIPIENT})),
    )
    .await;
    let listed = api
        .ok(M::GET, &format!("/v1/apps/{app_id}/secrets"), None)
        .await;
    assert_eq!(listed["stale"], json!(true), "{listed}");
    let rewrapped = {
        let id = id_b.parse().unwrap();
        let mut keys = Vec::new();
        for r in [recipient_b.as_str(), OTHER_RECIPIENT] {
            keys.push(r.parse().unwrap());
        }
        SopsFile::parse(&file3)
            .unwrap()
            .rewrap(std::slice::from_ref(&id), &keys)
            .unwrap()
    };
    let (s, body) = put_file(&api, &app_id, &format!("?base={head1}"), rewrapped.clone()).await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("changed since"), "{body}");
    let at = git_str(
        &meta_git,
        &["log", "-1", "--format=%H", "refs/heads/main", "--", PATH],
        None,
    );
    let (s, body) = put_file(&api, &app_id, &format!("?base={at}"), rewrapped.clone()).await;
    assert_eq!(s, 200, "{body}");
    let committed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(committed["commit"].is_string(), "{body}");
    assert_eq!(committed["stale"], json!(false), "{body}");
    let (_, file4) = head_file(&captain).await;
    assert_eq!(file4.trim_end(), rewrapped.trim_end());
    let (s, body) = put_file(&api, &app_id, &format!("?base={at}"), rewrapped).await;
    assert_eq!(s, 200, "{body}");
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["commit"].is_null());
    // (The rollout of the new release may commit meanwhile: compare the
    // last commit of the file.)
    let last = git_str(
        &meta_git,
        &["log", "-1", "--format=%H", "refs/heads/main", "--", PATH],
        None,
    );
    assert_eq!(json!(last), committed["commit"], "no second commit");

    captain.shutdown().await;
    assert!(
        !contains(&logs.lock().unwrap(), SECRET),
        "plaintext in the logs"
    );
}

/// Polls the secrets file at the head for at most `secs` seconds until `ok`.
async fn wait_for_file(
    captain: &captain::Captain,
    secs: u64,
    what: &str,
    mut ok: impl FnMut(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, yaml) = head_file(captain).await;
        if ok(&yaml) {
            return yaml;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
