//! The user CLI (`zw login|apps|deploy|status|releases|env|scale|rollback|
//! logs`) run as the real `zw` binary against a real captain started in
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

    /// Run `zw` authenticated by flags.
    fn zw(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--api", &self.api, "--token", &self.token]);
        self.zw_in(self.home.path(), &all, &[])
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
