//! The `process` runtime: for machines without virtualisation. NOT a VM.
//!
//! An instance is the image's entrypoint in its own mount, pid and network
//! namespaces, chrooted into the image's ext4 rootfs (loop-mounted
//! read-only, under a tmpfs overlay so `/` and `/tmp` are writable), run as
//! the image's user. The namespace work is `scripts/process-instance.sh`;
//! the network is [`crate::net`].
//!
//! The supervisor runs in its own session (`setsid`), so it is not killed
//! with the follower: a follower restarted after `kill -9` finds it by the
//! pid and start time in its ledger and adopts it. Everything the instance
//! mounted lives in its private mount namespace and goes away with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::Notify;

use super::{InstanceSpec, Liveness, Runtime, RuntimeError, RuntimeHandle, pid_is, proc_stat};
use crate::net::{InstanceNet, InstanceNetNames};

const SUPERVISOR_SH: &str = include_str!("../../../scripts/process-instance.sh");

/// How long a supervisor may take to reach the app's exec.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Between SIGTERM and SIGKILL when stopping.
const STOP_GRACE: Duration = Duration::from_millis(1500);
/// The PATH an app gets when neither the image nor the release sets one
/// (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Exit codes by instance id, with the pid they belong to.
type Exits = Arc<Mutex<HashMap<String, (u32, Option<i32>)>>>;

pub struct ProcessRuntime {
    supervisor: PathBuf,
    net: InstanceNet,
    /// Exit codes of supervisors this process spawned (and reaps), by
    /// instance id, with the pid they belong to.
    exits: Exits,
    /// Woken when an instance this process supervises exits.
    on_exit: Arc<Notify>,
}

impl ProcessRuntime {
    /// `scripts_dir` receives the embedded scripts; `on_exit` is notified
    /// whenever an instance started by this runtime exits (the reconciler's
    /// "instance exit" activation).
    pub fn new(scripts_dir: &Path, on_exit: Arc<Notify>) -> Result<Self, RuntimeError> {
        let supervisor = scripts_dir.join("process-instance.sh");
        crate::net::write_script(&supervisor, SUPERVISOR_SH).map_err(|source| {
            RuntimeError::Io {
                what: format!("writing {}", supervisor.display()),
                source,
            }
        })?;
        let net = InstanceNet::new(scripts_dir).map_err(|e| RuntimeError::Unavailable {
            driver: "process",
            reason: e.to_string(),
        })?;
        tracing::warn!(
            "runtime `process` selected: instances run as namespaced processes on this host's kernel, NOT in VMs; \
             use it for development or machines without virtualisation only"
        );
        Ok(ProcessRuntime {
            supervisor,
            net,
            exits: Default::default(),
            on_exit,
        })
    }

    /// Probe: root, and the tools the supervisor needs.
    pub fn probe() -> Result<(), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (namespaces, loop mounts)".into());
        }
        for tool in ["bash", "ip", "nft", "unshare", "mount"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false)
                || ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                    .iter()
                    .any(|d| Path::new(d).join(tool).is_file());
            if !found {
                return Err(format!("`{tool}` not found"));
            }
        }
        Ok(())
    }

    fn recorded_exit(&self, handle: &RuntimeHandle) -> Option<Option<i32>> {
        let exits = self.exits.lock().expect("exits lock");
        match exits.get(&handle.instance_id) {
            Some((pid, code)) if *pid == handle.pid => Some(*code),
            _ => None,
        }
    }

    async fn start_inner(
        &self,
        spec: &InstanceSpec,
        names: &InstanceNetNames,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let io = |what: String| move |source| RuntimeError::Io { what, source };
        let rootfs = spec.image_dir.join("rootfs.ext4");
        if !rootfs.is_file() {
            return Err(RuntimeError::BadImage {
                path: rootfs,
                reason: "rootfs.ext4 is missing".into(),
            });
        }
        if spec.argv.is_empty() {
            return Err(RuntimeError::StartFailed {
                instance_id: spec.instance_id.clone(),
                reason: "the image has neither entrypoint nor cmd".into(),
            });
        }
        std::fs::create_dir_all(&spec.work_dir)
            .map_err(io(format!("creating {}", spec.work_dir.display())))?;
        for stale in ["started", "exit_status", "supervisor.pid"] {
            let _ = std::fs::remove_file(spec.work_dir.join(stale));
        }
        let log_path = spec.work_dir.join("stdout.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io("duplicating the log fd".into()))?;

        self.net
            .up(names, spec.ip)
            .await
            .map_err(|e| RuntimeError::StartFailed {
                instance_id: spec.instance_id.clone(),
                reason: e.to_string(),
            })?;

        let workdir = if spec.workdir.is_empty() {
            "/"
        } else {
            &spec.workdir
        };
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&self.supervisor)
            .arg("run")
            .arg(&spec.work_dir)
            .arg(&names.netns)
            .arg(&rootfs)
            .arg(&spec.user)
            .arg(workdir)
            .arg("--")
            .args(&spec.argv)
            .env_clear()
            .envs(&spec.env_vars)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        if !spec.env_vars.contains_key("PATH") {
            cmd.env("PATH", DEFAULT_PATH);
        }
        // SAFETY: setsid is async-signal-safe; it makes the supervisor a
        // session and process-group leader, so it outlives us and the whole
        // instance can be signalled as one group.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(io("spawning the process supervisor".into()))?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let pid_start_ticks = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        {
            let exits = self.exits.clone();
            let notify = self.on_exit.clone();
            let id = spec.instance_id.clone();
            exits.lock().expect("exits lock").remove(&id);
            tokio::spawn(async move {
                let code = child.wait().await.ok().and_then(|s| s.code());
                exits.lock().expect("exits lock").insert(id, (pid, code));
                notify.notify_one();
            });
        }
        let handle = RuntimeHandle {
            instance_id: spec.instance_id.clone(),
            driver: "process".into(),
            pid,
            pid_start_ticks,
            ip: spec.ip,
            port: spec.port,
            work_dir: spec.work_dir.clone(),
            extra: [
                ("netns".to_string(), names.netns.clone()),
                ("host_if".to_string(), names.host_if.clone()),
            ]
            .into_iter()
            .collect(),
        };

        // Wait (bounded) for the supervisor to reach the app's exec, so that
        // a bad rootfs or user is a start failure with its reason.
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(code) = self.recorded_exit(&handle) {
                let _ = self.stop(&handle).await;
                return Err(RuntimeError::StartFailed {
                    instance_id: spec.instance_id.clone(),
                    reason: format!(
                        "supervisor exited with {}: {}",
                        code.map_or("a signal".to_string(), |c| format!("status {c}")),
                        log_tail(&log_path, 3)
                    ),
                });
            }
            if spec.work_dir.join("started").exists() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.stop(&handle).await;
                return Err(RuntimeError::StartFailed {
                    instance_id: spec.instance_id.clone(),
                    reason: format!(
                        "not ready after {READY_TIMEOUT:?}: {}",
                        log_tail(&log_path, 3)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!(instance = %spec.instance_id, pid, ip = %spec.ip, "started as a namespaced process (NOT a VM)");
        Ok(handle)
    }

    /// Stops the process group of supervisor `pid`. The app is pid 1 of its
    /// namespace, where a signal without a handler is ignored: if it catches
    /// SIGTERM it gets SIGTERM and a grace period, else SIGKILL at once.
    async fn kill_group(&self, pid: u32) {
        let group = Pid::from_raw(-(pid as i32));
        if kill(group, None).is_err() {
            return;
        }
        if app_catches_sigterm(pid) {
            let _ = kill(group, Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            while tokio::time::Instant::now() < deadline {
                if kill(group, None).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = kill(group, Signal::SIGKILL);
        for _ in 0..250 {
            if kill(group, None).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::error!(pid, "process group survived SIGKILL for 5 s");
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Supervisor -> unshare -> app (the namespace's pid 1): does the app have
/// a SIGTERM handler (bit 15 of `SigCgt`)?
fn app_catches_sigterm(supervisor: u32) -> bool {
    let Some(app) = children(supervisor).into_iter().flat_map(children).next() else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{app}/status"))
        .ok()
        .and_then(|st| {
            let mask = st
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&mask, 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// Last `n` non-empty lines of a log file, joined with " | ".
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start<'a>(
        &'a self,
        spec: &'a InstanceSpec,
    ) -> BoxFuture<'a, Result<RuntimeHandle, RuntimeError>> {
        Box::pin(async move {
            let names = InstanceNetNames::for_instance(&spec.instance_id);
            // A namespace left by an earlier attempt would make `up` fail.
            let _ = self.net.down(&names).await;
            let r = self.start_inner(spec, &names).await;
            if r.is_err() {
                let _ = self.net.down(&names).await;
            }
            r
        })
    }

    fn stop<'a>(&'a self, handle: &'a RuntimeHandle) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if pid_is(handle.pid, handle.pid_start_ticks) {
                self.kill_group(handle.pid).await;
            }
            let names = InstanceNetNames::for_instance(&handle.instance_id);
            self.net.down(&names).await.map_err(|e| RuntimeError::Io {
                what: format!("removing the network of {}: {e}", handle.instance_id),
                source: std::io::Error::other(e.to_string()),
            })?;
            Ok(())
        })
    }

    fn liveness(&self, handle: &RuntimeHandle) -> Liveness {
        if let Some(code) = self.recorded_exit(handle) {
            return Liveness::Exited(code);
        }
        if pid_is(handle.pid, handle.pid_start_ticks) {
            return Liveness::Running;
        }
        // Not ours to reap (adopted after a restart): the supervisor wrote
        // the status before exiting, unless it was killed.
        let code = std::fs::read_to_string(handle.work_dir.join("exit_status"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Liveness::Exited(code)
    }

    fn reclaim<'a>(
        &'a self,
        instance_id: &'a str,
        work_dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let pid: Option<u32> = std::fs::read_to_string(work_dir.join("supervisor.pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if let Some(pid) = pid {
                // Only a supervisor of this very work dir is ours to kill.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains("process-instance.sh")
                    && cmdline.contains(&*work_dir.to_string_lossy())
                {
                    tracing::info!(
                        instance = instance_id,
                        pid,
                        "reclaiming an interrupted start"
                    );
                    self.kill_group(pid).await;
                }
            }
            let names = InstanceNetNames::for_instance(instance_id);
            let _ = self.net.down(&names).await;
            Ok(())
        })
    }
}
