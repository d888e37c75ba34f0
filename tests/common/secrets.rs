//! Helpers of the secrets tests (`tests/secrets_*.rs`): a captured log,
//! a busybox image serving `$API_KEY`, plain git, the captain's API, and
//! in-process followers. Included with `#[path]`, so tests that do not use
//! them (`tests/journey.rs` shares `common/mod.rs`) are not affected.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use follower::image::{ImageConfig, LocalDirImageSource};
use follower::reconciler::{InstanceRecord, Phase};
use follower::runtime::RuntimeChoice;
use prost::Message;
use serde_json::Value;

/// Everything every component logs, from the start of the test.
pub fn log_buffer() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("debug,hyper=info,hyper_util=info,h2=info")
            .with_ansi(false)
            .with_writer(move || LogWriter(w.clone()))
            .init();
        buf
    })
    .clone()
}

pub struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// An ext4 root filesystem holding a static busybox and `/www/index.html`
/// ("up").
pub fn busybox_rootfs() -> Vec<u8> {
    let staging = tempfile::tempdir().unwrap();
    let root = staging.path().join("root");
    for d in ["bin", "www", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    std::fs::write(root.join("www/index.html"), "up\n").unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    let img = staging.path().join("rootfs.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("16M")
        .stdout(Stdio::null())
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is installed");
    assert!(st.success(), "mkfs.ext4 failed");
    std::fs::read(&img).unwrap()
}

/// An ext4 image holding a static busybox, in the object-store layout.
/// The app writes `$API_KEY` into the page it serves.
pub fn busybox_image(store: &Path) -> String {
    let rootfs = busybox_rootfs();
    let config = ImageConfig {
        entrypoint: vec!["/bin/busybox".into(), "sh".into(), "-c".into()],
        cmd: vec![
            "echo \"$API_KEY\" > /www/secret.txt && exec /bin/busybox httpd -f -p 8080 -h /www"
                .into(),
        ],
        env: [("PATH".to_string(), "/bin".to_string())]
            .into_iter()
            .collect(),
        workdir: "/www".into(),
        user: "root".into(),
        exposed_ports: vec![8080],
        rootfs_bytes: 16 << 20,
    };
    let cfg = serde_json::to_vec(&config).unwrap();
    let hex = sha256_hex(&[rootfs.as_slice(), &cfg].concat());
    let dir = store.join("images").join(&hex);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rootfs.ext4"), rootfs).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    format!("sha256:{hex}")
}

pub fn git(git_dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let mut child = Command::new("git")
        .arg("--git-dir")
        .arg(git_dir)
        .args(args)
        .env("GIT_INDEX_FILE", git_dir.join("test-tamper-index"))
        .env("GIT_AUTHOR_NAME", "tamperer")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "tamperer")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        input.write_all(b).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn git_str(git_dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> String {
    String::from_utf8(git(git_dir, args, stdin))
        .unwrap()
        .trim()
        .to_string()
}

pub struct Api {
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, String) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (s, text) = self.call(method.clone(), path, body).await;
        assert!((200..300).contains(&s), "{method} {path}: {s} {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }
}

/// Age recipient names listed in `env`'s env.pb at the meta head.
pub async fn env_recipients(captain: &captain::Captain, env: &str) -> Vec<(String, String)> {
    let meta = &captain.state().meta;
    let head = meta.head().await.unwrap().unwrap();
    let tree = meta.tree(head).await.unwrap();
    let bytes = tree.get(&meta_schema::layout::env_path(env)).unwrap();
    meta_schema::pb::Env::decode(bytes)
        .unwrap()
        .age_recipients
        .into_iter()
        .map(|r| (r.name, r.recipient))
        .collect()
}

pub async fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn healthy_of(f: &follower::Follower, release: &str) -> Option<InstanceRecord> {
    f.reconciler
        .instances
        .borrow()
        .values()
        .find(|r| r.release_id == release && r.phase == Phase::Healthy)
        .cloned()
}

pub async fn page(http: &reqwest::Client, rec: &InstanceRecord) -> String {
    let url = format!("http://[{}]:{}/secret.txt", rec.ip, rec.port);
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// A /64 of `fd00:7a77::/32` for a follower's instances, distinct per
/// process and per call.
pub fn instance_range() -> follower::net::InstanceRange {
    static N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let k = N.fetch_add(0x111, std::sync::atomic::Ordering::Relaxed);
    let n = ((nanos as u16 ^ std::process::id() as u16).wrapping_add(k)) | 0x8000;
    follower::net::InstanceRange::parse(&format!("fd00:7a77:0:{n:x}::/64")).unwrap()
}

/// A follower of the captain's meta repo (`meta_git`) with the process
/// runtime, its own data dir and age identity, and images from `store`.
pub async fn start_follower(
    data_dir: &Path,
    node_id: &str,
    api: &Api,
    meta_git: &Path,
    store: &Path,
) -> follower::Follower {
    let mut fcfg = follower::FollowerConfig::new(data_dir, meta_git.display().to_string());
    fcfg.node_id = Some(node_id.into());
    fcfg.captain_url = Some(api.base.clone());
    fcfg.token = api.token.clone();
    fcfg.runtime = RuntimeChoice::Process;
    fcfg.instance_range = Some(instance_range());
    fcfg.images = Some(Arc::new(LocalDirImageSource::new(store)));
    fcfg.poll_interval = Duration::from_millis(500);
    fcfg.reconcile_interval = Duration::from_millis(200);
    fcfg.heartbeat_interval = Duration::from_secs(1);
    follower::Follower::start(fcfg).await.unwrap()
}

/// Wakes `f` at every captain commit (as `zw up` does), until aborted.
pub fn bridge(captain: &captain::Captain, f: &follower::Follower) -> tokio::task::JoinHandle<()> {
    let mut commits = captain.state().commits.subscribe();
    let notify = f.notify.clone();
    tokio::spawn(async move {
        while commits.changed().await.is_ok() {
            notify.notify_one();
        }
    })
}

/// What the secrets tests start from: a captain on `root/captain` (fast
/// polling), the admin's API client, the busybox image in `root/store`,
/// and the project `web` with its app `web.production`.
pub struct Setup {
    pub data: PathBuf,
    pub store: PathBuf,
    pub digest: String,
    pub captain: captain::Captain,
    pub api: Api,
    pub project_id: String,
    pub app_id: String,
}

pub async fn captain_with_web_app(root: &Path) -> Setup {
    let data = root.join("captain");
    let store = root.join("store");
    let digest = busybox_image(&store);
    let mut cfg = captain::Config::new(&data);
    cfg.poll_interval = Duration::from_millis(500);
    cfg.rollout_interval = Duration::from_millis(200);
    cfg.heartbeat_interval = Duration::from_secs(1);
    let captain = captain::Captain::start(cfg).await.unwrap();
    let api = Api {
        base: format!("http://{}", captain.local_addr()),
        token: captain.admin_token().unwrap().to_string(),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    };
    let p = api
        .ok(
            reqwest::Method::POST,
            "/v1/projects",
            Some(serde_json::json!({"name": "web", "repo": "https://example.invalid/web.git"})),
        )
        .await;
    let pid = p["id"].as_str().unwrap().to_string();
    let app = api
        .ok(
            reqwest::Method::POST,
            &format!("/v1/projects/{pid}/apps"),
            Some(serde_json::json!({"name": "web", "env": "production"})),
        )
        .await;
    let app_id = app["id"].as_str().unwrap().to_string();
    Setup {
        data,
        store,
        digest,
        captain,
        api,
        project_id: pid,
        app_id,
    }
}
