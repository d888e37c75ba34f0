//! Secrets end to end, in one process: a real captain (SQLite, its own meta
//! repository) and a real follower with the `process` runtime. The node's
//! age recipient lands in every env.pb; a secret set through the API is
//! encrypted to it, released, and reaches the instance's environment; the
//! plaintext is found neither in the SQLite files, nor in the log output
//! of captain and follower, nor in any object of the meta repository. A
//! secrets file altered by hand (plain git) makes the next instance fail
//! to start, with a reason naming the MAC and not the value.
//!
//! Every address is on loopback; every wait is bounded.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use follower::image::{ImageConfig, LocalDirImageSource};
use follower::reconciler::{InstanceRecord, Phase};
use follower::runtime::RuntimeChoice;
use prost::Message;
use serde_json::{Value, json};

const SECRET: &str = "plaintext-7c0ffee-d15ea5e-first";
const SECRET2: &str = "plaintext-2b4dc0de-f00d-second";
/// A JSON number sent as a value: errors must not quote it back.
const NUMBER: &str = "918273645546372819";
/// A valid age X25519 recipient of no node here (age's test vector).
const OTHER_RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

/// Everything every component logs, from the start of the test.
fn log_buffer() -> Arc<Mutex<Vec<u8>>> {
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

struct LogWriter(Arc<Mutex<Vec<u8>>>);

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

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// An ext4 image holding a static busybox, in the object-store layout.
/// The app writes `$API_KEY` into the page it serves.
fn busybox_image(store: &Path) -> String {
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
    let rootfs = std::fs::read(&img).unwrap();
    let hex = sha256_hex(&[rootfs.as_slice(), &cfg].concat());
    let dir = store.join("images").join(&hex);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rootfs.ext4"), rootfs).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    format!("sha256:{hex}")
}

fn git(git_dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
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

fn git_str(git_dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> String {
    String::from_utf8(git(git_dir, args, stdin))
        .unwrap()
        .trim()
        .to_string()
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(
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

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
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
async fn env_recipients(captain: &captain::Captain, env: &str) -> Vec<(String, String)> {
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

async fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn healthy_of(f: &follower::Follower, release: &str) -> Option<InstanceRecord> {
    f.reconciler
        .instances
        .borrow()
        .values()
        .find(|r| r.release_id == release && r.phase == Phase::Healthy)
        .cloned()
}

async fn page(http: &reqwest::Client, rec: &InstanceRecord) -> String {
    let url = format!("http://[{}]:{}/secret.txt", rec.ip, rec.port);
    http.get(url).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_reaches_the_instance_and_nowhere_else() {
    let logs = log_buffer();
    let tmp = tempfile::tempdir().unwrap();
    let data: PathBuf = tmp.path().join("captain");
    let store = tmp.path().join("store");
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
    use reqwest::Method as M;

    // An app (and its env) before any node exists: nothing to encrypt to.
    let p = api
        .ok(
            M::POST,
            "/v1/projects",
            Some(json!({"name": "web", "repo": "https://example.invalid/web.git"})),
        )
        .await;
    let pid = p["id"].as_str().unwrap().to_string();
    let app = api
        .ok(
            M::POST,
            &format!("/v1/projects/{pid}/apps"),
            Some(json!({"name": "web", "env": "production"})),
        )
        .await;
    let app_id = app["id"].as_str().unwrap().to_string();
    let secrets_url = format!("/v1/apps/{app_id}/secrets");
    let (s, body) = api
        .call(
            M::PUT,
            &secrets_url,
            Some(json!({"secrets": {"API_KEY": SECRET}})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("no age recipients"), "{body}");
    assert!(!body.contains(SECRET));
    assert!(env_recipients(&captain, "production").await.is_empty());

    // The follower registers with its age recipient: production lists it.
    let range = {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let n = (nanos as u16 ^ std::process::id() as u16) | 0x8000;
        follower::net::InstanceRange::parse(&format!("fd00:7a77:0:{n:x}::/64")).unwrap()
    };
    let mut fcfg = follower::FollowerConfig::new(
        tmp.path().join("node"),
        data.join("meta.git").display().to_string(),
    );
    fcfg.node_id = Some("node-a".into());
    fcfg.captain_url = Some(api.base.clone());
    fcfg.token = api.token.clone();
    fcfg.runtime = RuntimeChoice::Process;
    fcfg.instance_range = Some(range);
    fcfg.images = Some(Arc::new(LocalDirImageSource::new(&store)));
    fcfg.poll_interval = Duration::from_millis(500);
    fcfg.reconcile_interval = Duration::from_millis(200);
    fcfg.heartbeat_interval = Duration::from_secs(1);
    let f = follower::Follower::start(fcfg).await.unwrap();
    let mut commits = captain.state().commits.subscribe();
    let notify = f.notify.clone();
    let bridge = tokio::spawn(async move {
        while commits.changed().await.is_ok() {
            notify.notify_one();
        }
    });
    // The follower registers in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    while env_recipients(&captain, "production").await.is_empty() {
        assert!(Instant::now() < deadline, "the node never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env_recipients(&captain, "production").await,
        vec![("node-a".to_string(), f.age_recipient.clone())]
    );
    // A later env starts with every registered node.
    api.ok(
        M::POST,
        &format!("/v1/projects/{pid}/apps"),
        Some(json!({"name": "web", "env": "staging"})),
    )
    .await;
    assert_eq!(
        env_recipients(&captain, "staging").await,
        vec![("node-a".to_string(), f.age_recipient.clone())]
    );
    // Another node joins every env, and leaves every env when removed.
    api.ok(
        M::POST,
        "/v1/nodes",
        Some(json!({"id": "node-b", "address": "127.0.0.1", "cpus": 1, "memory_bytes": 1u64 << 30, "disk_bytes": 1u64 << 30, "age_recipient": OTHER_RECIPIENT})),
    )
    .await;
    for env in ["production", "staging"] {
        let names: Vec<String> = env_recipients(&captain, env)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(names, ["node-a", "node-b"], "{env}");
    }
    api.ok(M::DELETE, "/v1/nodes/node-b", None).await;
    for env in ["production", "staging"] {
        let names: Vec<String> = env_recipients(&captain, env)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(names, ["node-a"], "{env}");
    }

    // A value that is not a string is refused without being quoted back.
    let (s, body) = api
        .call(
            M::PUT,
            &secrets_url,
            Some(
                serde_json::from_str(&format!(r#"{{"secrets": {{"API_KEY": {NUMBER}}}}}"#))
                    .unwrap(),
            ),
        )
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(!body.contains(NUMBER), "{body}");

    // Set the secret (the app has no release yet), then deploy: the
    // release names it, the follower decrypts it into the environment.
    let v = api
        .ok(
            M::PUT,
            &secrets_url,
            Some(json!({"secrets": {"API_KEY": SECRET}})),
        )
        .await;
    assert_eq!(v["names"], json!(["API_KEY"]));
    assert_eq!(v["recipients"], json!(["node-a"]));
    assert_eq!(v["stale"], json!(false));
    assert!(v["release"].is_null(), "{v}");
    assert!(!v.to_string().contains(SECRET));
    let d1 = api
        .ok(
            M::POST,
            "/v1/deployments",
            Some(json!({"app_id": app_id, "image_digest": digest, "port": 8080, "min_instances": 1, "health_check_path": "/"})),
        )
        .await;
    let r1 = d1["id"].as_str().unwrap().to_string();
    let rec = wait_for(120, "the first release healthy", || healthy_of(&f, &r1)).await;
    assert_eq!(page(&api.http, &rec).await, format!("{SECRET}\n"));

    // The names are readable, never the values.
    let (s, listed) = api.call(M::GET, &secrets_url, None).await;
    assert_eq!(s, 200, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["names"], json!(["API_KEY"]));
    assert!(!listed.to_string().contains(SECRET));

    // The captain cannot keep a value it cannot read: dropping a name
    // needs `unset`.
    let (s, body) = api
        .call(
            M::PUT,
            &secrets_url,
            Some(json!({"secrets": {"OTHER": "x"}})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("missing: API_KEY"), "{body}");

    // A new value on a deployed app: one commit, one release copying the
    // active one, which the rollout starts with the new value.
    let v = api
        .ok(
            M::PUT,
            &secrets_url,
            Some(json!({"secrets": {"API_KEY": SECRET2}})),
        )
        .await;
    let r2 = v["release"]
        .as_str()
        .expect("a release was made")
        .to_string();
    let meta_git = data.join("meta.git");
    let commit = v["commit"].as_str().unwrap();
    let changed = git_str(
        &meta_git,
        &["diff-tree", "--no-commit-id", "--name-only", "-r", commit],
        None,
    );
    assert_eq!(
        changed.lines().collect::<Vec<_>>(),
        [
            format!("envs/production/apps/web/releases/{r2}.pb"),
            "envs/production/apps/web/secrets.sops.yaml".to_string()
        ]
    );
    let blob = git_str(
        &meta_git,
        &[
            "rev-parse",
            &format!("{commit}:envs/production/apps/web/secrets.sops.yaml"),
        ],
        None,
    );
    let rel = meta_schema::pb::Release::decode(
        git(
            &meta_git,
            &[
                "cat-file",
                "blob",
                &format!("{commit}:envs/production/apps/web/releases/{r2}.pb"),
            ],
            None,
        )
        .as_slice(),
    )
    .unwrap();
    assert_eq!(rel.secret_refs, ["API_KEY"]);
    assert_eq!(rel.secrets_blob, blob);
    assert_eq!(rel.image_digest, digest);
    assert_eq!(rel.min_instances, 1);
    let rec = wait_for(120, "the release of the new secret healthy", || {
        healthy_of(&f, &r2)
    })
    .await;
    assert_eq!(page(&api.http, &rec).await, format!("{SECRET2}\n"));

    // The plaintexts are nowhere the captain writes: not in the SQLite files,
    let mut db_files = 0;
    for e in std::fs::read_dir(&data).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("captain.db") {
            let bytes = std::fs::read(e.path()).unwrap();
            db_files += usize::from(contains(&bytes, &app_id));
            for s in [SECRET, SECRET2] {
                assert!(!contains(&bytes, s), "plaintext in {name}");
            }
        }
    }
    assert!(db_files > 0, "the SQLite files hold the app's rows");
    // not in any object of the meta repository,
    let objects = git(
        &meta_git,
        &["cat-file", "--batch-all-objects", "--batch"],
        None,
    );
    assert!(
        contains(&objects, "ENC[AES256_GCM,data:"),
        "the secrets files are in the repo"
    );
    for s in [SECRET, SECRET2] {
        assert!(!contains(&objects, s), "plaintext in the meta repository");
    }
    // and not in what captain and follower logged.
    {
        let l = logs.lock().unwrap();
        assert!(contains(&l, "secrets written"), "the log capture works");
        for s in [SECRET, SECRET2, NUMBER] {
            assert!(!contains(&l, s), "plaintext in the logs");
        }
    }

    // A byte of the MAC flipped by hand with plain git: the next instance
    // is not started, and says why without the value.
    let path = "envs/production/apps/web/secrets.sops.yaml";
    let head = git_str(&meta_git, &["rev-parse", "refs/heads/main"], None);
    let yaml = git_str(
        &meta_git,
        &["cat-file", "blob", &format!("{head}:{path}")],
        None,
    );
    let at = yaml.find("mac: ENC[AES256_GCM,data:").expect("a mac entry")
        + "mac: ENC[AES256_GCM,data:".len();
    let mut bytes = yaml.into_bytes();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    bytes.push(b'\n');
    let blob = git_str(&meta_git, &["hash-object", "-w", "--stdin"], Some(&bytes));
    git(&meta_git, &["read-tree", &head], None);
    git(
        &meta_git,
        &[
            "update-index",
            "--cacheinfo",
            &format!("100644,{blob},{path}"),
        ],
        None,
    );
    let tree = git_str(&meta_git, &["write-tree"], None);
    let tampered = git_str(
        &meta_git,
        &["commit-tree", &tree, "-p", &head, "-m", "flip a byte"],
        None,
    );
    git(
        &meta_git,
        &["update-ref", "refs/heads/main", &tampered, &head],
        None,
    );
    let _ = std::fs::remove_file(meta_git.join("test-tamper-index"));
    let d3 = api
        .ok(
            M::POST,
            "/v1/deployments",
            Some(json!({"app_id": app_id, "image_digest": digest, "port": 8080, "min_instances": 1, "health_check_path": "/"})),
        )
        .await;
    let r3 = d3["id"].as_str().unwrap().to_string();
    f.notify.notify_one();
    let failed = wait_for(120, "the release on the altered file refused", || {
        f.reconciler
            .instances
            .borrow()
            .values()
            .find(|r| r.release_id == r3 && r.reason.contains("MAC"))
            .cloned()
    })
    .await;
    assert!(failed.reason.contains("MAC mismatch"), "{}", failed.reason);
    assert!(
        failed.handle.is_none(),
        "an instance was started: {}",
        failed.reason
    );
    assert_ne!(failed.phase, Phase::Healthy);
    for s in [SECRET, SECRET2] {
        assert!(!failed.reason.contains(s));
    }
    // The release serving the last good file keeps running.
    let rec = healthy_of(&f, &r2).expect("the previous release still serves");
    assert_eq!(page(&api.http, &rec).await, format!("{SECRET2}\n"));

    bridge.abort();
    f.shutdown_and_stop_instances().await;
    captain.shutdown().await;
    let l = logs.lock().unwrap();
    for s in [SECRET, SECRET2] {
        assert!(!contains(&l, s), "plaintext in the logs");
    }
}
