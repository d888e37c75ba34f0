//! The user CLI (`zw login|apps|deploy|status|releases|env|scale|rollback|
//! logs`), the operators' `zw cluster token create` and `zw nodes
//! list|drain|remove`, and where every command takes its token from
//! (`--token-file`, the environment, `--token` with a warning), run as the
//! real `zw` binary against a real captain started in
//! this process on loopback, with a temporary data dir, SQLite and the
//! captain's own meta repository (pushes validated by `zw
//! captain-pre-receive`).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const ZW: &str = env!("CARGO_BIN_EXE_zw");

struct TestCaptain {
    rt: tokio::runtime::Runtime,
    captain: Option<captain::Captain>,
    data: tempfile::TempDir,
    /// $HOME and $XDG_CONFIG_HOME of the CLI runs (no real credentials).
    home: tempfile::TempDir,
    api: String,
    token: String,
}

impl TestCaptain {
    fn start() -> TestCaptain {
        TestCaptain::start_opts(false)
    }

    /// With `builds`, the captain runs a real builder (buildah) over
    /// `<data>/store`.
    fn start_opts(builds: bool) -> TestCaptain {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut cfg = captain::Config::new(data.path());
        cfg.hook_command = Some(vec![ZW.into(), "captain-pre-receive".into()]);
        if builds {
            let store: std::sync::Arc<dyn builder::ObjectStore> =
                std::sync::Arc::new(builder::LocalStore::new(data.path().join("store")));
            let b = rt
                .block_on(builder::Builder::new(
                    store,
                    builder::BuilderConfig::new(data.path().join("builder")),
                ))
                .expect("a build backend (buildah) is installed");
            cfg.builder = Some(std::sync::Arc::new(b));
        }
        let captain = rt
            .block_on(captain::Captain::start(cfg))
            .expect("captain starts");
        let api = format!("http://{}", captain.local_addr());
        let token = captain
            .admin_token()
            .expect("first start makes a token")
            .to_string();
        TestCaptain {
            rt,
            captain: Some(captain),
            data,
            home: tempfile::tempdir().unwrap(),
            api,
            token,
        }
    }

    /// Run `zw` with a clean environment: no ZW_API/ZW_TOKEN, an empty
    /// data dir and config dir unless `env` says otherwise.
    fn zw_in(&self, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let empty_data = self.home.path().join("no-data");
        let mut c = Command::new(ZW);
        c.current_dir(cwd)
            .args(args)
            .env_remove("ZW_API")
            .env_remove("ZW_TOKEN")
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("ZW_DATA_DIR", &empty_data)
            .env("ZW_LOG", "warn");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// Run `zw` with `--api` and the admin token in `$ZW_TOKEN` (not on
    /// the command line, where every user of the host could read it).
    fn zw(&self, args: &[&str]) -> Output {
        self.zw_as(&self.token, args)
    }

    /// Run `zw` with `--api` and `token` in `$ZW_TOKEN`.
    fn zw_as(&self, token: &str, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--api", &self.api]);
        self.zw_in(self.home.path(), &all, &[("ZW_TOKEN", token)])
    }

    /// Call the API as `token`: the answer's status and JSON body.
    fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let http = reqwest::blocking::Client::new();
        let mut r = http
            .request(method.parse().unwrap(), format!("{}{path}", self.api))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.zw(args);
        assert!(
            out.status.success(),
            "zw {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let s = self.ok(args);
        serde_json::from_str(&s)
            .unwrap_or_else(|e| panic!("zw {args:?} printed no JSON ({e}): {s}"))
    }
}

impl Drop for TestCaptain {
    fn drop(&mut self) {
        if let Some(c) = self.captain.take() {
            self.rt.block_on(c.shutdown());
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn failed(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit 1; stdout {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = stderr(o);
    // Progress lines may come first; the error is the last line.
    assert!(
        e.trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("error: ")),
        "{e}"
    );
    e
}

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn apps_releases_env_scale_rollback_through_the_api_and_meta_repo() {
    let t = TestCaptain::start();
    let a = t.json(&[
        "apps",
        "create",
        "hello",
        "--repo",
        "https://example.invalid/hello.git",
        "--json",
    ]);
    assert_eq!(a["id"], "hello.production");
    let list = t.json(&["apps", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "hello");
    assert!(t.ok(&["apps", "list"]).contains("hello"));

    // First release: POST /v1/deployments (no active release to copy).
    let (img_a, img_b) = (digest('a'), digest('b'));
    t.ok(&[
        "deploy",
        "--image",
        &img_a,
        "--app",
        "hello",
        "--port",
        "8080",
        "--health-check",
        "/healthz",
        "--no-wait",
    ]);
    let rel = t.json(&["releases", "--app", "hello", "--json"]);
    assert_eq!(rel.as_array().unwrap().len(), 1);
    let first = rel[0]["id"].as_str().unwrap().to_string();
    assert_eq!(rel[0]["image_digest"], img_a.as_str());

    // env set: a new release copying the active one, pushed to meta.git.
    t.ok(&[
        "env",
        "set",
        "FOO=bar",
        "GREETING=hi there",
        "--app",
        "hello",
        "--no-wait",
    ]);
    let env = t.json(&["env", "list", "--app", "hello", "--json"]);
    assert_eq!(
        env,
        serde_json::json!({"FOO": "bar", "GREETING": "hi there"})
    );

    // A redeploy keeps the env vars and changes the image.
    t.ok(&[
        "deploy",
        "--image",
        &img_b,
        "--app",
        "hello.production",
        "--no-wait",
    ]);
    let env = t.json(&["env", "list", "--app", "hello", "--json"]);
    assert_eq!(env["FOO"], "bar");

    t.ok(&["scale", "5", "--app", "hello", "--no-wait"]);
    t.ok(&["env", "unset", "GREETING", "--app", "hello", "--no-wait"]);
    let env = t.json(&["env", "list", "--app", "hello", "--json"]);
    assert_eq!(env, serde_json::json!({"FOO": "bar"}));
    let rel = t.json(&["releases", "--app", "hello", "--json"]);
    let rel = rel.as_array().unwrap();
    assert_eq!(rel.len(), 5);
    assert_eq!(rel[0]["image_digest"], img_b.as_str());
    assert_eq!(rel[0]["min_instances"], 5, "unset keeps the scale");
    assert_eq!(rel[1]["min_instances"], 5);

    // Nothing has run (no followers), so there is nothing to roll back to
    // by default; --to copies the named release, env vars and all.
    let o = t.zw(&["rollback", "--app", "hello", "--no-wait"]);
    assert!(
        failed(&o).contains("no earlier running release"),
        "{}",
        stderr(&o)
    );
    t.ok(&["rollback", "--to", &first, "--app", "hello", "--no-wait"]);
    let rel = t.json(&["releases", "--app", "hello", "--json"]);
    assert_eq!(rel[0]["image_digest"], img_a.as_str());
    assert_eq!(rel[0]["min_instances"], 3);
    assert_eq!(
        t.json(&["env", "list", "--app", "hello", "--json"]),
        serde_json::json!({})
    );

    let status = t.json(&["status", "--app", "hello", "--json"]);
    assert_eq!(status["active"]["id"], rel[0]["id"]);
    assert_eq!(status["url"], "https://hello.localhost");
    assert_eq!(
        status["instances"],
        serde_json::json!([]),
        "no follower reported any"
    );
    assert!(
        t.ok(&["status", "--app", "hello"])
            .contains("url:      https://hello.localhost")
    );
    let text = t.ok(&["releases", "--app", "hello"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with('*') && l.contains(rel[0]["id"].as_str().unwrap())),
        "{text}"
    );

    t.ok(&["apps", "delete", "hello"]);
    assert_eq!(t.json(&["apps", "list", "--json"]), serde_json::json!([]));
}

#[test]
fn finds_the_api_in_flags_env_login_and_the_data_dir() {
    let t = TestCaptain::start();
    // A `zw up` data dir: admin.token written by the captain, api.url by up.
    std::fs::write(t.data.path().join("api.url"), format!("{}\n", t.api)).unwrap();
    let data = t.data.path().to_str().unwrap();
    let cwd = t.home.path();
    let o = t.zw_in(
        cwd,
        &[
            "apps",
            "create",
            "web",
            "--repo",
            "https://example.invalid/w.git",
        ],
        &[("ZW_DATA_DIR", data)],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // Environment variables.
    let o = t.zw_in(
        cwd,
        &["apps", "list", "--json"],
        &[("ZW_API", &t.api), ("ZW_TOKEN", &t.token)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["name"], "web");

    // zw login refuses a bad token and saves nothing.
    let creds = t.home.path().join("config/zeitwork/credentials.json");
    let o = t.zw_in(
        cwd,
        &["login", "--api", &t.api, "--token", "zw_not_a_token"],
        &[],
    );
    let e = failed(&o);
    assert!(e.contains("(unauthorized)"), "{e}");
    assert!(!creds.exists());
    // ... and saves a good one, mode 0600, used by the next commands.
    let o = t.zw_in(cwd, &["login", "--api", &t.api, "--token", &t.token], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let saved: Value = serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
    assert_eq!(saved["api"], t.api.as_str());
    let o = t.zw_in(cwd, &["status", "--app", "web", "--json"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["app"]["id"], "web.production");
    assert!(v["active"].is_null());

    // The flag wins over the login; a refused connection names the URL and its origin.
    let dead = format!("http://127.0.0.1:{}", free_port());
    // The saved token is never sent to another API.
    let o = t.zw_in(cwd, &["apps", "list", "--api", &dead], &[]);
    let e = failed(&o);
    assert!(e.contains(&format!("no API token for {dead}")), "{e}");
    let o = t.zw_in(
        cwd,
        &["apps", "list", "--api", &dead, "--token", "zw_x"],
        &[],
    );
    let e = failed(&o);
    assert!(
        e.contains(&format!(
            "cannot connect to the API at {dead} (from the command line flag)"
        )),
        "{e}"
    );
    let o = t.zw_in(
        cwd,
        &["apps", "list"],
        &[("ZW_API", &dead), ("ZW_TOKEN", "zw_x")],
    );
    assert!(failed(&o).contains("(from $ZW_API)"), "{}", stderr(&o));
    // A bad token from the environment is named as such.
    let o = t.zw_in(cwd, &["apps", "list"], &[("ZW_TOKEN", "zw_nope")]);
    let e = failed(&o);
    assert!(
        e.contains("(token from $ZW_TOKEN)") && e.contains("(unauthorized)"),
        "{e}"
    );
}

#[test]
fn errors_and_the_app_from_the_project_file() {
    let t = TestCaptain::start();
    t.ok(&[
        "apps",
        "create",
        "site",
        "--env",
        "staging",
        "--repo",
        "https://example.invalid/s.git",
    ]);
    let o = t.zw(&["apps", "create", "site", "--env", "staging"]);
    let e = failed(&o);
    assert!(e.trim_end().ends_with("(conflict)"), "{e}");
    assert!(e.contains("exists in env \"staging\""), "{e}");

    let o = t.zw(&["status", "--app", "nope.production"]);
    assert!(
        failed(&o).trim_end().ends_with("(not_found)"),
        "{}",
        stderr(&o)
    );
    let o = t.zw(&[
        "deploy",
        "--image",
        "sha256:short",
        "--app",
        "site",
        "--no-wait",
    ]);
    assert!(
        failed(&o).trim_end().ends_with("(bad_request)"),
        "{}",
        stderr(&o)
    );

    // No --app and no project file: a clear error.
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api", &t.api, "--token", &t.token]);
        t.zw_in(dir.path(), &all, &[])
    };
    let o = run(&["status"]);
    assert!(
        failed(&o).contains("which app? give --app NAME"),
        "{}",
        stderr(&o)
    );
    std::fs::write(
        dir.path().join(".zeitwork.toml"),
        "# the app\napp = \"site\"\n",
    )
    .unwrap();
    let o = run(&["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["app"]["id"], "site.staging");

    // env/scale need a release to copy.
    let o = run(&["scale", "2", "--no-wait"]);
    assert!(failed(&o).contains("has no release yet"), "{}", stderr(&o));
    let o = run(&["env", "set", "1BAD=x"]);
    assert!(
        failed(&o).contains("is not an environment variable name"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn logs_of_an_app_without_instances_and_of_an_unknown_instance() {
    let t = TestCaptain::start();
    t.ok(&[
        "apps",
        "create",
        "svc",
        "--repo",
        "https://example.invalid/svc.git",
    ]);
    // No instance reported yet: nothing to print, not an error.
    assert_eq!(t.ok(&["logs", "--app", "svc"]), "");
    assert_eq!(t.ok(&["logs", "--app", "svc", "--json"]), "");
    let o = t.zw(&["logs", "--app", "svc", "--instance", "i-nope"]);
    let e = failed(&o);
    assert!(e.contains("has no instance \"i-nope\""), "{e}");
}

/// `zw deploy` without --no-wait follows the deployment's status to a
/// terminal one: exit 0 and the URL on `running`, exit 1 with the reason on
/// `failed`. The statuses are moved here through the API, as the rollout
/// would move them.
#[test]
fn deploy_follows_the_rollout_to_running_or_failed() {
    let t = TestCaptain::start();
    t.ok(&[
        "apps",
        "create",
        "hello",
        "--repo",
        "https://example.invalid/hello.git",
    ]);
    let http = reqwest::blocking::Client::new();
    let put = |id: &str, status: &str, reason: Option<&str>| {
        let mut body = serde_json::json!({"status": status});
        if let Some(r) = reason {
            body["reason"] = r.into();
        }
        let r = http
            .put(format!("{}/v1/deployments/{id}/status", t.api))
            .bearer_auth(&t.token)
            .json(&body)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{status}: {}", r.text().unwrap());
    };
    let spawn = |img: &str| {
        Command::new(ZW)
            .args([
                "deploy",
                "--image",
                img,
                "--app",
                "hello",
                "--wait-timeout",
                "120",
            ])
            .args(["--api", &t.api, "--token", &t.token])
            .env("ZW_DATA_DIR", t.home.path().join("no-data"))
            .env("XDG_CONFIG_HOME", t.home.path().join("config"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The newest deployment not in `seen`, waiting for the CLI to make it.
    let newest_new = |seen: usize| -> String {
        for _ in 0..600 {
            let v: Value = http
                .get(format!("{}/v1/deployments?app_id=hello.production", t.api))
                .bearer_auth(&t.token)
                .send()
                .unwrap()
                .json()
                .unwrap();
            let v = v.as_array().unwrap();
            if v.len() > seen {
                return v[0]["id"].as_str().unwrap().to_string();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("zw deploy made no deployment");
    };

    let child = spawn(&digest('c'));
    let id = newest_new(0);
    for s in ["building", "starting", "running"] {
        put(&id, s, None);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "https://hello.localhost"
    );
    assert!(
        stderr(&out).contains(&format!("release {id} is running")),
        "{}",
        stderr(&out)
    );

    let child = spawn(&digest('d'));
    let id2 = newest_new(1);
    assert_ne!(id, id2);
    put(&id2, "failed", Some("health check /healthz answered 500"));
    let out = child.wait_with_output().unwrap();
    let e = failed(&out);
    assert!(
        e.contains(&format!(
            "release {id2} failed: health check /healthz answered 500"
        )),
        "{e}"
    );

    // Now there is a running release before the active one: plain rollback copies it.
    t.ok(&["rollback", "--app", "hello", "--no-wait"]);
    let rel = t.json(&["releases", "--app", "hello", "--json"]);
    assert_eq!(rel[0]["image_digest"], digest('c').as_str());
}

/// `zw deploy` with no source argument uploads the current directory to
/// the captain, which builds it into its object store; then the CLI
/// releases that image. A captain that does not build says so before
/// anything is uploaded.
#[test]
fn deploy_builds_the_current_directory_on_the_captain() {
    let plain = TestCaptain::start();
    plain.ok(&[
        "apps",
        "create",
        "hello",
        "--repo",
        "https://example.invalid/hello.git",
    ]);
    let o = plain.zw_in(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &[
            "deploy",
            "examples/hello",
            "--app",
            "hello",
            "--no-wait",
            "--api",
            &plain.api,
            "--token",
            &plain.token,
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("does not build"), "{}", stderr(&o));
    drop(plain);

    let t = TestCaptain::start_opts(true);
    let store = t.data.path().join("store");
    t.ok(&[
        "apps",
        "create",
        "hello",
        "--repo",
        "https://example.invalid/hello.git",
    ]);
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("src");
    std::fs::create_dir_all(&ctx).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    std::fs::copy(example.join("Dockerfile"), ctx.join("Dockerfile")).unwrap();
    std::fs::write(ctx.join("index.html"), "built by zw deploy\n").unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox"))
        .expect("busybox-static is installed (/bin/busybox)");
    std::fs::write(ctx.join("zeitwork.json"), r#"{"app": "hello"}"#).unwrap();
    let data = work.path().join("data");
    let o = t.zw_in(
        &ctx,
        &[
            "deploy",
            "--no-wait",
            "--port",
            "8080",
            "--health-check",
            "/healthz",
            "--api",
            &t.api,
            "--token",
            &t.token,
        ],
        &[("ZW_DATA_DIR", data.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rel = t.json(&["releases", "--app", "hello", "--json"]);
    let digest = rel[0]["image_digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    // The build log streamed to the terminal, and the image is in the
    // captain's store (not in the CLI's data dir).
    assert!(
        stderr(&o).contains(&format!("image {digest}")),
        "{}",
        stderr(&o)
    );
    assert!(store.join("images").join(hex).join("rootfs.ext4").is_file());
    assert!(store.join("images").join(hex).join("config.json").is_file());
    assert!(!data.join("store").exists());

    // --git URL: the branch is pinned to its commit, which the release records.
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .current_dir(&ctx)
            .args(["-c", "user.name=Dev", "-c", "user.email=dev@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "hello"]);
    let head = git(&["rev-parse", "HEAD"]);
    let url = format!("file://{}", ctx.display());
    let o = t.zw_in(
        work.path(),
        &[
            "deploy",
            "--git",
            &url,
            "--branch",
            "main",
            "--app",
            "hello",
            "--no-wait",
            "--api",
            &t.api,
            "--token",
            &t.token,
        ],
        &[("ZW_DATA_DIR", data.to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rel = t.json(&["releases", "--app", "hello", "--json"]);
    assert_eq!(rel.as_array().unwrap().len(), 2);
    assert_eq!(rel[0]["source_commit"], head.as_str());
    let hex = rel[0]["image_digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    assert!(store.join("images").join(hex).join("rootfs.ext4").is_file());
}

/// A user (not admin) token of the captain.
fn user_token(t: &TestCaptain) -> String {
    let (s, v) = t.call(
        "POST",
        "/v1/tokens",
        &t.token,
        Some(serde_json::json!({"name": "alice", "kind": "user"})),
    );
    assert_eq!(s, 201, "{v}");
    v["secret"].as_str().unwrap().to_string()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn cluster_token_create_prints_the_token_or_json_and_the_captains_refusals() {
    let t = TestCaptain::start();
    // Plain: the token alone, so `T=$(zw cluster token create ...)` works.
    let out = t.ok(&["cluster", "token", "create", "--role", "worker"]);
    assert!(out.ends_with('\n') && out.lines().count() == 1, "{out:?}");
    let token = out.trim();
    assert!(token.starts_with("zwj_") && token.len() > 40, "{token:?}");

    let before = now_ms();
    let v = t.json(&[
        "cluster", "token", "create", "--role", "edge", "--ttl", "90s", "--json",
    ]);
    let after = now_ms();
    assert_eq!(v["role"], "edge");
    assert!(v["token"].as_str().unwrap().starts_with("zwj_"), "{v}");
    let exp = v["expires_at"].as_i64().unwrap();
    // The captain reads the database's clock: allow a second either side.
    assert!(
        exp >= before + 89_000 && exp <= after + 91_000,
        "expires_at {exp} is not 90 s after {before}..{after}"
    );
    let v = t.json(&[
        "cluster", "token", "create", "--role", "worker", "--ttl", "7d", "--json",
    ]);
    let exp = v["expires_at"].as_i64().unwrap();
    assert!((exp - now_ms() - 7 * 86_400_000).abs() < 60_000, "{v}");

    // The token is what the captain takes: an edge joins with it once.
    let (_key, csr) = edge::pki::key_and_csr("e1").unwrap();
    let edge_token = t.json(&["cluster", "token", "create", "--role", "edge", "--json"]);
    let join = |tok: &str| {
        reqwest::blocking::Client::new()
            .post(format!("{}/v1/cluster/join", t.api))
            .bearer_auth(tok)
            .json(&serde_json::json!({"role": "edge", "name": "e1", "csr_pem": csr}))
            .send()
            .unwrap()
    };
    let r = join(edge_token["token"].as_str().unwrap());
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().unwrap());
    // ... and the worker token of the plain run is refused for an edge.
    let r = join(token);
    assert_eq!(r.status().as_u16(), 403);

    // A bad role and a too long ttl: the captain's own words.
    let e = failed(&t.zw(&["cluster", "token", "create", "--role", "db"]));
    assert!(e.contains("role \"db\" is not worker or edge"), "{e}");
    let e = failed(&t.zw(&[
        "cluster", "token", "create", "--role", "worker", "--ttl", "8d",
    ]));
    assert!(
        e.contains("a join token lasts from 1 second to 7 days")
            && e.contains("not 691200 seconds"),
        "{e}"
    );
    // Less than a second is no ttl at all.
    let e = failed(&t.zw(&[
        "cluster", "token", "create", "--role", "worker", "--ttl", "500ms",
    ]));
    assert!(e.contains("not 0 seconds"), "{e}");
    // A ttl that is no duration never reaches the captain.
    let o = t.zw(&[
        "cluster",
        "token",
        "create",
        "--role",
        "worker",
        "--ttl",
        "1 fortnight",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("--ttl") && e.contains("1 fortnight"), "{e}");

    // A user token is refused, saying what it needs.
    let user = user_token(&t);
    let e = failed(&t.zw_as(&user, &["cluster", "token", "create", "--role", "worker"]));
    assert!(
        e.contains("a user token may not call this endpoint; it needs an admin token"),
        "{e}"
    );
}

#[test]
fn nodes_list_drain_and_remove_real_nodes_and_edges() {
    let t = TestCaptain::start();
    // Two nodes registered by an admin, as `zw up` and tests do.
    let mut node_tokens = std::collections::BTreeMap::new();
    for id in ["n1", "n2"] {
        let (s, v) = t.call(
            "POST",
            "/v1/nodes",
            &t.token,
            Some(serde_json::json!({
                "id": id, "address": format!("10.0.0.{}", &id[1..]),
                "cpus": 2, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 32,
            })),
        );
        assert_eq!(s, 201, "{v}");
        node_tokens.insert(id, v["token"].as_str().unwrap().to_string());
    }
    // n1 beats and runs one instance.
    let (s, v) = t.call(
        "PUT",
        "/v1/nodes/n1/state",
        &node_tokens["n1"],
        Some(serde_json::json!({"state": "online", "resources": {
            "cpus": 2, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 32,
            "memory_used_bytes": 0, "instances": 1}})),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = t.call(
        "POST",
        "/v1/instances",
        &node_tokens["n1"],
        Some(
            serde_json::json!({"id": "i-1", "node_id": "n1", "env": "production",
            "app": "web", "release_id": "rel-1", "state": "healthy"}),
        ),
    );
    assert_eq!(s, 200, "{v}");
    // An edge that joined the cluster.
    let edge = t.json(&["cluster", "token", "create", "--role", "edge", "--json"]);
    let (_key, csr) = edge::pki::key_and_csr("e1").unwrap();
    let (s, v) = t.call(
        "POST",
        "/v1/cluster/join",
        edge["token"].as_str().unwrap(),
        Some(serde_json::json!({"role": "edge", "name": "e1", "csr_pem": csr})),
    );
    assert_eq!(s, 201, "{v}");

    let out = t.ok(&["nodes", "list"]);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        lines[0],
        [
            "ID",
            "ROLE",
            "STATE",
            "DRAIN",
            "HEARTBEAT",
            "INSTANCES",
            "ADDRESS"
        ],
        "{out}"
    );
    let row = |id: &str| {
        lines
            .iter()
            .find(|l| l[0] == id)
            .unwrap_or_else(|| panic!("no row {id} in\n{out}"))
            .clone()
    };
    let n1 = row("n1");
    assert_eq!(n1[1..4], ["worker", "online", "no"], "{out}");
    assert!(n1[4].ends_with("s ago"), "{out}");
    assert_eq!(n1[5..], ["1", "10.0.0.1"], "{out}");
    // Registration counts as n2's first sign of life.
    let n2 = row("n2");
    assert!(n2[4].ends_with("s ago") && n2[5] == "0", "{out}");
    assert_eq!(
        row("e1")[1..],
        ["edge", "joined", "-", "-", "-", "-"],
        "{out}"
    );

    let v = t.json(&["nodes", "list", "--json"]);
    let nodes: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["n1", "n2"], "{v}");
    assert_eq!(v["members"][0]["id"], "e1", "{v}");
    assert_eq!(v["members"][0]["role"], "edge", "{v}");
    assert!(v["members"][0]["removed_at"].is_null(), "{v}");

    // Drain and wait: the wait ends when the node's last instance stopped.
    let mut c = Command::new(ZW);
    c.args([
        "nodes",
        "drain",
        "n1",
        "--wait",
        "--timeout",
        "60s",
        "--api",
        &t.api,
    ])
    .env("ZW_TOKEN", &t.token)
    .env("HOME", t.home.path())
    .env("XDG_CONFIG_HOME", t.home.path().join("config"))
    .env("ZW_DATA_DIR", t.home.path().join("no-data"))
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = Running(Some(c.spawn().unwrap()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !t.call("GET", "/v1/nodes/n1", &t.token, None).1["drain"]
        .as_bool()
        .unwrap()
    {
        assert!(std::time::Instant::now() < deadline, "never drained");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (s, v) = t.call(
        "PUT",
        "/v1/instances/i-1/state",
        &node_tokens["n1"],
        Some(serde_json::json!({"state": "stopped"})),
    );
    assert_eq!(s, 200, "{v}");
    let o = child.wait_output(std::time::Duration::from_secs(30));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("node n1 is draining")
            && out.contains("node n1: 1 instance left: web.production healthy")
            && out.contains("node n1 is empty"),
        "{out}"
    );
    assert_eq!(row_of(&t.ok(&["nodes", "list"]), "n1")[3], "yes");

    // A wait that cannot end says so when its time is up.
    let (s, v) = t.call(
        "POST",
        "/v1/instances",
        &node_tokens["n2"],
        Some(
            serde_json::json!({"id": "i-2", "node_id": "n2", "env": "production",
            "app": "web", "release_id": "rel-1", "state": "starting"}),
        ),
    );
    assert_eq!(s, 200, "{v}");
    let e = failed(&t.zw(&["nodes", "drain", "n2", "--wait", "--timeout", "2s"]));
    assert!(e.contains("node n2 still has 1 instance after 2s"), "{e}");

    // --off: the node takes instances again.
    let out = t.ok(&["nodes", "drain", "n1", "--off"]);
    assert!(out.contains("node n1 takes instances again"), "{out}");
    assert_eq!(
        t.call("GET", "/v1/nodes/n1", &t.token, None).1["drain"],
        false
    );
    let e = failed(&t.zw(&["nodes", "drain", "nope"]));
    assert!(
        e.contains("node \"nope\" does not exist (not_found)"),
        "{e}"
    );

    // Remove: a node that never joined (DELETE /v1/nodes), an edge member.
    let out = t.ok(&["nodes", "remove", "n2"]);
    assert!(out.contains("node n2 removed"), "{out}");
    assert_eq!(t.call("GET", "/v1/nodes/n2", &t.token, None).0, 404);
    // Its token is revoked with it.
    assert_eq!(
        t.call(
            "PUT",
            "/v1/nodes/n2/state",
            &node_tokens["n2"],
            Some(serde_json::json!({"state": "online"}))
        )
        .0,
        401
    );
    let out = t.ok(&["nodes", "remove", "e1"]);
    assert!(out.contains("e1 removed from the cluster"), "{out}");
    let v = t.json(&["nodes", "list", "--json"]);
    assert!(v["members"][0]["removed_at"].is_i64(), "{v}");
    let out = t.ok(&["nodes", "list"]);
    assert!(!out.contains("e1") && !out.contains("n2"), "{out}");
    let e = failed(&t.zw(&["nodes", "remove", "ghost"]));
    assert!(
        e.contains("no node and no member of the cluster is named \"ghost\""),
        "{e}"
    );

    // Only admins.
    let user = user_token(&t);
    for args in [
        &["nodes", "list"][..],
        &["nodes", "drain", "n1"],
        &["nodes", "remove", "n1"],
    ] {
        let e = failed(&t.zw_as(&user, args));
        assert!(
            e.contains("a user token may not call this endpoint; it needs an admin token"),
            "{args:?}: {e}"
        );
    }
    assert!(t.call("GET", "/v1/nodes/n1", &t.token, None).0 == 200);
}

/// A child process, killed and reaped on drop (when a test fails).
struct Running(Option<std::process::Child>);

impl Running {
    fn wait_output(mut self, limit: std::time::Duration) -> Output {
        let deadline = std::time::Instant::now() + limit;
        while self.0.as_mut().unwrap().try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "still running after {limit:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn row_of(out: &str, id: &str) -> Vec<String> {
    out.lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .find(|l| l[0] == id)
        .unwrap_or_else(|| panic!("no row {id} in\n{out}"))
}

#[test]
fn tokens_come_from_a_file_or_the_environment_and_the_command_line_is_warned() {
    let t = TestCaptain::start();
    let cwd = t.home.path();
    let warning = "warning: --token on the command line is readable by every user of this host";
    let file = t.home.path().join("admin.token");
    std::fs::write(&file, format!("{}\n", t.token)).unwrap();
    let f = file.to_str().unwrap();

    // --token still works, with the warning naming the safer ways.
    let o = t.zw_in(
        cwd,
        &["apps", "list", "--api", &t.api, "--token", &t.token],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(warning) && e.contains("--token-file PATH or $ZW_TOKEN"),
        "{e}"
    );
    // --token-file and $ZW_TOKEN: no warning.
    let o = t.zw_in(
        cwd,
        &["apps", "list", "--api", &t.api, "--token-file", f],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let o = t.zw(&["apps", "list"]);
    assert!(
        o.status.success() && !stderr(&o).contains("warning"),
        "{}",
        stderr(&o)
    );
    // The file wins over the environment; a bad one is named.
    let o = t.zw_in(
        cwd,
        &["apps", "list", "--api", &t.api, "--token-file", f],
        &[("ZW_TOKEN", "zw_wrong")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bad = t.home.path().join("bad.token");
    std::fs::write(&bad, "zw_wrong\n").unwrap();
    let e = failed(&t.zw_in(
        cwd,
        &[
            "apps",
            "list",
            "--api",
            &t.api,
            "--token-file",
            bad.to_str().unwrap(),
        ],
        &[],
    ));
    assert!(
        e.contains(&format!("(token from {})", bad.display())),
        "{e}"
    );
    let missing = t.home.path().join("missing.token");
    let e = failed(&t.zw_in(
        cwd,
        &[
            "apps",
            "list",
            "--api",
            &t.api,
            "--token-file",
            missing.to_str().unwrap(),
        ],
        &[],
    ));
    assert!(
        e.contains(&format!("reading the API token from {}", missing.display())),
        "{e}"
    );
    // Both at once is a mistake.
    let o = t.zw_in(
        cwd,
        &["apps", "list", "--token", "x", "--token-file", f],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // zw login takes the file too, and saves the token.
    let o = t.zw_in(cwd, &["login", "--api", &t.api, "--token-file", f], &[]);
    assert!(
        o.status.success() && !stderr(&o).contains("warning"),
        "{}",
        stderr(&o)
    );
    let saved: Value = serde_json::from_slice(
        &std::fs::read(t.home.path().join("config/zeitwork/credentials.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["token"], t.token.as_str());

    // zw follower and zw edge: the same, before they start anything (here
    // they stop at a later bad flag, so no service is left running).
    let node_dir = t.home.path().join("node");
    let nd = node_dir.to_str().unwrap();
    let follower = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "follower",
            "--data-dir",
            nd,
            "--instance-range",
            "not-a-range",
        ];
        args.extend(extra);
        t.zw_in(cwd, &args, env)
    };
    let e = failed(&follower(&["--token", "zw_x"], &[]));
    assert!(
        e.contains(warning) && e.contains("--token-file PATH or $ZW_TOKEN"),
        "{e}"
    );
    let e = failed(&follower(&["--token-file", f], &[]));
    assert!(
        !e.contains("warning") && e.contains("--instance-range"),
        "{e}"
    );
    let e = failed(&follower(&[], &[("ZW_TOKEN", "zw_x")]));
    assert!(!e.contains("warning"), "{e}");
    let e = failed(&follower(&["--token-file", missing.to_str().unwrap()], &[]));
    assert!(e.contains("reading the node token from"), "{e}");
    // A join token is a secret too (it admits one host to the cluster).
    let e = failed(&follower(&["--join-token", "zwj_x"], &[]));
    assert!(
        e.contains("warning: --join-token on the command line")
            && e.contains("--join-token-file PATH or $ZW_JOIN_TOKEN"),
        "{e}"
    );
    let e = failed(&follower(&[], &[("ZW_JOIN_TOKEN", "zwj_x")]));
    assert!(!e.contains("warning"), "{e}");

    let edge_dir = t.home.path().join("edge");
    let ed = edge_dir.to_str().unwrap();
    let no_routes = t.home.path().join("no-routes.json");
    let edge = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "edge",
            "--data-dir",
            ed,
            "--http",
            "127.0.0.1:0",
            "--no-https",
            "--routes-file",
            no_routes.to_str().unwrap(),
        ];
        args.extend(extra);
        t.zw_in(cwd, &args, env)
    };
    let e = failed(&edge(&["--token", "zw_x"], &[]));
    assert!(
        e.contains(warning) && e.contains("--token-file PATH or $ZW_EDGE_TOKEN"),
        "{e}"
    );
    let e = failed(&edge(&["--token-file", f], &[]));
    assert!(
        !e.contains("warning") && e.contains("no-routes.json"),
        "{e}"
    );
    let e = failed(&edge(&[], &[("ZW_EDGE_TOKEN", "zw_x")]));
    assert!(!e.contains("warning"), "{e}");
    let e = failed(&edge(&["--token-file", missing.to_str().unwrap()], &[]));
    assert!(e.contains("reading the edge token from"), "{e}");
}
