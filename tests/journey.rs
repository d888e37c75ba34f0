//! The whole journey under `zw up` with the `process` runtime, through the
//! real binary: build with buildah, deploy v1, request it through the edge;
//! deploy v2 while a client sends requests (0 failures, answers switch);
//! `git revert` the v2 release in a clone of the meta repo and push (v1
//! serves again, 0 failures); a release that never becomes healthy is
//! failed while v1 keeps serving; `kill -9` of `zw up` mid-rollout and a
//! restart finish the rollout without duplicate or orphaned instances.
//! Every address is on loopback; every loop is bounded.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn zw() -> &'static str {
    env!("CARGO_BIN_EXE_zw")
}

/// A `zw up` child process; Ctrl-C (SIGINT) on drop stops its instances.
struct Up {
    child: Option<Child>,
    api: String,
    http: u16,
    token: String,
    log: PathBuf,
}

impl Up {
    fn start(data: &Path, api_port: u16, http: u16) -> Up {
        let log = PathBuf::from(format!("{}.{api_port}.log", data.display()));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(zw())
            .args(["up", "--runtime", "process"])
            .arg("--data-dir")
            .arg(data)
            .arg(format!("--api=127.0.0.1:{api_port}"))
            .arg(format!("--http=127.0.0.1:{http}"))
            .arg(format!("--https=127.0.0.1:{}", free_port()))
            .env("ZW_LOG", "info,edge=warn")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let api = format!("http://127.0.0.1:{api_port}");
        let mut up = Up {
            child: Some(child),
            api,
            http,
            token: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(t) = std::fs::read_to_string(data.join("admin.token"))
                && reqwest::blocking::get(format!("{}/v1/health", up.api)).is_ok_and(|r| r.status().is_success())
            {
                up.token = t.trim().to_string();
                break;
            }
            assert!(Instant::now() < deadline, "zw up did not come up:\n{}", up.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        up
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let c = reqwest::blocking::Client::new();
        let mut req = c.request(method, format!("{}{path}", self.api)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().unwrap();
        let status = resp.status();
        let v: Value = resp.json().unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Build an image of examples/hello with this page text (and maybe a
/// broken command); returns its digest.
fn build(work: &Path, data: &Path, name: &str, page: &str, cmd: Option<&str>) -> String {
    let ctx = work.join(format!("ctx-{name}"));
    std::fs::create_dir_all(&ctx).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    let mut dockerfile = std::fs::read_to_string(example.join("Dockerfile")).unwrap();
    if let Some(cmd) = cmd {
        dockerfile.push_str(&format!("CMD {cmd}\n"));
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(ctx.join("index.html"), page).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).expect("busybox-static is installed (/bin/busybox)");
    let out = Command::new(zw())
        .args(["build", "--json", "--app", "hello"])
        .arg("--data-dir")
        .arg(data)
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(out.status.success(), "zw build: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["artifact"]["digest"].as_str().unwrap().to_string()
}

fn deploy(up: &Up, digest: &str) -> Value {
    up.api(
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"app_id": "hello.production", "image_digest": digest, "port": 8080, "health_check_path": "/healthz"})),
    )
}

fn get_page(http: u16) -> Result<String, String> {
    let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    match c.get(format!("http://127.0.0.1:{http}/")).header("host", "hello.localhost").send() {
        Ok(r) if r.status().is_success() => r.text().map_err(|e| e.to_string()),
        Ok(r) => Err(format!("status {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

fn wait_for_page(up: &Up, want: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if get_page(up.http).is_ok_and(|p| p.contains(want)) {
            return;
        }
        assert!(Instant::now() < deadline, "{want:?} never served:\n{}", up.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends requests through the edge until stopped (at most 10 minutes,
/// 200,000 requests); counts failures and which versions answered.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<(usize, Vec<String>, Vec<String>)>>,
}

impl Load {
    fn start(http: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let (s, f) = (stop.clone(), failures.clone());
        let handle = std::thread::spawn(move || {
            let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
            let started = Instant::now();
            let (mut n, mut order, mut errors) = (0usize, Vec::<String>::new(), Vec::new());
            while !s.load(Ordering::Relaxed) && n < 200_000 && started.elapsed() < Duration::from_secs(600) {
                n += 1;
                let r = c.get(format!("http://127.0.0.1:{http}/")).header("host", "hello.localhost").send();
                match r.map_err(|e| e.to_string()).and_then(|r| {
                    let st = r.status();
                    let body = r.text().map_err(|e| e.to_string())?;
                    if st.is_success() { Ok(body) } else { Err(format!("status {st}: {body}")) }
                }) {
                    Ok(body) => {
                        let v = ["version-1", "version-2"].iter().find(|v| body.contains(**v)).map(|v| v.to_string()).unwrap_or_default();
                        if order.last() != Some(&v) {
                            order.push(v);
                        }
                    }
                    Err(e) => {
                        f.fetch_add(1, Ordering::Relaxed);
                        if errors.len() < 10 {
                            errors.push(e);
                        }
                    }
                }
            }
            (n, order, errors)
        });
        Load { stop, failures, handle: Some(handle) }
    }

    fn finish(mut self) -> (usize, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=Dev", "-c", "user.email=dev@example.com"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn setup_app(up: &Up) {
    let p = up.api(reqwest::Method::POST, "/v1/projects", Some(json!({"name": "hello", "repo": "https://example.invalid/hello.git"})));
    let pid = p["id"].as_str().unwrap();
    up.api(reqwest::Method::POST, &format!("/v1/projects/{pid}/apps"), Some(json!({"name": "hello"})));
}

/// Instances running from this data dir: distinct chroot roots of live
/// processes under it.
fn running_instances(data: &Path) -> BTreeSet<PathBuf> {
    let data = data.canonicalize().unwrap();
    let mut roots = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(root) = std::fs::read_link(e.path().join("root"))
            && root.starts_with(&data)
        {
            roots.insert(root);
        }
    }
    roots
}

fn deployment_status(up: &Up, id: &str) -> String {
    up.api(reqwest::Method::GET, &format!("/v1/deployments/{id}"), None)["status"].as_str().unwrap().to_string()
}

#[test]
fn journey_deploy_rollout_revert_and_failed_deploy_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("zw");
    let (api_port, http) = (free_port(), free_port());
    let up = Up::start(&data, api_port, http);
    setup_app(&up);
    let v1 = build(tmp.path(), &data, "v1", "<h1>hello version-1</h1>", None);
    let v2 = build(tmp.path(), &data, "v2", "<h1>hello version-2</h1>", None);
    let bad = build(tmp.path(), &data, "bad", "<h1>never served</h1>", Some(r#"["/bin/busybox", "false"]"#));

    deploy(&up, &v1);
    wait_for_page(&up, "version-1", 60);

    let load = Load::start(http);
    std::thread::sleep(Duration::from_millis(300));
    let d2 = deploy(&up, &v2);
    wait_for_page(&up, "version-2", 60);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(load.failures.load(Ordering::Relaxed), 0, "failures during v1 -> v2");

    // Rollback by git: revert the commit that added the v2 release, in a
    // clone of the captain's meta repo over smart HTTP, and push.
    let clone = tmp.path().join("meta-clone");
    let url = format!("http://zw:{}@127.0.0.1:{api_port}/meta.git", up.token);
    git(tmp.path(), &["clone", "-q", &url, clone.to_str().unwrap()]);
    git(&clone, &["revert", "--no-edit", d2["commit"].as_str().unwrap()]);
    git(&clone, &["push", "-q", "origin", "main"]);
    wait_for_page(&up, "version-1", 60);
    std::thread::sleep(Duration::from_millis(300));
    let (requests, order, errors) = load.finish();
    assert_eq!(errors, Vec::<String>::new(), "failed requests out of {requests}");
    assert_eq!(order, ["version-1", "version-2", "version-1"], "answers switched v1 -> v2 -> v1 ({requests} requests)");

    // A release that never becomes healthy is failed; v1 keeps serving.
    let load = Load::start(http);
    let d3 = deploy(&up, &bad);
    let id = d3["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while deployment_status(&up, id) != "failed" {
        assert!(Instant::now() < deadline, "bad release not failed:\n{}", up.log_text());
        std::thread::sleep(Duration::from_millis(250));
    }
    let (requests, order, errors) = load.finish();
    assert_eq!(errors, Vec::<String>::new(), "failed requests out of {requests} during the failed deploy");
    assert_eq!(order, ["version-1"]);
    let reason = up.api(reqwest::Method::GET, &format!("/v1/deployments/{id}"), None)["reason"].to_string();
    assert!(reason.contains("failed"), "{reason}");
    drop(up);
    // Ctrl-C stopped every instance it started.
    assert!(running_instances(&data).is_empty(), "instances left after Ctrl-C: {:?}", running_instances(&data));
}

#[test]
fn journey_kill_9_of_zw_up_mid_rollout_then_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("zw");
    let (api_port, http) = (free_port(), free_port());
    let mut up = Up::start(&data, api_port, http);
    setup_app(&up);
    let v1 = build(tmp.path(), &data, "v1", "<h1>hello version-1</h1>", None);
    let v2 = build(tmp.path(), &data, "v2", "<h1>hello version-2</h1>", None);
    deploy(&up, &v1);
    wait_for_page(&up, "version-1", 60);
    deploy(&up, &v2);
    // Kill as soon as the v2 rollout has started some instance.
    let deadline = Instant::now() + Duration::from_secs(30);
    while running_instances(&data).len() < 4 {
        assert!(Instant::now() < deadline, "v2 rollout never started:\n{}", up.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    up.kill9();
    let before = running_instances(&data);

    let up = Up::start(&data, api_port, http);
    wait_for_page(&up, "version-2", 90);
    // Converged: v2 serving (3) and v1 draining (3); nothing more, and
    // every instance alive before the kill was adopted or stopped, none
    // started twice.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = running_instances(&data);
        if now.len() == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "expected 6 instances, have {}: {now:?}\nbefore kill: {before:?}\n{}", now.len(), up.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let reported = up.api(reqwest::Method::GET, "/v1/instances", None);
    let live: Vec<&Value> = reported
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] != "stopped" && i["state"] != "failed")
        .collect();
    assert_eq!(live.len(), 6, "{reported}");
    drop(up);
    assert!(running_instances(&data).is_empty(), "instances left after Ctrl-C");
}
