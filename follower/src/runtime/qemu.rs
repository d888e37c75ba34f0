//! The `qemu` runtime: one QEMU `-M microvm` per instance.
//!
//! Guest: Debian's cloud kernel and a small initramfs holding our static
//! init (`zw-init`) and the virtio modules ([`prepare_guest`] makes both,
//! through `scripts/prepare-kernel.sh` and `scripts/build-initramfs.sh`).
//! The app's `rootfs.ext4` is a virtio block device opened with
//! `snapshot=on`: the guest writes to a throwaway copy-on-write layer, the
//! image is never modified. The instance config (argv, env with its
//! secrets, workdir, user) is appended to the initramfs as a second cpio
//! archive built in a memfd that only QEMU inherits: it never touches the
//! disk and is never logged. The console (ttyS0) is appended to
//! `work_dir/stdout.log`: kernel warnings, zw-init's own lines
//! (`zw-init: ...`, no secret values) and the app's stdout/stderr. When the
//! app exits the guest powers off and QEMU exits; the app's exit code is the
//! `zw-init: powering off (exit code N)` line of that log.
//!
//! Network: a tap device per instance (`scripts/instance-net.sh tap-up`,
//! under the node's rules like every instance link), named like
//! the other drivers' host interfaces (`zwi` + hash), holding the gateway
//! address of the instance's /112; zw-init gives `eth0` the instance's
//! address (`zw.ip=`/`zw.gw=` on the kernel command line).
//!
//! Acceleration: KVM when it really works, else TCG. A `/dev/kvm` that opens
//! proves little (nested KVM without hardware paging crawls and dies on a
//! Debian kernel), so `Auto` boots the guest once under `-accel kvm` with
//! `zw.probe` (zw-init prints `zw-init: probe ok` and powers off) and uses
//! KVM only if that line arrives within [`KVM_PROBE_TIMEOUT`]. The verdict
//! is cached for the life of the process.
//!
//! Stop: the console is also a unix socket (`work_dir/vm/console.sock`,
//! the log being its logfile); `stop` writes `zw-stop` to it, zw-init sends
//! SIGTERM to the app, reaps it and powers off. After [`APP_STOP_GRACE`]
//! the VMM is killed (SIGTERM, then SIGKILL).
//!
//! Jail: QEMU starts through `scripts/qemu-jail.sh`, like Firecracker's
//! jailer: a private mount namespace whose root is a tmpfs with only what
//! it needs ([`VmPaths::jail`]), chrooted, as an unprivileged uid of the
//! instance's id range with no capabilities and no_new_privs, and with its
//! own seccomp filter ([`SANDBOX`]). It may write only its console log and
//! `work_dir/vm`; every exec of the chain keeps the pid, so the child the
//! follower spawns is QEMU itself.
//!
//! QEMU runs in its own session, so it outlives a follower killed with
//! `kill -9`; the handle's pid + start time find it again.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Notify, OnceCell};

use super::{InstanceSpec, Liveness, Runtime, RuntimeError, RuntimeHandle, pid_is, proc_stat};
use crate::net::{INSTANCE_PREFIX_LEN, InstanceNetNames, gateway_of, stable_hash, write_script};

const DRIVER: &str = "qemu";
const PREPARE_KERNEL_SH: &str = include_str!("../../../scripts/prepare-kernel.sh");
const BUILD_INITRAMFS_SH: &str = include_str!("../../../scripts/build-initramfs.sh");
const JAIL_SH: &str = include_str!("../../../scripts/qemu-jail.sh");
const BUILD_GUEST_INIT_SH: &str = include_str!("../../../scripts/build-guest-init.sh");
/// zw-init's source: the binary carries it, so a node can build its guest
/// init (plain rustc) without the repository.
const ZW_INIT_RS: &str = include_str!("../bin/zw-init.rs");
/// QEMU's own seccomp filter, on top of the jail: no obsolete syscalls, no
/// set*uid, no fork/exec, no scheduler or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The QEMU binary looked up on PATH by default.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// How long a guest under `-accel kvm` may take to reach init before KVM is
/// declared broken. A working KVM gets there in well under a second.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Between SIGTERM and SIGKILL of the VMM when stopping.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long the app has to exit after the stop request (SIGTERM in the
/// guest) before the VM is killed.
pub const APP_STOP_GRACE: Duration = Duration::from_secs(5);
/// The fd number the initrd memfd has in QEMU.
pub(crate) const INITRD_FD: i32 = 3;
/// Kernel arguments of every boot: console on the serial port, no reboot
/// loop on panic, no BIOS EDD or PCI probing (microvm has neither), and
/// only kernel errors and worse in the log (an OOM kill stays visible; so
/// does one harmless "PCI: Fatal: No config space access function found").
pub(crate) const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 reboot=t quiet edd=off pci=off";
/// Marker zw-init prints before powering off.
const EXIT_MARKER: &str = "zw-init: powering off (exit code ";

/// How guests are executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the operator asked for; `Auto` runs the boot check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Kernel and base initramfs every guest boots.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub guest: GuestImage,
    pub accel: AccelChoice,
    /// `qemu-system-x86_64`, or a path to it.
    pub qemu: PathBuf,
    /// Where the embedded scripts are written.
    pub scripts_dir: PathBuf,
    /// What instances may reach (their taps join the node's rules).
    pub net: crate::net::NetPolicy,
}

/// Checks shared by the VM drivers before they start a VMM: the image has a
/// rootfs and a command, and the instance's work dir exists. Returns the
/// console log path and its current length (the guest's output of this
/// start begins there).
pub(crate) fn prepare_vm_start(spec: &InstanceSpec) -> Result<(PathBuf, u64), RuntimeError> {
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
        .map_err(io_err(format!("creating {}", spec.work_dir.display())))?;
    let log = spec.work_dir.join("stdout.log");
    let log_offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    Ok((log, log_offset))
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

fn unavailable(reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Unavailable {
        driver: DRIVER,
        reason: reason.into(),
    }
}

/// Runs an embedded script (written to `scripts_dir` first); returns stdout.
async fn run_script(
    scripts_dir: &Path,
    name: &str,
    body: &str,
    args: &[&OsString],
) -> Result<String, RuntimeError> {
    let path = scripts_dir.join(name);
    write_script(&path, body).map_err(io_err(format!("writing {}", path.display())))?;
    let out = tokio::process::Command::new("bash")
        .arg(&path)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io_err(format!("running {name}")))?;
    if !out.status.success() {
        return Err(unavailable(format!(
            "{name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Makes the guest kernel (downloaded once into `cache_dir/kernel`) and the
/// base initramfs (`cache_dir/initramfs.cpio`, from the static `zw_init`).
/// Idempotent; the kernel download is skipped when cached.
pub async fn prepare_guest(cache_dir: &Path, zw_init: &Path) -> Result<GuestImage, RuntimeError> {
    let scripts = cache_dir.join("scripts");
    let kernel_cache = cache_dir.join("kernel");
    let kdir = run_script(
        &scripts,
        "prepare-kernel.sh",
        PREPARE_KERNEL_SH,
        &[&kernel_cache.into_os_string()],
    )
    .await?;
    let kdir = PathBuf::from(kdir.lines().last().unwrap_or_default());
    let initramfs = cache_dir.join("initramfs.cpio");
    run_script(
        &scripts,
        "build-initramfs.sh",
        BUILD_INITRAMFS_SH,
        &[
            &kdir.clone().into_os_string(),
            &zw_init.as_os_str().to_owned(),
            &initramfs.clone().into_os_string(),
        ],
    )
    .await?;
    Ok(GuestImage {
        kernel: kdir.join("vmlinuz"),
        initramfs,
    })
}

/// The guest from nothing but what this binary embeds: zw-init built from
/// its embedded source (`scripts/build-guest-init.sh`, rustc), then
/// [`prepare_guest`]. Everything is cached in `cache_dir`.
pub async fn prepare_guest_embedded(cache_dir: &Path) -> Result<GuestImage, RuntimeError> {
    let scripts = cache_dir.join("scripts");
    let src = cache_dir.join("zw-init.rs");
    let bin = cache_dir.join("zw-init");
    let fresh = std::fs::read_to_string(&src).is_ok_and(|s| s == ZW_INIT_RS) && bin.is_file();
    if !fresh {
        std::fs::create_dir_all(cache_dir)
            .map_err(io_err(format!("creating {}", cache_dir.display())))?;
        std::fs::write(&src, ZW_INIT_RS).map_err(io_err(format!("writing {}", src.display())))?;
        run_script(
            &scripts,
            "build-guest-init.sh",
            BUILD_GUEST_INIT_SH,
            &[&src.clone().into_os_string(), &bin.clone().into_os_string()],
        )
        .await?;
    }
    prepare_guest(cache_dir, &bin).await
}

/// For `auto`: can a real microVM run here? Cheap checks first (QEMU with
/// the microvm machine, root, `/dev/kvm`), then the guest is prepared
/// ([`prepare_guest_embedded`]) and booted once under KVM
/// ([`kvm_boot_check`]). `Ok` with the guest when KVM works; else why not.
/// A negative boot check is remembered in `cache_dir/kvm-verdict` for this
/// host kernel, so later starts do not wait for it again.
pub async fn auto_guest(cache_dir: &Path) -> Result<GuestImage, String> {
    probe()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("no usable /dev/kvm ({e}); a VM would be emulated (TCG)"))?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let verdict_file = cache_dir.join("kvm-verdict");
    if let Some(why) = std::fs::read_to_string(&verdict_file)
        .ok()
        .and_then(|v| v.strip_prefix(&format!("{release}\n")).map(String::from))
    {
        return Err(format!("{why} (checked earlier on this kernel)"));
    }
    let guest = prepare_guest_embedded(cache_dir)
        .await
        .map_err(|e| format!("cannot prepare a guest: {e}"))?;
    match kvm_boot_check(Path::new(QEMU_BINARY), &guest).await {
        Ok(t) => {
            tracing::info!(
                boot_ms = t.as_millis() as u64,
                "KVM works: a guest reached init"
            );
            Ok(guest)
        }
        Err(why) => {
            let why = format!("KVM does not work here ({why}); a VM would be emulated (TCG)");
            let _ = std::fs::write(&verdict_file, format!("{release}\n{why}"));
            Err(why)
        }
    }
}

/// Cheap, cached: is QEMU with the microvm machine here, and are we root
/// (tap devices)? Says nothing about KVM: TCG is always possible.
pub fn probe() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                return Err("needs root (tap devices)".into());
            }
            let out = std::process::Command::new(QEMU_BINARY)
                .args(["-machine", "help"])
                .output()
                .map_err(|e| {
                    format!("{QEMU_BINARY} not runnable: {e} (apt-get install qemu-system-x86)")
                })?;
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("microvm "))
            {
                Ok(())
            } else {
                Err(format!("{QEMU_BINARY} has no microvm machine"))
            }
        })
        .clone()
}

/// Boots the guest once under `-accel kvm` with `zw.probe`; `Ok` with the
/// time to init if it got there within [`KVM_PROBE_TIMEOUT`].
pub async fn kvm_boot_check(qemu: &Path, guest: &GuestImage) -> Result<Duration, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .args(["-append", &format!("{BASE_CMDLINE} zw.probe")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let seen = tokio::time::timeout(KVM_PROBE_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("zw-init: probe ok") {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.start_kill();
    let status = child.wait().await;
    match seen {
        Ok(true) => Ok(started.elapsed()),
        Ok(false) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            let err = err.trim().lines().last().unwrap_or("").to_string();
            Err(format!(
                "guest under KVM ended before init ({status:?}): {err}"
            ))
        }
        Err(_) => Err(format!(
            "guest under KVM did not reach init within {KVM_PROBE_TIMEOUT:?}"
        )),
    }
}

/// The host's TSC frequency, given to TCG guests: a slow emulated guest on a
/// busy host often fails to calibrate its TSC against the PIT and then hangs
/// at boot. (Under TCG the guest reads the host's TSC.)
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// Longest unix socket path (sun_path holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The directory QEMU writes in (console socket, pidfile, the snapshot
/// overlay): `work_dir/vm`, owned by the VMM's unprivileged uid.
pub fn vm_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("vm")
}

/// The console's socket (for stop requests), when its path fits.
fn console_socket(work_dir: &Path) -> Option<PathBuf> {
    let sock = vm_dir(work_dir).join("console.sock");
    (sock.as_os_str().len() <= MAX_SOCKET_PATH).then_some(sock)
}

/// The serial console: written to the log either way; a unix socket the
/// follower can send `zw-stop` through when the path allows one. `run` is
/// the VM directory as QEMU sees it, `host_run` as the host does.
fn console_chardev(run: &Path, host_work: &Path, log: &Path) -> String {
    match console_socket(host_work).map(|_| run.join("console.sock")) {
        Some(sock) => format!(
            "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
            opt_path(&sock),
            opt_path(log)
        ),
        None => format!("file,id=console,path={},append=on", opt_path(log)),
    }
}

/// Asks zw-init to SIGTERM the app and waits up to `grace` for the VM to
/// power off. `true` if it did.
pub(crate) async fn graceful_stop(handle: &RuntimeHandle, grace: Duration) -> bool {
    let Some(sock) = console_socket(&handle.work_dir) else {
        return false;
    };
    // The connection stays open until the VM is gone: QEMU drops input
    // it has not yet passed to the UART when its client hangs up.
    let sent = async {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::UnixStream::connect(&sock).await?;
        s.write_all(b"\nzw-stop\n").await?;
        Ok::<_, std::io::Error>(s)
    };
    let _conn = match tokio::time::timeout(Duration::from_secs(1), sent).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::warn!(instance = %handle.instance_id, "stop request through {}: {e}", sock.display());
            return false;
        }
        Err(_) => return false,
    };
    let deadline = Instant::now() + grace;
    while pid_is(handle.pid, handle.pid_start_ticks) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// QEMU option values double their commas.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The locally administered MAC of an instance's NIC.
pub(crate) fn mac_of(instance_id: &str) -> String {
    let h = stable_hash(instance_id).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

/// A newc cpio archive holding `zw/config.json` (mode 0600), appended to
/// the base initramfs: the kernel unpacks concatenated archives in order.
fn config_cpio(json: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::with_capacity(json.len() + 512);
    entry(&mut out, 1, "zw", 0o040_700, &[]);
    entry(&mut out, 2, "zw/config.json", 0o100_600, json);
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// The JSON zw-init reads (see `src/bin/zw-init.rs`). Holds secrets: kept
/// in memory only.
fn guest_config(spec: &InstanceSpec) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "argv": spec.argv,
        "env": spec.env_vars,
        "workdir": spec.workdir,
        "user": spec.user,
        "hostname": spec.instance_id,
    }))
    .expect("a JSON object of strings serialises")
}

/// The app's exit code, from the console log written after `offset`.
pub fn guest_exit_code(log: &Path, offset: u64) -> Option<i32> {
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    let from = offset.max(len.saturating_sub(64 * 1024));
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let at = text.rfind(EXIT_MARKER)?;
    let rest = &text[at + EXIT_MARKER.len()..];
    rest[..rest.find(')')?].parse().ok()
}

/// `base` (the guest initramfs) followed by the instance's config archive,
/// in a memfd (close-on-exec; a driver hands it to its VMM as fd 3).
pub(crate) fn instance_initrd(base: &[u8], spec: &InstanceSpec) -> Result<OwnedFd, RuntimeError> {
    // SAFETY: memfd_create with a static C string; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"zw-initrd".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_err("memfd_create for the initrd")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    file.write_all(base)
        .and_then(|()| file.write_all(&config_cpio(&guest_config(spec))))
        .map_err(io_err("writing the initrd memfd"))?;
    Ok(OwnedFd::from(file))
}

/// Makes `fd` the child's fd [`INITRD_FD`] (without close-on-exec) and puts
/// the child in its own session, so the VMM outlives a follower killed with
/// `kill -9`. Runs between fork and exec.
pub(crate) fn vmm_pre_exec(fd: i32) -> std::io::Result<()> {
    // SAFETY: async-signal-safe libc calls only.
    unsafe {
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let rc = if fd == INITRD_FD {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, INITRD_FD)
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`]; waits until it is gone.
pub(crate) async fn kill_vmm(pid: u32, start_ticks: u64) {
    let target = nix::unistd::Pid::from_raw(pid as i32);
    for (signal, wait) in [
        (nix::sys::signal::Signal::SIGTERM, STOP_GRACE),
        (nix::sys::signal::Signal::SIGKILL, Duration::from_secs(2)),
    ] {
        if !pid_is(pid, start_ticks) {
            return;
        }
        let _ = nix::sys::signal::kill(target, signal);
        let deadline = Instant::now() + wait;
        while pid_is(pid, start_ticks) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The app's exit code of a VM handle, from its console log.
pub(crate) fn handle_exit_code(handle: &RuntimeHandle) -> Option<i32> {
    let offset = handle
        .extra
        .get("log_offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    guest_exit_code(&handle.work_dir.join("stdout.log"), offset)
}

/// Creates (`up` = the instance's address) or removes the tap of a VM.
pub(crate) async fn run_tap(
    net: &crate::net::InstanceNet,
    up: Option<std::net::Ipv6Addr>,
    tap: &str,
) -> Result<(), String> {
    match up {
        Some(ip) => net.tap_up(tap, ip, None).await,
        None => net.tap_down(tap).await,
    }
    .map_err(|e| e.to_string())
}

/// Exit statuses of VMMs a runtime spawned (and reaps), by instance id,
/// with the pid they belong to.
pub(crate) type Exits = Arc<Mutex<HashMap<String, (u32, Option<i32>)>>>;

/// This process's KVM boot check: time to init, or why KVM is unusable.
static KVM_VERDICT: OnceCell<Result<Duration, String>> = OnceCell::const_new();

/// The KVM boot check's verdict, once an `Auto` runtime has made it.
pub fn kvm_verdict() -> Option<Result<Duration, String>> {
    KVM_VERDICT.get().cloned()
}

/// Where QEMU finds its files.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// The console log.
    pub log: PathBuf,
    /// Console socket, pidfile, snapshot overlay.
    pub run: PathBuf,
}

impl VmPaths {
    /// The paths in the jail `scripts/qemu-jail.sh` makes.
    pub fn jail() -> VmPaths {
        VmPaths {
            kernel: "/kernel".into(),
            rootfs: "/rootfs.ext4".into(),
            log: "/console.log".into(),
            run: "/run-vm".into(),
        }
    }
}

pub struct QemuRuntime {
    config: QemuConfig,
    base_initrd: Vec<u8>,
    net: crate::net::InstanceNet,
    jail_script: PathBuf,
    tsc_khz: Option<u64>,
    /// QEMU exit statuses of VMs this process spawned (and reaps), by
    /// instance id, with the pid they belong to.
    exits: Exits,
    /// Woken when a VM this runtime started exits.
    on_exit: Arc<Notify>,
}

impl QemuRuntime {
    pub fn new(config: QemuConfig, on_exit: Arc<Notify>) -> Result<Self, RuntimeError> {
        probe().map_err(unavailable)?;
        if !config.guest.kernel.is_file() {
            return Err(unavailable(format!(
                "no guest kernel at {}",
                config.guest.kernel.display()
            )));
        }
        let base_initrd = std::fs::read(&config.guest.initramfs).map_err(io_err(format!(
            "reading the guest initramfs {}",
            config.guest.initramfs.display()
        )))?;
        let net = crate::net::InstanceNet::new(&config.scripts_dir)
            .map_err(|e| RuntimeError::Unavailable {
                driver: DRIVER,
                reason: e.to_string(),
            })?
            .with_policy(config.net.clone());
        let jail_script = config.scripts_dir.join("qemu-jail.sh");
        write_script(&jail_script, JAIL_SH)
            .map_err(io_err(format!("writing {}", jail_script.display())))?;
        Ok(QemuRuntime {
            config,
            base_initrd,
            net,
            jail_script,
            tsc_khz: host_tsc_khz(),
            exits: Default::default(),
            on_exit,
        })
    }

    /// The accelerator guests get; the first call under `Auto` boots the KVM
    /// check (up to [`KVM_PROBE_TIMEOUT`]), later calls are free.
    pub async fn accelerator(&self) -> Accel {
        match self.config.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => {
                let verdict = KVM_VERDICT
                    .get_or_init(|| async {
                        let v = kvm_boot_check(&self.config.qemu, &self.config.guest).await;
                        match &v {
                            Ok(t) => tracing::info!(
                                boot_ms = t.as_millis() as u64,
                                "qemu: KVM works, guests use it"
                            ),
                            Err(why) => tracing::warn!(
                                "qemu: KVM unusable ({why}); guests run under TCG (slow)"
                            ),
                        }
                        v
                    })
                    .await;
                if verdict.is_ok() {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
        }
    }

    /// The complete QEMU command line of an instance (without the binary),
    /// the initrd read from `initrd`, with the host's paths (QEMU run by
    /// hand, as root).
    pub fn command_line(
        &self,
        spec: &InstanceSpec,
        accel: Accel,
        tap: &str,
        initrd: &str,
    ) -> Vec<OsString> {
        let paths = VmPaths {
            kernel: self.config.guest.kernel.clone(),
            rootfs: spec.image_dir.join("rootfs.ext4"),
            log: spec.work_dir.join("stdout.log"),
            run: vm_dir(&spec.work_dir),
        };
        self.command_line_in(spec, accel, tap, initrd, &paths)
    }

    /// The command line with the paths as QEMU sees them (in its jail:
    /// [`VmPaths::jail`]).
    pub fn command_line_in(
        &self,
        spec: &InstanceSpec,
        accel: Accel,
        tap: &str,
        initrd: &str,
        paths: &VmPaths,
    ) -> Vec<OsString> {
        let rootfs = &paths.rootfs;
        let log = &paths.log;
        let mut append = format!(
            "{BASE_CMDLINE} zw.ip={}/{INSTANCE_PREFIX_LEN} zw.gw={}",
            spec.ip,
            gateway_of(spec.ip)
        );
        let mut args: Vec<String> = vec![
            "-M".into(),
            "microvm".into(),
            "-accel".into(),
            accel.as_str().into(),
        ];
        match accel {
            Accel::Kvm => args.extend(["-cpu".into(), "host".into()]),
            Accel::Tcg => {
                if let Some(khz) = self.tsc_khz {
                    append.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
                }
            }
        }
        args.extend([
            "-m".into(),
            spec.memory_mb.max(64).to_string(),
            "-smp".into(),
            spec.vcpus.max(1).to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-name".into(),
            format!("zw-{}", spec.instance_id.replace(',', "_")),
            "-sandbox".into(),
            SANDBOX.into(),
            "-pidfile".into(),
            paths.run.join("qemu.pid").display().to_string(),
            "-chardev".into(),
            console_chardev(&paths.run, &spec.work_dir, log),
            "-serial".into(),
            "chardev:console".into(),
            "-kernel".into(),
            paths.kernel.display().to_string(),
            "-initrd".into(),
            initrd.into(),
            "-append".into(),
            append,
            "-drive".into(),
            format!(
                "id=root,file={},format=raw,if=none,snapshot=on",
                opt_path(rootfs)
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-netdev".into(),
            format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            format!(
                "virtio-net-device,netdev=net0,mac={}",
                mac_of(&spec.instance_id)
            ),
        ]);
        args.into_iter().map(OsString::from).collect()
    }

    /// The base initramfs followed by the instance's config, in a memfd.
    pub fn initrd_memfd(&self, spec: &InstanceSpec) -> Result<OwnedFd, RuntimeError> {
        instance_initrd(&self.base_initrd, spec)
    }

    async fn tap(&self, up: Option<(std::net::Ipv6Addr, u32)>, tap: &str) -> Result<(), String> {
        match up {
            Some((ip, owner)) => self.net.tap_up(tap, ip, Some(owner)).await,
            None => self.net.tap_down(tap).await,
        }
        .map_err(|e| e.to_string())
    }

    async fn start_inner(
        &self,
        spec: &InstanceSpec,
        tap: &str,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let failed = |reason: String| RuntimeError::StartFailed {
            instance_id: spec.instance_id.clone(),
            reason,
        };
        let (_, log_offset) = prepare_vm_start(spec)?;
        let qemu_log_path = spec.work_dir.join("qemu.log");
        let qemu_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&qemu_log_path)
            .map_err(io_err(format!("opening {}", qemu_log_path.display())))?;
        let accel = self.accelerator().await;
        let initrd = self.initrd_memfd(spec)?;
        let args = self.command_line_in(spec, accel, tap, "/initrd", &VmPaths::jail());
        // QEMU runs as an unprivileged uid of the instance's own range; it
        // writes only its console log and its VM directory.
        let uid = super::rootfs::IdMap::for_slot(spec.ip.segments()[6]).host_base;
        let owner = Some(nix::unistd::Uid::from_raw(uid));
        let group = Some(nix::unistd::Gid::from_raw(uid));
        let vm = vm_dir(&spec.work_dir);
        std::fs::create_dir_all(&vm).map_err(io_err(format!("creating {}", vm.display())))?;
        for p in [vm.clone(), spec.work_dir.join("stdout.log")] {
            if !p.exists() {
                std::fs::File::create(&p).map_err(io_err(format!("creating {}", p.display())))?;
            }
            nix::unistd::chown(&p, owner, group).map_err(|e| RuntimeError::Io {
                what: format!("chown {}", p.display()),
                source: e.into(),
            })?;
        }

        self.tap(Some((spec.ip, uid)), tap).await.map_err(failed)?;
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&self.jail_script)
            .arg(uid.to_string())
            .arg(&spec.work_dir)
            .arg(&self.config.guest.kernel)
            .arg(spec.image_dir.join("rootfs.ext4"))
            .arg(if accel == Accel::Kvm { "1" } else { "0" })
            .arg(&self.config.qemu)
            .args(&args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("TMPDIR", "/run-vm")
            .stdin(std::process::Stdio::null())
            .stdout(qemu_log.try_clone().map_err(io_err("dup qemu.log"))?);
        cmd.stderr(qemu_log);
        let raw = initrd.as_raw_fd();
        // SAFETY: vmm_pre_exec makes only async-signal-safe calls.
        unsafe {
            cmd.pre_exec(move || vmm_pre_exec(raw));
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = self.tap(None, tap).await;
                return Err(failed(format!(
                    "spawning {}: {e}",
                    self.config.qemu.display()
                )));
            }
        };
        drop(initrd);
        let pid = child
            .id()
            .ok_or_else(|| failed("QEMU exited at once".into()))?;
        let pid_start_ticks = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        {
            let exits = Arc::clone(&self.exits);
            let on_exit = Arc::clone(&self.on_exit);
            let id = spec.instance_id.clone();
            tokio::spawn(async move {
                let code = child.wait().await.ok().and_then(|s| s.code());
                exits.lock().expect("exits lock").insert(id, (pid, code));
                on_exit.notify_waiters();
            });
        }
        let extra = BTreeMap::from([
            ("tap".to_string(), tap.to_string()),
            ("accel".to_string(), accel.as_str().to_string()),
            ("log_offset".to_string(), log_offset.to_string()),
        ]);
        tracing::info!(instance = %spec.instance_id, pid, accel = accel.as_str(), tap, "qemu: VM started");
        Ok(RuntimeHandle {
            instance_id: spec.instance_id.clone(),
            driver: DRIVER.into(),
            pid,
            pid_start_ticks,
            ip: spec.ip,
            port: spec.port,
            work_dir: spec.work_dir.clone(),
            extra,
        })
    }
}

impl Runtime for QemuRuntime {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn start<'a>(
        &'a self,
        spec: &'a InstanceSpec,
    ) -> BoxFuture<'a, Result<RuntimeHandle, RuntimeError>> {
        Box::pin(async move {
            let tap = InstanceNetNames::for_instance(&spec.instance_id).host_if;
            self.start_inner(spec, &tap).await
        })
    }

    fn stop<'a>(&'a self, handle: &'a RuntimeHandle) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if pid_is(handle.pid, handle.pid_start_ticks)
                && !graceful_stop(handle, APP_STOP_GRACE).await
            {
                tracing::warn!(instance = %handle.instance_id, "qemu: app did not stop in time, killing the VM");
            }
            kill_vmm(handle.pid, handle.pid_start_ticks).await;
            if pid_is(handle.pid, handle.pid_start_ticks) {
                return Err(RuntimeError::Io {
                    what: format!("stopping QEMU pid {} of {}", handle.pid, handle.instance_id),
                    source: std::io::Error::other("still alive after SIGKILL"),
                });
            }
            let tap = handle
                .extra
                .get("tap")
                .cloned()
                .unwrap_or_else(|| InstanceNetNames::for_instance(&handle.instance_id).host_if);
            self.tap(None, &tap).await.map_err(|e| RuntimeError::Io {
                what: format!("removing tap {tap} of {}", handle.instance_id),
                source: std::io::Error::other(e),
            })?;
            Ok(())
        })
    }

    fn liveness(&self, handle: &RuntimeHandle) -> Liveness {
        let reaped = matches!(
            self.exits.lock().expect("exits lock").get(&handle.instance_id),
            Some((pid, _)) if *pid == handle.pid
        );
        if !reaped && pid_is(handle.pid, handle.pid_start_ticks) {
            Liveness::Running
        } else {
            Liveness::Exited(handle_exit_code(handle))
        }
    }

    fn reclaim<'a>(
        &'a self,
        instance_id: &'a str,
        work_dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            // A QEMU whose start was never recorded: found by its pidfile,
            // and only if its command line names this instance's work dir.
            let pid = std::fs::read_to_string(vm_dir(work_dir).join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if let Some(pid) = pid {
                let name = format!("\0zw-{}\0", instance_id.replace(',', "_"));
                let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&name))
                    .unwrap_or(false);
                if let (true, Some((_, ticks))) = (ours, proc_stat(pid)) {
                    tracing::warn!(
                        instance = instance_id,
                        pid,
                        "qemu: reclaiming an unrecorded VM"
                    );
                    kill_vmm(pid, ticks).await;
                }
            }
            let tap = InstanceNetNames::for_instance(instance_id).host_if;
            self.tap(None, &tap).await.map_err(|e| RuntimeError::Io {
                what: format!("removing tap {tap} of {instance_id}"),
                source: std::io::Error::other(e),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_archive_is_newc_and_aligned() {
        let a = config_cpio(br#"{"argv":["x"]}"#);
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("zw/config.json\0"));
        assert!(text.contains(r#"{"argv":["x"]}"#));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn exit_code_is_read_after_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        std::fs::write(
            &log,
            "zw-init: powering off (exit code 3)\nboot\napp says hi\n",
        )
        .unwrap();
        assert_eq!(guest_exit_code(&log, 0), Some(3));
        assert_eq!(guest_exit_code(&log, 10), None);
        std::fs::write(
            &log,
            "old\nzw-init: app exited with status 7\nzw-init: powering off (exit code 7)\n",
        )
        .unwrap();
        assert_eq!(guest_exit_code(&log, 4), Some(7));
    }
}
