//! Tenants: every route of the API (and of the node protocol) called with
//! the token of a user of *another* project, against the resources of
//! project A. The cases are keyed by the route table itself, so a new
//! route without a case fails this test until someone decides what another
//! tenant may do with it.

mod common;

use std::collections::BTreeMap;

use captain::db::{BuildRow, ImageRow};
use common::{Backend, Env, digest};
use reqwest::Method;
use serde_json::{Value, json};

/// The pre-receive hook runs this test binary (see `common`).
#[test]
#[ignore = "run by the meta repository's pre-receive hook, not by the test runner"]
fn pre_receive_hook_entry() {
    if std::env::var_os(common::HOOK_MODE_ENV).is_some() {
        std::process::exit(captain::hooks::main_entry());
    }
}

/// What a user of another project may do with a route.
#[derive(Debug, Clone, Copy)]
enum Case {
    /// Not about any project's data (why).
    NotScoped(&'static str),
    /// Refused with one of these statuses (404 where a name could leak).
    Refused(&'static [u16]),
    /// Answered, with nothing of project A in the answer.
    Filtered,
}

use Case::{Filtered, NotScoped, Refused};

const NOT_FOUND: &[u16] = &[404];
const FORBIDDEN: &[u16] = &[403];

fn cases() -> BTreeMap<(&'static str, &'static str), Case> {
    BTreeMap::from([
        (("GET", "/v1/health"), NotScoped("liveness")),
        (("GET", "/v1/auth/github"), NotScoped("sign-in")),
        (("POST", "/v1/auth/github"), NotScoped("sign-in")),
        (
            ("POST", "/v1/webhook/github"),
            NotScoped("HMAC-signed by GitHub"),
        ),
        (("POST", "/v1/waitlist"), NotScoped("anyone may join")),
        (("GET", "/v1/waitlist"), Refused(FORBIDDEN)),
        (("POST", "/v1/waitlist/{id}/admit"), Refused(FORBIDDEN)),
        (("GET", "/v1/users"), Refused(FORBIDDEN)),
        (
            ("GET", "/v1/openapi.json"),
            NotScoped("the API's description"),
        ),
        (
            ("GET", "/metrics"),
            NotScoped("per-route counters, no project data"),
        ),
        (("GET", "/v1/admin/tasks"), Refused(FORBIDDEN)),
        (("GET", "/v1/tokens"), Refused(FORBIDDEN)),
        (("POST", "/v1/tokens"), Refused(FORBIDDEN)),
        (("DELETE", "/v1/tokens/{id}"), Refused(FORBIDDEN)),
        (("GET", "/v1/projects"), Filtered),
        (
            ("POST", "/v1/projects"),
            NotScoped("creates a project of the caller's own"),
        ),
        (("GET", "/v1/projects/{id}"), Refused(NOT_FOUND)),
        (("GET", "/v1/projects/{id}/apps"), Refused(NOT_FOUND)),
        (("POST", "/v1/projects/{id}/apps"), Refused(NOT_FOUND)),
        (("GET", "/v1/projects/{id}/members"), Refused(NOT_FOUND)),
        (("POST", "/v1/projects/{id}/members"), Refused(NOT_FOUND)),
        (
            ("DELETE", "/v1/projects/{id}/members/{user_id}"),
            Refused(NOT_FOUND),
        ),
        (("GET", "/v1/apps/{id}"), Refused(NOT_FOUND)),
        (("DELETE", "/v1/apps/{id}"), Refused(NOT_FOUND)),
        (("GET", "/v1/apps/{id}/secrets"), Refused(NOT_FOUND)),
        (("PUT", "/v1/apps/{id}/secrets"), Refused(NOT_FOUND)),
        (("GET", "/v1/apps/{id}/logs"), Refused(NOT_FOUND)),
        (("PUT", "/v1/apps/{id}/secrets/file"), Refused(FORBIDDEN)),
        (("GET", "/v1/deployments"), Filtered),
        (("POST", "/v1/deployments"), Refused(NOT_FOUND)),
        (("GET", "/v1/deployments/{id}"), Refused(NOT_FOUND)),
        (("PUT", "/v1/deployments/{id}/status"), Refused(NOT_FOUND)),
        (("GET", "/v1/nodes"), Refused(FORBIDDEN)),
        (("POST", "/v1/nodes"), Refused(FORBIDDEN)),
        (("GET", "/v1/nodes/{id}"), Refused(FORBIDDEN)),
        (("DELETE", "/v1/nodes/{id}"), Refused(FORBIDDEN)),
        (("PUT", "/v1/nodes/{id}/state"), Refused(FORBIDDEN)),
        (("GET", "/v1/instances"), Filtered),
        (("POST", "/v1/instances"), Refused(FORBIDDEN)),
        (("GET", "/v1/instances/{id}"), Refused(NOT_FOUND)),
        (("DELETE", "/v1/instances/{id}"), Refused(FORBIDDEN)),
        (("PUT", "/v1/instances/{id}/state"), Refused(FORBIDDEN)),
        (("GET", "/v1/images"), Filtered),
        (("POST", "/v1/images"), Refused(FORBIDDEN)),
        (("GET", "/v1/images/{id}"), Refused(NOT_FOUND)),
        (("DELETE", "/v1/images/{id}"), Refused(FORBIDDEN)),
        (("GET", "/v1/images/{id}/download"), Refused(NOT_FOUND)),
        (
            ("POST", "/v1/sources"),
            NotScoped("uploads a source of the caller's own"),
        ),
        (("GET", "/v1/builds"), Filtered),
        (("POST", "/v1/builds"), Refused(NOT_FOUND)),
        (("GET", "/v1/builds/{id}"), Refused(NOT_FOUND)),
        (("GET", "/v1/builds/{id}/logs"), Refused(NOT_FOUND)),
        (("GET", "/v1/routes/stream"), Refused(FORBIDDEN)),
        (("POST", "/v1/cluster/join-tokens"), Refused(FORBIDDEN)),
        (("POST", "/v1/cluster/join"), Refused(FORBIDDEN)),
        (("POST", "/v1/cluster/renew"), Refused(FORBIDDEN)),
        (("GET", "/v1/cluster/members"), Refused(FORBIDDEN)),
        (("DELETE", "/v1/cluster/members/{id}"), Refused(FORBIDDEN)),
        (("PUT", "/v1/nodes/{id}/drain"), Refused(FORBIDDEN)),
        (
            ("GET", "/meta.git/info/refs"),
            NotScoped(
                "the meta repository is readable by every user (see ARCHITECTURE's trust model); pushes are authorized per path, tested in tests/push_auth.rs",
            ),
        ),
        (
            ("POST", "/meta.git/git-upload-pack"),
            NotScoped("a fetch, as above"),
        ),
        (
            ("POST", "/meta.git/git-receive-pack"),
            NotScoped(
                "pushes are authorized per path by the pre-receive hook (tests/push_auth.rs)",
            ),
        ),
    ])
}

/// Project A's resources, and the tokens of a user of project B and of a
/// node that runs nothing of A's.
struct World {
    a_project: String,
    a_app: String,
    a_user: String,
    a_token_id: String,
    a_deployment: String,
    a_build: String,
    a_image_id: String,
    a_digest: String,
    a_instance: String,
    waitlist_id: String,
    b_token: String,
    b_user: String,
    n1_token: String,
    n2_token: String,
}

async fn user_token(env: &Env, name: &str) -> (String, String, String) {
    let (s, t) = env
        .post("/v1/tokens", json!({"name": name, "kind": "user"}))
        .await;
    assert_eq!(s, 201, "{t}");
    (
        t["secret"].as_str().unwrap().to_string(),
        t["token"]["user_id"].as_str().unwrap().to_string(),
        t["token"]["id"].as_str().unwrap().to_string(),
    )
}

async fn node(env: &Env, id: &str) -> String {
    let (s, n) = env
        .post(
            "/v1/nodes",
            json!({"id": id, "address": "10.0.0.1", "cpus": 2, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 34}),
        )
        .await;
    assert!(s == 201 || s == 200, "{n}");
    n["token"].as_str().unwrap().to_string()
}

async fn world(env: &Env) -> World {
    let (a_token, a_user, a_token_id) = user_token(env, "alice").await;
    let (b_token, b_user, _) = user_token(env, "bob").await;
    let as_a = |m: Method, p: &'static str, b: Value| {
        let a = a_token.clone();
        async move { env.req_as(&a, m, p, Some(b)).await }
    };
    let (s, p) = as_a(
        Method::POST,
        "/v1/projects",
        json!({"name": "shop", "repo": "https://git.example.com/alice/shop.git"}),
    )
    .await;
    assert_eq!(s, 201, "{p}");
    let a_project = p["id"].as_str().unwrap().to_string();
    let (s, app) = env
        .req_as(
            &a_token,
            Method::POST,
            &format!("/v1/projects/{a_project}/apps"),
            Some(json!({"name": "alicesweb"})),
        )
        .await;
    assert_eq!(s, 201, "{app}");
    let a_app = app["id"].as_str().unwrap().to_string();
    let st = env.captain.as_ref().unwrap().state().clone();
    // An image A's project built, and a build of A's app.
    let a_digest = digest(7);
    let a_image_id = "img-alice".to_string();
    st.db
        .insert_image(&ImageRow {
            id: a_image_id.clone(),
            digest: a_digest.clone(),
            size_bytes: 1,
            source_commit: String::new(),
            created_at: 1,
        })
        .await
        .unwrap();
    st.db
        .add_image_project(&a_digest, &a_project)
        .await
        .unwrap();
    let (s, d) = env
        .req_as(
            &a_token,
            Method::POST,
            "/v1/deployments",
            Some(json!({"app_id": a_app, "image_digest": a_digest})),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    let a_deployment = d["id"].as_str().unwrap().to_string();
    let a_build = meta_schema::new_id();
    st.db
        .insert_build(&BuildRow {
            id: a_build.clone(),
            app_id: a_app.clone(),
            source_kind: "git".into(),
            source_url: "https://git.example.com/alice/shop.git".into(),
            source_branch: String::new(),
            source_commit: String::new(),
            dockerfile: "Dockerfile".into(),
            build_args: "{}".into(),
            deploy_spec: String::new(),
            status: "failed".into(),
            attempts: 1,
            next_attempt_at: 0,
            error: "x".into(),
            image_digest: String::new(),
            deployment_id: String::new(),
            created_at: 1,
            started_at: None,
            finished_at: None,
            updated_at: 1,
        })
        .await
        .unwrap();
    let n1_token = node(env, "n1").await;
    let n2_token = node(env, "n2").await;
    let a_instance = "i-alice".to_string();
    let (s, i) = env
        .req_as(
            &n1_token,
            Method::POST,
            "/v1/instances",
            Some(json!({"id": a_instance, "node_id": "n1", "env": "production", "app": "alicesweb", "release_id": a_deployment, "state": "healthy"})),
        )
        .await;
    assert_eq!(s, 200, "{i}");
    let (s, w) = env
        .post("/v1/waitlist", json!({"email": "carol@example.com"}))
        .await;
    assert_eq!(s, 201, "{w}");
    let waitlist_id = env.get("/v1/waitlist").await.1[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // B's own project, so B is a user with something of their own.
    let (s, pb) = env
        .req_as(
            &b_token,
            Method::POST,
            "/v1/projects",
            Some(json!({"name": "blog", "repo": "https://git.example.com/bob/blog.git"})),
        )
        .await;
    assert_eq!(s, 201, "{pb}");
    World {
        a_project,
        a_app,
        a_user,
        a_token_id,
        a_deployment,
        a_build,
        a_image_id,
        a_digest,
        a_instance,
        waitlist_id,
        b_token,
        b_user,
        n1_token,
        n2_token,
    }
}

/// `path` with its parameters filled with project A's resources.
fn fill(path: &str, w: &World) -> String {
    let id = if path.starts_with("/v1/projects/") {
        &w.a_project
    } else if path.starts_with("/v1/apps/") {
        &w.a_app
    } else if path.starts_with("/v1/deployments/") {
        &w.a_deployment
    } else if path.starts_with("/v1/nodes/") || path.starts_with("/v1/cluster/members/") {
        &"n1".to_string()
    } else if path.starts_with("/v1/instances/") {
        &w.a_instance
    } else if path.starts_with("/v1/images/") {
        &w.a_image_id
    } else if path.starts_with("/v1/builds/") {
        &w.a_build
    } else if path.starts_with("/v1/tokens/") {
        &w.a_token_id
    } else if path.starts_with("/v1/waitlist/") {
        &w.waitlist_id
    } else {
        &String::new()
    };
    path.replace("{id}", id).replace("{user_id}", &w.a_user)
}

/// A body that aims at project A's resources.
fn body(method: &str, path: &str, w: &World) -> Option<Value> {
    if method == "GET" || method == "DELETE" {
        return None;
    }
    Some(match path {
        "/v1/projects/{id}/apps" => json!({"name": "stolen"}),
        "/v1/projects/{id}/members" => json!({"user_id": w.b_user, "role": "owner"}),
        "/v1/apps/{id}/secrets" => json!({"secrets": {"X": "y"}}),
        "/v1/deployments" => json!({"app_id": w.a_app, "image_digest": w.a_digest}),
        "/v1/deployments/{id}/status" => json!({"status": "failed", "reason": "sabotage"}),
        "/v1/nodes" => {
            json!({"id": "evil", "address": "10.0.0.9", "cpus": 1, "memory_bytes": 1, "disk_bytes": 1})
        }
        "/v1/nodes/{id}/state" => json!({"state": "offline"}),
        "/v1/nodes/{id}/drain" => json!({"drain": true}),
        "/v1/cluster/join-tokens" => json!({"role": "worker"}),
        "/v1/cluster/join" => json!({"role": "worker", "name": "evil", "csr_pem": "x"}),
        "/v1/cluster/renew" => json!({"csr_pem": "x"}),
        "/v1/instances" => {
            json!({"id": w.a_instance, "node_id": "n1", "env": "production", "app": "alicesweb", "release_id": w.a_deployment, "state": "failed"})
        }
        "/v1/instances/{id}/state" => json!({"state": "failed"}),
        "/v1/images" => json!({"digest": digest(9), "size_bytes": 1}),
        "/v1/builds" => {
            json!({"app_id": w.a_app, "source": {"git": {"url": "https://git.example.com/alice/shop.git"}}})
        }
        "/v1/tokens" => json!({"name": "mine", "kind": "admin"}),
        _ => json!({}),
    })
}

/// Everything of project A that must not appear in another tenant's
/// answers.
fn secrets_of_a(w: &World) -> Vec<&str> {
    vec![
        &w.a_project,
        &w.a_app,
        &w.a_deployment,
        &w.a_build,
        &w.a_image_id,
        &w.a_digest,
        &w.a_instance,
        "alicesweb",
    ]
}

async fn another_tenant_is_refused_on_every_route(backend: Backend) {
    let env = Env::start(backend).await;
    let w = world(&env).await;
    let cases = cases();
    let mut failures = Vec::new();
    let mut seen = 0;
    for spec in captain::api::routes() {
        for m in spec.methods {
            let key = (m.as_str(), spec.path);
            let Some(case) = cases.get(&key).copied() else {
                failures.push(format!(
                    "{} {}: no case; decide what a user of another project may do with it and add it to cases()",
                    key.0, key.1
                ));
                continue;
            };
            seen += 1;
            if let NotScoped(why) = case {
                assert!(!why.is_empty(), "{key:?}: say why it is not scoped");
                continue;
            }
            let path = fill(spec.path, &w);
            let method = Method::from_bytes(m.as_str().as_bytes()).unwrap();
            let sent = body(m.as_str(), spec.path, &w);
            let sent_text = sent.as_ref().map(|b| b.to_string()).unwrap_or_default();
            let (s, v) = env.req_as(&w.b_token, method, &path, sent).await;
            match case {
                Refused(ok) if !ok.contains(&s) => {
                    failures.push(format!("{} {path}: expected {ok:?}, got {s}: {v}", key.0))
                }
                Filtered if s != 200 => {
                    failures.push(format!("{} {path}: expected 200, got {s}: {v}", key.0))
                }
                _ => {}
            }
            let text = v.to_string();
            for leak in secrets_of_a(&w) {
                // What B sent may come back (as "app X does not exist").
                if text.contains(leak) && !path.contains(leak) && !sent_text.contains(leak) {
                    failures.push(format!(
                        "{} {path}: the answer names {leak:?} of project A: {text}",
                        key.0
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "another tenant got through:\n{}",
        failures.join("\n")
    );
    assert_eq!(seen, cases.len(), "a case names a route that is gone");

    // Nothing of A was changed by any of that.
    let (s, a) = env.get(&format!("/v1/apps/{}", w.a_app)).await;
    assert_eq!(s, 200, "{a}");
    let (_, d) = env
        .get(&format!("/v1/deployments/{}", w.a_deployment))
        .await;
    assert_ne!(d["status"], "failed", "{d}");
    let (_, members) = env
        .get(&format!("/v1/projects/{}/members", w.a_project))
        .await;
    assert_eq!(members.as_array().unwrap().len(), 1, "{members}");
    let (_, i) = env.get(&format!("/v1/instances/{}", w.a_instance)).await;
    assert_eq!(i["state"], "healthy", "{i}");
    env.stop().await;
}
both!(another_tenant, another_tenant_is_refused_on_every_route);

/// A node's credential acts only for its own node and the instances placed
/// on it: another node's instances and row, and the secrets of apps not
/// placed on it, are refused.
async fn a_node_acts_only_for_itself(backend: Backend) {
    let env = Env::start(backend).await;
    let w = world(&env).await;
    let n2 = &w.n2_token;
    let report = |node: &str, state: &str| json!({"id": w.a_instance, "node_id": node, "env": "production", "app": "alicesweb", "release_id": w.a_deployment, "state": state});
    for (method, path, body, what) in [
        (
            Method::POST,
            "/v1/instances".to_string(),
            Some(report("n1", "failed")),
            "report another node's instance",
        ),
        (
            Method::POST,
            "/v1/instances".to_string(),
            Some(report("n2", "failed")),
            "take another node's instance over",
        ),
        (
            Method::DELETE,
            format!("/v1/instances/{}", w.a_instance),
            None,
            "delete another node's instance",
        ),
        (
            Method::PUT,
            format!("/v1/instances/{}/state", w.a_instance),
            Some(json!({"state": "failed"})),
            "change another node's instance",
        ),
        (
            Method::PUT,
            "/v1/nodes/n1/state".to_string(),
            Some(json!({"state": "offline"})),
            "heartbeat for another node",
        ),
        (
            Method::GET,
            "/v1/instances?node_id=n1".to_string(),
            None,
            "list another node's instances",
        ),
    ] {
        let (s, v) = env.req_as(n2, method, &path, body).await;
        assert_eq!(s, 403, "{what}: {v}");
    }
    // Its own list holds only its own instances.
    let (s, v) = env.req_as(n2, Method::GET, "/v1/instances", None).await;
    assert_eq!((s, v.clone()), (200, json!([])), "{v}");
    let (s, v) = env
        .req_as(&w.n1_token, Method::GET, "/v1/instances", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    // The secrets file of an app with nothing placed on the node (it has
    // no release, so nothing runs anywhere).
    let (s, idle) = env
        .post(
            &format!("/v1/projects/{}/apps", w.a_project),
            json!({"name": "idle"}),
        )
        .await;
    assert_eq!(s, 201, "{idle}");
    let r = env
        .http
        .put(format!(
            "{}/v1/apps/{}/secrets/file",
            env.base,
            idle["id"].as_str().unwrap()
        ))
        .bearer_auth(n2)
        .body("sops: {}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "{}", r.text().await.unwrap());
    let (_, i) = env.get(&format!("/v1/instances/{}", w.a_instance)).await;
    assert_eq!(
        (i["state"].clone(), i["node_id"].clone()),
        (json!("healthy"), json!("n1"))
    );
    env.stop().await;
}
both!(node_credentials, a_node_acts_only_for_itself);

/// Members: the owner adds a member, who then sees the project; a member
/// cannot manage members; the last owner cannot be removed.
async fn members_see_their_projects(backend: Backend) {
    let env = Env::start(backend).await;
    let w = world(&env).await;
    let (a_token, _, _) = {
        // A's token: create another for alice's user.
        let (s, t) = env
            .post(
                "/v1/tokens",
                json!({"name": "alice-2", "kind": "user", "user_id": w.a_user}),
            )
            .await;
        assert_eq!(s, 201, "{t}");
        (t["secret"].as_str().unwrap().to_string(), (), ())
    };
    let path = format!("/v1/projects/{}/members", w.a_project);
    let (s, m) = env
        .req_as(
            &a_token,
            Method::POST,
            &path,
            Some(json!({"user_id": w.b_user})),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    assert_eq!(m["role"], "member");
    let (s, p) = env
        .req_as(
            &w.b_token,
            Method::GET,
            &format!("/v1/projects/{}", w.a_project),
            None,
        )
        .await;
    assert_eq!(s, 200, "{p}");
    let (s, v) = env
        .req_as(
            &w.b_token,
            Method::POST,
            &path,
            Some(json!({"user_id": w.b_user, "role": "owner"})),
        )
        .await;
    assert_eq!(s, 403, "a member is not an owner: {v}");
    let (s, v) = env
        .req_as(
            &a_token,
            Method::DELETE,
            &format!("{path}/{}", w.a_user),
            None,
        )
        .await;
    assert_eq!(s, 409, "the last owner stays: {v}");
    let (s, _) = env
        .req_as(
            &a_token,
            Method::DELETE,
            &format!("{path}/{}", w.b_user),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = env
        .req_as(
            &w.b_token,
            Method::GET,
            &format!("/v1/projects/{}", w.a_project),
            None,
        )
        .await;
    assert_eq!(s, 404, "removed: not found again");
    env.stop().await;
}
both!(members, members_see_their_projects);
