//! The root filesystem of a `process` instance, built on the host before
//! the OCI runtime starts the container in it.
//!
//! ```text
//! <work>/lower    the image's rootfs.ext4, loop-mounted ro,nodev,nosuid (owned by uid 0)
//! <work>/mapped   an idmapped clone of lower: uid/gid n appear as base+n
//! <work>/upper    tmpfs (nodev,nosuid): data/ (owned by base) and work/
//! <work>/root     overlay of mapped + upper/data, nodev,nosuid: the container's /
//! ```
//!
//! The idmap is what lets the image's uid 0 be the container's root inside
//! a user namespace (host uid `base`) and still own its files. util-linux
//! 2.38 has no `X-mount.idmap`, and nix has no wrappers for the new mount
//! API, so the idmap step is three raw syscalls here: `open_tree` (clone of
//! `lower`), `mount_setattr(MOUNT_ATTR_IDMAP)` with the fd of a user
//! namespace holding the instance's mapping, `move_mount` onto `mapped`.
//!
//! Every mount is made private, so nothing done to them propagates. Once the
//! container runs, its own mount namespace holds its root; [`detach`] then
//! lazily unmounts the host's copies, so an instance's filesystem lives and
//! dies with the instance (the loop device is released when the last user
//! of the ext4 superblock goes).

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Mount points under an instance's work dir, innermost last.
const MOUNT_POINTS: [&str; 4] = ["lower", "mapped", "upper", "root"];
/// Largest `/etc/passwd` or `/etc/group` read from an image.
const MAX_ID_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("rootfs {path} cannot be mounted as ext4: {stderr}")]
    Image { path: PathBuf, stderr: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {stderr}")]
    Mount { what: String, stderr: String },
    #[error("user {0} is not in the image's /etc/passwd")]
    NoUser(String),
    #[error("group {0} is not in the image's /etc/group")]
    NoGroup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RootfsError {
    let what = what.into();
    move |source| RootfsError::Io { what, source }
}

/// The user namespace mapping of one instance: container ids 0..size are
/// host ids base..base+size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub host_base: u32,
    pub size: u32,
}

impl IdMap {
    /// Instance slot `n` (1..=65535, from its address) maps onto host ids
    /// `n * 65536 ..`: distinct per instance on a node, never host uid 0 or
    /// any id below 65536 (the host's own users). The last slot ends one
    /// short, as `(uid_t)-1` is not an id.
    pub fn for_slot(slot: u16) -> IdMap {
        let slot = slot.max(1);
        IdMap {
            host_base: u32::from(slot) << 16,
            size: if slot == u16::MAX { 0xffff } else { 0x1_0000 },
        }
    }

    /// The host id of container id `id`.
    pub fn host(&self, id: u32) -> u32 {
        self.host_base + id
    }
}

/// Paths of an instance's mounts under its work dir.
pub fn root_dir(work: &Path) -> PathBuf {
    work.join("root")
}

async fn run_mount(what: &str, work: &Path, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = tokio::process::Command::new("mount")
        .args(args)
        .current_dir(work)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{what}: running mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn make_private(target: &Path) -> Result<(), RootfsError> {
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| RootfsError::Io {
        what: format!("making {} private", target.display()),
        source: e.into(),
    })
}

/// Mounts the instance's root under `work` (see the module doc) and returns
/// the overlay's path. On error, whatever was mounted is detached again.
pub async fn mount(
    work: &Path,
    image: &Path,
    map: IdMap,
    upper_mb: u32,
) -> Result<PathBuf, RootfsError> {
    detach(work);
    let r = mount_inner(work, image, map, upper_mb).await;
    if r.is_err() {
        detach(work);
    }
    r
}

async fn mount_inner(
    work: &Path,
    image: &Path,
    map: IdMap,
    upper_mb: u32,
) -> Result<PathBuf, RootfsError> {
    for d in MOUNT_POINTS {
        let p = work.join(d);
        std::fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
    }
    // Relative paths (the command runs in `work`): the overlay's options
    // then show no host path inside the instance, and need no escaping.
    run_mount(
        "rootfs",
        work,
        &[
            "-t".as_ref(),
            "ext4".as_ref(),
            "-o".as_ref(),
            "loop,ro,nodev,nosuid".as_ref(),
            image.as_os_str(),
            "lower".as_ref(),
        ],
    )
    .await
    .map_err(|stderr| RootfsError::Image {
        path: image.to_path_buf(),
        stderr,
    })?;
    make_private(&work.join("lower"))?;

    let (lower, mapped) = (work.join("lower"), work.join("mapped"));
    tokio::task::spawn_blocking(move || {
        let ns = userns_with(map)?;
        idmapped_clone(&lower, &mapped, ns.as_fd()).map_err(io(format!(
            "idmapped mount of {} on {}",
            lower.display(),
            mapped.display()
        )))
    })
    .await
    .map_err(|e| RootfsError::Io {
        what: "idmap task".into(),
        source: std::io::Error::other(e),
    })??;
    make_private(&work.join("mapped"))?;

    let base = map.host_base.to_string();
    let tmpfs_opts = format!("mode=0755,size={upper_mb}m,nodev,nosuid,uid={base},gid={base}");
    run_mount(
        "upper tmpfs",
        work,
        &[
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "-o".as_ref(),
            tmpfs_opts.as_ref(),
            "zw-upper".as_ref(),
            "upper".as_ref(),
        ],
    )
    .await
    .map_err(|stderr| RootfsError::Mount {
        what: "mounting the upper tmpfs".into(),
        stderr,
    })?;
    make_private(&work.join("upper"))?;
    for d in ["data", "work"] {
        let p = work.join("upper").join(d);
        std::fs::create_dir(&p).map_err(io(format!("creating {}", p.display())))?;
    }
    // The container's root owns its `/`.
    nix::unistd::chown(
        &work.join("upper/data"),
        Some(nix::unistd::Uid::from_raw(map.host_base)),
        Some(nix::unistd::Gid::from_raw(map.host_base)),
    )
    .map_err(|e| RootfsError::Io {
        what: "chown of the upper layer".into(),
        source: e.into(),
    })?;
    run_mount(
        "overlay",
        work,
        &[
            "-t".as_ref(),
            "overlay".as_ref(),
            "-o".as_ref(),
            "lowerdir=mapped,upperdir=upper/data,workdir=upper/work,nodev,nosuid".as_ref(),
            "zw-root".as_ref(),
            "root".as_ref(),
        ],
    )
    .await
    .map_err(|stderr| RootfsError::Mount {
        what: "mounting the overlay root".into(),
        stderr,
    })?;
    let root = work.join("root");
    make_private(&root)?;
    ensure_tmp(&root, map)?;
    Ok(root)
}

/// Lazily unmounts whatever of an instance's mounts the host still has;
/// idempotent. A running container keeps its own copies.
pub fn detach(work: &Path) {
    for d in MOUNT_POINTS.iter().rev() {
        let p = work.join(d);
        // Stacked mounts (an interrupted earlier attempt) come off one by one.
        for _ in 0..8 {
            if nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

/// Does the host still hold a mount of this instance?
pub fn host_mounts(work: &Path) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let points: Vec<PathBuf> = MOUNT_POINTS.iter().map(|d| work.join(d)).collect();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| points.contains(p))
        .collect()
}

/// `/tmp` exists and is world-writable and sticky, as apps expect; made in
/// the upper layer (never through a symlink of the image) when the image
/// has none.
fn ensure_tmp(root: &Path, map: IdMap) -> Result<(), RootfsError> {
    let dir = open_root(root)?;
    match nix::sys::stat::mkdirat(
        dir.as_fd(),
        "tmp",
        nix::sys::stat::Mode::from_bits_truncate(0o1777),
    ) {
        Ok(()) => {
            let tmp = nix::fcntl::openat(
                dir.as_fd(),
                "tmp",
                nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_NOFOLLOW
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| RootfsError::Io {
                what: "opening /tmp".into(),
                source: e.into(),
            })?;
            nix::sys::stat::fchmod(&tmp, nix::sys::stat::Mode::from_bits_truncate(0o1777))
                .and_then(|()| {
                    nix::unistd::fchown(
                        &tmp,
                        Some(nix::unistd::Uid::from_raw(map.host_base)),
                        Some(nix::unistd::Gid::from_raw(map.host_base)),
                    )
                })
                .map_err(|e| RootfsError::Io {
                    what: "setting up /tmp".into(),
                    source: e.into(),
                })
        }
        Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(RootfsError::Io {
            what: "creating /tmp".into(),
            source: e.into(),
        }),
    }
}

fn open_root(root: &Path) -> Result<OwnedFd, RootfsError> {
    nix::fcntl::open(
        root,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| RootfsError::Io {
        what: format!("opening {}", root.display()),
        source: e.into(),
    })
}

/// Reads a file of the image with every path resolved inside `root`
/// (`RESOLVE_IN_ROOT`: an absolute symlink or `..` never leaves it).
fn read_in_root(root: &Path, path: &str) -> Result<Option<String>, RootfsError> {
    let dir = open_root(root)?;
    let how = nix::fcntl::OpenHow::new()
        .flags(nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC)
        .resolve(
            nix::fcntl::ResolveFlag::RESOLVE_IN_ROOT
                | nix::fcntl::ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let fd = match nix::fcntl::openat2(dir.as_fd(), path, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => {
            return Err(RootfsError::Io {
                what: format!("opening the image's {path}"),
                source: e.into(),
            });
        }
    };
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_ID_FILE)
        .read_to_string(&mut text)
        .map_err(io(format!("reading the image's {path}")))?;
    Ok(Some(text))
}

/// Third and fourth field of the first line of a passwd/group file whose
/// field `key_field` is `key`.
fn lookup(file: Option<&str>, key_field: usize, key: &str) -> Option<(u32, Option<u32>)> {
    file?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.get(key_field) != Some(&key) {
            return None;
        }
        Some((
            f.get(2)?.parse().ok()?,
            f.get(3).and_then(|g| g.parse().ok()),
        ))
    })
}

/// The image's `USER` (`""`, `name`, `uid`, `name:group` or `uid:gid`)
/// resolved in its own `/etc/passwd` and `/etc/group`: (uid, gid) in the
/// container. A user without a group gets its passwd group, else its uid.
pub fn resolve_user(root: &Path, user: &str) -> Result<(u32, u32), RootfsError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let passwd = read_in_root(root, "/etc/passwd")?;
    let uid = match u.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => {
            lookup(passwd.as_deref(), 0, u)
                .ok_or_else(|| RootfsError::NoUser(u.to_string()))?
                .0
        }
    };
    let gid = match g.filter(|g| !g.is_empty()) {
        None => lookup(passwd.as_deref(), 2, &uid.to_string())
            .and_then(|(_, gid)| gid)
            .unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group = read_in_root(root, "/etc/group")?;
                lookup(group.as_deref(), 0, g)
                    .ok_or_else(|| RootfsError::NoGroup(g.to_string()))?
                    .0
            }
        },
    };
    Ok((uid, gid))
}

// The new mount API (linux/mount.h); not in libc for this target.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cpath(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// `open_tree(src, CLONE)` + `mount_setattr(IDMAP, userns)` + `move_mount`
/// onto `dst`: `dst` shows `src` with its ids shifted by the namespace's
/// mapping, read-only, nodev, nosuid.
fn idmapped_clone(src: &Path, dst: &Path, userns: BorrowedFd<'_>) -> std::io::Result<()> {
    let (src, dst) = (cpath(src)?, cpath(dst)?);
    // SAFETY: plain syscalls on valid NUL-terminated paths and a live fd;
    // the returned fd is owned at once.
    let tree = unsafe {
        let fd = libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd as i32)
    };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: `attr` lives across the call and its size is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A user namespace with `map` for uids and gids, as an fd: a forked child
/// unshares one and waits; the parent (root in the initial namespace)
/// writes its maps, opens `/proc/<child>/ns/user`, and lets it exit.
fn userns_with(map: IdMap) -> Result<OwnedFd, RootfsError> {
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| RootfsError::Io {
            what: "pipe".into(),
            source: e.into(),
        })
    };
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    // SAFETY: the child makes only async-signal-safe calls (unshare, write,
    // read, _exit) and never returns into Rust code.
    let child = match unsafe { nix::unistd::fork() } {
        Err(e) => {
            return Err(RootfsError::Io {
                what: "fork for a user namespace".into(),
                source: e.into(),
            });
        }
        Ok(nix::unistd::ForkResult::Child) => unsafe {
            // Our copy of the write end would keep the read below from ever
            // seeing the parent close its own.
            libc::close(go_w.as_raw_fd());
            let ok: u8 = (libc::unshare(libc::CLONE_NEWUSER) == 0).into();
            libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
            let mut b = 0u8;
            libc::read(go_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        },
        Ok(nix::unistd::ForkResult::Parent { child }) => child,
    };
    drop(ready_w);
    drop(go_r);
    let result = (|| {
        let mut ok = [0u8];
        std::fs::File::from(ready_r)
            .read_exact(&mut ok)
            .map_err(io("waiting for the user namespace child"))?;
        if ok[0] != 1 {
            return Err(RootfsError::Io {
                what: "unshare(CLONE_NEWUSER)".into(),
                source: std::io::Error::other("refused"),
            });
        }
        let line = format!("0 {} {}\n", map.host_base, map.size);
        for f in ["uid_map", "gid_map"] {
            let p = format!("/proc/{child}/{f}");
            std::fs::write(&p, &line).map_err(io(format!("writing {p}")))?;
        }
        let p = format!("/proc/{child}/ns/user");
        std::fs::File::open(&p)
            .map(OwnedFd::from)
            .map_err(io(format!("opening {p}")))
    })();
    drop(go_w);
    let _ = nix::sys::wait::waitpid(child, None);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_disjoint_ranges_above_the_host_users() {
        assert_eq!(IdMap::for_slot(1).host_base, 65536);
        assert_eq!(IdMap::for_slot(2).host_base, 131072);
        let last = IdMap::for_slot(u16::MAX);
        assert_eq!(
            u64::from(last.host_base) + u64::from(last.size),
            u64::from(u32::MAX)
        );
        assert_eq!(IdMap::for_slot(0), IdMap::for_slot(1));
    }

    #[test]
    fn users_resolve_in_the_image_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(root, "").unwrap(), (0, 0));
        assert_eq!(resolve_user(root, "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root, "1000").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(root, "2000").unwrap(), (2000, 2000));
        assert_eq!(resolve_user(root, "app:staff").unwrap(), (1000, 50));
        assert_eq!(resolve_user(root, "7:8").unwrap(), (7, 8));
        assert!(
            matches!(resolve_user(root, "nobody"), Err(RootfsError::NoUser(u)) if u == "nobody")
        );
        assert!(
            matches!(resolve_user(root, "app:wheel"), Err(RootfsError::NoGroup(g)) if g == "wheel")
        );
        // A passwd that is a symlink out of the root is resolved inside it.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        for target in [
            outside.path().join("passwd"),
            PathBuf::from("../../../../../..")
                .join(outside.path().strip_prefix("/").unwrap())
                .join("passwd"),
        ] {
            std::fs::remove_file(root.join("etc/passwd")).unwrap();
            std::os::unix::fs::symlink(&target, root.join("etc/passwd")).unwrap();
            assert!(
                matches!(resolve_user(root, "evil"), Err(RootfsError::NoUser(_))),
                "{target:?} was followed out of the root"
            );
        }
    }
}
