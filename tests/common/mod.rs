//! Helpers shared by the journey test and the journey benchmark: a `zw up`
//! child process, image builds through `zw build`, API calls, requests
//! through the edge, and a bounded load loop.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn zw() -> &'static str {
    env!("CARGO_BIN_EXE_zw")
}

/// A `zw up` child process; Ctrl-C (SIGINT) on drop stops its instances.
pub struct Up {
    child: Option<Child>,
    pub api: String,
    pub http: u16,
    pub token: String,
    pub log: PathBuf,
}

impl Up {
    pub fn start(data: &Path, api_port: u16, http: u16) -> Up {
        let log = PathBuf::from(format!("{}.{api_port}.log", data.display()));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
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
                && reqwest::blocking::get(format!("{}/v1/health", up.api))
                    .is_ok_and(|r| r.status().is_success())
            {
                up.token = t.trim().to_string();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "zw up did not come up:\n{}",
                up.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        up
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let c = reqwest::blocking::Client::new();
        let mut req = c
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().unwrap();
        let status = resp.status();
        let v: Value = resp.json().unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn stop(&mut self) {
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
pub fn build(work: &Path, data: &Path, name: &str, page: &str, cmd: Option<&str>) -> String {
    let ctx = work.join(format!("ctx-{name}"));
    std::fs::create_dir_all(&ctx).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    let mut dockerfile = std::fs::read_to_string(example.join("Dockerfile")).unwrap();
    if let Some(cmd) = cmd {
        dockerfile.push_str(&format!("CMD {cmd}\n"));
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(ctx.join("index.html"), page).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox"))
        .expect("busybox-static is installed (/bin/busybox)");
    let out = Command::new(zw())
        .args(["build", "--json", "--app", "hello"])
        .arg("--data-dir")
        .arg(data)
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "zw build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["artifact"]["digest"].as_str().unwrap().to_string()
}

pub fn deploy(up: &Up, digest: &str) -> Value {
    up.api(
        reqwest::Method::POST,
        "/v1/deployments",
        Some(json!({"app_id": "hello.production", "image_digest": digest, "port": 8080, "health_check_path": "/healthz"})),
    )
}

pub fn get_page(http: u16) -> Result<String, String> {
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    match c
        .get(format!("http://127.0.0.1:{http}/"))
        .header("host", "hello.localhost")
        .send()
    {
        Ok(r) if r.status().is_success() => r.text().map_err(|e| e.to_string()),
        Ok(r) => Err(format!("status {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

pub fn wait_for_page(up: &Up, want: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if get_page(up.http).is_ok_and(|p| p.contains(want)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{want:?} never served:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends requests through the edge until stopped (at most 10 minutes,
/// 200,000 requests); counts failures and which versions answered.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub failures: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<LoadResult>>,
}

/// What a load run saw.
pub struct LoadResult {
    pub requests: usize,
    /// Versions that answered, in order, each listed once per change.
    pub order: Vec<String>,
    /// The first failures (at most 10).
    pub errors: Vec<String>,
    /// Longest time between two successful responses.
    pub max_gap: Duration,
}

impl Load {
    pub fn start(http: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let (s, f) = (stop.clone(), failures.clone());
        let handle = std::thread::spawn(move || {
            let c = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let started = Instant::now();
            let (mut n, mut order, mut errors) = (0usize, Vec::<String>::new(), Vec::new());
            let (mut last_ok, mut max_gap) = (Instant::now(), Duration::ZERO);
            while !s.load(Ordering::Relaxed)
                && n < 200_000
                && started.elapsed() < Duration::from_secs(600)
            {
                n += 1;
                let r = c
                    .get(format!("http://127.0.0.1:{http}/"))
                    .header("host", "hello.localhost")
                    .send();
                match r.map_err(|e| e.to_string()).and_then(|r| {
                    let st = r.status();
                    let body = r.text().map_err(|e| e.to_string())?;
                    if st.is_success() {
                        Ok(body)
                    } else {
                        Err(format!("status {st}: {body}"))
                    }
                }) {
                    Ok(body) => {
                        max_gap = max_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                        let v = ["version-1", "version-2"]
                            .iter()
                            .find(|v| body.contains(**v))
                            .map(|v| v.to_string())
                            .unwrap_or_default();
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
            LoadResult {
                requests: n,
                order,
                errors,
                max_gap,
            }
        });
        Load {
            stop,
            failures,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
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
}

pub fn setup_app(up: &Up) {
    let p = up.api(
        reqwest::Method::POST,
        "/v1/projects",
        Some(json!({"name": "hello", "repo": "https://example.invalid/hello.git"})),
    );
    let pid = p["id"].as_str().unwrap();
    up.api(
        reqwest::Method::POST,
        &format!("/v1/projects/{pid}/apps"),
        Some(json!({"name": "hello"})),
    );
}

/// Instances running from this data dir: the work dirs of its instances
/// whose app process is alive.
pub fn running_instances(data: &Path) -> BTreeSet<PathBuf> {
    // An instance of the `process` runtime is running while the pid runc
    // wrote in its work dir is alive in the instance's own cgroup.
    let data = data.canonicalize().unwrap();
    let mut running = BTreeSet::new();
    let dirs = std::fs::read_dir(data.join("follower/instances"))
        .into_iter()
        .flatten();
    for work in dirs.flatten().map(|e| e.path()) {
        let Some(id) = work.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let Some(pid) = std::fs::read_to_string(work.join("app.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let container = follower::runtime::process::container_id(&id);
        let in_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| c.lines().any(|l| l.ends_with(&format!("/{container}"))));
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        });
        if in_cgroup && alive {
            running.insert(work);
        }
    }
    running
}

pub fn deployment_status(up: &Up, id: &str) -> String {
    up.api(reqwest::Method::GET, &format!("/v1/deployments/{id}"), None)["status"]
        .as_str()
        .unwrap()
        .to_string()
}
