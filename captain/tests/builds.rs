//! The captain's build queue with real buildah builds of `FROM scratch`
//! busybox images, on SQLite and on a real Postgres: upload, queue, build,
//! logs (JSON and server-sent events), image download, deploy; a failing
//! RUN fails once; an infrastructure fault is retried by the queue; a build
//! cut short by a stop is retried by the next captain.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use builder::LocalStore;
use builder::store::{ObjectStore, ObjectStream, StoreError};
use bytes::Bytes;
use common::builds::{busybox, make_builder, source_tarball};
use common::{Backend, Env};
use futures::future::BoxFuture;
use serde_json::{Value, json};

/// The meta repository's pre-receive hook runs this binary (see
/// `common::test_hook_command`): only acts when the hook runs it.
#[test]
#[ignore = "run by the meta repository's pre-receive hook, not by the test runner"]
fn pre_receive_hook_entry() {
    if std::env::var_os(common::HOOK_MODE_ENV).is_some() {
        std::process::exit(captain::hooks::main_entry());
    }
}

const GOOD: &str = "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo built-by-captain > /stamp\"]\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\nEXPOSE 8080\n";
const FAILING: &str = "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo the-user-step-broke; exit 3\"]\n";

/// A real local store whose first `fail_puts` uploads fail with a transient
/// error (the store "down for a moment").
struct FlakyStore {
    inner: LocalStore,
    fail_puts: AtomicUsize,
}

impl ObjectStore for FlakyStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put_file<'a>(
        &'a self,
        key: &'a str,
        src: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        if key.starts_with("images/")
            && self
                .fail_puts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Box::pin(async move {
                Err(StoreError::Remote {
                    store: "flaky".into(),
                    op: "put",
                    key: key.into(),
                    message: "connection refused (the store is down)".into(),
                    transient: true,
                })
            });
        }
        self.inner.put_file(key, src)
    }
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.put(key, data)
    }
    fn get_stream<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectStream, StoreError>> {
        self.inner.get_stream(key)
    }
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.exists(key)
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.delete(key)
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        self.inner.list(prefix)
    }
}

async fn upload(env: &Env, tarball: Vec<u8>) -> String {
    let r = env
        .http
        .post(format!("{}/v1/sources", env.base))
        .bearer_auth(&env.token)
        .header("content-type", "application/gzip")
        .body(tarball)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn wait_build(env: &Env, id: &str, limit: Duration) -> Value {
    let start = Instant::now();
    loop {
        let (s, b) = env.get(&format!("/v1/builds/{id}")).await;
        assert_eq!(s, 200, "{b}");
        if b["status"] == "succeeded" || b["status"] == "failed" {
            return b;
        }
        assert!(
            start.elapsed() < limit,
            "build {id} still {b} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads a build's SSE stream to its end (bounded).
async fn sse(env: &Env, id: &str) -> String {
    let r = env
        .http
        .get(format!("{}/v1/builds/{id}/logs", env.base))
        .bearer_auth(&env.token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    tokio::time::timeout(Duration::from_secs(180), r.text())
        .await
        .expect("the stream ends when the build ends")
        .unwrap()
}

async fn queue_upload_deploy_download_logs(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::start_with(backend, |d| {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(d.join("store")));
        Some(make_builder(d, store))
    })
    .await;
    let (project, app) = env.project_and_app("shop", "web").await;
    let tarball = source_tarball(tmp.path(), GOOD);
    let src = upload(&env, tarball.clone()).await;
    // The same bytes again: the same id, stored once.
    assert_eq!(upload(&env, tarball).await, src);

    let (s, b) = env
        .post(
            "/v1/builds",
            json!({"app_id": app, "source": {"upload": src}, "source_commit": "abc1234",
                   "deploy": {"port": 8080, "health_check_path": "/stamp"}}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["status"], "queued");
    let id = b["id"].as_str().unwrap().to_string();
    // Streamed while it runs: the stream ends with the finished build.
    let stream = sse(&env, &id).await;
    assert!(stream.contains("event: line"), "{stream}");
    assert!(stream.contains("event: end"), "{stream}");
    let b = wait_build(&env, &id, Duration::from_secs(30)).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(b["attempts"], 1);
    let digest = b["image_digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{b}");
    let dep = b["deployment_id"].as_str().unwrap().to_string();
    assert!(!dep.is_empty(), "a deployment was asked for: {b}");

    // Every stored line was in the stream, in order, once.
    let (s, lines) = env.get(&format!("/v1/builds/{id}/logs?limit=10000")).await;
    assert_eq!(s, 200);
    let lines = lines.as_array().unwrap().clone();
    assert!(lines.len() > 3, "{lines:?}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"], i as i64 + 1);
        assert!(
            stream.contains(&format!("id: {}\n", l["seq"])),
            "line {} missing from the stream",
            l["seq"]
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["line"].as_str().unwrap().contains(&digest)),
        "the log names the image"
    );
    // Paged: after the 2nd line, the 3rd comes first.
    let (_, page) = env
        .get(&format!("/v1/builds/{id}/logs?from=2&limit=1"))
        .await;
    assert_eq!(page[0]["seq"], 3);

    // The image row, the deployment with that image, the release commit.
    let (s, img) = env.get(&format!("/v1/images/{digest}")).await;
    assert_eq!(s, 200, "{img}");
    assert_eq!(img["source_commit"], "abc1234");
    let (s, d) = env.get(&format!("/v1/deployments/{dep}")).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["image_digest"], digest);
    assert_eq!(d["source_commit"], "abc1234");

    // Download streams exactly the stored objects.
    let hex = digest.strip_prefix("sha256:").unwrap();
    for (part, key) in [
        ("rootfs", format!("images/{hex}/rootfs.ext4")),
        ("config", format!("images/{hex}/config.json")),
    ] {
        let r = env
            .http
            .get(format!(
                "{}/v1/images/{digest}/download?part={part}",
                env.base
            ))
            .bearer_auth(&env.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{part}");
        let body = r.bytes().await.unwrap();
        let stored = std::fs::read(env.data_dir().join("store").join(&key)).unwrap();
        assert_eq!(body.len(), stored.len(), "{part}");
        assert!(body == stored, "{part} differs from the store");
    }
    let config: Value = serde_json::from_slice(
        &std::fs::read(
            env.data_dir()
                .join("store")
                .join(format!("images/{hex}/config.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(config["exposed_ports"], json!([8080]));

    // Bad input, each named, nothing queued.
    let before = env.get("/v1/builds").await.1.as_array().unwrap().len();
    let cases = [
        (json!({"app_id": app, "source": {}}), 400, "exactly one"),
        (
            json!({"app_id": app, "source": {"upload": "sha256:zz"}}),
            400,
            "sha256",
        ),
        (
            json!({"app_id": app, "source": {"upload": format!("sha256:{}", "0".repeat(64))}}),
            404,
            "uploaded source",
        ),
        (
            json!({"app_id": app, "source": {"git": {"url": "not a url"}}}),
            400,
            "git URL",
        ),
        (
            json!({"app_id": app, "source": {"upload": src}, "dockerfile": "/etc/Dockerfile"}),
            400,
            "inside the source",
        ),
        (
            json!({"app_id": "nope", "source": {"upload": src}}),
            404,
            "app",
        ),
    ];
    for (body, status, needle) in cases {
        let (s, v) = env.post("/v1/builds", body.clone()).await;
        assert_eq!(s, status, "{body} -> {v}");
        assert!(v.to_string().contains(needle), "{body} -> {v}");
    }
    let r = env
        .http
        .post(format!("{}/v1/sources", env.base))
        .bearer_auth(&env.token)
        .header("content-type", "application/gzip")
        .body("not gzip at all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = env
        .http
        .post(format!("{}/v1/sources", env.base))
        .bearer_auth(&env.token)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    assert_eq!(
        env.get("/v1/builds").await.1.as_array().unwrap().len(),
        before
    );
    let (s, _) = env.get("/v1/builds/nope").await;
    assert_eq!(s, 404);
    // A user token may not make the captain read its own disk.
    let (s, t) = env
        .post("/v1/tokens", json!({"name": "dev", "kind": "user"}))
        .await;
    assert_eq!(s, 201, "{t}");
    let user = t["secret"].as_str().unwrap().to_string();
    let (s, m) = env
        .post(
            &format!("/v1/projects/{project}/members"),
            json!({"user_id": t["token"]["user_id"]}),
        )
        .await;
    assert_eq!(s, 201, "a member of the project: {m}");
    for url in ["file:///etc", "file:///var/lib/zeitwork/meta.git"] {
        let r = env
            .http
            .post(format!("{}/v1/builds", env.base))
            .bearer_auth(&user)
            .json(&json!({"app_id": app, "source": {"git": {"url": url}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{url}");
    }

    // Credentials in a git URL (a token for a private repository) are
    // never shown back: not in the answer, not in the build's view.
    let (s, b) = env
        .post(
            "/v1/builds",
            json!({"app_id": app, "source": {"git": {"url": "https://ci:s3cret-pat@git.invalid/web.git"}}}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap();
    let view: Value = env
        .http
        .get(format!("{}/v1/builds/{id}", env.base))
        .bearer_auth(&env.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let done = wait_build(&env, id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "failed", "{done}");
    for v in [&b, &view, &done] {
        assert!(
            !v.to_string().contains("s3cret-pat"),
            "a git credential shown: {v}"
        );
        assert!(v.to_string().contains("ci:<redacted>@git.invalid"), "{v}");
    }

    // A captain with a store but no builder still serves images, and
    // refuses builds.
    let mut env = env;
    env.store = Some(captain::ImageStore(Arc::new(LocalStore::new(
        env.data_dir().join("store"),
    ))));
    env.builder = None;
    env.restart(false).await;
    let r = env
        .http
        .get(format!(
            "{}/v1/images/{digest}/download?part=config",
            env.base
        ))
        .bearer_auth(&env.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (s, v) = env
        .post(
            "/v1/builds",
            json!({"app_id": app, "source": {"upload": src}}),
        )
        .await;
    // Not configured is a 4xx that says so (not a 503: retrying will not help).
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "not_configured", "{v}");
    assert!(v.to_string().contains("no builder"), "{v}");
    env.stop().await;
}

async fn user_fault_fails_once_infra_fault_is_retried(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env::start_with(backend, |d| {
        let store: Arc<dyn ObjectStore> = Arc::new(FlakyStore {
            inner: LocalStore::new(d.join("store")),
            fail_puts: AtomicUsize::new(1),
        });
        Some(make_builder(d, store))
    })
    .await;
    let (_, app) = env.project_and_app("shop", "web").await;

    // The user's RUN step fails: failed at once, with its output.
    let bad = upload(&env, source_tarball(&tmp.path().join("bad"), FAILING)).await;
    let (s, b) = env
        .post(
            "/v1/builds",
            json!({"app_id": app, "source": {"upload": bad}}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let b = wait_build(&env, b["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert_eq!(b["attempts"], 1, "a user fault is not retried: {b}");
    let err = b["error"].as_str().unwrap();
    assert!(
        err.contains("the-user-step-broke"),
        "log tail in the status: {err}"
    );

    // The store refuses the first upload: the queue retries, then succeeds.
    let good = upload(&env, source_tarball(&tmp.path().join("good"), GOOD)).await;
    let (s, b) = env
        .post(
            "/v1/builds",
            json!({"app_id": app, "source": {"upload": good}}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let b = wait_build(&env, &id, Duration::from_secs(90)).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(b["attempts"], 2, "one retry after the store fault: {b}");
    assert!(
        b["deployment_id"].as_str().unwrap().is_empty(),
        "build only"
    );
    let (_, lines) = env.get(&format!("/v1/builds/{id}/logs?limit=10000")).await;
    let text = lines.to_string();
    assert!(text.contains("retrying"), "{text}");
    assert!(text.contains("attempt 2"), "{text}");
    env.stop().await;
}

/// A gzip'd tar whose `src/leak` is a hard link to `target`, written as a
/// hostile client would (the tar crate's checked setters refuse `..`).
fn tarball_with_hard_link(dockerfile: &str, target: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_path("src/Dockerfile").unwrap();
    h.set_size(dockerfile.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, dockerfile.as_bytes()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("src/leak").unwrap();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

/// The attack: an uploaded source hard-links the captain's admin token
/// (`<data>/admin.token`, seen from `<data>/build-work/<id>/src`) and
/// `COPY`s it into an image the user could download. The archive is
/// refused before anything is built, naming the entry; a user fault, so
/// not retried.
async fn uploaded_hard_link_to_the_admin_token_is_refused(backend: Backend) {
    let env = Env::start_with(backend, |d| {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(d.join("store")));
        Some(make_builder(d, store))
    })
    .await;
    assert!(env.data_dir().join("admin.token").is_file());
    let (_, app) = env.project_and_app("shop", "web").await;
    let src = upload(
        &env,
        tarball_with_hard_link(
            "FROM scratch\nCOPY leak /leak\n",
            "src/../../../admin.token",
        ),
    )
    .await;
    let (s, b) = env
        .post(
            "/v1/builds",
            json!({"app_id": app, "source": {"upload": src}}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let b = wait_build(&env, b["id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert_eq!(b["attempts"], 1, "bad input is not retried: {b}");
    assert_eq!(b["image_digest"], "", "no image: {b}");
    let err = b["error"].as_str().unwrap();
    assert!(
        err.contains("\"src/leak\"") && err.contains("outside the build context"),
        "the error names the entry: {err}"
    );
    let (_, images) = env.get("/v1/images").await;
    assert_eq!(images, json!([]), "no image was made");
    env.stop().await;
}

both!(
    uploaded_hard_link,
    uploaded_hard_link_to_the_admin_token_is_refused
);

async fn a_build_cut_short_by_a_stop_runs_again(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut env = Env::start_with(backend, |d| {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(d.join("store")));
        Some(make_builder(d, store))
    })
    .await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let src = upload(&env, source_tarball(tmp.path(), GOOD)).await;
    let (s, b) = env
        .post(
            "/v1/builds",
            json!({"app_id": app, "source": {"upload": src}, "deploy": {}}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    // Stop as soon as the build runs.
    let start = Instant::now();
    loop {
        let (_, b) = env.get(&format!("/v1/builds/{id}")).await;
        if b["status"] == "building" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.restart(false).await;
    let b = wait_build(&env, &id, Duration::from_secs(60)).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert_eq!(b["attempts"], 2, "{b}");
    assert!(!b["deployment_id"].as_str().unwrap().is_empty(), "{b}");
    // One deployment from it, not two.
    let (_, deps) = env.get(&format!("/v1/deployments?app_id={app}")).await;
    assert_eq!(deps.as_array().unwrap().len(), 1, "{deps}");
    env.stop().await;
}

both!(
    upload_build_deploy_download,
    queue_upload_deploy_download_logs
);
both!(faults, user_fault_fails_once_infra_fault_is_retried);
both!(restart, a_build_cut_short_by_a_stop_runs_again);

/// A recorded GitHub push payload whose repository URL is rewritten to a
/// local repository (GitHub is unreachable here), signed with a real HMAC:
/// the captain queues a build of the pushed commit and deploys its image,
/// keeping the active release's port and env vars.
async fn github_push_payload_recorded_builds_and_deploys(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("shop");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy(busybox(), repo.join("busybox")).unwrap();
    std::fs::write(repo.join("Dockerfile"), GOOD).unwrap();
    common::git(Some(&repo), &["init", "-q", "-b", "main"]);
    common::git(Some(&repo), &["add", "."]);
    common::git(
        Some(&repo),
        &[
            "-c",
            "user.name=T",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "app",
        ],
    );
    let sha = common::git(Some(&repo), &["rev-parse", "HEAD"]);
    let url = format!("file://{}", repo.display());

    let env = Env::start_with(backend, |d| {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(d.join("store")));
        Some(make_builder(d, store))
    })
    .await;
    let (s, p) = env
        .post("/v1/projects", json!({"name": "shop", "repo": url}))
        .await;
    assert_eq!(s, 201, "{p}");
    let (s, a) = env
        .post(
            &format!("/v1/projects/{}/apps", p["id"].as_str().unwrap()),
            json!({"name": "web"}),
        )
        .await;
    assert_eq!(s, 201, "{a}");
    let app = a["id"].as_str().unwrap().to_string();
    // The active release: its port and env vars must carry over.
    let (s, d) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": common::digest(1), "port": 8080, "env_vars": {"MODE": "prod"}}),
        )
        .await;
    assert_eq!(s, 201, "{d}");

    let mut payload: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/github_push.json"
        ))
        .unwrap(),
    )
    .unwrap();
    payload["repository"]["clone_url"] = json!(url);
    payload["after"] = json!(sha);
    let body = serde_json::to_vec(&payload).unwrap();
    let sig = captain::webhook::sign(b"It's a Secret to Everybody", &body);
    let r = env
        .http
        .post(format!("{}/v1/webhook/github", env.base))
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", sig)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["deployments"], json!([]), "{v}");
    let builds = v["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 1, "{v}");
    assert_eq!(builds[0]["source_commit"], sha.as_str());
    let b = wait_build(
        &env,
        builds[0]["id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(b["status"], "succeeded", "{b}");
    let dep = b["deployment_id"].as_str().unwrap();
    let (_, d) = env.get(&format!("/v1/deployments/{dep}")).await;
    assert_eq!(d["source_commit"], sha.as_str());
    assert_eq!(d["image_digest"], b["image_digest"]);

    // The release in the meta repo kept the port and env vars.
    let repo = meta_schema::repo::MetaRepo::open(&env.meta_dir()).unwrap();
    let head = repo.head("main").unwrap().unwrap();
    let tree = repo.tree_at(&head).unwrap();
    let path = meta_schema::layout::release_path(
        d["env"].as_str().unwrap(),
        d["app"].as_str().unwrap(),
        dep,
    );
    let rel =
        <meta_schema::pb::Release as prost::Message>::decode(tree.get(&path).unwrap()).unwrap();
    assert_eq!(rel.port, 8080);
    assert_eq!(rel.env_vars.get("MODE").map(String::as_str), Some("prod"));
    env.stop().await;
}

both!(github_push, github_push_payload_recorded_builds_and_deploys);
