//! `PUT`/`GET /v1/apps/{id}/secrets` and node recipients in env.pb, against
//! SQLite and Postgres: what is refused (and that no refusal quotes a
//! value), what one write commits, and recipients following node
//! registration and removal. The end-to-end path through a follower is in
//! the workspace's `tests/secrets_journey.rs`.

mod common;

use common::{Backend, Env, git};
use meta_schema::pb;
use prost::Message;
use serde_json::{Value, json};

#[test]
#[ignore = "run by the meta repository's pre-receive hook, not by the test runner"]
fn pre_receive_hook_entry() {
    if std::env::var_os(common::HOOK_MODE_ENV).is_some() {
        std::process::exit(captain::hooks::main_entry());
    }
}

/// A valid age X25519 recipient (age's test vector); no identity is
/// needed: the captain only encrypts.
const R1: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
const VALUE: &str = "never-echoed-4f9d1c";

fn node(id: &str, recipient: &str) -> Value {
    json!({"id": id, "address": "10.0.0.9", "cpus": 1, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 30, "age_recipient": recipient})
}

fn env_pb(env: &Env, name: &str) -> pb::Env {
    // env.pb is binary: read git's output raw.
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(env.meta_dir())
        .args(["cat-file", "blob", &format!("main:envs/{name}/env.pb")])
        .output()
        .unwrap();
    assert!(out.status.success());
    pb::Env::decode(out.stdout.as_slice()).unwrap()
}

async fn put_raw(env: &Env, path: &str, content_type: &str, body: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .put(format!("{}{path}", env.base))
        .bearer_auth(&env.token)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn refusals_commits_and_recipients(backend: Backend) {
    let env = Env::start(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let url = format!("/v1/apps/{app}/secrets");

    // No file yet: no names; no recipient yet: writes are refused.
    let (s, v) = env.get(&url).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["names"], json!([]));
    assert_eq!(v["stale"], json!(false));
    let (s, v) = env.put(&url, json!({"secrets": {"A": VALUE}})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{v}"
    );
    let (s, v) = env.get("/v1/apps/nope.production/secrets").await;
    assert_eq!(s, 404, "{v}");

    // A node registers: the existing env lists it.
    let (s, v) = env.post("/v1/nodes", node("n1", R1)).await;
    assert_eq!(s, 201, "{v}");
    let e = env_pb(&env, "production");
    assert_eq!(
        e.age_recipients,
        [pb::AgeRecipient {
            name: "n1".into(),
            recipient: R1.into()
        }]
    );
    // A recipient that is not an X25519 key is not listed (it would break
    // every later write of the env).
    let (s, v) = env.post("/v1/nodes", node("n2", "age1qqqq")).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(env_pb(&env, "production").age_recipients.len(), 1);

    // Refusals, none of which quotes a value.
    let bodies = [
        (json!({"secrets": {"1BAD": VALUE}}), 400, "invalid_name"),
        (
            json!({"secrets": {"A_unencrypted": VALUE}}),
            400,
            "invalid_name",
        ),
        (
            json!({"secrets": {"A": VALUE}, "unset": ["A"]}),
            400,
            "bad_request",
        ),
        (
            json!({"secrets": {"A": VALUE}, "extra": VALUE}),
            400,
            "unknown_field",
        ),
        (json!({"secrets": {"A": [VALUE]}}), 400, "bad_request"),
        (json!({"secrets": [VALUE]}), 400, "bad_request"),
    ];
    for (body, status, code) in bodies {
        let (s, v) = env.put(&url, body.clone()).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
        assert!(!v.to_string().contains(VALUE), "{v}");
    }
    let (s, text) = put_raw(
        &env,
        &url,
        "application/json",
        &format!("{{\"secrets\": {{\"A\": \"{VALUE}\""),
    )
    .await;
    assert_eq!(s, 400, "{text}");
    assert!(!text.contains(VALUE), "{text}");
    let (s, text) = put_raw(&env, &url, "text/plain", &format!("A={VALUE}")).await;
    assert_eq!(s, 415, "{text}");
    assert!(!text.contains(VALUE), "{text}");

    // A deployed app: one write = one commit with the file and a release
    // copying the active one.
    let (s, d) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": common::digest(1), "port": 8080, "env_vars": {"PLAIN": "1"}}),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    let (s, v) = env
        .put(&url, json!({"secrets": {"A": VALUE, "B": ""}}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(!v.to_string().contains(VALUE));
    assert_eq!(v["names"], json!(["A", "B"]));
    assert_eq!(v["recipients"], json!(["n1"]));
    let release = v["release"].as_str().unwrap();
    let commit = v["commit"].as_str().unwrap();
    let meta = env.meta_dir();
    let meta = meta.to_str().unwrap();
    let files = git(
        None,
        &[
            "--git-dir",
            meta,
            "diff-tree",
            "--no-commit-id",
            "--name-only",
            "-r",
            commit,
        ],
    );
    assert_eq!(
        files.lines().collect::<Vec<_>>(),
        [
            format!("envs/production/apps/web/releases/{release}.pb"),
            "envs/production/apps/web/secrets.sops.yaml".to_string()
        ]
    );
    let out = std::process::Command::new("git")
        .args(["--git-dir", meta, "cat-file", "blob"])
        .arg(format!(
            "{commit}:envs/production/apps/web/releases/{release}.pb"
        ))
        .output()
        .unwrap();
    let r = pb::Release::decode(out.stdout.as_slice()).unwrap();
    assert_eq!(r.secret_refs, ["A", "B"]);
    assert_eq!(
        r.secrets_blob,
        git(
            None,
            &[
                "--git-dir",
                meta,
                "rev-parse",
                &format!("{commit}:envs/production/apps/web/secrets.sops.yaml")
            ]
        )
    );
    assert_eq!(r.image_digest, common::digest(1));
    assert_eq!(r.env_vars.get("PLAIN").map(String::as_str), Some("1"));
    assert_eq!(r.port, 8080);

    // Dropping a name needs `unset`; with it, the file holds the rest.
    let (s, v) = env.put(&url, json!({"secrets": {"A": VALUE}})).await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing: B"),
        "{v}"
    );
    let (s, v) = env
        .put(&url, json!({"secrets": {"A": VALUE}, "unset": ["B"]}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["names"], json!(["A"]));

    // The next deployment of the app names the secrets too.
    let (s, d) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": common::digest(2)}),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    let out = std::process::Command::new("git")
        .args(["--git-dir", meta, "cat-file", "blob"])
        .arg(format!("main:{}", d["path"].as_str().unwrap()))
        .output()
        .unwrap();
    let r = pb::Release::decode(out.stdout.as_slice()).unwrap();
    assert_eq!(r.secret_refs, ["A"]);
    assert_eq!(
        r.secrets_blob,
        git(
            None,
            &[
                "--git-dir",
                meta,
                "rev-parse",
                "main:envs/production/apps/web/secrets.sops.yaml"
            ]
        )
    );

    // A new env starts with the nodes; removing a node removes it
    // everywhere, and the file written before is then stale.
    let (pid, _) = env.project_and_app("other", "api").await;
    let (s, v) = env
        .post(
            &format!("/v1/projects/{pid}/apps"),
            json!({"name": "api", "env": "staging"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(env_pb(&env, "staging").age_recipients.len(), 1);
    let (s, v) = env.req(reqwest::Method::DELETE, "/v1/nodes/n1", None).await;
    assert_eq!(s, 204, "{v}");
    assert!(env_pb(&env, "production").age_recipients.is_empty());
    assert!(env_pb(&env, "staging").age_recipients.is_empty());
    let (s, v) = env.get(&url).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stale"], json!(true));
    assert_eq!(v["env_recipients"], json!([]));
    let (s, v) = env.put(&url, json!({"secrets": {"A": VALUE}})).await;
    assert_eq!(s, 409, "{v}");

    // Nothing of the value in the database.
    if backend == Backend::Sqlite {
        for e in std::fs::read_dir(env.data_dir()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("captain.db") {
                let b = std::fs::read(e.path()).unwrap();
                assert!(!b.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()));
            }
        }
    }
    env.stop().await;
}

both!(
    refusals_commits_and_recipients,
    refusals_commits_and_recipients
);
