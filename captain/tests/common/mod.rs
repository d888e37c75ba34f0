//! Test harness of the captain: one real PostgreSQL cluster per test
//! binary (started from the machine's binaries by
//! `scripts/pg-test-cluster.sh`, stopped when the binary exits), a fresh
//! database per test, real SQLite files, real git, real HTTP on loopback.
//! [`both!`] runs one async test body against SQLite and Postgres.

#![allow(dead_code)]

pub mod builds;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use captain::{Captain, Config};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

struct PgCluster {
    port: u16,
}

static PG: OnceLock<Result<PgCluster, String>> = OnceLock::new();
static DB_SEQ: AtomicU32 = AtomicU32::new(0);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn pg() -> &'static PgCluster {
    let r = PG.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg-test-cluster.sh");
        let dir = std::env::temp_dir().join(format!(
            "zw-captain-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
        let port = free_port();
        let out = Command::new("bash")
            .arg(script)
            .arg(&dir)
            .arg(port.to_string())
            .arg(std::process::id().to_string())
            .output()
            .map_err(|e| format!("running {script}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "starting the Postgres test cluster failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(PgCluster { port })
    });
    match r {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// A database URL for a fresh, empty database of `backend`.
pub async fn fresh_database(backend: Backend, dir: &Path) -> String {
    match backend {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("captain.db").display()),
        Backend::Postgres => {
            let port = pg().port;
            let name = format!(
                "t{}_{}",
                std::process::id(),
                DB_SEQ.fetch_add(1, Ordering::SeqCst)
            );
            sqlx::any::install_default_drivers();
            let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
                .await
                .expect("connect to the test cluster");
            sqlx::Executor::execute(
                &mut conn,
                sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")),
            )
            .await
            .expect("create a test database");
            let _ = sqlx::Connection::close(conn).await;
            format!("postgres://postgres@127.0.0.1:{port}/{name}")
        }
    }
}

/// Drop every table of a database (the "wipe the database" of the tests).
pub async fn wipe_database(url: &str, backend: Backend) {
    sqlx::any::install_default_drivers();
    match backend {
        Backend::Sqlite => {
            let path = url
                .trim_start_matches("sqlite://")
                .split('?')
                .next()
                .unwrap()
                .to_string();
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{path}{suffix}"));
            }
        }
        Backend::Postgres => {
            let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url)
                .await
                .expect("connect");
            sqlx::Executor::execute(
                &mut conn,
                "DROP SCHEMA public CASCADE; CREATE SCHEMA public;",
            )
            .await
            .expect("wipe the database");
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// Run an async test body against SQLite and against Postgres.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $body(common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $body(common::Backend::Postgres).await
            }
        }
    };
}

/// The command the meta repository's pre-receive hook runs in tests: this
/// test binary, running only its ignored `pre_receive_hook_entry` test,
/// which calls `captain::hooks::main_entry`.
pub fn test_hook_command() -> Vec<String> {
    vec![
        std::env::current_exe().unwrap().display().to_string(),
        "--exact".into(),
        "pre_receive_hook_entry".into(),
        "--ignored".into(),
        "--quiet".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ]
}

pub const HOOK_MODE_ENV: &str = "ZW_CAPTAIN_TEST_HOOK";

/// A captain under test with its client.
pub struct Env {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pub database_url: String,
    pub captain: Option<Captain>,
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
    /// Given to every captain this Env starts (builds, image downloads).
    pub builder: Option<std::sync::Arc<builder::Builder>>,
    /// Given to every captain this Env starts (image downloads).
    pub store: Option<captain::ImageStore>,
}

pub fn config(dir: &Path, database_url: &str) -> Config {
    let mut c = Config::new(dir);
    c.database_url = Some(database_url.to_string());
    c.poll_interval = std::time::Duration::from_millis(300);
    c.heartbeat_interval = std::time::Duration::from_millis(200);
    c.node_grace = std::time::Duration::from_millis(600);
    c.github_webhook_secret = Some("It's a Secret to Everybody".into());
    let mut hook = test_hook_command();
    // The hook runs this binary; the env var tells its entry test to act.
    hook.insert(0, format!("{HOOK_MODE_ENV}=1"));
    hook.insert(0, "env".into());
    c.hook_command = Some(hook);
    c
}

impl Env {
    pub async fn start(backend: Backend) -> Env {
        Env::start_with(backend, |_| None).await
    }

    /// Like [`Env::start`], with the builder `make` returns for the data dir.
    pub async fn start_with(
        backend: Backend,
        make: impl FnOnce(&Path) -> Option<std::sync::Arc<builder::Builder>>,
    ) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = fresh_database(backend, dir.path()).await;
        let builder = make(dir.path());
        let mut cfg = config(dir.path(), &database_url);
        cfg.builder = builder.clone();
        cfg.build_retry_backoff = std::time::Duration::from_millis(200);
        let captain = Captain::start(cfg).await.expect("captain starts");
        let token = std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(Some(token.as_str()), captain.admin_token());
        let base = format!("http://{}", captain.local_addr());
        Env {
            backend,
            dir,
            database_url,
            captain: Some(captain),
            base,
            token,
            http: reqwest::Client::new(),
            builder,
            store: None,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn meta_dir(&self) -> PathBuf {
        self.dir.path().join("meta.git")
    }

    /// Stop the captain and start a new one on the same data (optionally
    /// after wiping the database).
    pub async fn restart(&mut self, wipe: bool) {
        if let Some(c) = self.captain.take() {
            c.shutdown().await;
        }
        if wipe {
            wipe_database(&self.database_url, self.backend).await;
        }
        let mut cfg = config(self.dir.path(), &self.database_url);
        cfg.builder = self.builder.clone();
        cfg.store = self.store.clone();
        cfg.build_retry_backoff = std::time::Duration::from_millis(200);
        let c = Captain::start(cfg).await.expect("captain restarts");
        if let Some(t) = c.admin_token() {
            self.token = t.to_string();
        }
        self.base = format!("http://{}", c.local_addr());
        self.captain = Some(c);
    }

    pub async fn stop(mut self) {
        if let Some(c) = self.captain.take() {
            c.shutdown().await;
        }
    }

    pub async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.req_as(&self.token, method, path, body).await
    }

    /// A request with `token` rather than the admin's.
    pub async fn req_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.req(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.req(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.req(reqwest::Method::PUT, path, Some(body)).await
    }

    /// Create a project and an app; returns (project id, app id).
    pub async fn project_and_app(&self, project: &str, app: &str) -> (String, String) {
        let (s, p) = self
            .post("/v1/projects", serde_json::json!({"name": project, "repo": format!("https://github.com/acme/{project}.git")}))
            .await;
        assert_eq!(s, 201, "{p}");
        let pid = p["id"].as_str().unwrap().to_string();
        let (s, a) = self
            .post(
                &format!("/v1/projects/{pid}/apps"),
                serde_json::json!({"name": app}),
            )
            .await;
        assert_eq!(s, 201, "{a}");
        (pid, a["id"].as_str().unwrap().to_string())
    }
}

/// `git` in `dir` (or anywhere), panicking with its stderr on failure.
pub fn git(dir: Option<&Path>, args: &[&str]) -> String {
    let mut c = Command::new("git");
    if let Some(d) = dir {
        c.current_dir(d);
    }
    let out = c
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Number of commits on main of a bare repository.
pub fn commit_count(git_dir: &Path) -> usize {
    git(
        None,
        &[
            "--git-dir",
            git_dir.to_str().unwrap(),
            "rev-list",
            "--count",
            "main",
        ],
    )
    .parse()
    .unwrap()
}

pub fn digest(n: u32) -> String {
    format!("sha256:{:064x}", n)
}
