//! Shared test harness: tool checks, busybox build contexts, debugfs, a
//! moto S3 server on loopback, counting wrappers.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use builder::backend::{BackendRequest, BuildBackend, BuildahBackend};
use builder::store::{ObjectStore, ObjectStream, StoreError};
use builder::{BuildError, Builder, BuilderConfig, LogSink, RetryPolicy};
use bytes::Bytes;
use futures::future::BoxFuture;

/// Fail loudly when a tool the test needs is missing.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .chain(["/usr/sbin".into(), "/sbin".into()])
                    .any(|d: PathBuf| d.join(tool).is_file())
            })
            .unwrap_or(false);
        assert!(
            found,
            "this test needs `{tool}` (Debian: apt-get install buildah e2fsprogs busybox-static git python3-venv)"
        );
    }
}

pub fn busybox() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "this test needs a static busybox at /bin/busybox (Debian: apt-get install busybox-static)"
    );
}

/// A build context with busybox at `busybox` and `dockerfile` at `Dockerfile`.
pub fn busybox_context(dir: &Path, dockerfile: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(busybox(), dir.join("busybox")).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir.to_path_buf()
}

/// Retries fast enough for tests.
pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
        multiplier: 2.0,
    }
}

pub fn config(data_dir: &Path) -> BuilderConfig {
    let mut c = BuilderConfig::new(data_dir);
    c.retry = fast_retry(4);
    c
}

/// A builder with the real buildah backend, counting backend calls.
pub fn buildah_builder(
    store: Arc<dyn ObjectStore>,
    data_dir: &Path,
) -> (Builder, Arc<AtomicUsize>) {
    require_tools(&["buildah", "mkfs.ext4"]);
    let inner = BuildahBackend::new(&data_dir.join("buildah")).expect("buildah backend");
    let calls = Arc::new(AtomicUsize::new(0));
    let backend = CountingBackend {
        inner,
        calls: calls.clone(),
    };
    (
        Builder::with_backend(store, Box::new(backend), config(data_dir)),
        calls,
    )
}

/// Counts calls of a real backend.
pub struct CountingBackend<B> {
    pub inner: B,
    pub calls: Arc<AtomicUsize>,
}

impl<B: BuildBackend> BuildBackend for CountingBackend<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn build<'a>(
        &'a self,
        req: &'a BackendRequest,
        log: &'a dyn LogSink,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.build(req, log)
    }
}

/// Counts writes to a real store.
pub struct CountingStore<S> {
    pub inner: S,
    pub puts: AtomicUsize,
}

impl<S> CountingStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            puts: AtomicUsize::new(0),
        }
    }
    pub fn puts(&self) -> usize {
        self.puts.load(Ordering::SeqCst)
    }
}

impl<S: ObjectStore> ObjectStore for CountingStore<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put_file<'a>(
        &'a self,
        key: &'a str,
        src: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_file(key, src)
    }
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        self.puts.fetch_add(1, Ordering::SeqCst);
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

/// Run `debugfs -R <request> <image>` and return its stdout.
pub fn debugfs(image: &Path, request: &str) -> String {
    require_tools(&["debugfs"]);
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `path` exists in the image.
pub fn debugfs_exists(image: &Path, path: &str) -> bool {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(image)
        .output()
        .expect("run debugfs");
    !String::from_utf8_lossy(&out.stderr).contains("File not found")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join(name)
}

/// moto_server on 127.0.0.1 (installed by scripts/s3-test-server.sh into a
/// cache venv if missing). Stopped on drop.
pub struct MotoServer {
    pub port: u16,
    child: Option<Child>,
}

impl MotoServer {
    pub fn start() -> Self {
        let install = Command::new("bash")
            .arg(script("s3-test-server.sh"))
            .arg("install")
            .stdout(Stdio::null())
            .status()
            .expect("run s3-test-server.sh");
        assert!(
            install.success(),
            "scripts/s3-test-server.sh install failed: moto[server] is needed for S3 tests"
        );
        let mut s = Self {
            port: free_port(),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("bash")
            .arg(script("s3-test-server.sh"))
            .arg("run")
            .arg(self.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        self.child = Some(child);
        // Bounded wait for the port to answer.
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("moto_server exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "moto_server did not listen on 127.0.0.1:{} within 20 s",
            self.port
        );
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop the server (its state is lost).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `bash` exec'd into moto_server, so this is the server's pid.
            let _ = c.kill();
            let _ = c.wait();
        }
        // Bounded wait until the port is closed.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn s3_config(&self, bucket: &str) -> builder::S3Config {
        let mut c = builder::S3Config::from_env(bucket);
        c.endpoint = Some(self.endpoint());
        c.region = "us-east-1".into();
        c.access_key_id = Some("testing".into());
        c.secret_access_key = Some("testing".into());
        c.session_token = None;
        c.connect_timeout = Duration::from_secs(2);
        c.read_timeout = Duration::from_secs(30);
        c
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
