//! Dockerfile build backends: `buildah` (daemonless) and `docker` (when an
//! engine answers). A backend builds a context and writes the image as an
//! OCI layout directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::error::{BuildError, Stage};
use crate::log::{LogLine, LogSink, LogStream, TailLog};
use crate::tools::find_tool;

/// Number of log lines kept for error messages.
pub const LOG_TAIL_LINES: usize = 30;

/// What to build.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    /// The build context directory.
    pub context_dir: PathBuf,
    /// The Dockerfile (inside the context).
    pub dockerfile: PathBuf,
    pub build_args: Vec<(String, String)>,
    /// Local image name to tag the result with.
    pub tag: String,
    /// Where to write the OCI layout (must not exist yet).
    pub oci_dir: PathBuf,
}

/// A Dockerfile build backend. Errors say whose fault a failure is: a
/// failing Dockerfile step is [`BuildError::User`] with the log tail, a
/// crashed or unusable backend is [`BuildError::Infrastructure`].
pub trait BuildBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Build `req` and write the image to `req.oci_dir` as an OCI layout
    /// whose manifest is tagged `latest`.
    fn build<'a>(
        &'a self,
        req: &'a BackendRequest,
        log: &'a dyn LogSink,
    ) -> BoxFuture<'a, Result<(), BuildError>>;
}

/// Run `cmd`, stream its output lines to `log`, return its exit status.
async fn run_logged(
    mut cmd: Command,
    tool: &str,
    stage: Stage,
    log: &TailLog<'_>,
) -> Result<std::process::ExitStatus, BuildError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| BuildError::infra(stage, format!("could not start {tool}"), e))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (status, (), ()) = tokio::join!(
        child.wait(),
        pump(stdout, LogStream::Stdout, log),
        pump(stderr, LogStream::Stderr, log)
    );
    status.map_err(|e| BuildError::infra(stage, format!("waiting for {tool}"), e))
}

async fn pump(r: impl AsyncRead + Unpin, stream: LogStream, log: &TailLog<'_>) {
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    // Bounded by the child's output; ends at EOF or on a read error.
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                log.line(LogLine { stream, text });
            }
        }
    }
}

/// Classify a failed backend run from its status and log tail.
fn classify(
    tool: &str,
    step: &str,
    status: std::process::ExitStatus,
    tail: Vec<String>,
    user_markers: &[&str],
) -> BuildError {
    use std::os::unix::process::ExitStatusExt;
    let text = tail.join("\n");
    let lower = text.to_lowercase();
    if let Some(sig) = status.signal() {
        return BuildError::Infrastructure {
            stage: Stage::Build,
            message: format!("{tool} {step} was killed by signal {sig} (backend crashed)"),
            transient: true,
            log_tail: tail,
            cause: None,
        };
    }
    if lower.contains("no space left on device") || lower.contains("disk quota exceeded") {
        return BuildError::Infrastructure {
            stage: Stage::Build,
            message: format!("{tool} {step} ran out of disk space ({status})"),
            transient: true,
            log_tail: tail,
            cause: None,
        };
    }
    if user_markers.iter().any(|m| text.contains(m)) {
        let message = tail
            .iter()
            .rev()
            .find(|l| user_markers.iter().any(|m| l.contains(m)))
            .cloned()
            .unwrap_or_else(|| format!("{tool} {step} failed ({status})"));
        return BuildError::User {
            message,
            log_tail: tail,
        };
    }
    BuildError::Infrastructure {
        stage: Stage::Build,
        message: format!("{tool} {step} failed ({status})"),
        transient: true,
        log_tail: tail,
        cause: None,
    }
}

// ---------------------------------------------------------------- sandbox

/// Host ids a sandboxed build runs as: its root is host id
/// `BUILD_ID_BASE`. The last 64 Ki block of ids, which the follower never
/// gives an instance (its slot 65535 is never handed out).
pub const BUILD_ID_BASE: u32 = 0xFFFF_0000;
/// Ids mapped into a build's user namespace (the last id, `(uid_t)-1`, is
/// not one).
pub const BUILD_ID_COUNT: u32 = 0xFFFF;
/// Where a sandboxed build sees its state directory (in its own mount
/// namespace, over a tmpfs on `/tmp`), whatever the modes of the host's
/// directories above it.
const SANDBOX_STATE: &str = "/tmp/zw-build";

/// cgroup limits and a deadline of one build (the whole buildah process
/// tree, RUN steps included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    pub memory_mb: u64,
    pub pids: u32,
    pub cpus: u32,
    pub timeout: std::time::Duration,
}

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            memory_mb: 4096,
            pids: 4096,
            cpus: 2,
            timeout: std::time::Duration::from_secs(30 * 60),
        }
    }
}

/// The cgroup of one build (v1 hierarchies or the unified one): limits
/// written at creation; whatever still runs in it is killed, and it is
/// removed, on drop.
struct BuildCgroup {
    dirs: Vec<PathBuf>,
}

impl BuildCgroup {
    fn create(limits: &BuildLimits) -> std::io::Result<BuildCgroup> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "zw-build-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let root = Path::new("/sys/fs/cgroup");
        let memory = (limits.memory_mb << 20).to_string();
        let quota = (u64::from(limits.cpus.max(1)) * 100_000).to_string();
        let mut cg = BuildCgroup { dirs: Vec::new() };
        let write = |dir: &Path, file: &str, value: &str| {
            std::fs::write(dir.join(file), value).map_err(|e| {
                std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display()))
            })
        };
        if root.join("cgroup.controllers").exists() {
            // cgroup v2: the controllers must be on for the root's children.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu");
            let dir = root.join(&name);
            std::fs::create_dir(&dir)?;
            cg.dirs.push(dir.clone());
            write(&dir, "memory.max", &memory)?;
            write(&dir, "memory.swap.max", "0").ok();
            write(&dir, "pids.max", &limits.pids.to_string())?;
            write(&dir, "cpu.max", &format!("{quota} 100000"))?;
        } else {
            for (controller, files) in [
                ("memory", vec![("memory.limit_in_bytes", memory.clone())]),
                ("pids", vec![("pids.max", limits.pids.to_string())]),
                (
                    "cpu",
                    vec![
                        ("cpu.cfs_period_us", "100000".to_string()),
                        ("cpu.cfs_quota_us", quota.clone()),
                    ],
                ),
            ] {
                let dir = root.join(controller).join(&name);
                std::fs::create_dir(&dir)?;
                cg.dirs.push(dir.clone());
                for (file, value) in files {
                    write(&dir, file, &value)?;
                }
            }
        }
        Ok(cg)
    }

    /// `cgroup.procs` of each hierarchy, for the child to join before exec.
    fn procs_files(&self) -> Vec<std::ffi::CString> {
        use std::os::unix::ffi::OsStrExt;
        self.dirs
            .iter()
            .filter_map(|d| {
                std::ffi::CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok()
            })
            .collect()
    }

    /// Which limit a build ran into, if any (for its error message).
    fn hit(&self) -> Option<&'static str> {
        let read = |f: &str| {
            self.dirs
                .iter()
                .find_map(|d| std::fs::read_to_string(d.join(f)).ok())
        };
        let count = |text: Option<String>, key: &str| {
            text.and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix(key)
                        .map(|n| n.trim().parse::<u64>().unwrap_or(0))
                })
            })
            .unwrap_or(0)
        };
        if count(read("memory.events"), "oom_kill ") > 0
            || count(read("memory.oom_control"), "oom_kill ") > 0
        {
            return Some("its memory limit");
        }
        if count(read("pids.events"), "max ") > 0 {
            return Some("its process limit");
        }
        None
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let mut alive = false;
            for dir in &self.dirs {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    alive = true;
                    // SAFETY: kill(2) on a pid read from our own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            if !alive {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Makes `cmd` start in `cgroup`, in a mount namespace of its own where
/// `state` is seen at [`SANDBOX_STATE`], and in a user namespace whose root
/// is host id [`BUILD_ID_BASE`]. The child unshares; a thread of ours writes
/// its id maps (root in the parent namespace may map any ids, no
/// `newuidmap` or `/etc/subuid` needed) and lets it go on to exec.
fn sandbox(cmd: &mut Command, cgroup: &BuildCgroup, state: &Path) -> std::io::Result<SandboxGuard> {
    use std::ffi::CString;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let pipe = || -> std::io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    };
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let procs = cgroup.procs_files();
    let state = CString::new(state.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let (ready_wr, go_rd) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls (open, write, read, close, unshare, mount,
    // mkdir, set*id, getpid) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return fail();
                }
                libc::close(fd);
            }
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return fail();
            }
            // The state directory is opened in the new namespace and bound
            // through its fd: the tmpfs about to cover /tmp may cover its
            // path. "/proc/self/fd/<n>" is spelled out without allocating.
            let fd = libc::open(
                state.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return fail();
            }
            let mut path = [0u8; 40];
            let prefix = b"/proc/self/fd/";
            path[..prefix.len()].copy_from_slice(prefix);
            let mut digits = [0u8; 12];
            let (mut n, mut k) = (fd as u32, 0);
            loop {
                digits[k] = b'0' + (n % 10) as u8;
                k += 1;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            for i in 0..k {
                path[prefix.len() + i] = digits[k - 1 - i];
            }
            if libc::mount(
                c"zw-build".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=1m".as_ptr().cast(),
            ) != 0
                || libc::mkdir(c"/tmp/zw-build".as_ptr(), 0o755) != 0
                || libc::mount(
                    path.as_ptr().cast(),
                    c"/tmp/zw-build".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                || libc::unshare(libc::CLONE_NEWUSER) != 0
            {
                return fail();
            }
            let pid = libc::getpid().to_ne_bytes();
            let mut go = 0u8;
            if libc::write(ready_wr, pid.as_ptr().cast(), 4) != 4
                || libc::read(go_rd, (&mut go as *mut u8).cast(), 1) != 1
                || go != 1
            {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            if libc::setresgid(0, 0, 0) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresuid(0, 0, 0) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
    let mapper = std::thread::spawn(move || {
        let mut pid = [0u8; 4];
        let mut ready = std::fs::File::from(ready_r);
        let mut go = std::fs::File::from(go_w);
        if ready.read_exact(&mut pid).is_err() {
            return; // the child failed before unsharing; spawn reports it
        }
        let pid = i32::from_ne_bytes(pid);
        let map = format!("0 {BUILD_ID_BASE} {BUILD_ID_COUNT}\n");
        let ok = ["uid_map", "gid_map"]
            .iter()
            .all(|f| std::fs::write(format!("/proc/{pid}/{f}"), &map).is_ok());
        let _ = go.write_all(&[u8::from(ok)]);
    });
    Ok(SandboxGuard {
        mapper,
        _child_ends: (ready_w, go_r),
    })
}

/// The mapping thread of a sandboxed command, and the fds the child uses
/// between fork and exec: they must stay open until it has been spawned
/// (dropping them lets the thread end if the child never got that far).
struct SandboxGuard {
    mapper: std::thread::JoinHandle<()>,
    _child_ends: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
}

/// Gives the build's root (host id [`BUILD_ID_BASE`]) everything under
/// `dir`; skipped when `dir` is its already.
fn hand_over(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir)?;
    if std::fs::metadata(dir)?.uid() == BUILD_ID_BASE {
        return Ok(());
    }
    let owner = format!("{BUILD_ID_BASE}:{BUILD_ID_BASE}");
    let st = std::process::Command::new("chown")
        .args(["-R", "--no-dereference", &owner])
        .arg(dir)
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "chown -R {owner} {} failed",
            dir.display()
        )))
    }
}

// ---------------------------------------------------------------- buildah

/// Daemonless builds with `buildah bud --isolation chroot --storage-driver vfs`,
/// with its own storage under a data directory (no global state), and
/// `--timestamp 0` so that the same input gives the same image digest.
///
/// Run as root, every buildah process runs sandboxed ([`sandbox`]): in a
/// cgroup with [`BuildLimits`], under a deadline, and in a user namespace
/// whose root is the unprivileged host id [`BUILD_ID_BASE`], in a mount
/// namespace that sees only the backend's own state directory (handed to
/// that id) at a fixed path. The build context is copied in there first.
/// A RUN step therefore has no host privilege: it cannot read a file only
/// root may read, or write anywhere but its own layer. What it can still
/// reach: the host's network namespace (chroot isolation has no network
/// of its own), the host's process list in /proc, files of the host that
/// any user may read, and the CPU, memory and processes of its limits.
#[derive(Debug, Clone)]
pub struct BuildahBackend {
    binary: PathBuf,
    storage_root: PathBuf,
    run_root: PathBuf,
    /// The backend's state directory (sandboxed builds see it at
    /// [`SANDBOX_STATE`]).
    state_dir: PathBuf,
    /// Limits of sandboxed builds; `None` when not root (buildah is then
    /// rootless by itself).
    sandbox: Option<BuildLimits>,
}

impl BuildahBackend {
    /// A backend keeping its storage under `state_dir`.
    pub fn new(state_dir: &Path) -> Result<Self, BuildError> {
        let binary = find_tool("buildah").ok_or_else(|| {
            BuildError::infra_permanent(
                Stage::Build,
                "buildah is not installed (Debian: apt-get install buildah)",
            )
        })?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        Ok(Self {
            binary,
            storage_root: state_dir.join("storage"),
            run_root: state_dir.join("run"),
            state_dir: state_dir.to_path_buf(),
            sandbox: root.then(BuildLimits::default),
        })
    }

    /// Other limits for sandboxed builds.
    pub fn with_limits(mut self, limits: BuildLimits) -> Self {
        if self.sandbox.is_some() {
            self.sandbox = Some(limits);
        }
        self
    }

    /// The limits builds run under, when sandboxed.
    pub fn limits(&self) -> Option<BuildLimits> {
        self.sandbox
    }

    /// `path` (under the state directory) as the build sees it.
    fn seen(&self, path: &Path) -> PathBuf {
        match (self.sandbox, path.strip_prefix(&self.state_dir)) {
            (Some(_), Ok(rel)) => Path::new(SANDBOX_STATE).join(rel),
            _ => path.to_path_buf(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(self.seen(&self.storage_root))
            .arg("--runroot")
            .arg(self.seen(&self.run_root))
            .arg("--storage-driver")
            .arg("vfs")
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("BUILDAH_ISOLATION", "chroot")
            .env("LC_ALL", "C");
        if self.sandbox.is_some() {
            cmd.env("HOME", self.seen(&self.state_dir.join("home")))
                .env("TMPDIR", self.seen(&self.state_dir.join("tmp")))
                .env("XDG_RUNTIME_DIR", self.seen(&self.run_root));
        }
        cmd
    }

    /// Runs a buildah command, sandboxed when root (see the type's doc).
    async fn run(
        &self,
        mut cmd: Command,
        stage: Stage,
        log: &TailLog<'_>,
    ) -> Result<std::process::ExitStatus, BuildError> {
        let Some(limits) = self.sandbox else {
            return run_logged(cmd, "buildah", stage, log).await;
        };
        let cgroup = BuildCgroup::create(&limits)
            .map_err(|e| BuildError::infra(stage, "creating the build's cgroup", e))?;
        let guard = sandbox(&mut cmd, &cgroup, &self.state_dir)
            .map_err(|e| BuildError::infra(stage, "preparing the build sandbox", e))?;
        let run =
            tokio::time::timeout(limits.timeout, run_logged(cmd, "buildah", stage, log)).await;
        let SandboxGuard {
            mapper,
            _child_ends,
        } = guard;
        drop(_child_ends);
        let _ = tokio::task::spawn_blocking(move || mapper.join()).await;
        let over = cgroup.hit();
        drop(cgroup); // kills whatever the build left running
        match run {
            Err(_) => Err(BuildError::User {
                message: format!(
                    "the build ran longer than its limit of {} s",
                    limits.timeout.as_secs()
                ),
                log_tail: log.tail(),
            }),
            Ok(Ok(status)) if !status.success() && over.is_some() => Err(BuildError::User {
                message: format!(
                    "the build was stopped by {} ({} MiB, {} processes)",
                    over.unwrap_or_default(),
                    limits.memory_mb,
                    limits.pids
                ),
                log_tail: log.tail(),
            }),
            Ok(r) => r,
        }
    }

    /// Copies the context into the state directory, owned by the build's
    /// root: the build reads nothing of the host but this copy.
    fn stage_context(&self, req: &BackendRequest, n: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        let staged = self.state_dir.join("contexts").join(n);
        let _ = std::fs::remove_dir_all(&staged);
        std::fs::create_dir_all(&staged)?;
        let st = std::process::Command::new("cp")
            .args(["-a", "--no-preserve=ownership"])
            .arg(req.context_dir.join("."))
            .arg(&staged)
            .status()?;
        if !st.success() {
            return Err(std::io::Error::other(format!(
                "copying the context {} failed",
                req.context_dir.display()
            )));
        }
        hand_over_all(&staged)?;
        let rel = req
            .dockerfile
            .strip_prefix(&req.context_dir)
            .map_err(|_| std::io::Error::other("the Dockerfile is outside the context"))?;
        Ok((staged.clone(), staged.join(rel)))
    }

    const USER_MARKERS: &'static [&'static str] = &[
        "building at STEP",
        "error parsing",
        "Dockerfile parse error",
        "unknown instruction",
    ];
}

impl BuildBackend for BuildahBackend {
    fn name(&self) -> &'static str {
        "buildah"
    }

    fn build<'a>(
        &'a self,
        req: &'a BackendRequest,
        log: &'a dyn LogSink,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            let tail = TailLog::new(log, LOG_TAIL_LINES);
            // Sandboxed: the context is copied into the state directory and
            // the image written there, both owned by the build's root.
            let n = format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let (context, dockerfile, oci_out) = if self.sandbox.is_some() {
                for d in [&self.storage_root, &self.run_root] {
                    hand_over(d).map_err(|e| {
                        BuildError::infra(Stage::Build, "handing the storage to the build user", e)
                    })?;
                }
                for d in ["home", "tmp", "out"] {
                    hand_over(&self.state_dir.join(d)).map_err(|e| {
                        BuildError::infra(Stage::Build, "preparing the build's directories", e)
                    })?;
                }
                let (ctx, df) = self
                    .stage_context(req, &n)
                    .map_err(|e| BuildError::infra(Stage::Build, "staging the build context", e))?;
                (ctx, df, self.state_dir.join("out").join(&n))
            } else {
                (
                    req.context_dir.clone(),
                    req.dockerfile.clone(),
                    req.oci_dir.clone(),
                )
            };
            let cleanup = StagedDirs(if self.sandbox.is_some() {
                vec![context.clone(), oci_out.clone()]
            } else {
                Vec::new()
            });
            let mut cmd = self.command();
            cmd.arg("bud")
                .args([
                    "--isolation",
                    "chroot",
                    "--timestamp",
                    "0",
                    "--layers",
                    "--format",
                    "oci",
                ])
                .arg("-f")
                .arg(self.seen(&dockerfile))
                .arg("-t")
                .arg(&req.tag);
            for (k, v) in &req.build_args {
                cmd.arg("--build-arg").arg(format!("{k}={v}"));
            }
            cmd.arg(self.seen(&context));
            let status = self.run(cmd, Stage::Build, &tail).await?;
            if !status.success() {
                return Err(classify(
                    "buildah",
                    "bud",
                    status,
                    tail.tail(),
                    Self::USER_MARKERS,
                ));
            }

            let _ = tokio::fs::remove_dir_all(&req.oci_dir).await;
            let _ = tokio::fs::remove_dir_all(&oci_out).await;
            let mut push = self.command();
            push.arg("push")
                .arg("--quiet")
                .arg(&req.tag)
                .arg(format!("oci:{}:latest", self.seen(&oci_out).display()));
            let status = self.run(push, Stage::Export, &tail).await?;
            // Drop the tag; the layer cache (--layers) stays for the next build.
            let mut rmi = self.command();
            rmi.arg("rmi").arg(&req.tag);
            let _ = self
                .run(rmi, Stage::Export, &TailLog::new(&crate::log::NullLog, 1))
                .await;
            if status.success() && oci_out != req.oci_dir {
                move_dir(&oci_out, &req.oci_dir).map_err(|e| {
                    BuildError::infra(Stage::Export, "moving the image out of the sandbox", e)
                })?;
            }
            drop(cleanup);
            if !status.success() {
                return Err(BuildError::Infrastructure {
                    stage: Stage::Export,
                    message: format!("buildah push to an OCI layout failed ({status})"),
                    transient: true,
                    log_tail: tail.tail(),
                    cause: None,
                });
            }
            Ok(())
        })
    }
}

/// Directories a sandboxed build staged, removed when the build is done.
struct StagedDirs(Vec<PathBuf>);

impl Drop for StagedDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// `chown -R` to the build's root, always (a fresh copy).
fn hand_over_all(dir: &Path) -> std::io::Result<()> {
    let owner = format!("{BUILD_ID_BASE}:{BUILD_ID_BASE}");
    let st = std::process::Command::new("chown")
        .args(["-R", "--no-dereference", &owner])
        .arg(dir)
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "chown -R {owner} {} failed",
            dir.display()
        )))
    }
}

/// Renames `from` to `to` (same filesystem), else copies it.
fn move_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    let st = std::process::Command::new("cp")
        .args(["-a", "--no-preserve=ownership"])
        .arg(from)
        .arg(to)
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "copying {} failed",
            from.display()
        )))
    }
}

// ---------------------------------------------------------------- docker

/// Builds with a Docker engine (`docker build`, then `docker save`, whose
/// archive is an OCI layout since Docker 25). Only usable when an engine
/// answers ([`DockerBackend::engine_answers`]). Docker builds are not made
/// reproducible here, so rebuilding after the engine's cache is gone may
/// yield a new digest.
#[derive(Debug, Clone)]
pub struct DockerBackend {
    binary: PathBuf,
}

impl DockerBackend {
    pub fn new() -> Result<Self, BuildError> {
        let binary = find_tool("docker").ok_or_else(|| {
            BuildError::infra_permanent(Stage::Build, "docker CLI is not installed")
        })?;
        Ok(Self { binary })
    }

    /// Whether a Docker engine answers (`docker version` reaches the server).
    pub async fn engine_answers(&self) -> bool {
        let out = Command::new(&self.binary)
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output();
        matches!(tokio::time::timeout(std::time::Duration::from_secs(10), out).await, Ok(Ok(o)) if o.status.success() && !o.stdout.is_empty())
    }

    const USER_MARKERS: &'static [&'static str] = &[
        "did not complete successfully",
        "dockerfile parse error",
        "failed to compute cache key",
        "unknown instruction",
    ];
}

impl BuildBackend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn build<'a>(
        &'a self,
        req: &'a BackendRequest,
        log: &'a dyn LogSink,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            let tail = TailLog::new(log, LOG_TAIL_LINES);
            let mut cmd = Command::new(&self.binary);
            cmd.args(["build", "--progress=plain"])
                .arg("-f")
                .arg(&req.dockerfile)
                .arg("-t")
                .arg(&req.tag);
            for (k, v) in &req.build_args {
                cmd.arg("--build-arg").arg(format!("{k}={v}"));
            }
            cmd.arg(&req.context_dir).env("DOCKER_BUILDKIT", "1");
            let status = run_logged(cmd, "docker", Stage::Build, &tail).await?;
            if !status.success() {
                return Err(classify(
                    "docker",
                    "build",
                    status,
                    tail.tail(),
                    Self::USER_MARKERS,
                ));
            }
            let _ = tokio::fs::remove_dir_all(&req.oci_dir).await;
            tokio::fs::create_dir_all(&req.oci_dir)
                .await
                .map_err(|e| BuildError::infra(Stage::Export, "creating the OCI directory", e))?;
            let archive = req.oci_dir.with_extension("tar");
            let mut save = Command::new(&self.binary);
            save.arg("save").arg("-o").arg(&archive).arg(&req.tag);
            let status = run_logged(save, "docker", Stage::Export, &tail).await?;
            // Drop the tag; the engine's build cache stays for the next build.
            let mut rmi = Command::new(&self.binary);
            rmi.arg("rmi").arg(&req.tag);
            let _ = run_logged(
                rmi,
                "docker",
                Stage::Export,
                &TailLog::new(&crate::log::NullLog, 1),
            )
            .await;
            if !status.success() {
                return Err(BuildError::Infrastructure {
                    stage: Stage::Export,
                    message: format!("docker save failed ({status})"),
                    transient: true,
                    log_tail: tail.tail(),
                    cause: None,
                });
            }
            let (archive2, dir) = (archive.clone(), req.oci_dir.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut ar = tar::Archive::new(std::fs::File::open(&archive2)?);
                ar.unpack(&dir)?;
                std::fs::remove_file(&archive2)
            })
            .await
            .map_err(|e| BuildError::infra(Stage::Export, "unpacking docker save output", e))?
            .map_err(|e| BuildError::infra(Stage::Export, "unpacking docker save output", e))?;
            if !req.oci_dir.join("index.json").exists() {
                return Err(BuildError::infra_permanent(
                    Stage::Export,
                    "docker save did not write an OCI layout (index.json); Docker 25 or newer is needed",
                ));
            }
            tag_single_manifest_latest(&req.oci_dir).map_err(|e| {
                BuildError::infra(Stage::Export, "reading docker save index.json", e)
            })?;
            Ok(())
        })
    }
}

/// `docker save` names the manifest by the image name; the exporter looks
/// for `latest`. Rewrite the ref-name annotation of the (single) manifest.
fn tag_single_manifest_latest(dir: &Path) -> std::io::Result<()> {
    let path = dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path)?).map_err(std::io::Error::other)?;
    if let Some(obj) = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .and_then(|m| m.first_mut())
        .and_then(|first| first.as_object_mut())
        && let Some(ann) = obj
            .entry("annotations")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
    {
        ann.insert("org.opencontainers.image.ref.name".into(), "latest".into());
    }
    std::fs::write(
        &path,
        serde_json::to_vec(&index).map_err(std::io::Error::other)?,
    )
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendKind {
    /// buildah if installed (daemonless, reproducible), else docker if an engine answers.
    #[default]
    Auto,
    Buildah,
    Docker,
}

/// Construct the backend for `kind`, keeping buildah's state under `state_dir`.
pub async fn select_backend(
    kind: BackendKind,
    state_dir: &Path,
) -> Result<Box<dyn BuildBackend>, BuildError> {
    match kind {
        BackendKind::Buildah => Ok(Box::new(BuildahBackend::new(state_dir)?)),
        BackendKind::Docker => {
            let d = DockerBackend::new()?;
            if !d.engine_answers().await {
                return Err(BuildError::infra_permanent(
                    Stage::Build,
                    "no Docker engine answers (docker version failed)",
                ));
            }
            Ok(Box::new(d))
        }
        BackendKind::Auto => {
            if let Ok(b) = BuildahBackend::new(state_dir) {
                return Ok(Box::new(b));
            }
            if let Ok(d) = DockerBackend::new()
                && d.engine_answers().await
            {
                return Ok(Box::new(d));
            }
            Err(BuildError::infra_permanent(
                Stage::Build,
                "no build backend: buildah is not installed and no Docker engine answers (Debian: apt-get install buildah)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn classification() {
        let tail = |s: &str| s.lines().map(String::from).collect::<Vec<_>>();
        let e = classify(
            "buildah",
            "bud",
            std::process::ExitStatus::from_raw(3 << 8),
            tail("out\nError: building at STEP \"RUN x\": exit status 3"),
            BuildahBackend::USER_MARKERS,
        );
        assert!(matches!(&e, BuildError::User { message, .. } if message.contains("RUN x")));
        let e = classify(
            "buildah",
            "bud",
            std::process::ExitStatus::from_raw(9),
            tail("partial"),
            BuildahBackend::USER_MARKERS,
        );
        assert!(e.is_retryable());
        let e = classify(
            "buildah",
            "bud",
            std::process::ExitStatus::from_raw(1 << 8),
            tail("Error: building at STEP \"COPY\": write /x: no space left on device"),
            BuildahBackend::USER_MARKERS,
        );
        assert!(e.is_retryable());
    }
}
