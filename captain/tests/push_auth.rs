//! Pushes to the captain's `/meta.git` are authorized per path by the
//! pusher's role: each attack a user could make with a push, refused by the
//! pre-receive hook, naming the path; what a user may do (add and revert
//! releases of their own apps) still works.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Backend, Env, digest};
use meta_schema::layout::{app_path, deployment_path, env_path, node_path, release_path};
use meta_schema::pb;
use prost::Message;
use reqwest::Method;
use serde_json::json;

#[test]
#[ignore = "run by the meta repository's pre-receive hook, not by the test runner"]
fn pre_receive_hook_entry() {
    if std::env::var_os(common::HOOK_MODE_ENV).is_some() {
        std::process::exit(captain::hooks::main_entry());
    }
}

/// A clone of the captain's meta repository, pushing as one token.
struct Clone {
    dir: tempfile::TempDir,
}

impl Clone {
    fn new(env: &Env, token: &str) -> Clone {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "http://git:{token}@{}/meta.git",
            env.base.trim_start_matches("http://")
        );
        common::git(Some(dir.path()), &["clone", "--quiet", &url, "c"]);
        Clone { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("c")
    }

    fn write(&self, rel: &str, bytes: &[u8]) {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    /// Commit everything and push: Ok, or the refusal git printed.
    fn push(&self, message: &str) -> Result<(), String> {
        let c = self.path();
        common::git(Some(&c), &["add", "-A"]);
        common::git(Some(&c), &["commit", "--quiet", "-m", message]);
        let out = Command::new("git")
            .current_dir(&c)
            .args(["push", "--quiet", "origin", "HEAD:main"])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// Back to the remote's head (after a refused push).
    fn reset(&self) {
        let c = self.path();
        common::git(Some(&c), &["fetch", "--quiet", "origin"]);
        common::git(Some(&c), &["reset", "--quiet", "--hard", "origin/main"]);
    }
}

fn release(env_name: &str, app: &str) -> pb::Release {
    pb::Release {
        id: meta_schema::new_id(),
        app: app.into(),
        env: env_name.into(),
        image_digest: digest(3),
        created_at: meta_schema::now_millis(),
        ..Default::default()
    }
}

async fn user(env: &Env, name: &str) -> String {
    let (s, t) = env
        .post("/v1/tokens", json!({"name": name, "kind": "user"}))
        .await;
    assert_eq!(s, 201, "{t}");
    t["secret"].as_str().unwrap().to_string()
}

async fn project_app(env: &Env, token: &str, project: &str, app: &str) {
    let (s, p) = env
        .req_as(
            token,
            Method::POST,
            "/v1/projects",
            Some(
                json!({"name": project, "repo": format!("https://git.example.com/{project}.git")}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    let (s, a) = env
        .req_as(
            token,
            Method::POST,
            &format!("/v1/projects/{}/apps", p["id"].as_str().unwrap()),
            Some(json!({"name": app, "domains": [format!("{app}.example.com")]})),
        )
        .await;
    assert_eq!(s, 201, "{a}");
}

fn refused(r: Result<(), String>, path: &str, what: &str) {
    match r {
        Ok(()) => panic!("{what}: the push was accepted"),
        Err(e) => assert!(
            e.contains("push refused") && e.contains(path),
            "{what}: refused, naming {path}:\n{e}"
        ),
    }
}

async fn pushes_are_authorized_per_path(backend: Backend) {
    let env = Env::start(backend).await;
    let alice = user(&env, "alice").await;
    let bob = user(&env, "bob").await;
    project_app(&env, &alice, "shop", "web").await;
    project_app(&env, &bob, "blog", "blog").await;
    let b = Clone::new(&env, &bob);

    // Another tenant's app: a release that would replace what runs.
    let r = release("production", "web");
    let p = release_path("production", "web", &r.id);
    b.write(&p, &r.encode_to_vec());
    refused(
        b.push("take over web"),
        &p,
        "a release of another tenant's app",
    );
    b.reset();

    // A deployment file, even of one's own app (only the captain writes
    // them): a forged PROMOTED rollout.
    let own = release("production", "blog");
    let id = meta_schema::new_id();
    let dep = pb::Deployment {
        id: id.clone(),
        app: "blog".into(),
        env: "production".into(),
        rollout_id: id.clone(),
        state: pb::DeploymentState::Promoted as i32,
        release: Some(own.clone()),
        instances: vec![],
        created_at: meta_schema::now_millis(),
        reason: String::new(),
    };
    let p = deployment_path("production", "blog", &id);
    b.write(&p, &dep.encode_to_vec());
    refused(b.push("forge a promotion"), &p, "a deployment file");
    b.reset();

    // env.pb: an extra age recipient would get every secret re-wrapped to
    // the attacker's key.
    let p = env_path("production");
    let mut e = pb::Env::decode(std::fs::read(b.path().join(&p)).unwrap().as_slice()).unwrap();
    e.age_recipients.push(pb::AgeRecipient {
        name: "attacker".into(),
        recipient: "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p".into(),
    });
    b.write(&p, &e.encode_to_vec());
    refused(b.push("add my key"), &p, "an age recipient in env.pb");
    b.reset();

    // nodes/: a node of one's own.
    let p = node_path("evil");
    b.write(
        &p,
        &pb::Node {
            id: "evil".into(),
            address: "10.6.6.6".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    refused(b.push("a node"), &p, "a node file");
    b.reset();

    // Anything outside the layout.
    b.write("payload.bin", &[0u8; 64]);
    refused(b.push("a blob"), "payload.bin", "a file outside the layout");
    b.reset();

    // A huge file in one's own app (an env var of 2 MiB).
    let mut big = release("production", "blog");
    big.env_vars.insert("X".into(), "x".repeat(2 << 20));
    let p = release_path("production", "blog", &big.id);
    b.write(&p, &big.encode_to_vec());
    refused(b.push("big"), &p, "a file over the size limit");
    b.reset();

    // Another app's domain through one's own app.pb.
    let p = app_path("production", "blog");
    let mut a = pb::App::decode(std::fs::read(b.path().join(&p)).unwrap().as_slice()).unwrap();
    a.domains = vec!["web.example.com".into()];
    b.write(&p, &a.encode_to_vec());
    refused(b.push("steal a domain"), &p, "another app's custom domain");
    b.reset();

    // What a user may do: add a release of their own app, and revert it.
    let p = release_path("production", "blog", &own.id);
    b.write(&p, &own.encode_to_vec());
    b.push("release blog").expect("a release of one's own app");
    let head = common::git(Some(&b.path()), &["rev-parse", "HEAD"]);
    common::git(Some(&b.path()), &["revert", "--no-edit", &head]);
    let out = Command::new("git")
        .current_dir(b.path())
        .args(["push", "--quiet", "origin", "HEAD:main"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git revert of one's own release: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An admin may change env.pb.
    let adm = Clone::new(&env, &env.token);
    let p = env_path("production");
    let mut e = pb::Env::decode(std::fs::read(adm.path().join(&p)).unwrap().as_slice()).unwrap();
    e.domains.push("apps.example.org".into());
    adm.write(&p, &e.encode_to_vec());
    adm.push("more domains").expect("an admin may");
    env.stop().await;
}
both!(push_authorization, pushes_are_authorized_per_path);
