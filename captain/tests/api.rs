//! The captain's API against a real SQLite file and a real Postgres
//! cluster, real meta repository, real HTTP on loopback.

mod common;

use common::{Backend, Env, commit_count, digest, git};
use meta_schema::repo::MetaRepo;
use serde_json::{Value, json};

/// Entry point of the pre-receive hook in tests (see
/// `common::test_hook_command`): only acts when the hook runs it.
#[test]
#[ignore = "run by the meta repository's pre-receive hook, not by the test runner"]
fn pre_receive_hook_entry() {
    if std::env::var_os(common::HOOK_MODE_ENV).is_some() {
        std::process::exit(captain::hooks::main_entry());
    }
}

/// (commits on main, deployment rows, indexed commits), after the mirror
/// has caught up with the repository.
async fn counts(env: &Env) -> (usize, i64, i64) {
    let st = env.captain.as_ref().unwrap().state();
    captain::meta::sync(&st.meta, &st.db).await.unwrap();
    (
        commit_count(&env.meta_dir()),
        st.db.count_deployments().await.unwrap(),
        st.db.count_commits().await.unwrap(),
    )
}

async fn bad_input_table(backend: Backend) {
    let env = Env::start(backend).await;
    let (pid, app) = env.project_and_app("shop", "web").await;
    let (s, d) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": digest(1)}),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    let dep = d["id"].as_str().unwrap().to_string();
    let before = counts(&env).await;
    let apps_before = env.get(&format!("/v1/projects/{pid}/apps")).await.1;

    let big = "x".repeat(1024 * 1024 + 10);
    let apps_path = format!("/v1/projects/{pid}/apps");
    let status_path = format!("/v1/deployments/{dep}/status");
    // (method, path, body, token ("t" = admin, None = none), status, code)
    type Case<'a> = (&'a str, &'a str, String, Option<&'a str>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", "/v1/projects", "{\"name\": \"a\",".into(), Some("t"), 400, "invalid_json"),
        ("POST", "/v1/projects", "".into(), Some("t"), 400, "invalid_json"),
        ("POST", "/v1/projects", "{\"name\": 5, \"repo\": \"r\"}".into(), Some("t"), 400, "bad_request"),
        ("POST", "/v1/projects", "{\"name\": \"a\", \"repo\": \"r\", \"colour\": 1}".into(), Some("t"), 400, "unknown_field"),
        ("POST", "/v1/projects", "{\"name\": \"Not_A_Label\", \"repo\": \"r\"}".into(), Some("t"), 400, "invalid_name"),
        ("POST", &apps_path, "{\"name\": \"-web\"}".into(), Some("t"), 400, "invalid_name"),
        ("POST", &apps_path, "{\"name\": \"web\"}".into(), Some("t"), 409, "conflict"),
        ("POST", &apps_path, "{\"name\": \"ok\", \"env\": \"PROD\"}".into(), Some("t"), 400, "invalid_name"),
        ("POST", "/v1/projects", format!("{{\"name\": \"{big}\", \"repo\": \"r\"}}"), Some("t"), 413, "payload_too_large"),
        ("POST", "/v1/projects", "{\"name\": \"a\", \"repo\": \"r\"}".into(), None, 401, "unauthorized"),
        ("POST", "/v1/projects", "{\"name\": \"a\", \"repo\": \"r\"}".into(), Some("zwa_wrong"), 401, "unauthorized"),
        ("POST", "/v1/deployments", format!("{{\"app_id\": \"{app}\", \"image_digest\": \"sha256:xyz\"}}"), Some("t"), 400, "bad_request"),
        ("POST", "/v1/deployments", format!("{{\"app_id\": \"{app}\"}}"), Some("t"), 400, "bad_request"),
        ("POST", "/v1/deployments", format!("{{\"app_id\": \"{app}\", \"image_digest\": \"{}\", \"port\": 70000}}", digest(2)), Some("t"), 422, "invalid_release"),
        ("POST", "/v1/deployments", format!("{{\"app_id\": \"{app}\", \"image_digest\": \"{}\", \"env_vars\": {{\"1BAD\": \"x\"}}}}", digest(2)), Some("t"), 422, "invalid_release"),
        ("POST", "/v1/deployments", format!("{{\"app_id\": \"nope.production\", \"image_digest\": \"{}\"}}", digest(2)), Some("t"), 404, "not_found"),
        ("PUT", &status_path, "{\"status\": \"running\"}".into(), Some("t"), 409, "illegal_transition"),
        ("PUT", &status_path, "{\"status\": \"exploded\"}".into(), Some("t"), 400, "bad_request"),
        ("PUT", &status_path, "{\"status\": \"failed\"}".into(), Some("t"), 400, "bad_request"),
        ("POST", "/v1/waitlist", "{\"email\": \"not an email\"}".into(), None, 400, "bad_request"),
        ("POST", "/v1/nodes", "{\"id\": \"Node_1\", \"address\": \"10.0.0.1\", \"cpus\": 2, \"memory_bytes\": 1, \"disk_bytes\": 1}".into(), Some("t"), 400, "invalid_name"),
        ("POST", "/v1/nodes", "{\"id\": \"n1\", \"address\": \"10.0.0.1\", \"cpus\": -2, \"memory_bytes\": 1, \"disk_bytes\": 1}".into(), Some("t"), 400, "bad_request"),
        ("GET", "/v1/projects/nope", "".into(), Some("t"), 404, "not_found"),
        ("GET", "/v1/nothing-here", "".into(), Some("t"), 404, "not_found"),
        ("DELETE", "/v1/projects", "".into(), Some("t"), 405, "method_not_allowed"),
        ("GET", "/v1/deployments?limit=abc", "".into(), Some("t"), 400, "bad_request"),
        ("POST", "/v1/webhook/github", "{}".into(), None, 401, "invalid_signature"),
    ];
    for (method, path, body, token, status, code) in &cases {
        let mut r = env
            .http
            .request(method.parse().unwrap(), format!("{}{path}", env.base))
            .header("content-type", "application/json")
            .body(body.clone());
        match token {
            Some("t") => r = r.bearer_auth(&env.token),
            Some(t) => r = r.bearer_auth(t),
            None => {}
        }
        let resp = r.send().await.unwrap();
        let got = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(
            got,
            *status,
            "{method} {path} {}: {v}",
            &body[..body.len().min(80)]
        );
        assert_eq!(v["error"]["code"], *code, "{method} {path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    }
    // The illegal transition names the legal ones.
    let (_, v) = env
        .put(
            &format!("/v1/deployments/{dep}/status"),
            json!({"status": "running"}),
        )
        .await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("legal from starting: [running, failed]")
            || msg.contains("legal from pending: [building, failed]"),
        "{msg}"
    );
    // Nothing was written to the repo or the database.
    assert_eq!(counts(&env).await, before);
    assert_eq!(
        env.get(&format!("/v1/projects/{pid}/apps")).await.1,
        apps_before
    );
    assert_eq!(env.get("/v1/projects").await.1.as_array().unwrap().len(), 1);
    assert_eq!(
        env.captain
            .as_ref()
            .unwrap()
            .state()
            .db
            .waitlist_len()
            .await
            .unwrap(),
        0
    );
    assert_eq!(env.get("/v1/nodes").await.1, json!([]));
    env.stop().await;
}
both!(
    bad_input_is_refused_with_codes_and_writes_nothing,
    bad_input_table
);

async fn deployment_is_one_commit(backend: Backend) {
    let env = Env::start(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let (commits0, rows0, _) = counts(&env).await;
    let repo = MetaRepo::open(&env.meta_dir()).unwrap();
    let head0 = repo.head("main").unwrap().unwrap();
    let files0 = repo.tree_at(&head0).unwrap();

    let (s, d) = env
        .post("/v1/deployments", json!({"app_id": app, "image_digest": digest(7), "port": 8080, "env_vars": {"MODE": "prod"}}))
        .await;
    assert_eq!(s, 201, "{d}");
    let id = d["id"].as_str().unwrap();
    assert_eq!(d["status"], "pending", "no image row: pending");
    assert_eq!(
        commit_count(&env.meta_dir()),
        commits0 + 1,
        "exactly one new commit"
    );
    let head = repo.head("main").unwrap().unwrap();
    assert_eq!(d["commit"], head.as_str());
    let files = repo.tree_at(&head).unwrap();
    let added: Vec<&str> = files
        .iter()
        .map(|(p, _)| p)
        .filter(|p| !files0.contains(p))
        .collect();
    let path = format!("envs/production/apps/web/releases/{id}.pb");
    assert_eq!(added, vec![path.as_str()], "one new file: the release");
    assert_eq!(files0.len() + 1, files.len());
    let rel =
        <meta_schema::pb::Release as prost::Message>::decode(files.get(&path).unwrap()).unwrap();
    assert_eq!(
        (rel.app.as_str(), rel.env.as_str(), rel.port),
        ("web", "production", 8080)
    );
    assert_eq!(rel.image_digest, digest(7));
    assert_eq!(rel.source.unwrap().repo, "https://github.com/acme/shop.git");
    meta_schema::validate::validate_tree(&files).unwrap();

    let (s, list) = env.get("/v1/deployments").await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().unwrap().len() as i64, rows0 + 1);
    assert_eq!(list[0]["id"], id);
    let (_, one) = env.get(&format!("/v1/deployments/{id}")).await;
    assert_eq!(one["path"], path.as_str());
    let (_, a) = env.get(&format!("/v1/apps/{app}")).await;
    assert_eq!(a["active_release"], id);

    // With the image recorded, a deployment starts at `starting`.
    let (s, _) = env
        .post(
            "/v1/images",
            json!({"digest": digest(8), "size_bytes": 1234}),
        )
        .await;
    assert_eq!(s, 201);
    let (_, d2) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": digest(8)}),
        )
        .await;
    assert_eq!(d2["status"], "starting");
    assert_eq!(d2["legal_next"], json!(["running", "failed"]));
    env.stop().await;
}
both!(
    a_deployment_is_exactly_one_commit_adding_one_release,
    deployment_is_one_commit
);

async fn fifty_concurrent(backend: Backend) {
    let env = Env::start(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let (commits0, _, _) = counts(&env).await;
    let mut tasks = Vec::new();
    for n in 0..50u32 {
        let http = env.http.clone();
        let url = format!("{}/v1/deployments", env.base);
        let token = env.token.clone();
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"app_id": app, "image_digest": digest(1000 + n)}))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            assert_eq!(s, 201, "{v}");
            v["id"].as_str().unwrap().to_string()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50);
    assert_eq!(commit_count(&env.meta_dir()), commits0 + 50, "50 commits");
    let repo = MetaRepo::open(&env.meta_dir()).unwrap();
    let tree = repo.tree_at("main").unwrap();
    meta_schema::validate::validate_tree(&tree).expect("the repo is valid");
    let releases: Vec<&str> = tree
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.contains("/releases/"))
        .collect();
    assert_eq!(releases.len(), 50, "50 release files");
    for id in &ids {
        assert!(
            tree.contains(&format!("envs/production/apps/web/releases/{id}.pb")),
            "{id} lost"
        );
    }
    // The mirror indexed every commit exactly once.
    let (commits, rows, indexed) = counts(&env).await;
    assert_eq!((rows, indexed as usize), (50, commits));
    let (_, list) = env.get("/v1/deployments?limit=1000").await;
    let mut listed: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, ids);
    env.stop().await;
}
both!(
    fifty_concurrent_deployments_fifty_commits_none_lost,
    fifty_concurrent
);

async fn wipe_and_rebuild(backend: Backend) {
    let mut env = Env::start(backend).await;
    let (pid, web) = env.project_and_app("shop", "web").await;
    let (s, api) = env
        .post(
            &format!("/v1/projects/{pid}/apps"),
            json!({"name": "api", "env": "staging"}),
        )
        .await;
    assert_eq!(s, 201);
    let api = api["id"].as_str().unwrap().to_string();
    // Declared, with nothing deployed yet: an app without a release and a
    // project whose name is not its repository's.
    let (s, cron) = env
        .post(
            &format!("/v1/projects/{pid}/apps"),
            json!({"name": "cron", "env": "staging", "domains": ["cron.example.com"]}),
        )
        .await;
    assert_eq!(s, 201, "{cron}");
    let cron = cron["id"].as_str().unwrap().to_string();
    let (s, bar) = env
        .post(
            "/v1/projects",
            json!({"name": "barproj", "repo": "https://git.example.com/acme/bar.git", "dockerfile": "docker/Dockerfile.prod", "build_args": {"MODE": "prod"}}),
        )
        .await;
    assert_eq!(s, 201, "{bar}");
    let mut ids = Vec::new();
    for (app, n) in [(&web, 1), (&web, 2), (&api, 3)] {
        let (s, d) = env
            .post(
                "/v1/deployments",
                json!({"app_id": app, "image_digest": digest(n)}),
            )
            .await;
        assert_eq!(s, 201, "{d}");
        ids.push(d["id"].as_str().unwrap().to_string());
    }
    let (s, node) = env
        .post("/v1/nodes", json!({"id": "n1", "address": "10.0.0.1", "cpus": 4, "memory_bytes": 1u64 << 32, "disk_bytes": 1u64 << 36}))
        .await;
    assert_eq!(s, 201);
    let node_token = node["token"].as_str().unwrap().to_string();
    let projects_before = env.get("/v1/projects").await.1;
    let deployments_before: Vec<Value> = env
        .get("/v1/deployments")
        .await
        .1
        .as_array()
        .unwrap()
        .clone();

    env.restart(true).await;
    assert_ne!(env.token, "", "a new admin token after the wipe");
    let projects = env.get("/v1/projects").await.1;
    assert_eq!(projects.as_array().unwrap().len(), 2, "{projects}");
    let bar_after = projects
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == bar["id"])
        .expect("the project without apps comes back");
    assert_eq!(
        bar_after["name"], "barproj",
        "its own name, not one guessed from the URL"
    );
    assert_eq!(bar_after["dockerfile"], "docker/Dockerfile.prod");
    assert_eq!(bar_after["build_args"], json!({"MODE": "prod"}));
    let projects = json!(
        projects
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["id"] != bar["id"])
            .collect::<Vec<_>>()
    );
    assert_eq!(
        projects[0]["id"],
        pid.as_str(),
        "project id is derived from the git source"
    );
    assert_eq!(projects[0]["repo"], projects_before[0]["repo"]);
    assert_eq!(projects[0]["branch"], "main");
    assert_eq!(projects[0]["name"], "shop");
    let mut apps: Vec<(String, Value)> = projects[0]["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                a["active_release"].clone(),
            )
        })
        .collect();
    apps.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        apps,
        vec![
            (api.clone(), json!(ids[2])),
            (cron.clone(), json!(null)),
            (web.clone(), json!(ids[1]))
        ]
    );
    let (_, c) = env.get(&format!("/v1/apps/{cron}")).await;
    assert_eq!(c["domains"], json!(["cron.example.com"]), "{c}");
    let after: Vec<Value> = env
        .get("/v1/deployments")
        .await
        .1
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(after.len(), 3);
    for (a, b) in after.iter().zip(deployments_before.iter()) {
        for k in [
            "id",
            "app_id",
            "project_id",
            "env",
            "app",
            "image_digest",
            "min_instances",
            "present",
            "path",
        ] {
            assert_eq!(a[k], b[k], "{k} of {}", a["id"]);
        }
    }
    // Observed state is gone with the database, and comes back from reports.
    assert_eq!(env.get("/v1/instances").await.1, json!([]));
    let (s, _) = env
        .req(reqwest::Method::POST, "/v1/instances", Some(json!({"id": "i1", "node_id": "n1", "env": "production", "app": "web", "release_id": ids[1], "state": "healthy"})))
        .await;
    assert_eq!(s, 200);
    let (_, inst) = env.get("/v1/instances").await;
    assert_eq!(inst[0]["id"], "i1");
    assert_eq!(inst[0]["release_id"], ids[1].as_str());
    // The old node token died with the database.
    let r = env
        .http
        .get(format!("{}/v1/instances", env.base))
        .bearer_auth(node_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    env.stop().await;
}
both!(
    wipe_database_restart_everything_rebuilt_from_repo,
    wipe_and_rebuild
);

async fn revert_by_git_push(backend: Backend) {
    let env = Env::start(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let (_, d1) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": digest(1)}),
        )
        .await;
    let (_, d2) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": digest(2)}),
        )
        .await;
    assert_eq!(
        env.get(&format!("/v1/apps/{app}")).await.1["active_release"],
        d2["id"]
    );

    let work = tempfile::tempdir().unwrap();
    let url = format!(
        "http://git:{}@{}/meta.git",
        env.token,
        env.base.trim_start_matches("http://")
    );
    git(Some(work.path()), &["clone", "--quiet", &url, "clone"]);
    let clone = work.path().join("clone");
    git(
        Some(&clone),
        &["revert", "--no-edit", d2["commit"].as_str().unwrap()],
    );
    git(Some(&clone), &["push", "--quiet", "origin", "main"]);
    let (_, a) = env.get(&format!("/v1/apps/{app}")).await;
    assert_eq!(
        a["active_release"], d1["id"],
        "the revert made release 1 active again"
    );
    let (_, d) = env
        .get(&format!("/v1/deployments/{}", d2["id"].as_str().unwrap()))
        .await;
    assert_eq!(d["present"], false);

    // An invalid push is refused by the hook, with the validation message.
    std::fs::create_dir_all(clone.join("envs/production/apps/web/releases")).unwrap();
    std::fs::write(
        clone.join("envs/production/apps/web/releases/not-a-ulid.pb"),
        b"garbage",
    )
    .unwrap();
    git(Some(&clone), &["add", "-A"]);
    git(Some(&clone), &["commit", "--quiet", "-m", "bad file"]);
    let out = std::process::Command::new("git")
        .current_dir(&clone)
        .args(["push", "origin", "main"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("push refused") && err.contains("not-a-ulid.pb"),
        "{err}"
    );
    // Changing a committed release is refused: releases are immutable.
    git(Some(&clone), &["reset", "--quiet", "--hard", "HEAD~1"]);
    let r1 = clone.join(d1["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&r1).unwrap();
    bytes.extend_from_slice(&[0x38, 0x01]); // field 7 (port) = 1
    std::fs::write(&r1, bytes).unwrap();
    git(
        Some(&clone),
        &["commit", "--quiet", "-am", "edit a release"],
    );
    let out = std::process::Command::new("git")
        .current_dir(&clone)
        .args(["push", "origin", "main"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("immutable"), "{err}");
    git(Some(&clone), &["reset", "--quiet", "--hard", "HEAD~1"]);
    git(
        Some(&clone),
        &["commit", "--quiet", "--allow-empty", "-m", "placeholder"],
    );
    // A node token may fetch but not push.
    let (_, n) = env
        .post(
            "/v1/nodes",
            json!({"id": "n1", "address": "a", "cpus": 1, "memory_bytes": 1, "disk_bytes": 1}),
        )
        .await;
    let node_url = format!(
        "http://node:{}@{}/meta.git",
        n["token"].as_str().unwrap(),
        env.base.trim_start_matches("http://")
    );
    git(
        Some(work.path()),
        &["clone", "--quiet", &node_url, "node-clone"],
    );
    git(Some(&clone), &["reset", "--quiet", "--hard", "HEAD~1"]);
    git(
        Some(&clone),
        &["commit", "--quiet", "--allow-empty", "-m", "empty"],
    );
    let out = std::process::Command::new("git")
        .current_dir(&clone)
        .args(["push", &node_url, "main"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "node tokens cannot push");
    // Without credentials git is challenged and fails.
    let anon = format!("http://{}/meta.git", env.base.trim_start_matches("http://"));
    let out = std::process::Command::new("git")
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["ls-remote", &anon])
        .output()
        .unwrap();
    assert!(!out.status.success());
    env.stop().await;
}
both!(
    a_git_revert_pushed_by_plain_git_changes_the_active_release,
    revert_by_git_push
);

async fn status_machine_and_follower_contract(backend: Backend) {
    let env = Env::start(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;
    // pending -> building -> starting -> running via the API.
    let (_, d) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "commit": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"}),
        )
        .await;
    let id = d["id"].as_str().unwrap().to_string();
    assert_eq!(d["status"], "pending");
    for s in ["building", "starting"] {
        let (code, v) = env
            .put(
                &format!("/v1/deployments/{id}/status"),
                json!({"status": s}),
            )
            .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["status"], s);
    }
    // A second deployment fails with a reason; then nothing more is legal.
    let (_, f) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "commit": "abcdef0"}),
        )
        .await;
    let fid = f["id"].as_str().unwrap();
    let (code, v) = env
        .put(
            &format!("/v1/deployments/{fid}/status"),
            json!({"status": "failed", "reason": "Dockerfile: no such file"}),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("failed"), Some("Dockerfile: no such file"))
    );
    let (code, v) = env
        .put(
            &format!("/v1/deployments/{fid}/status"),
            json!({"status": "building"}),
        )
        .await;
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (409, Some("illegal_transition"))
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("legal from failed: []")
    );

    // Node registration, heartbeat, reports; node token limits.
    let (s, n) = env
        .post("/v1/nodes", json!({"id": "n1", "address": "10.0.0.1", "region": "eu", "cpus": 4, "memory_bytes": 8u64 << 30, "disk_bytes": 100u64 << 30, "age_recipient": "age1qqqq", "api_url": "https://10.0.0.1:7001", "proxy_addr": "10.0.0.1:7002"}))
        .await;
    assert_eq!(s, 201, "{n}");
    assert_eq!(n["node"]["state"], "online");
    let nt = n["token"].as_str().unwrap().to_string();
    assert!(nt.starts_with("zwn_"));
    // Registering again (a restarted follower) updates the node and
    // replaces its token; the old one stops working.
    let (s, again) = env
        .post(
            "/v1/nodes",
            json!({"id": "n1", "address": "10.0.0.1", "region": "eu", "cpus": 4, "memory_bytes": 8u64 << 30, "disk_bytes": 100u64 << 30, "age_recipient": "age1qqqq", "api_url": "https://10.0.0.1:7001", "proxy_addr": "10.0.0.1:7003"}),
        )
        .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["node"]["proxy_addr"], "10.0.0.1:7003");
    let old_token = nt;
    let nt = again["token"].as_str().unwrap().to_string();
    assert_ne!(nt, old_token);
    let refused = env
        .http
        .put(format!("{}/v1/nodes/n1/state", env.base))
        .bearer_auth(&old_token)
        .json(&json!({"state": "online"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status().as_u16(),
        401,
        "the replaced node token still works"
    );
    let node = |m: reqwest::Method, p: &str| {
        env.http
            .request(m, format!("{}{p}", env.base))
            .bearer_auth(&nt)
    };
    let r = node(reqwest::Method::PUT, "/v1/nodes/n1/state")
        .json(&json!({"state": "online", "resources": {"cpus": 4, "memory_bytes": 8u64 << 30, "disk_bytes": 1, "memory_used_bytes": 1u64 << 30, "instances": 3}, "meta": {"applied_commit": "c0ffee", "refused_commit": "bad", "refused_reason": "does not descend from c0ffee"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["memory_used_bytes"], 1u64 << 30);
    assert_eq!(v["instances"], 3);
    assert_eq!(
        (v["applied_commit"].as_str(), v["refused_commit"].as_str()),
        (Some("c0ffee"), Some("bad"))
    );
    assert_eq!(v["refused_reason"], "does not descend from c0ffee");
    for (m, p) in [
        (reqwest::Method::GET, "/v1/projects"),
        (reqwest::Method::GET, "/v1/tokens"),
        (reqwest::Method::POST, "/v1/deployments"),
    ] {
        let r = node(m, p).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{p}");
    }
    let r = node(reqwest::Method::POST, "/v1/instances")
        .json(&json!({"id": "i9", "node_id": "other", "env": "production", "app": "web", "release_id": id, "state": "healthy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        403,
        "a node reports only its own instances"
    );
    // Three healthy instances (the default min) move starting -> running.
    for (i, state) in [("i1", "healthy"), ("i2", "healthy"), ("i3", "starting")] {
        let r = node(reqwest::Method::POST, "/v1/instances")
            .json(&json!({"id": i, "node_id": "n1", "env": "production", "app": "web", "rollout_id": "", "release_id": id, "state": state, "reason": "", "address": "fd00::1", "port": 8080, "attempts": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    assert_eq!(
        env.get(&format!("/v1/deployments/{id}")).await.1["status"],
        "starting"
    );
    let r = node(reqwest::Method::PUT, "/v1/instances/i3/state")
        .json(&json!({"state": "healthy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        env.get(&format!("/v1/deployments/{id}")).await.1["status"],
        "running"
    );
    let r = node(reqwest::Method::DELETE, "/v1/instances/i3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(env.get("/v1/instances/i3").await.0, 404);

    // Missed heartbeats: the node goes offline (heartbeat interval 200 ms).
    let mut state = String::new();
    for _ in 0..100 {
        state = env.get("/v1/nodes/n1").await.1["state"]
            .as_str()
            .unwrap()
            .to_string();
        if state == "offline" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state, "offline");
    // Deleting the node revokes its token.
    assert_eq!(
        env.req(reqwest::Method::DELETE, "/v1/nodes/n1", None)
            .await
            .0,
        204
    );
    assert_eq!(
        node(reqwest::Method::GET, "/v1/instances")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    env.stop().await;
}
both!(
    status_machine_nodes_and_instances,
    status_machine_and_follower_contract
);

async fn tokens_images_waitlist_auth(backend: Backend) {
    let env = Env::start(backend).await;
    let mode = std::fs::metadata(env.data_dir().join("admin.token"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap();
    assert_eq!(mode & 0o777, 0o600);
    let (s, t) = env
        .post("/v1/tokens", json!({"name": "ci", "kind": "user"}))
        .await;
    assert_eq!(s, 201);
    let user = t["secret"].as_str().unwrap().to_string();
    let tid = t["token"]["id"].as_str().unwrap().to_string();
    let as_user = |m: reqwest::Method, p: &str| {
        env.http
            .request(m, format!("{}{p}", env.base))
            .bearer_auth(&user)
    };
    assert_eq!(
        as_user(reqwest::Method::GET, "/v1/projects")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        as_user(reqwest::Method::GET, "/v1/tokens")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    let (_, list) = env.get("/v1/tokens").await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        !list.to_string().contains(&user),
        "secrets are never listed"
    );
    assert_eq!(
        env.req(reqwest::Method::DELETE, &format!("/v1/tokens/{tid}"), None)
            .await
            .0,
        204
    );
    assert_eq!(
        as_user(reqwest::Method::GET, "/v1/projects")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        env.req(reqwest::Method::DELETE, &format!("/v1/tokens/{tid}"), None)
            .await
            .0,
        404
    );

    let (s, img) = env
        .post(
            "/v1/images",
            json!({"digest": digest(5), "size_bytes": 42, "source_commit": "abc1234"}),
        )
        .await;
    assert_eq!(s, 201);
    // A source commit is a commit id (as the document says), not any text
    // (found by tests/openapi_fuzz.rs).
    let (s, v) = env
        .post(
            "/v1/images",
            json!({"digest": digest(6), "size_bytes": 1, "source_commit": "\u{84}"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    assert_eq!(
        env.post("/v1/images", json!({"digest": digest(5), "size_bytes": 42}))
            .await
            .0,
        409
    );
    let iid = img["id"].as_str().unwrap();
    assert_eq!(
        env.get(&format!("/v1/images/{}", digest(5))).await.1["id"],
        iid
    );
    assert_eq!(env.get("/v1/images").await.1.as_array().unwrap().len(), 1);
    assert_eq!(
        env.req(reqwest::Method::DELETE, &format!("/v1/images/{iid}"), None)
            .await
            .0,
        204
    );
    assert_eq!(env.get(&format!("/v1/images/{iid}")).await.0, 404);

    let anon = |body: Value| {
        env.http
            .post(format!("{}/v1/waitlist", env.base))
            .json(&body)
            .send()
    };
    assert_eq!(
        anon(json!({"email": "ada@example.com"}))
            .await
            .unwrap()
            .status()
            .as_u16(),
        201
    );
    assert_eq!(
        anon(json!({"email": "ada@example.com"}))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let h = env
        .http
        .get(format!("{}/v1/health", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status().as_u16(), 200);
    let h: Value = h.json().await.unwrap();
    assert_eq!(
        h["database"],
        match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    );
    // GitHub OAuth is not configured: a clear 404 with its code, no login
    // (a 4xx: retrying will not help).
    let r = env
        .http
        .get(format!("{}/v1/auth/github", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "github_oauth_not_configured"
    );
    // Deleting an app removes its releases from the repo in one commit.
    let (_, app) = env.project_and_app("shop", "web").await;
    env.post(
        "/v1/deployments",
        json!({"app_id": app, "image_digest": digest(1)}),
    )
    .await;
    let c0 = commit_count(&env.meta_dir());
    assert_eq!(
        env.req(reqwest::Method::DELETE, &format!("/v1/apps/{app}"), None)
            .await
            .0,
        204
    );
    assert_eq!(commit_count(&env.meta_dir()), c0 + 1);
    let tree = MetaRepo::open(&env.meta_dir())
        .unwrap()
        .tree_at("main")
        .unwrap();
    assert!(!tree.iter().any(|(p, _)| p.contains("/apps/web/")));
    assert_eq!(env.get(&format!("/v1/apps/{app}")).await.0, 404);
    env.stop().await;
}
both!(tokens_images_waitlist_and_auth, tokens_images_waitlist_auth);

async fn webhook_push(backend: Backend) {
    let env = Env::start(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/github_push.json"
    ))
    .unwrap();
    let secret = b"It's a Secret to Everybody";
    let sig = captain::webhook::sign(secret, &body);
    let send = |sig: String, event: &'static str| {
        env.http
            .post(format!("{}/v1/webhook/github", env.base))
            .header("X-GitHub-Event", event)
            .header("X-Hub-Signature-256", sig)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    };
    let bad = captain::webhook::sign(b"wrong secret", &body);
    let r = send(bad, "push").await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(env.get("/v1/deployments").await.1, json!([]));
    let r = send(sig.clone(), "push").await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["deployments"].as_array().unwrap().len(), 1);
    assert_eq!(v["deployments"][0]["app_id"], app.as_str());
    assert_eq!(
        v["deployments"][0]["source_commit"],
        "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
    );
    assert_eq!(v["deployments"][0]["status"], "pending");
    let r = send(sig, "ping").await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(
        env.get("/v1/deployments").await.1.as_array().unwrap().len(),
        1
    );
    // Known GitHub docs vector for the HMAC itself.
    assert!(captain::webhook::verify_signature(
        secret,
        b"Hello, World!",
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    ));
    env.stop().await;
}
both!(github_webhook_recorded_push_payload, webhook_push);

async fn openapi_and_metrics(backend: Backend) {
    let env = Env::start(backend).await;
    let r = env
        .http
        .get(format!("{}/v1/openapi.json", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let doc: Value = r.json().await.unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let routes = captain::api::routes();
    assert!(routes.len() >= 35);
    for spec in &routes {
        for m in spec.methods {
            let op = &paths[spec.path][m.as_str().to_lowercase()];
            assert!(
                op.is_object(),
                "{m} {} missing from the OpenAPI document",
                spec.path
            );
        }
        // And the router answers the route (not a 404 / 405 of the router).
        let url = format!("{}{}", env.base, spec.path.replace("{id}", "x"));
        let m: reqwest::Method = spec.methods[0].as_str().parse().unwrap();
        let r = env
            .http
            .request(m, url)
            .bearer_auth(&env.token)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let streaming = r
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
        // An event stream never ends: its status is the answer.
        let v: Value = if streaming {
            Value::Null
        } else {
            r.json().await.unwrap_or(Value::Null)
        };
        assert!(
            s != 405
                && !(s == 404
                    && v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("no route"))),
            "{} {}: {s}",
            spec.methods[0],
            spec.path
        );
    }
    assert!(doc["components"]["schemas"]["CreateDeployment"].is_object());
    let m = env
        .http
        .get(format!("{}/metrics", env.base))
        .bearer_auth(&env.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("zw_captain_http_requests_total{method=\"GET\",route=\"/v1/openapi.json\",status=\"200\"}"), "{m}");
    assert!(m.contains("zw_captain_http_request_duration_seconds_bucket"));
    assert!(m.contains("zw_captain_meta_commits_written_total"));
    let anon = env
        .http
        .get(format!("{}/metrics", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        anon.status().as_u16(),
        401,
        "metrics need a token (invariant 7)"
    );
    assert!(m.contains("zw_captain_mirror_lag_seconds"));
    env.stop().await;
}
both!(
    openapi_lists_every_route_and_metrics_are_served,
    openapi_and_metrics
);

async fn follows_an_external_origin(backend: Backend) {
    // The meta repo lives on another git server (here: a bare repo reached
    // by file://); the captain pushes its commits there and follows commits
    // others push.
    let origin_dir = tempfile::tempdir().unwrap();
    let origin_path = origin_dir.path().join("origin.git");
    let origin = MetaRepo::init_bare(&origin_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = common::fresh_database(backend, dir.path()).await;
    let mut config = common::config(dir.path(), &url);
    config.meta_repo = Some(format!("file://{}", origin_path.display()));
    let c = captain::Captain::start(config).await.unwrap();
    let token = c.admin_token().unwrap().to_string();
    let base = format!("http://{}", c.local_addr());
    let http = reqwest::Client::new();
    let post = |p: &str, b: Value| {
        http.post(format!("{base}{p}"))
            .bearer_auth(&token)
            .json(&b)
            .send()
    };
    let r: Value = post(
        "/v1/projects",
        json!({"name": "shop", "repo": "https://github.com/acme/shop.git"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let pid = r["id"].as_str().unwrap().to_string();
    let a: Value = post(&format!("/v1/projects/{pid}/apps"), json!({"name": "web"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let app = a["id"].as_str().unwrap().to_string();
    let r = post(
        "/v1/deployments",
        json!({"app_id": app, "image_digest": digest(1)}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let d: Value = r.json().await.unwrap();
    assert_eq!(
        origin.head("main").unwrap().as_deref(),
        d["commit"].as_str(),
        "the commit was pushed to origin"
    );

    // Another writer commits a release straight to origin.
    let id = meta_schema::new_id();
    let rel = meta_schema::pb::Release {
        id: id.clone(),
        app: "web".into(),
        env: "production".into(),
        image_digest: digest(2),
        created_at: meta_schema::now_millis(),
        source: Some(meta_schema::pb::Source {
            repo: "https://github.com/acme/shop.git".into(),
            branch: "main".into(),
            commit: String::new(),
        }),
        ..Default::default()
    };
    origin
        .commit(
            "main",
            &meta_schema::repo::ChangeSet::new().add(
                meta_schema::layout::release_path("production", "web", &id),
                prost::Message::encode_to_vec(&rel),
            ),
            "release by another writer",
        )
        .unwrap();
    let mut active = Value::Null;
    for _ in 0..100 {
        let v: Value = http
            .get(format!("{base}/v1/apps/{app}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        active = v["active_release"].clone();
        if active == json!(id) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        active,
        json!(id),
        "the captain followed origin (poll every 300 ms)"
    );
    c.shutdown().await;
}
both!(
    follows_commits_of_an_external_meta_repo_origin,
    follows_an_external_origin
);
