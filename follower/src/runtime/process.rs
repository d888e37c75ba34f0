//! The `process` runtime: for machines without virtualisation. NOT a VM.
//!
//! An instance is an OCI container run by `runc`: the image's entrypoint in
//! its own user, mount, pid, ipc, uts and cgroup namespaces and in the
//! instance's network namespace ([`crate::net`]), as the image's user
//! mapped onto an unprivileged host id range ([`rootfs::IdMap`]), with the
//! default capability set, the default seccomp profile and cgroup limits
//! ([`oci`]). Its root is the image's ext4 rootfs, idmapped, under a tmpfs
//! overlay ([`rootfs`]).
//!
//! Why runc: crun 1.8 (Debian 12) refuses a cgroup v1/v2 hybrid host
//! outright; runc 1.1 runs containers with a user namespace on v1, hybrid
//! and v2 hosts alike (its cgroupfs manager), and is a distribution
//! package. youki's `libcontainer` would put the container runtime inside
//! the follower (a crash of one would be a crash of both) and pull a large
//! dependency tree for what one `runc run` does.
//!
//! The app's environment (image env, release env vars, secrets) exists only
//! in the follower's memory and in the bundle's `config.json`, on tmpfs
//! (`/run/zeitwork` or, where `/run` is on disk, `/dev/shm/zeitwork`; mode
//! 0700), which is removed as soon as the container runs. runc's own state
//! directory (there too) holds no environment. The supervisor script and
//! runc run with an environment of their own: no host shell or program ever
//! sees the app's.
//!
//! The supervisor (`scripts/process-instance.sh`, running `runc run` in the
//! foreground) runs in its own session (`setsid`), so it is not killed with
//! the follower: a follower restarted after `kill -9` finds it by the pid
//! and start time in its ledger and adopts it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::Notify;

use super::rootfs::{self, IdMap};
use super::{InstanceSpec, Liveness, Runtime, RuntimeError, RuntimeHandle, oci, pid_is, proc_stat};
use crate::net::{InstanceNet, InstanceNetNames};

const SUPERVISOR_SH: &str = include_str!("../../../scripts/process-instance.sh");

/// How long a supervisor may take to get the app running.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Between SIGTERM and SIGKILL when stopping.
const STOP_GRACE: Duration = Duration::from_millis(1500);
/// Size of the tmpfs holding an instance's writes to its root filesystem.
const UPPER_MB: u32 = 256;
/// The PATH an app gets when neither the image nor the release sets one
/// (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The PATH of the supervisor and the host tools the follower runs.
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Exit codes by instance id, with the pid they belong to.
type Exits = Arc<Mutex<HashMap<String, (u32, Option<i32>)>>>;

pub struct ProcessRuntime {
    supervisor: PathBuf,
    runc: PathBuf,
    /// On tmpfs: `bundles/<container>/` and runc's state (`runc/`).
    run_dir: PathBuf,
    /// The OCI `linux.seccomp` every container gets.
    seccomp: serde_json::Value,
    net: InstanceNet,
    /// Exit codes of supervisors this process spawned (and reaps), by
    /// instance id, with the pid they belong to.
    exits: Exits,
    /// Woken when an instance this process supervises exits.
    on_exit: Arc<Notify>,
}

/// Looks `tool` up on PATH and in the usual system directories.
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(std::env::split_paths(HOST_PATH))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// The tmpfs directory for bundles and runc's state: `/run/zeitwork`, or
/// `/dev/shm/zeitwork` where `/run` is on disk. Created 0700; refused if
/// someone else owns it.
pub fn run_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let base = ["/run", "/dev/shm"]
        .into_iter()
        .map(Path::new)
        .find(|p| is_tmpfs(p))
        .ok_or("neither /run nor /dev/shm is a tmpfs (OCI bundles hold secrets: never on disk)")?;
    let dir = base.join("zeitwork");
    match std::fs::create_dir(&dir) {
        Ok(()) => std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} must be a directory owned by root with mode 0700",
            dir.display()
        ));
    }
    for sub in ["bundles", "runc"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| format!("creating {}: {e}", dir.join(sub).display()))?;
    }
    Ok(dir)
}

/// runc's name of an instance's container (also its cgroup).
pub fn container_id(instance_id: &str) -> String {
    if !instance_id.is_empty()
        && instance_id.len() <= 200
        && instance_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        format!("zw-{instance_id}")
    } else {
        format!("zw-{:016x}", crate::net::stable_hash(instance_id))
    }
}

/// The slot of an instance address (`<range>::<slot>:2`).
fn slot_of(ip: std::net::Ipv6Addr) -> u16 {
    ip.segments()[6]
}

impl ProcessRuntime {
    /// `scripts_dir` receives the embedded scripts; `on_exit` is notified
    /// whenever an instance started by this runtime exits (the reconciler's
    /// "instance exit" activation).
    pub fn new(scripts_dir: &Path, on_exit: Arc<Notify>) -> Result<Self, RuntimeError> {
        Self::with_net(scripts_dir, on_exit, crate::net::NetPolicy::default())
    }

    /// [`ProcessRuntime::new`] with the node's network policy.
    pub fn with_net(
        scripts_dir: &Path,
        on_exit: Arc<Notify>,
        policy: crate::net::NetPolicy,
    ) -> Result<Self, RuntimeError> {
        let unavailable = |reason: String| RuntimeError::Unavailable {
            driver: "process",
            reason,
        };
        Self::probe().map_err(unavailable)?;
        let supervisor = scripts_dir.join("process-instance.sh");
        crate::net::write_script(&supervisor, SUPERVISOR_SH).map_err(|source| {
            RuntimeError::Io {
                what: format!("writing {}", supervisor.display()),
                source,
            }
        })?;
        let net = InstanceNet::new(scripts_dir)
            .map_err(|e| unavailable(e.to_string()))?
            .with_policy(policy);
        let runc = find_tool("runc").ok_or_else(|| unavailable("`runc` not found".into()))?;
        let seccomp = oci::load_seccomp(Path::new(oci::SECCOMP_PROFILE)).map_err(|e| {
            unavailable(format!(
                "{e}{}",
                std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            ))
        })?;
        let run_dir = run_dir().map_err(unavailable)?;
        tracing::warn!(
            "runtime `process` selected: instances run as OCI containers (runc, user namespace, \
             seccomp, cgroup limits) on this host's kernel, NOT in VMs; a kernel bug is a way out"
        );
        Ok(ProcessRuntime {
            supervisor,
            runc,
            run_dir,
            seccomp,
            net,
            exits: Default::default(),
            on_exit,
        })
    }

    /// Probe: root, runc, the seccomp profile, a tmpfs for bundles, and the
    /// tools the network and mounts need.
    pub fn probe() -> Result<(), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (namespaces, loop mounts)".into());
        }
        for (tool, package) in [
            ("bash", "bash"),
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("mount", "mount"),
            ("runc", "runc"),
        ] {
            if find_tool(tool).is_none() {
                return Err(format!("`{tool}` not found (apt-get install {package})"));
            }
        }
        if !Path::new(oci::SECCOMP_PROFILE).is_file() {
            return Err(format!(
                "no default seccomp profile at {} (apt-get install golang-github-containers-common)",
                oci::SECCOMP_PROFILE
            ));
        }
        run_dir().map(|_| ())
    }

    fn recorded_exit(&self, handle: &RuntimeHandle) -> Option<Option<i32>> {
        let exits = self.exits.lock().expect("exits lock");
        match exits.get(&handle.instance_id) {
            Some((pid, code)) if *pid == handle.pid => Some(*code),
            _ => None,
        }
    }

    fn bundle_dir(&self, container: &str) -> PathBuf {
        self.run_dir.join("bundles").join(container)
    }

    /// Writes `config.json` (0600, in a 0700 directory on tmpfs).
    fn write_bundle(
        &self,
        container: &str,
        config: &serde_json::Value,
    ) -> std::io::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = self.bundle_dir(container);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("config.json"))?;
        f.write_all(&serde_json::to_vec(config).map_err(std::io::Error::other)?)?;
        Ok(dir)
    }

    async fn start_inner(
        &self,
        spec: &InstanceSpec,
        names: &InstanceNetNames,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let io = |what: String| move |source| RuntimeError::Io { what, source };
        let failed = |reason: String| RuntimeError::StartFailed {
            instance_id: spec.instance_id.clone(),
            reason,
        };
        let image = spec.image_dir.join("rootfs.ext4");
        if !image.is_file() {
            return Err(RuntimeError::BadImage {
                path: image,
                reason: "rootfs.ext4 is missing".into(),
            });
        }
        if spec.argv.is_empty() {
            return Err(failed("the image has neither entrypoint nor cmd".into()));
        }
        let work = &spec.work_dir;
        std::fs::create_dir_all(work).map_err(io(format!("creating {}", work.display())))?;
        for stale in ["started", "exit_status", "supervisor.pid", "app.pid"] {
            let _ = std::fs::remove_file(work.join(stale));
        }
        let log_path = work.join("stdout.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io("duplicating the log fd".into()))?;

        // The network and the root filesystem are independent: made at once.
        let idmap = IdMap::for_slot(slot_of(spec.ip));
        let (net, root) = tokio::join!(
            self.net.up(names, spec.ip),
            rootfs::mount(work, &image, idmap, UPPER_MB)
        );
        net.map_err(|e| failed(e.to_string()))?;
        let root = root.map_err(|e| failed(error_chain(&e)))?;
        let (uid, gid) =
            rootfs::resolve_user(&root, &spec.user).map_err(|e| failed(error_chain(&e)))?;
        let mut env = spec.env_vars.clone();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.to_string());
        let container = container_id(&spec.instance_id);
        let netns = Path::new("/var/run/netns").join(&names.netns);
        let cgroups_path = format!("/{container}");
        let hostname: String = spec
            .app
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(63)
            .collect();
        // The bundle's resolv.conf: the node's resolvers the instance can
        // reach (not one on loopback), over the image's.
        let resolv = std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|h| oci::instance_resolv_conf(&h));
        let resolv_path = self.bundle_dir(&container).join("resolv.conf");
        let config = oci::config(
            &oci::ContainerSpec {
                args: &spec.argv,
                env: &env,
                cwd: if spec.workdir.is_empty() {
                    "/"
                } else {
                    &spec.workdir
                },
                uid,
                gid,
                hostname: if hostname.is_empty() {
                    "app"
                } else {
                    &hostname
                },
                root: &root,
                netns: &netns,
                cgroups_path: &cgroups_path,
                idmap,
                limits: oci::Limits::new(spec.memory_mb, spec.vcpus),
                resolv_conf: resolv.as_ref().map(|_| resolv_path.as_path()),
            },
            &self.seccomp,
        );
        drop(env);
        let bundle = self
            .write_bundle(&container, &config)
            .map_err(io(format!("writing the bundle of {container}")))?;
        if let Some(text) = &resolv {
            std::fs::write(&resolv_path, text)
                .map_err(io(format!("writing {}", resolv_path.display())))?;
        }
        drop(config);

        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&self.supervisor)
            .arg("run")
            .arg(work)
            .arg(&self.runc)
            .arg(self.run_dir.join("runc"))
            .arg(&bundle)
            .arg(&container)
            .env_clear()
            .env("PATH", HOST_PATH)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe; it makes the supervisor a
        // session and process-group leader, so it outlives us.
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
            extra: BTreeMap::from([
                ("netns".to_string(), names.netns.clone()),
                ("host_if".to_string(), names.host_if.clone()),
                ("container".to_string(), container.clone()),
            ]),
        };

        // Wait (bounded) for runc to report the app's pid, so that a bad
        // image or config is a start failure with its reason.
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let ready = loop {
            if let Some(code) = self.recorded_exit(&handle) {
                break Err(format!(
                    "supervisor exited with {}: {}",
                    code.map_or("a signal".to_string(), |c| format!("status {c}")),
                    log_tail(&log_path, 3)
                ));
            }
            if read_pid(&work.join("app.pid")).is_some() {
                break Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(format!(
                    "not ready after {READY_TIMEOUT:?}: {}",
                    log_tail(&log_path, 3)
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The environment leaves the disk-less bundle as soon as runc has
        // read it; the container holds its root, the host lets go of it.
        let _ = std::fs::remove_file(bundle.join("config.json"));
        rootfs::detach(work);
        if let Err(reason) = ready {
            let _ = self.stop(&handle).await;
            return Err(failed(reason));
        }
        tracing::warn!(instance = %spec.instance_id, pid, ip = %spec.ip, "started as an OCI container (NOT a VM)");
        Ok(handle)
    }

    /// The app's host pid, if it is still the process of our container
    /// (its cgroup names the container).
    fn app_pid(work: &Path, container: &str) -> Option<u32> {
        let pid = read_pid(&work.join("app.pid"))?;
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let needle = format!("/{container}");
        cgroups.lines().any(|l| l.ends_with(&needle)).then_some(pid)
    }

    /// Stops a container: SIGTERM to the app if it handles it (it is pid 1
    /// of its namespace, where an unhandled signal is ignored) and a grace
    /// period, then SIGKILL; then the supervisor, and whatever runc or the
    /// host still holds of it.
    async fn kill_container(&self, supervisor: Option<(u32, u64)>, work: &Path, container: &str) {
        if let Some(app) = Self::app_pid(work, container) {
            let target = Pid::from_raw(app as i32);
            if catches_sigterm(app) {
                let _ = kill(target, Signal::SIGTERM);
                let deadline = tokio::time::Instant::now() + STOP_GRACE;
                while alive(app) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let _ = kill(target, Signal::SIGKILL);
        }
        if let Some((pid, ticks)) = supervisor {
            // runc run exits once the app has; the supervisor right after.
            for _ in 0..250 {
                if !pid_is(pid, ticks) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if pid_is(pid, ticks) {
                let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            }
        }
        // A container whose runc died with it (or never reached `run`).
        let _ = tokio::process::Command::new(&self.runc)
            .arg("--root")
            .arg(self.run_dir.join("runc"))
            .args(["delete", "--force", container])
            .env_clear()
            .env("PATH", HOST_PATH)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status()
            .await;
        rootfs::detach(work);
        let _ = std::fs::remove_dir_all(self.bundle_dir(container));
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&p| p > 0)
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// Does `pid` have a SIGTERM handler (bit 15 of `SigCgt`)?
fn catches_sigterm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
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
                // Whatever part of the instance exists: mounts, bundle,
                // container, network.
                self.kill_container(None, &spec.work_dir, &container_id(&spec.instance_id))
                    .await;
                let _ = self.net.down(&names).await;
            }
            r
        })
    }

    fn stop<'a>(&'a self, handle: &'a RuntimeHandle) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let container = handle
                .extra
                .get("container")
                .cloned()
                .unwrap_or_else(|| container_id(&handle.instance_id));
            self.kill_container(
                Some((handle.pid, handle.pid_start_ticks)),
                &handle.work_dir,
                &container,
            )
            .await;
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
            // Only a supervisor of this very work dir is ours to kill.
            let supervisor = pid.and_then(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                (cmdline.contains("process-instance.sh")
                    && cmdline.contains(&*work_dir.to_string_lossy()))
                .then(|| proc_stat(pid).map(|(_, t)| (pid, t)))
                .flatten()
            });
            if let Some((pid, _)) = supervisor {
                tracing::info!(
                    instance = instance_id,
                    pid,
                    "reclaiming an interrupted start"
                );
            }
            self.kill_container(supervisor, work_dir, &container_id(instance_id))
                .await;
            let names = InstanceNetNames::for_instance(instance_id);
            let _ = self.net.down(&names).await;
            Ok(())
        })
    }
}
