//! Test fixtures: real ext4 images of busybox, made without the builder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use follower::image::ImageConfig;

/// Builds an image in the object-store layout under `store`
/// (`images/<hex>/rootfs.ext4` + `config.json`) from a directory holding a
/// static busybox, an `index.html` and a passwd/group with `nobody`.
/// Returns its digest (`sha256:` of the rootfs file).
pub fn busybox_image(store: &Path, config: &ImageConfig) -> String {
    let staging = tempfile::tempdir().unwrap();
    let root = staging.path().join("root");
    for d in ["bin", "www", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    std::fs::write(root.join("www/index.html"), "hello from zeitwork\n").unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    let img = staging.path().join("rootfs.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("16M")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is installed");
    assert!(st.success(), "mkfs.ext4 failed");
    let out = Command::new("sha256sum").arg(&img).output().unwrap();
    let hex = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    // Give each config its own digest even with the same rootfs.
    let cfg = serde_json::to_vec(config).unwrap();
    let hex = sha_of(&[hex.as_bytes(), &cfg].concat());
    let dir = store.join("images").join(&hex);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&img, dir.join("rootfs.ext4")).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    format!("sha256:{hex}")
}

fn sha_of(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A busybox httpd serving /www on `port`, as `nobody`.
pub fn httpd_config(port: u16) -> ImageConfig {
    ImageConfig {
        entrypoint: vec![
            "/bin/busybox".into(),
            "httpd".into(),
            "-f".into(),
            "-v".into(),
        ],
        cmd: vec!["-p".into(), port.to_string(), "-h".into(), "/www".into()],
        env: [("PATH".to_string(), "/bin".to_string())]
            .into_iter()
            .collect(),
        workdir: "/www".into(),
        user: "nobody".into(),
        exposed_ports: vec![port],
        rootfs_bytes: 16 << 20,
    }
}

/// The path of the image directory of `digest` in `store`.
pub fn image_dir(store: &Path, digest: &str) -> PathBuf {
    store
        .join("images")
        .join(digest.trim_start_matches("sha256:"))
}

/// A random node-local range, so concurrent tests never share addresses.
pub fn random_range() -> follower::net::InstanceRange {
    let n = ulid::Ulid::new().random() as u16 | 0x8000;
    follower::net::InstanceRange::parse(&format!("fd00:7a77:0:{n:x}::/64")).unwrap()
}

/// GET over plain TCP (no proxy, no client library between the test and the
/// socket): status line and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(3), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A meta repository on disk (the upstream a follower fetches from), with
/// helpers to write releases and deployments the way the captain does.
pub struct Meta {
    pub repo: meta_schema::repo::MetaRepo,
    pub path: PathBuf,
}

impl Meta {
    pub fn new(dir: &Path) -> Meta {
        use prost::Message;
        let path = dir.join("upstream.git");
        let repo = meta_schema::repo::MetaRepo::init_bare(&path).unwrap();
        let env = meta_schema::pb::Env {
            name: "prod".into(),
            ..Default::default()
        };
        repo.commit(
            "main",
            &meta_schema::repo::ChangeSet::new()
                .add(meta_schema::layout::env_path("prod"), env.encode_to_vec()),
            "env prod",
        )
        .unwrap();
        Meta { repo, path }
    }

    pub fn url(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    pub fn release(&self, app: &str, digest: &str, port: u32) -> meta_schema::pb::Release {
        meta_schema::pb::Release {
            id: meta_schema::new_id(),
            app: app.into(),
            env: "prod".into(),
            image_digest: digest.into(),
            port,
            health_check: Some(meta_schema::pb::HealthCheck {
                kind: Some(meta_schema::pb::health_check::Kind::HttpPath("/".into())),
                interval_ms: 500,
                timeout_ms: 1000,
            }),
            created_at: meta_schema::now_millis(),
            drain_seconds: Some(0),
            ..Default::default()
        }
    }

    /// A deployment of `release` in `state`; a new rollout (with `n`
    /// instances on `node`) unless `rollout` is given.
    pub fn deployment(
        &self,
        release: &meta_schema::pb::Release,
        state: meta_schema::pb::DeploymentState,
        rollout: Option<&meta_schema::pb::Deployment>,
        node: &str,
        n: usize,
    ) -> meta_schema::pb::Deployment {
        let id = meta_schema::new_id();
        meta_schema::pb::Deployment {
            id: id.clone(),
            app: release.app.clone(),
            env: "prod".into(),
            rollout_id: rollout
                .map(|r| r.rollout_id.clone())
                .unwrap_or_else(|| id.clone()),
            state: state as i32,
            release: Some(release.clone()),
            instances: rollout.map(|r| r.instances.clone()).unwrap_or_else(|| {
                (0..n)
                    .map(|_| meta_schema::pb::Placement {
                        instance_id: meta_schema::new_id(),
                        node: node.into(),
                    })
                    .collect()
            }),
            created_at: meta_schema::now_millis(),
            reason: String::new(),
        }
    }

    /// Commits releases and deployments (added) and removed paths.
    pub fn commit(
        &self,
        releases: &[&meta_schema::pb::Release],
        deployments: &[&meta_schema::pb::Deployment],
        remove: &[String],
        msg: &str,
    ) -> String {
        use prost::Message;
        let mut cs = meta_schema::repo::ChangeSet::new();
        for r in releases {
            cs = cs.add(
                meta_schema::layout::release_path(&r.env, &r.app, &r.id),
                r.encode_to_vec(),
            );
        }
        for d in deployments {
            cs = cs.add(
                meta_schema::layout::deployment_path(&d.env, &d.app, &d.id),
                d.encode_to_vec(),
            );
        }
        for p in remove {
            cs = cs.remove(p.clone());
        }
        self.repo.commit("main", &cs, msg).unwrap()
    }

    /// Moves `main` to `commit` by force, as a `git push --force` would.
    pub fn force_main(&self, commit: &str) {
        let st = Command::new("git")
            .arg("--git-dir")
            .arg(&self.path)
            .args(["update-ref", "refs/heads/main", commit])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// One request a [`RecordingCaptain`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub auth: String,
    pub body: serde_json::Value,
}

/// A captain on loopback that records every request and answers like the
/// captain's API contract: 201 {node, token} on registration, 200 otherwise.
pub struct RecordingCaptain {
    pub url: String,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
    /// Tokens answered with 401 (a node deleted on the captain).
    pub revoked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The node token the captain issues at its `n`th registration (from 1).
pub fn issued_token(n: usize) -> String {
    format!("node-token-issued-by-captain-{n}")
}

type Shared = (
    std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
);

impl RecordingCaptain {
    pub async fn start() -> RecordingCaptain {
        use axum::extract::{Request, State};
        use axum::http::StatusCode;
        let requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>> = Default::default();
        let revoked: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        async fn record(
            State((reqs, revoked)): State<Shared>,
            req: Request,
        ) -> (StatusCode, axum::Json<serde_json::Value>) {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap();
            let body: serde_json::Value =
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            let is_register = method == "POST" && path == "/v1/nodes";
            let refused = revoked
                .lock()
                .unwrap()
                .iter()
                .any(|t| auth == format!("Bearer {t}"));
            let mut reqs = reqs.lock().unwrap();
            reqs.push(Recorded {
                method,
                path,
                auth,
                body: body.clone(),
            });
            if is_register {
                let n = reqs
                    .iter()
                    .filter(|r| r.method == "POST" && r.path == "/v1/nodes")
                    .count();
                (
                    StatusCode::CREATED,
                    axum::Json(serde_json::json!({"node": body, "token": issued_token(n)})),
                )
            } else if refused {
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(serde_json::json!({"error": "revoked"})),
                )
            } else {
                (StatusCode::OK, axum::Json(serde_json::json!({})))
            }
        }
        let app = axum::Router::new()
            .fallback(record)
            .with_state((requests.clone(), revoked.clone()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        RecordingCaptain {
            url,
            requests,
            revoked,
        }
    }

    pub fn count(&self, method: &str, path: &str) -> usize {
        self.all()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    pub fn all(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// Polls `f` every 100 ms for at most `secs` seconds.
pub async fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Removes every trace of `process` runtime instances when a test ends,
/// however it ends (a failed assertion included): the container, its
/// cgroup and runc state, the host's mounts, the bundle and the network.
/// Works from the names alone, without the runtime under test.
#[derive(Default)]
pub struct ProcessInstances(pub Vec<(String, PathBuf)>);

impl ProcessInstances {
    /// Registers an instance by id and work dir (before it is started).
    pub fn add(&mut self, instance_id: &str, work_dir: &Path) {
        self.0
            .push((instance_id.to_string(), work_dir.to_path_buf()));
    }
}

impl Drop for ProcessInstances {
    fn drop(&mut self) {
        let run = follower::runtime::process::run_dir().ok();
        for (id, work) in &self.0 {
            let container = follower::runtime::process::container_id(id);
            if let Some(pid) = std::fs::read_to_string(work.join("app.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
                if cg.contains(&container) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if let Some(run) = &run {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(run.join("runc"))
                    .args(["delete", "--force", &container])
                    .stderr(std::process::Stdio::null())
                    .status();
                let _ = std::fs::remove_dir_all(run.join("bundles").join(&container));
            }
            for m in ["root", "upper", "mapped", "lower"] {
                let _ = nix::mount::umount2(&work.join(m), nix::mount::MntFlags::MNT_DETACH);
            }
            let n = follower::net::InstanceNetNames::for_instance(id);
            let _ = Command::new("ip")
                .args(["netns", "del", &n.netns])
                .stderr(std::process::Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["link", "del", &n.host_if])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
