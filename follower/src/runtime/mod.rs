//! The one place the follower talks to a VMM (or, for `process`, to the
//! kernel's namespaces). Every driver implements [`Runtime`]; the reconciler
//! only ever sees this trait, so it is testable without hardware.
//!
//! Lifecycle: `start` returns a [`RuntimeHandle`] that is serialisable and
//! recorded in the follower's ledger *before* the reconciler moves on, so a
//! follower killed with `kill -9` can, after a restart, `adopt` the instances
//! that are still alive instead of starting duplicates.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub mod firecracker;
pub mod oci;
pub mod process;
pub mod qemu;
pub mod rootfs;

/// Everything a driver needs to start one instance. Built by the reconciler
/// from the desired state and the image fetched from the object store.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub instance_id: String,
    pub env: String,
    pub app: String,
    /// Directory holding the image artifact: `rootfs.ext4` and `config.json`.
    pub image_dir: PathBuf,
    /// Command to run: the release's entrypoint/cmd override, else the image's.
    pub argv: Vec<String>,
    /// Full environment of the app process (image env, release env, secrets,
    /// PORT). Secrets live here in memory only: drivers must never write
    /// this map to disk or to logs.
    pub env_vars: BTreeMap<String, String>,
    pub workdir: String,
    pub user: String,
    /// The instance's own IPv6 address on the node.
    pub ip: Ipv6Addr,
    /// Port the app listens on inside the instance.
    pub port: u16,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// Per-instance directory for driver state and logs (`stdout.log`).
    pub work_dir: PathBuf,
}

/// What the ledger remembers about a started instance; enough for any
/// driver to find it again after the follower restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeHandle {
    pub instance_id: String,
    /// Driver name: "process", "qemu" or "firecracker".
    pub driver: String,
    /// PID of the supervising process (the VMM, or the namespace init).
    pub pid: u32,
    /// Start time of that PID in clock ticks since boot (from
    /// /proc/<pid>/stat), so a recycled PID is never mistaken for ours.
    pub pid_start_ticks: u64,
    pub ip: Ipv6Addr,
    pub port: u16,
    pub work_dir: PathBuf,
    /// Driver-specific extras (tap name, netns name, API socket path).
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    Running,
    /// Exited; the code when it is known.
    Exited(Option<i32>),
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime {driver} is not available here: {reason}")]
    Unavailable {
        driver: &'static str,
        reason: String,
    },
    #[error("image at {path} is unusable: {reason}")]
    BadImage { path: PathBuf, reason: String },
    #[error("instance {instance_id} failed to start: {reason}")]
    StartFailed { instance_id: String, reason: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A way to run instances on this node.
pub trait Runtime: Send + Sync + 'static {
    /// "process", "qemu" or "firecracker".
    fn name(&self) -> &'static str;

    /// Start one instance. Returns once the VMM/process is running (not
    /// necessarily healthy: health checks are the reconciler's job).
    fn start<'a>(
        &'a self,
        spec: &'a InstanceSpec,
    ) -> BoxFuture<'a, Result<RuntimeHandle, RuntimeError>>;

    /// Stop an instance and release what it held (network, mounts). Must be
    /// idempotent: stopping an instance that is already gone is `Ok`.
    fn stop<'a>(&'a self, handle: &'a RuntimeHandle) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Is the instance still alive? Never blocks for long.
    fn liveness(&self, handle: &RuntimeHandle) -> Liveness;

    /// Removes whatever an interrupted `start` of `instance_id` may have left
    /// behind (the follower died after asking for a start and before the
    /// ledger recorded its handle): processes, network, mounts. Idempotent;
    /// the default has nothing to clean.
    fn reclaim<'a>(
        &'a self,
        instance_id: &'a str,
        work_dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        let _ = (instance_id, work_dir);
        Box::pin(async { Ok(()) })
    }
}

/// State and start time (clock ticks since boot, field 22 of
/// `/proc/<pid>/stat`) of a process, or `None` when there is no such pid.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Is `pid` alive (not a zombie) and the very process that started at
/// `start_ticks`?
pub fn pid_is(pid: u32, start_ticks: u64) -> bool {
    matches!(proc_stat(pid), Some((state, start)) if start == start_ticks && state != 'Z' && state != 'X')
}

/// Which driver to run instances with (`--runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeChoice {
    /// firecracker, else qemu, else process.
    #[default]
    Auto,
    Firecracker,
    Qemu,
    Process,
}

/// What the VM drivers need besides their probe: guest kernels and
/// initramfs (prepared by `qemu::prepare_guest` or given by the operator).
/// A driver without its guest is skipped by `auto`, with that reason.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// Kernel + initramfs for the qemu microvm driver.
    pub qemu_guest: Option<qemu::GuestImage>,
    /// Why `auto` must not pick qemu here (set by whoever checked, e.g.
    /// `zw up` after [`qemu::auto_guest`]: KVM does not work).
    pub qemu_skip: Option<String>,
    /// An uncompressed kernel with virtio-mmio command-line devices, and the
    /// initramfs, for firecracker.
    pub firecracker_guest: Option<qemu::GuestImage>,
    /// What instances may reach, whichever driver runs them.
    pub net: crate::net::NetPolicy,
}

fn build_firecracker(
    vm: &VmOptions,
    scripts_dir: &Path,
    on_exit: &std::sync::Arc<tokio::sync::Notify>,
) -> Result<std::sync::Arc<dyn Runtime>, String> {
    firecracker::probe()?;
    let g = vm
        .firecracker_guest
        .as_ref()
        .ok_or("no firecracker guest kernel/initramfs configured")?;
    let cfg = firecracker::FirecrackerConfig {
        binary: PathBuf::from("firecracker"),
        kernel: g.kernel.clone(),
        initramfs: g.initramfs.clone(),
        scripts_dir: scripts_dir.to_path_buf(),
        net: vm.net.clone(),
    };
    let rt =
        firecracker::FirecrackerRuntime::new(cfg, on_exit.clone()).map_err(|e| e.to_string())?;
    Ok(std::sync::Arc::new(rt))
}

fn build_qemu(
    vm: &VmOptions,
    scripts_dir: &Path,
    on_exit: &std::sync::Arc<tokio::sync::Notify>,
) -> Result<std::sync::Arc<dyn Runtime>, String> {
    qemu::probe()?;
    if let Some(why) = &vm.qemu_skip {
        return Err(why.clone());
    }
    let guest = vm
        .qemu_guest
        .clone()
        .ok_or("no qemu guest kernel/initramfs configured")?;
    let cfg = qemu::QemuConfig {
        guest,
        accel: qemu::AccelChoice::Auto,
        qemu: PathBuf::from("qemu-system-x86_64"),
        scripts_dir: scripts_dir.to_path_buf(),
        net: vm.net.clone(),
    };
    let rt = qemu::QemuRuntime::new(cfg, on_exit.clone()).map_err(|e| e.to_string())?;
    Ok(std::sync::Arc::new(rt))
}

/// Picks and builds the runtime; returns it with a sentence saying why it
/// was chosen (logged, and shown in `GET /v1/node/info`). `auto` tries
/// firecracker, then qemu, then process, and names why each was skipped.
pub fn choose(
    choice: RuntimeChoice,
    scripts_dir: &Path,
    vm: &VmOptions,
    on_exit: std::sync::Arc<tokio::sync::Notify>,
) -> Result<(std::sync::Arc<dyn Runtime>, String), RuntimeError> {
    type Builder = fn(
        &VmOptions,
        &Path,
        &std::sync::Arc<tokio::sync::Notify>,
    ) -> Result<std::sync::Arc<dyn Runtime>, String>;
    let vms: [(&'static str, RuntimeChoice, Builder); 2] = [
        ("firecracker", RuntimeChoice::Firecracker, build_firecracker),
        ("qemu", RuntimeChoice::Qemu, build_qemu),
    ];
    let mut skipped = Vec::new();
    for (name, c, build) in vms {
        if choice != RuntimeChoice::Auto && choice != c {
            continue;
        }
        match build(vm, scripts_dir, &on_exit) {
            Ok(rt) => {
                let reason = if choice == RuntimeChoice::Auto {
                    let mut r = format!("auto chose {name}");
                    if !skipped.is_empty() {
                        r.push_str(&format!(" ({})", skipped.join("; ")));
                    }
                    r
                } else {
                    format!("{name}: asked for with --runtime {name}")
                };
                tracing::info!("{reason}");
                return Ok((rt, reason));
            }
            Err(reason) if choice == c => {
                return Err(RuntimeError::Unavailable {
                    driver: name,
                    reason,
                });
            }
            Err(reason) => skipped.push(format!("{name} skipped: {reason}")),
        }
    }
    process::ProcessRuntime::probe().map_err(|reason| RuntimeError::Unavailable {
        driver: "process",
        reason,
    })?;
    let reason = match choice {
        RuntimeChoice::Process => "process: asked for with --runtime process".to_string(),
        _ => format!("auto chose process because {}", skipped.join("; ")),
    };
    let rt = process::ProcessRuntime::with_net(scripts_dir, on_exit, vm.net.clone())?;
    tracing::warn!("{reason}");
    Ok((std::sync::Arc::new(rt), reason))
}
