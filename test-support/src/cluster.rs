//! A cluster of hosts on one machine, for multi-host tests.
//!
//! [`Cluster::up`] runs `scripts/cluster.sh up` (embedded, written with the
//! S3 test server's script into `<cluster dir>/scripts`): network
//! namespaces `pg`, `s3`, `git`, `internet`, `op1`, `op2`, `w1`, `w2`, `w3`
//! with their own IPv4 and IPv6 addresses, joined by a bridge in a namespace
//! of its own, Postgres, S3, a git server and a plain HTTP "internet" host
//! running. Its methods mirror the script's subcommands (`crash` is a power
//! cut of a host: its processes, instances included, killed); dropping it runs
//! `down`, so a failing test leaves no namespace, process, cgroup or mount
//! behind, and a reaper left by `up` runs `down` if the test process is
//! killed before that.
//!
//! ```no_run
//! use std::time::Duration;
//! use test_support::cluster::{Cluster, Family};
//!
//! let c = Cluster::up("demo").unwrap().with_zw("/path/to/zw");
//! let db = c.url_of("pg").unwrap().to_string();
//! c.zw("op1", "captain", &["captain", "--data-dir", "captain", "--listen", "[::]:7700",
//!     "--database-url", &db]).unwrap();
//! let health = format!("http://{}/v1/health", c.socket("op1", 7700, Family::V6).unwrap());
//! c.wait_http("w1", &health, Duration::from_secs(20)).unwrap();
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const CLUSTER_SH: &str = include_str!("../../scripts/cluster.sh");
const S3_TEST_SERVER_SH: &str = include_str!("../../scripts/s3-test-server.sh");

/// Longest name a test may give [`Cluster::up`]; the process id and a
/// counter are appended to make the cluster's prefix unique.
pub const MAX_NAME_LEN: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster name {0:?}: 1 to 6 lowercase letters or digits, starting with a letter")]
    BadName(String),
    #[error("writing the harness scripts to {path}")]
    WriteScript {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running cluster.sh {action}")]
    Spawn {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster.sh {action} failed ({status}): {stderr}")]
    Failed {
        action: String,
        status: String,
        stderr: String,
    },
    #[error("reading the state file {path}")]
    ReadState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the state file {path}")]
    ParseState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cluster.sh {action} printed {output:?}, not what was expected")]
    BadOutput { action: String, output: String },
    #[error("no host {0:?} in the cluster")]
    NoHost(String),
    #[error("no service {0:?} in the cluster")]
    NoService(String),
    #[error("no zw binary given (Cluster::with_zw)")]
    NoZw,
    #[error("{url} did not answer from host {host} within {timeout:?}; last error: {last}")]
    HttpTimeout {
        host: String,
        url: String,
        timeout: Duration,
        last: String,
    },
    #[error("entering the network namespace of host {host}")]
    EnterHost {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster {name} left things behind: {}", .leftovers.join("; "))]
    Leftovers {
        name: String,
        leftovers: Vec<String>,
    },
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// One host of the state file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HostInfo {
    /// Its network namespace (`<prefix>-<host>`).
    pub netns: String,
    /// `postgres`, `s3`, `git`, `internet`, `operator` or `worker`.
    pub role: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Its working directory (processes started in it run there).
    pub dir: PathBuf,
}

/// One service of the state file: `pg`, `s3`, `git`, `internet`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Service {
    pub host: String,
    /// Over IPv4; `url6` over IPv6.
    pub url: String,
    pub url6: String,
    /// Its main process when `up` finished.
    pub pid: Option<u32>,
    /// The rest: `user`/`database` (pg), `bucket`, `region`,
    /// `access_key_id`, `secret_access_key` (s3), `git_url` (git daemon),
    /// `root` (git: directory of the bare repositories), `body` (internet).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Service {
    /// A string field of `extra`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(|v| v.as_str())
    }
}

/// The state file `up` writes (`<dir>/state.json`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct State {
    /// The cluster's prefix: every namespace is `<name>-<host>`.
    pub name: String,
    pub dir: PathBuf,
    pub bridge_netns: String,
    /// cgroup v2 directory holding every process started in a host.
    pub cgroup: Option<PathBuf>,
    pub hosts: BTreeMap<String, HostInfo>,
    pub services: BTreeMap<String, Service>,
    /// The names of the hosts, /etc/hosts format.
    pub hosts_file: PathBuf,
    pub logs: PathBuf,
}

/// A running cluster; `down` on drop.
pub struct Cluster {
    state: State,
    script: PathBuf,
    zw: Option<PathBuf>,
    is_down: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.state.name)
            .field("dir", &self.state.dir)
            .finish()
    }
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

fn write_script(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text)
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
        .map_err(|source| ClusterError::WriteScript {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

fn status_text(out: &Output) -> String {
    out.status.to_string()
}

fn output_text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        s.push_str(" | stdout: ");
        s.push_str(stdout.trim_end());
    }
    s
}

/// Runs `bash cluster.sh ACTION --name NAME --dir DIR [ARGS...]`.
fn run_script(
    script: &Path,
    name: &str,
    dir: &Path,
    action: &str,
    args: &[&str],
) -> Result<Output> {
    Command::new("bash")
        .arg(script)
        .arg(action)
        .arg("--name")
        .arg(name)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|source| ClusterError::Spawn {
            action: action.to_string(),
            source,
        })
}

fn checked(action: &str, out: Output) -> Result<Output> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(ClusterError::Failed {
            action: action.to_string(),
            status: status_text(&out),
            stderr: output_text(&out),
        })
    }
}

impl Cluster {
    /// Brings a cluster up. `name` (at most [`MAX_NAME_LEN`] lowercase
    /// letters or digits) is made unique with this process's id and a
    /// counter, so tests and concurrent test runs never share a cluster.
    pub fn up(name: &str) -> Result<Cluster> {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !valid {
            return Err(ClusterError::BadName(name.to_string()));
        }
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{name}{:x}{:x}", std::process::id(), n % 0x1000);
        let dir = std::env::temp_dir().join(format!("zw-cluster-{prefix}"));
        // The scripts live in the cluster's directory, so `down` (the
        // reaper's too) removes them with everything else.
        let scripts = dir.join("scripts");
        let write_scripts = || -> Result<PathBuf> {
            std::fs::create_dir_all(&scripts).map_err(|source| ClusterError::WriteScript {
                path: scripts.clone(),
                source,
            })?;
            write_script(&scripts, "s3-test-server.sh", S3_TEST_SERVER_SH)?;
            write_script(&scripts, "cluster.sh", CLUSTER_SH)
        };
        // A cluster with this prefix can only be left by a dead process that
        // had this pid: take it down first.
        if dir.exists() {
            let script = write_scripts()?;
            checked("down", run_script(&script, &prefix, &dir, "down", &[])?)?;
        }
        let script = write_scripts()?;
        let pid = std::process::id().to_string();
        checked(
            "up",
            run_script(&script, &prefix, &dir, "up", &["--watch", &pid])?,
        )?;
        let path = dir.join("state.json");
        let state = std::fs::read(&path)
            .map_err(|source| ClusterError::ReadState {
                path: path.clone(),
                source,
            })
            .and_then(|bytes| {
                serde_json::from_slice::<State>(&bytes).map_err(|source| ClusterError::ParseState {
                    path: path.clone(),
                    source,
                })
            });
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                let _ = run_script(&script, &prefix, &dir, "down", &[]);
                return Err(e);
            }
        };
        Ok(Cluster {
            state,
            script,
            zw: None,
            is_down: false,
        })
    }

    /// The `zw` binary [`Cluster::zw`] starts (in the zw package's tests:
    /// `env!("CARGO_BIN_EXE_zw")`).
    pub fn with_zw(mut self, path: impl Into<PathBuf>) -> Self {
        self.zw = Some(path.into());
        self
    }

    /// The cluster's prefix (namespaces are `<name>-<host>`).
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Its directory: state, logs, the services' data, one directory per host.
    pub fn dir(&self) -> &Path {
        &self.state.dir
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    fn run(&self, action: &str, args: &[&str]) -> Result<Output> {
        run_script(
            &self.script,
            &self.state.name,
            &self.state.dir,
            action,
            args,
        )
    }

    pub fn host(&self, host: &str) -> Result<&HostInfo> {
        self.state
            .hosts
            .get(host)
            .ok_or_else(|| ClusterError::NoHost(host.to_string()))
    }

    /// Names of every host.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.state.hosts.keys().map(String::as_str)
    }

    pub fn ip(&self, host: &str, family: Family) -> Result<IpAddr> {
        let h = self.host(host)?;
        Ok(match family {
            Family::V4 => IpAddr::V4(h.ipv4),
            Family::V6 => IpAddr::V6(h.ipv6),
        })
    }

    /// `ip:port` of a host (`[ip]:port` for IPv6), for URLs.
    pub fn socket(&self, host: &str, port: u16, family: Family) -> Result<SocketAddr> {
        Ok(SocketAddr::new(self.ip(host, family)?, port))
    }

    pub fn service(&self, service: &str) -> Result<&Service> {
        self.state
            .services
            .get(service)
            .ok_or_else(|| ClusterError::NoService(service.to_string()))
    }

    /// The URL of a service over IPv4: `pg` (postgres://zw@...:5432/zw),
    /// `s3` (http://...:9000), `git` (smart HTTP URL of `meta.git`),
    /// `internet` (http://.../).
    pub fn url_of(&self, service: &str) -> Result<&str> {
        Ok(&self.service(service)?.url)
    }

    /// Runs a command in a host and waits for it.
    pub fn exec(&self, host: &str, args: &[&str]) -> Result<Output> {
        self.host(host)?;
        let mut a = vec![host, "--"];
        a.extend_from_slice(args);
        self.run("exec", &a)
    }

    /// Runs a command in a host; its stdout, or an error with its output
    /// when it fails.
    pub fn exec_ok(&self, host: &str, args: &[&str]) -> Result<String> {
        let out = checked(
            &format!("exec {host} -- {}", args.join(" ")),
            self.exec(host, args)?,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running process in a host; its output goes to
    /// [`Cluster::log_path`]. Returns its pid.
    pub fn spawn(&self, host: &str, name: &str, args: &[&str]) -> Result<u32> {
        self.host(host)?;
        let mut a = vec![host, name, "--"];
        a.extend_from_slice(args);
        let out = checked("spawn", self.run("spawn", &a)?)?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        text.parse().map_err(|_| ClusterError::BadOutput {
            action: "spawn".into(),
            output: text,
        })
    }

    /// Starts the `zw` binary given to [`Cluster::with_zw`] in a host, as
    /// its own process, with `args` (e.g. `["captain", "--data-dir", ...]`;
    /// relative paths are in the host's directory).
    pub fn zw(&self, host: &str, name: &str, args: &[&str]) -> Result<u32> {
        self.zw_env(host, name, &[], args)
    }

    /// [`Cluster::zw`] with environment variables set for it only.
    pub fn zw_env(
        &self,
        host: &str,
        name: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<u32> {
        let zw = self.zw.as_ref().ok_or(ClusterError::NoZw)?;
        let zw = zw.to_string_lossy();
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut a = vec!["env"];
        a.extend(vars.iter().map(String::as_str));
        a.push(zw.as_ref());
        a.extend_from_slice(args);
        self.spawn(host, name, &a)
    }

    /// `kill -9` a process started with [`Cluster::spawn`]; returns once
    /// it is dead.
    pub fn kill(&self, host: &str, name: &str) -> Result<()> {
        self.signal(host, name, "KILL")
    }

    /// Sends a signal (`TERM`, `INT`, `STOP`, `CONT`, `KILL`, ...).
    pub fn signal(&self, host: &str, name: &str, signal: &str) -> Result<()> {
        checked("kill", self.run("kill", &[host, name, signal])?).map(drop)
    }

    /// The pid of a spawned process if it still runs (a zombie does not).
    pub fn pid(&self, host: &str, name: &str) -> Option<u32> {
        let out = self.run("alive", &[host, name]).ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    pub fn alive(&self, host: &str, name: &str) -> bool {
        self.pid(host, name).is_some()
    }

    /// Every process of the cluster: in its namespaces (and those made from
    /// its hosts), in its cgroups, recorded by `spawn`.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let out = checked("pids", self.run("pids", &[])?)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// A power cut of a host: every process started in it (and in the
    /// namespaces made from it, instances included) killed, those
    /// namespaces, the mounts under its directory and its nftables rules
    /// gone; its addresses and routes stay, so processes can be started in
    /// it again as on a rebooted host.
    pub fn crash(&self, host: &str) -> Result<()> {
        self.host(host)?;
        checked("crash", self.run("crash", &[host])?).map(drop)
    }

    /// Cuts a host's link to the LAN (the router's side of its veth goes
    /// down): packets to and from it are lost, its processes keep running.
    pub fn partition(&self, host: &str) -> Result<()> {
        self.host(host)?;
        checked("partition", self.run("partition", &[host])?).map(drop)
    }

    pub fn heal(&self, host: &str) -> Result<()> {
        self.host(host)?;
        checked("heal", self.run("heal", &[host])?).map(drop)
    }

    /// `start`, `stop` or `restart` a service (`pg`, `s3`, `git`, `internet`).
    pub fn control(&self, service: &str, action: &str) -> Result<()> {
        self.service(service)?;
        checked("service", self.run("service", &[service, action])?).map(drop)
    }

    pub fn log_path(&self, host: &str, name: &str) -> PathBuf {
        self.state.logs.join(format!("{host}-{name}.log"))
    }

    /// What a spawned process printed so far (empty if nothing).
    pub fn log(&self, host: &str, name: &str) -> String {
        std::fs::read(self.log_path(host, name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// One GET with curl from inside a host (5 s at most); the body of a
    /// 2xx answer.
    pub fn http_get(&self, host: &str, url: &str) -> Result<String> {
        self.exec_ok(host, &["curl", "-fsS", "--max-time", "5", url])
    }

    /// GETs `url` with curl from inside a host until it answers 2xx, for at
    /// most `timeout`; the body.
    pub fn wait_http(&self, host: &str, url: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let max = left.as_secs_f64().clamp(0.5, 5.0).to_string();
            let last = match self.exec(host, &["curl", "-fsS", "--max-time", &max, url]) {
                Ok(out) if out.status.success() => {
                    return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
                }
                Ok(out) => output_text(&out),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(ClusterError::HttpTimeout {
                    host: host.to_string(),
                    url: url.to_string(),
                    timeout,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` on a new thread inside a host's network namespace: every
    /// socket it opens, and every thread it starts (a tokio runtime,
    /// reqwest's), is in that namespace. For clients in the test process
    /// itself, e.g. load loops that a curl per request would slow down.
    pub fn in_host<T, F>(&self, host: &str, f: F) -> Result<HostThread<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = Path::new("/run/netns").join(&self.host(host)?.netns);
        let enter_err = |source| ClusterError::EnterHost {
            host: host.to_string(),
            source,
        };
        let ns = std::fs::File::open(&path).map_err(enter_err)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("in-{host}"))
            .spawn(move || {
                // A network namespace is per thread: only this one (and the
                // threads it starts) moves.
                let entered = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from);
                drop(ns);
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                ok.then(f)
            })
            .map_err(enter_err)?;
        match rx.recv() {
            Ok(Ok(())) => Ok(HostThread { handle }),
            Ok(Err(e)) => Err(enter_err(e)),
            Err(_) => Err(enter_err(std::io::Error::other("the thread died"))),
        }
    }

    /// Takes the cluster down and checks that nothing of it is left.
    pub fn down(mut self) -> Result<()> {
        self.down_inner()
    }

    fn down_inner(&mut self) -> Result<()> {
        if self.is_down {
            return Ok(());
        }
        self.is_down = true;
        let pids = self.pids().unwrap_or_default();
        let out = self.run("down", &[])?;
        let mut left = leftovers(&self.state.name, &self.state.dir, &pids);
        if !out.status.success() {
            left.insert(0, format!("cluster.sh down: {}", output_text(&out)));
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Leftovers {
                name: self.state.name.clone(),
                leftovers: left,
            })
        }
    }

    /// The last lines of every log, for a failing test's output.
    fn print_log_tails(&self) {
        let Ok(entries) = std::fs::read_dir(&self.state.logs) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read(&p)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "---- cluster {}: {} (last {} lines) ----\n{}",
                self.state.name,
                p.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A thread running inside a host's network namespace ([`Cluster::in_host`]).
#[derive(Debug)]
pub struct HostThread<T> {
    handle: std::thread::JoinHandle<Option<T>>,
}

impl<T> HostThread<T> {
    /// Waits for it; `Err` with the panic's payload if it panicked.
    pub fn join(self) -> std::thread::Result<T> {
        self.handle
            .join()
            .map(|r| r.expect("in_host returns a HostThread only once inside the namespace"))
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.is_down {
            return;
        }
        if std::thread::panicking() {
            self.print_log_tails();
        }
        if let Err(e) = self.down_inner() {
            eprintln!("taking cluster {} down: {e}", self.state.name);
        }
    }
}

/// What is left of cluster `name` (directory `dir`) on this machine: its
/// network namespaces, mounts (of its namespaces or under its directory),
/// cgroup, directory, and which of `pids` still run. Empty when nothing is.
/// Reads the kernel's view directly, independently of `cluster.sh`.
pub fn leftovers(name: &str, dir: &Path, pids: &[u32]) -> Vec<String> {
    let mut left = Vec::new();
    let ns_prefix = format!("{name}-");
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&ns_prefix) {
                left.push(format!("network namespace {n}"));
            }
        }
    }
    let netns_mounts = format!("/run/netns/{ns_prefix}");
    let dir_text = dir.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        if point.starts_with(&netns_mounts)
            || point == dir_text
            || point.starts_with(&format!("{dir_text}/"))
        {
            left.push(format!("mount {point}"));
        }
    }
    if let Some(root) = cgroup2_mount() {
        let cg = root.join(format!("zw-cluster-{name}"));
        if cg.exists() {
            left.push(format!("cgroup {}", cg.display()));
        }
    }
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    for &pid in pids {
        if process_runs(pid) {
            left.push(format!("process {pid}"));
        }
    }
    left
}

/// Where the cgroup v2 hierarchy is mounted, if it is.
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split(' ');
        let point = f.nth(1)?;
        (f.next()? == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// Whether a process exists and is not a zombie.
pub fn process_runs(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last ')' (the command name may hold one).
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x") | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_runs() {
        for bad in ["", "Op", "1abc", "toolong", "a-b", "a b"] {
            assert!(
                matches!(Cluster::up(bad), Err(ClusterError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_process_that_exited_does_not_run() {
        assert!(process_runs(std::process::id()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_runs(pid));
    }

    #[test]
    fn leftovers_sees_a_directory_and_a_process() {
        let dir = tempfile::tempdir().unwrap();
        let left = leftovers("zzzz", dir.path(), &[std::process::id()]);
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left[0].starts_with("directory "), "{left:?}");
        assert!(left[1].starts_with("process "), "{left:?}");
    }
}
