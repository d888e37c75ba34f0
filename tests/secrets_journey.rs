//! Secrets end to end, in one process: a real captain (SQLite, its own meta
//! repository) and a real follower with the `process` runtime. The node's
//! age recipient lands in every env.pb; a secret set through the API is
//! encrypted to it, released, and reaches the instance's environment; the
//! plaintext is found neither in the SQLite files, nor in the log output
//! of captain and follower, nor in any object of the meta repository. A
//! secrets file altered by hand (plain git) makes the next instance fail
//! to start, with a reason naming the MAC and not the value.
//!
//! Every address is on loopback; every wait is bounded.

#[path = "common/secrets.rs"]
mod secrets_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use follower::image::LocalDirImageSource;
use follower::reconciler::Phase;
use follower::runtime::RuntimeChoice;
use prost::Message;
use secrets_common::*;
use serde_json::{Value, json};

const SECRET: &str = "plaintext-7c0ffee-d15ea5e-first";
const SECRET2: &str = "plaintext-2b4dc0de-f00d-second";
/// A JSON number sent as a value: errors must not quote it back.
const NUMBER: &str = "918273645546372819";
/// A valid age X25519 recipient of no node here (age's test vector).
const OTHER_RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_reaches_the_instance_and_nowhere_else() {
    let logs = log_buffer();
    let tmp = tempfile::tempdir().unwrap();
    // An app (and its env) before any node exists: nothing to encrypt to.
    let Setup {
        data,
        store,
        digest,
        captain,
        api,
        project_id: pid,
        app_id,
    } = captain_with_web_app(tmp.path()).await;
    use reqwest::Method as M;
    let secrets_url = format!("/v1/apps/{app_id}/secrets");
    let (s, body) = api
        .call(
            M::PUT,
            &secrets_url,
            Some(json!({"secrets": {"API_KEY": SECRET}})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("no age recipients"), "{body}");
    assert!(!body.contains(SECRET));
    assert!(env_recipients(&captain, "production").await.is_empty());

    // The follower registers with its age recipient: production lists it.
    let range = {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let n = (nanos as u16 ^ std::process::id() as u16) | 0x8000;
        follower::net::InstanceRange::parse(&format!("fd00:7a77:0:{n:x}::/64")).unwrap()
    };
    let mut fcfg = follower::FollowerConfig::new(
        tmp.path().join("node"),
        data.join("meta.git").display().to_string(),
    );
    fcfg.node_id = Some("node-a".into());
    fcfg.captain_url = Some(api.base.clone());
    fcfg.token = api.token.clone();
    fcfg.runtime = RuntimeChoice::Process;
    fcfg.instance_range = Some(range);
    fcfg.images = Some(Arc::new(LocalDirImageSource::new(&store)));
    fcfg.poll_interval = Duration::from_millis(500);
    fcfg.reconcile_interval = Duration::from_millis(200);
    fcfg.heartbeat_interval = Duration::from_secs(1);
    let f = follower::Follower::start(fcfg).await.unwrap();
    let mut commits = captain.state().commits.subscribe();
    let notify = f.notify.clone();
    let bridge = tokio::spawn(async move {
        while commits.changed().await.is_ok() {
            notify.notify_one();
        }
    });
    // The follower registers in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    while env_recipients(&captain, "production").await.is_empty() {
        assert!(Instant::now() < deadline, "the node never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env_recipients(&captain, "production").await,
        vec![("node-a".to_string(), f.age_recipient.clone())]
    );
    // A later env starts with every registered node.
    api.ok(
        M::POST,
        &format!("/v1/projects/{pid}/apps"),
        Some(json!({"name": "web", "env": "staging"})),
    )
    .await;
    assert_eq!(
        env_recipients(&captain, "staging").await,
        vec![("node-a".to_string(), f.age_recipient.clone())]
    );
    // Another node joins every env, and leaves every env when removed.
    api.ok(
        M::POST,
        "/v1/nodes",
        Some(json!({"id": "node-b", "address": "127.0.0.1", "cpus": 1, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 30, "age_recipient": OTHER_RECIPIENT})),
    )
    .await;
    for env in ["production", "staging"] {
        let names: Vec<String> = env_recipients(&captain, env)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(names, ["node-a", "node-b"], "{env}");
    }
    api.ok(M::DELETE, "/v1/nodes/node-b", None).await;
    for env in ["production", "staging"] {
        let names: Vec<String> = env_recipients(&captain, env)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(names, ["node-a"], "{env}");
    }

    // A value that is not a string is refused without being quoted back.
    let (s, body) = api
        .call(
            M::PUT,
            &secrets_url,
            Some(
                serde_json::from_str(&format!(r#"{{"secrets": {{"API_KEY": {NUMBER}}}}}"#))
                    .unwrap(),
            ),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(!body.contains(NUMBER), "{body}");

    // Set the secret (the app has no release yet), then deploy: the
    // release names it, the follower decrypts it into the environment.
    let v = api
        .ok(
            M::PUT,
            &secrets_url,
            Some(json!({"secrets": {"API_KEY": SECRET}})),
        )
        .await;
    assert_eq!(v["names"], json!(["API_KEY"]));
    assert_eq!(v["recipients"], json!(["node-a"]));
    assert_eq!(v["stale"], json!(false));
    assert!(v["release"].is_null(), "{v}");
    assert!(!v.to_string().contains(SECRET));
    let d1 = api
        .ok(
            M::POST,
            "/v1/deployments",
            Some(json!({"app_id": app_id, "image_digest": digest, "port": 8080, "min_instances": 1, "health_check_path": "/"})),
        )
        .await;
    let r1 = d1["id"].as_str().unwrap().to_string();
    let rec = wait_for(120, "the first release healthy", || healthy_of(&f, &r1)).await;
    assert_eq!(page(&api.http, &rec).await, format!("{SECRET}\n"));

    // The names are readable, never the values.
    let (s, listed) = api.call(M::GET, &secrets_url, None).await;
    assert_eq!(s, 200, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["names"], json!(["API_KEY"]));
    assert!(!listed.to_string().contains(SECRET));

    // The captain cannot keep a value it cannot read: dropping a name
    // needs `unset`.
    let (s, body) = api
        .call(
            M::PUT,
            &secrets_url,
            Some(json!({"secrets": {"OTHER": "x"}})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("missing: API_KEY"), "{body}");

    // A new value on a deployed app: one commit, one release copying the
    // active one, which the rollout starts with the new value.
    let v = api
        .ok(
            M::PUT,
            &secrets_url,
            Some(json!({"secrets": {"API_KEY": SECRET2}})),
        )
        .await;
    let r2 = v["release"]
        .as_str()
        .expect("a release was made")
        .to_string();
    let meta_git = data.join("meta.git");
    let commit = v["commit"].as_str().unwrap();
    let changed = git_str(
        &meta_git,
        &["diff-tree", "--no-commit-id", "--name-only", "-r", commit],
        None,
    );
    assert_eq!(
        changed.lines().collect::<Vec<_>>(),
        [
            format!("envs/production/apps/web/releases/{r2}.pb"),
            "envs/production/apps/web/secrets.sops.yaml".to_string()
        ]
    );
    let blob = git_str(
        &meta_git,
        &[
            "rev-parse",
            &format!("{commit}:envs/production/apps/web/secrets.sops.yaml"),
        ],
        None,
    );
    let rel = meta_schema::pb::Release::decode(
        git(
            &meta_git,
            &[
                "cat-file",
                "blob",
                &format!("{commit}:envs/production/apps/web/releases/{r2}.pb"),
            ],
            None,
        )
        .as_slice(),
    )
    .unwrap();
    assert_eq!(rel.secret_refs, ["API_KEY"]);
    assert_eq!(rel.secrets_blob, blob);
    assert_eq!(rel.image_digest, digest);
    assert_eq!(rel.min_instances, 1);
    let rec = wait_for(120, "the release of the new secret healthy", || {
        healthy_of(&f, &r2)
    })
    .await;
    assert_eq!(page(&api.http, &rec).await, format!("{SECRET2}\n"));

    // The plaintexts are nowhere the captain writes: not in the SQLite files,
    let mut db_files = 0;
    for e in std::fs::read_dir(&data).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("captain.db") {
            let bytes = std::fs::read(e.path()).unwrap();
            db_files += usize::from(contains(&bytes, &app_id));
            for s in [SECRET, SECRET2] {
                assert!(!contains(&bytes, s), "plaintext in {name}");
            }
        }
    }
    assert!(db_files > 0, "the SQLite files hold the app's rows");
    // not in any object of the meta repository,
    let objects = git(
        &meta_git,
        &["cat-file", "--batch-all-objects", "--batch"],
        None,
    );
    assert!(
        contains(&objects, "ENC[AES256_GCM,data:"),
        "the secrets files are in the repo"
    );
    for s in [SECRET, SECRET2] {
        assert!(!contains(&objects, s), "plaintext in the meta repository");
    }
    // and not in what captain and follower logged.
    {
        let l = logs.lock().unwrap();
        assert!(contains(&l, "secrets written"), "the log capture works");
        for s in [SECRET, SECRET2, NUMBER] {
            assert!(!contains(&l, s), "plaintext in the logs");
        }
    }

    // A byte of the MAC flipped by hand with plain git: the next instance
    // is not started, and says why without the value.
    let path = "envs/production/apps/web/secrets.sops.yaml";
    let head = git_str(&meta_git, &["rev-parse", "refs/heads/main"], None);
    let yaml = git_str(
        &meta_git,
        &["cat-file", "blob", &format!("{head}:{path}")],
        None,
    );
    let at = yaml.find("mac: ENC[AES256_GCM,data:").expect("a mac entry")
        + "mac: ENC[AES256_GCM,data:".len();
    let mut bytes = yaml.into_bytes();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    bytes.push(b'\n');
    let blob = git_str(&meta_git, &["hash-object", "-w", "--stdin"], Some(&bytes));
    git(&meta_git, &["read-tree", &head], None);
    git(
        &meta_git,
        &[
            "update-index",
            "--cacheinfo",
            &format!("100644,{blob},{path}"),
        ],
        None,
    );
    let tree = git_str(&meta_git, &["write-tree"], None);
    let tampered = git_str(
        &meta_git,
        &["commit-tree", &tree, "-p", &head, "-m", "flip a byte"],
        None,
    );
    git(
        &meta_git,
        &["update-ref", "refs/heads/main", &tampered, &head],
        None,
    );
    let _ = std::fs::remove_file(meta_git.join("test-tamper-index"));
    let d3 = api
        .ok(
            M::POST,
            "/v1/deployments",
            Some(json!({"app_id": app_id, "image_digest": digest, "port": 8080, "min_instances": 1, "health_check_path": "/"})),
        )
        .await;
    let r3 = d3["id"].as_str().unwrap().to_string();
    f.notify.notify_one();
    let failed = wait_for(120, "the release on the altered file refused", || {
        f.reconciler
            .instances
            .borrow()
            .values()
            .find(|r| r.release_id == r3 && r.reason.contains("MAC"))
            .cloned()
    })
    .await;
    assert!(failed.reason.contains("MAC mismatch"), "{}", failed.reason);
    assert!(
        failed.handle.is_none(),
        "an instance was started: {}",
        failed.reason
    );
    assert_ne!(failed.phase, Phase::Healthy);
    for s in [SECRET, SECRET2] {
        assert!(!failed.reason.contains(s));
    }
    // The release serving the last good file keeps running.
    let rec = healthy_of(&f, &r2).expect("the previous release still serves");
    assert_eq!(page(&api.http, &rec).await, format!("{SECRET2}\n"));

    bridge.abort();
    f.shutdown_and_stop_instances().await;
    captain.shutdown().await;
    let l = logs.lock().unwrap();
    for s in [SECRET, SECRET2] {
        assert!(!contains(&l, s), "plaintext in the logs");
    }
}
