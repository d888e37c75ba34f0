//! zw-init: PID 1 of a zeitwork microVM (qemu runtime).
//!
//! It is the initramfs's `/init`, built static (see
//! `scripts/build-guest-init.sh`) from std and the C library only, so it
//! needs nothing from the app's image. In order, it:
//!
//! 1. mounts devtmpfs, proc and sysfs and points its stdio at the console
//!    (the serial port the VMM writes to the instance's `stdout.log`);
//! 2. loads the kernel modules listed in `/lib/modules/load.order`;
//! 3. reads the instance config `/zw/config.json` (argv, env, workdir,
//!    user, hostname), appended to the initramfs by the follower in memory;
//!    its values (secrets among them) are never printed;
//! 4. configures `eth0` from the kernel command line (`zw.ip=ADDR/PLEN
//!    zw.gw=GATEWAY`) with ioctls, DAD off so the address is usable at once;
//! 5. mounts the app's ext4 rootfs from `/dev/vda`, moves /dev /proc /sys
//!    into it, adds a tmpfs on /tmp and makes it the root (`MS_MOVE` +
//!    chroot, as switch_root does);
//! 6. runs the app with its stdout/stderr on the console, reaps every
//!    zombie, and when the app exits prints `zw-init: app exited with
//!    status N` and powers the VM off.
//!
//! `zw.probe` on the command line makes it print `zw-init: probe ok` and
//! power off at once: the follower boots that to find out whether KVM works.
//! Any failure is printed as `zw-init: error: ...` and powers off too.

use std::collections::BTreeMap;
use std::ffi::{CString, c_char, c_int, c_long, c_uint, c_ulong, c_void};
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv6Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG_PATH: &str = "/zw/config.json";
const MODULES_DIR: &str = "/lib/modules";
const NEWROOT: &str = "/newroot";
const ROOT_DEVICE: &str = "/dev/vda";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// The C library, declared by hand: x86_64 Linux glibc ABI.
mod sys {
    use super::*;

    pub const MS_RDONLY: c_ulong = 1;
    pub const MS_NOSUID: c_ulong = 2;
    pub const MS_NODEV: c_ulong = 4;
    pub const MS_NOEXEC: c_ulong = 8;
    pub const MS_MOVE: c_ulong = 8192;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const EROFS: i32 = 30;
    pub const EACCES: i32 = 13;
    pub const ECHILD: i32 = 10;
    pub const EINTR: i32 = 4;
    pub const SYS_FINIT_MODULE: c_long = 313;
    pub const RB_POWER_OFF: c_int = 0x4321_fedc_u32 as c_int;
    pub const RB_AUTOBOOT: c_int = 0x0123_4567;
    pub const SIGTERM: c_int = 15;
    pub const SIGKILL: c_int = 9;
    pub const WNOHANG: c_int = 1;
    pub const SIOCGIFFLAGS: c_ulong = 0x8913;
    pub const SIOCSIFFLAGS: c_ulong = 0x8914;
    pub const SIOCSIFADDR: c_ulong = 0x8916;
    pub const SIOCGIFINDEX: c_ulong = 0x8933;
    pub const SIOCADDRT: c_ulong = 0x890B;
    pub const IFF_UP: i16 = 1;
    pub const RTF_UP: c_uint = 0x1;
    pub const RTF_GATEWAY: c_uint = 0x2;
    pub const ONLCR: c_uint = 0o4;
    pub const ECHO: c_uint = 0o10;
    pub const TCSANOW: c_int = 0;

    #[repr(C)]
    pub struct Ifreq {
        pub name: [u8; 16],
        /// The union: flags (short) or ifindex (int) at its start.
        pub data: [u8; 24],
    }

    #[repr(C)]
    pub struct In6Ifreq {
        pub addr: [u8; 16],
        pub prefixlen: u32,
        pub ifindex: c_int,
    }

    #[repr(C)]
    pub struct In6Rtmsg {
        pub dst: [u8; 16],
        pub src: [u8; 16],
        pub gateway: [u8; 16],
        pub rtype: u32,
        pub dst_len: u16,
        pub src_len: u16,
        pub metric: u32,
        pub info: c_ulong,
        pub flags: u32,
        pub ifindex: c_int,
    }

    #[repr(C)]
    pub struct Termios {
        pub c_iflag: c_uint,
        pub c_oflag: c_uint,
        pub c_cflag: c_uint,
        pub c_lflag: c_uint,
        pub c_line: u8,
        pub c_cc: [u8; 32],
        pub c_ispeed: c_uint,
        pub c_ospeed: c_uint,
    }

    unsafe extern "C" {
        pub fn mount(
            src: *const c_char,
            target: *const c_char,
            fstype: *const c_char,
            flags: c_ulong,
            data: *const c_void,
        ) -> c_int;
        pub fn chroot(path: *const c_char) -> c_int;
        pub fn reboot(cmd: c_int) -> c_int;
        pub fn sync();
        pub fn syscall(num: c_long, ...) -> c_long;
        pub fn ioctl(fd: c_int, req: c_ulong, ...) -> c_int;
        pub fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
        pub fn kill(pid: c_int, sig: c_int) -> c_int;
        pub fn setsid() -> c_int;
        pub fn dup2(old: c_int, new: c_int) -> c_int;
        pub fn sethostname(name: *const c_char, len: usize) -> c_int;
        pub fn tcgetattr(fd: c_int, t: *mut Termios) -> c_int;
        pub fn tcsetattr(fd: c_int, act: c_int, t: *const Termios) -> c_int;
    }
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("zw-init: this is the init of a zeitwork microVM; it only runs as PID 1");
        std::process::exit(2);
    }
    let code = match run() {
        Ok(status) => status,
        Err(e) => {
            say(&format!("error: {e}"));
            125
        }
    };
    power_off(code);
}

/// Everything up to the app's exit; returns the code to report.
fn run() -> Result<i32, String> {
    early_mounts()?;
    console_stdio();
    let cmdline =
        fs::read_to_string("/proc/cmdline").map_err(|e| format!("reading /proc/cmdline: {e}"))?;
    let args = KernelArgs::parse(&cmdline)?;
    if args.probe {
        say("probe ok");
        return Ok(0);
    }
    let started = Instant::now();
    load_modules()?;
    let config = Config::parse(
        &fs::read_to_string(CONFIG_PATH).map_err(|e| format!("reading {CONFIG_PATH}: {e}"))?,
    )?;
    if !config.hostname.is_empty() {
        let name = config.hostname.as_bytes();
        // SAFETY: pointer and length of a live byte slice.
        if unsafe { sys::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
            return Err(format!("sethostname: {}", io::Error::last_os_error()));
        }
    }
    if let Some((ip, plen, gw)) = args.net {
        configure_network(ip, plen, gw)?;
    }
    switch_root()?;
    say(&format!(
        "starting app after {} ms ({} env vars, workdir {}, user {})",
        started.elapsed().as_millis(),
        config.env.len(),
        config.workdir,
        if config.user.is_empty() {
            "root"
        } else {
            &config.user
        }
    ));
    run_app(&config)
}

fn say(msg: &str) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "zw-init: {msg}");
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"))
}

fn mount(src: &str, target: &str, fstype: &str, flags: c_ulong, data: &str) -> io::Result<()> {
    let (src, target, fstype, data) = (
        CString::new(src)?,
        CString::new(target)?,
        CString::new(fstype)?,
        CString::new(data)?,
    );
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        sys::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn early_mounts() -> Result<(), String> {
    for (fs_type, dir, flags) in [
        ("devtmpfs", "/dev", sys::MS_NOSUID),
        (
            "proc",
            "/proc",
            sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC,
        ),
    ] {
        let _ = fs::create_dir_all(dir);
        match mount(fs_type, dir, fs_type, flags, "") {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(sys::EBUSY) => {}
            Err(e) => return Err(format!("mounting {fs_type} on {dir}: {e}")),
        }
    }
    Ok(())
}

/// Points fds 0-2 at the console (the kernel may have found no
/// /dev/console in the initramfs) and turns off the tty's "\n" -> "\r\n"
/// translation so the log holds the app's bytes as they were written.
fn console_stdio() {
    let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    let fd = console.as_raw_fd();
    for target in 0..3 {
        // SAFETY: dup2 on an open fd.
        unsafe { sys::dup2(fd, target) };
    }
    // SAFETY: Termios is the C struct; zeroed is a valid start for tcgetattr.
    unsafe {
        let mut t: sys::Termios = std::mem::zeroed();
        if sys::tcgetattr(1, &mut t) == 0 {
            t.c_oflag &= !sys::ONLCR;
            // Input is the follower's stop request, not for the log.
            t.c_lflag &= !sys::ECHO;
            sys::tcsetattr(1, sys::TCSANOW, &t);
        }
    }
}

/// What the follower put on the kernel command line for us.
#[derive(Debug, PartialEq)]
struct KernelArgs {
    probe: bool,
    net: Option<(Ipv6Addr, u8, Ipv6Addr)>,
}

impl KernelArgs {
    fn parse(cmdline: &str) -> Result<Self, String> {
        let mut probe = false;
        let (mut ip, mut gw) = (None, None);
        for word in cmdline.split_ascii_whitespace() {
            match word.split_once('=') {
                None if word == "zw.probe" => probe = true,
                Some(("zw.ip", v)) => {
                    let (addr, plen) = v.split_once('/').unwrap_or((v, "128"));
                    let addr: Ipv6Addr = addr.parse().map_err(|_| format!("bad zw.ip {v:?}"))?;
                    let plen: u8 = plen
                        .parse()
                        .ok()
                        .filter(|p| *p <= 128)
                        .ok_or_else(|| format!("bad prefix length in zw.ip {v:?}"))?;
                    ip = Some((addr, plen));
                }
                Some(("zw.gw", v)) => gw = Some(v.parse().map_err(|_| format!("bad zw.gw {v:?}"))?),
                _ => {}
            }
        }
        let net = match (ip, gw) {
            (Some((ip, plen)), Some(gw)) => Some((ip, plen, gw)),
            (None, None) => None,
            _ => return Err("zw.ip and zw.gw go together".into()),
        };
        Ok(KernelArgs { probe, net })
    }
}

fn load_modules() -> Result<(), String> {
    let list = Path::new(MODULES_DIR).join("load.order");
    let Ok(order) = fs::read_to_string(&list) else {
        return Ok(()); // a kernel with the drivers built in
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULES_DIR).join(name);
        let file = fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let params = c"";
        // SAFETY: finit_module(fd, params, flags) with an open fd and a C string.
        let rc = unsafe {
            sys::syscall(
                sys::SYS_FINIT_MODULE,
                file.as_raw_fd() as c_long,
                params.as_ptr(),
                0 as c_long,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(sys::EEXIST) {
                return Err(format!("loading module {name}: {e}"));
            }
        }
        // The initramfs stays in memory until we leave it: free what we can.
        let _ = fs::remove_file(&path);
    }
    Ok(())
}

/// Waits (bounded) for a device or interface that a module's probe creates.
fn wait_for(path: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !Path::new(path).exists() {
        if Instant::now() >= deadline {
            return Err(format!(
                "{path} did not appear within {} ms",
                limit.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn ioctl<T>(fd: c_int, req: c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: `arg` is the C struct this request expects (see sys).
    if unsafe { sys::ioctl(fd, req, arg as *mut T) } < 0 {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn ifreq(name: &str) -> sys::Ifreq {
    let mut r = sys::Ifreq {
        name: [0; 16],
        data: [0; 24],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    r
}

fn if_index(fd: c_int, name: &str) -> Result<c_int, String> {
    let mut r = ifreq(name);
    ioctl(fd, sys::SIOCGIFINDEX, &mut r, &format!("index of {name}"))?;
    Ok(c_int::from_ne_bytes([
        r.data[0], r.data[1], r.data[2], r.data[3],
    ]))
}

fn link_up(fd: c_int, name: &str) -> Result<(), String> {
    let mut r = ifreq(name);
    ioctl(fd, sys::SIOCGIFFLAGS, &mut r, &format!("flags of {name}"))?;
    let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | sys::IFF_UP;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(fd, sys::SIOCSIFFLAGS, &mut r, &format!("setting {name} up"))
}

fn configure_network(ip: Ipv6Addr, plen: u8, gw: Ipv6Addr) -> Result<(), String> {
    wait_for("/sys/class/net/eth0", Duration::from_secs(5))?;
    // No duplicate address detection: the follower owns this address, and
    // DAD would keep it unusable ("tentative") for a second or more.
    // And an unsolicited neighbour advertisement when eth0 comes up (the
    // address is added before), so a host already knocking (health checks)
    // learns our MAC at once instead of after its next 1 s NDP retry.
    for (conf, value) in [
        ("/proc/sys/net/ipv6/conf/default/accept_dad", "0"),
        ("/proc/sys/net/ipv6/conf/eth0/accept_dad", "0"),
        ("/proc/sys/net/ipv6/conf/eth0/ndisc_notify", "1"),
    ] {
        fs::write(conf, value).map_err(|e| format!("writing {conf}: {e}"))?;
    }
    let sock =
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).map_err(|e| format!("AF_INET6 socket: {e}"))?;
    let fd = sock.as_raw_fd();
    link_up(fd, "lo")?;
    let ifindex = if_index(fd, "eth0")?;
    let mut addr = sys::In6Ifreq {
        addr: ip.octets(),
        prefixlen: u32::from(plen),
        ifindex,
    };
    ioctl(
        fd,
        sys::SIOCSIFADDR,
        &mut addr,
        &format!("adding {ip}/{plen} to eth0"),
    )?;
    link_up(fd, "eth0")?;
    let mut route = sys::In6Rtmsg {
        dst: [0; 16],
        src: [0; 16],
        gateway: gw.octets(),
        rtype: 0,
        dst_len: 0,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: sys::RTF_UP | sys::RTF_GATEWAY,
        ifindex,
    };
    ioctl(
        fd,
        sys::SIOCADDRT,
        &mut route,
        &format!("default route via {gw}"),
    )?;
    say(&format!("eth0 {ip}/{plen} via {gw}"));
    Ok(())
}

fn switch_root() -> Result<(), String> {
    wait_for(ROOT_DEVICE, Duration::from_secs(5))?;
    let _ = fs::create_dir_all(NEWROOT);
    // The VMM gives a writable copy-on-write view of the image (QEMU's
    // snapshot=on); an image attached read-only still boots, read-only.
    if let Err(e) = mount(ROOT_DEVICE, NEWROOT, "ext4", 0, "") {
        if !matches!(e.raw_os_error(), Some(sys::EROFS | sys::EACCES)) {
            return Err(format!("mounting {ROOT_DEVICE} on {NEWROOT}: {e}"));
        }
        mount(ROOT_DEVICE, NEWROOT, "ext4", sys::MS_RDONLY, "")
            .map_err(|e| format!("mounting {ROOT_DEVICE} read-only on {NEWROOT}: {e}"))?;
    }
    for dir in ["dev", "proc", "sys"] {
        let target = format!("{NEWROOT}/{dir}");
        let _ = fs::create_dir_all(&target);
        mount(&format!("/{dir}"), &target, "", sys::MS_MOVE, "")
            .map_err(|e| format!("moving /{dir} into the app's rootfs: {e}"))?;
    }
    let tmp = format!("{NEWROOT}/tmp");
    let _ = fs::create_dir_all(&tmp);
    if Path::new(&tmp).is_dir() {
        mount(
            "tmpfs",
            &tmp,
            "tmpfs",
            sys::MS_NOSUID | sys::MS_NODEV,
            "mode=1777",
        )
        .map_err(|e| format!("mounting tmpfs on /tmp: {e}"))?;
    }
    // What is left of the initramfs (the config, read already) goes.
    let _ = fs::remove_dir_all("/zw");
    let _ = fs::remove_dir_all(MODULES_DIR);
    let _ = fs::remove_file("/init");
    std::env::set_current_dir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
    mount(".", "/", "", sys::MS_MOVE, "")
        .map_err(|e| format!("moving the app's rootfs to /: {e}"))?;
    let dot = cstr(".")?;
    // SAFETY: chroot with a C string.
    if unsafe { sys::chroot(dot.as_ptr()) } != 0 {
        return Err(format!("chroot: {}", io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// `""`/`root`, `uid[:gid]`, or `name[:group]` looked up in the image.
fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<(u32, u32), String> {
    if user.is_empty() || user == "root" {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |table: &'static str, text: &str, name: &str| -> Result<Vec<u32>, String> {
        text.lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == name)
            .map(|f| {
                f[2..]
                    .iter()
                    .map_while(|x| x.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .filter(|ids| !ids.is_empty())
            .ok_or_else(|| format!("{name:?} is not in the image's {table}"))
    };
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => {
            let ids = lookup("/etc/passwd", passwd, u)?;
            (ids[0], ids.get(1).copied())
        }
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("/etc/group", group, g)?[0],
        },
        None => primary_gid.unwrap_or(uid),
    };
    Ok((uid, gid))
}

/// The follower stops an instance by writing `zw-stop` to the console
/// (the app's stdin is /dev/null, so only we read it): the first request
/// sends SIGTERM to the app, a second one SIGKILL. Power-off follows the
/// app's exit as always.
fn watch_stop_requests(app: c_int) {
    let spawned = std::thread::Builder::new()
        .name("stop-requests".into())
        .spawn(move || {
            let mut requests = 0;
            for line in io::stdin().lines() {
                let Ok(line) = line else { break };
                if line.trim() != "zw-stop" {
                    continue;
                }
                requests += 1;
                let (sig, name) = if requests == 1 {
                    (sys::SIGTERM, "SIGTERM")
                } else {
                    (sys::SIGKILL, "SIGKILL")
                };
                say(&format!("stop requested: {name} to the app"));
                // SAFETY: kill(2) on the app's pid, which we have not reaped yet
                // while the VM runs (reaping it powers the VM off).
                unsafe { sys::kill(app, sig) };
            }
        });
    if let Err(e) = spawned {
        say(&format!("cannot watch for stop requests: {e}"));
    }
}

fn run_app(config: &Config) -> Result<i32, String> {
    let Some(program) = config.argv.first() else {
        return Err("the config has an empty argv".into());
    };
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let (uid, gid) = resolve_user(&config.user, &passwd, &group)?;
    let mut cmd = Command::new(program);
    cmd.args(&config.argv[1..])
        .env_clear()
        .envs(&config.env)
        .stdin(Stdio::null());
    if !config.env.contains_key("PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if !config.workdir.is_empty() {
        cmd.current_dir(&config.workdir);
    }
    if uid != 0 || gid != 0 {
        cmd.uid(uid).gid(gid);
    }
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            sys::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {program:?}: {e}"))?;
    let app = child.id() as c_int;
    watch_stop_requests(app);
    // PID 1 reaps everything: the app, and orphans reparented to us.
    loop {
        let mut status: c_int = 0;
        // SAFETY: waitpid with a valid out pointer.
        let pid = unsafe { sys::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(sys::EINTR) => continue,
                Some(sys::ECHILD) => return Err("the app vanished without an exit status".into()),
                _ => return Err(format!("waitpid: {e}")),
            }
        }
        if pid == app {
            let code = if status & 0x7f == 0 {
                let code = (status >> 8) & 0xff;
                say(&format!("app exited with status {code}"));
                code
            } else {
                let sig = status & 0x7f;
                say(&format!("app killed by signal {sig}"));
                128 + sig
            };
            return Ok(code);
        }
    }
}

/// Stops what is left, flushes, powers off. Never returns.
fn power_off(code: i32) -> ! {
    // SAFETY: plain syscalls; PID 1 signalling every other process.
    unsafe {
        sys::kill(-1, sys::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out pointer.
        let pid = unsafe { sys::waitpid(-1, &mut status, sys::WNOHANG) };
        if pid < 0 || Instant::now() >= deadline {
            break;
        }
        if pid == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    say(&format!("powering off (exit code {code})"));
    let _ = io::stderr().flush();
    // SAFETY: as above; reboot(2) needs nothing but root.
    unsafe {
        sys::kill(-1, sys::SIGKILL);
        sys::sync();
        sys::reboot(sys::RB_POWER_OFF);
        // Power-off refused: a reboot ends the VM too (the VMM runs with
        // -no-reboot).
        sys::reboot(sys::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The instance config the follower writes (serde_json on its side).
#[derive(Debug, Default, PartialEq)]
struct Config {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    workdir: String,
    user: String,
    hostname: String,
}

impl Config {
    fn parse(text: &str) -> Result<Self, String> {
        let mut p = Json {
            s: text.as_bytes(),
            i: 0,
        };
        let value = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err("config.json: trailing bytes".into());
        }
        let JsonValue::Object(fields) = value else {
            return Err("config.json: not an object".into());
        };
        let mut c = Config::default();
        for (key, v) in fields {
            match (key.as_str(), v) {
                ("argv", JsonValue::Array(items)) => {
                    for item in items {
                        let JsonValue::String(s) = item else {
                            return Err("config.json: argv holds a non-string".into());
                        };
                        c.argv.push(s);
                    }
                }
                ("env", JsonValue::Object(vars)) => {
                    for (k, v) in vars {
                        let JsonValue::String(v) = v else {
                            return Err(format!("config.json: env {k} is not a string"));
                        };
                        c.env.insert(k, v);
                    }
                }
                ("workdir", JsonValue::String(s)) => c.workdir = s,
                ("user", JsonValue::String(s)) => c.user = s,
                ("hostname", JsonValue::String(s)) => c.hostname = s,
                (k, _) => return Err(format!("config.json: unexpected field {k:?} or type")),
            }
        }
        Ok(c)
    }
}

/// The JSON the config needs: objects, arrays, strings (numbers, booleans
/// and null are parsed and refused by `Config::parse`).
#[derive(Debug, PartialEq)]
enum JsonValue {
    Object(Vec<(String, JsonValue)>),
    Array(Vec<JsonValue>),
    String(String),
    Other,
}

struct Json<'a> {
    s: &'a [u8],
    i: usize,
}

impl Json<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("config.json: {what} at byte {}", self.i))
    }

    fn eat(&mut self, b: u8) -> bool {
        self.ws();
        let hit = self.s.get(self.i) == Some(&b);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn value(&mut self) -> Result<JsonValue, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                if self.eat(b'}') {
                    return Ok(JsonValue::Object(fields));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    if !self.eat(b':') {
                        return self.err("expected ':'");
                    }
                    fields.push((key, self.value()?));
                    if self.eat(b'}') {
                        return Ok(JsonValue::Object(fields));
                    }
                    if !self.eat(b',') {
                        return self.err("expected ',' or '}'");
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                if self.eat(b']') {
                    return Ok(JsonValue::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    if self.eat(b']') {
                        return Ok(JsonValue::Array(items));
                    }
                    if !self.eat(b',') {
                        return self.err("expected ',' or ']'");
                    }
                }
            }
            Some(b'"') => Ok(JsonValue::String(self.string()?)),
            Some(b't' | b'f' | b'n' | b'-' | b'0'..=b'9') => {
                while self.i < self.s.len()
                    && matches!(self.s[self.i], b'a'..=b'z' | b'0'..=b'9' | b'-' | b'+' | b'.' | b'E')
                {
                    self.i += 1;
                }
                Ok(JsonValue::Other)
            }
            _ => self.err("expected a value"),
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let Some(h) = self.s.get(self.i..self.i + 4) else {
            return self.err("short \\u escape");
        };
        let v = std::str::from_utf8(h)
            .ok()
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        self.i += 4;
        v.map_or_else(|| self.err("bad \\u escape"), Ok)
    }

    fn string(&mut self) -> Result<String, String> {
        if self.s.get(self.i) != Some(&b'"') {
            return self.err("expected a string");
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(&b) = self.s.get(self.i) else {
                return self.err("unterminated string");
            };
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return self.err("unterminated escape");
                    };
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xd800..0xdc00).contains(&hi) {
                                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return self.err("lone surrogate");
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return self.err("bad surrogate pair");
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            match char::from_u32(cp) {
                                Some(c) => c,
                                None => return self.err("bad code point"),
                            }
                        }
                        _ => return self.err("bad escape"),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(b),
            }
        }
        String::from_utf8(out).map_or_else(|_| self.err("string is not UTF-8"), Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_escapes_and_refuses_junk() {
        let c = Config::parse(
            r#"{"argv":["sh","-c","echo \"hi\"\n\u00e9\ud83d\ude00"],"env":{"A":"1","PATH":"/bin"},
               "workdir":"/srv","user":"app:staff","hostname":"i-1"}"#,
        )
        .unwrap();
        assert_eq!(c.argv, vec!["sh", "-c", "echo \"hi\"\n\u{e9}\u{1f600}"]);
        assert_eq!(c.env.get("PATH").map(String::as_str), Some("/bin"));
        assert_eq!(
            (c.workdir.as_str(), c.user.as_str(), c.hostname.as_str()),
            ("/srv", "app:staff", "i-1")
        );
        assert!(Config::parse(r#"{"argv":[1]}"#).is_err());
        assert!(Config::parse(r#"{"argv":["a"]} x"#).is_err());
        assert!(Config::parse(r#"{"argv":["a"}"#).is_err());
    }

    #[test]
    fn kernel_args_and_users() {
        let a =
            KernelArgs::parse("console=ttyS0 zw.ip=fd00::3:2/112 zw.gw=fd00::3:1 quiet").unwrap();
        assert_eq!(
            a.net,
            Some((
                "fd00::3:2".parse().unwrap(),
                112,
                "fd00::3:1".parse().unwrap()
            ))
        );
        assert!(!a.probe);
        assert!(KernelArgs::parse("zw.probe").unwrap().probe);
        assert!(KernelArgs::parse("zw.ip=fd00::2/112").is_err());
        assert!(KernelArgs::parse("zw.ip=fd00::2/129 zw.gw=fd00::1").is_err());

        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(resolve_user("", passwd, group), Ok((0, 0)));
        assert_eq!(resolve_user("app", passwd, group), Ok((1000, 1001)));
        assert_eq!(resolve_user("app:staff", passwd, group), Ok((1000, 50)));
        assert_eq!(resolve_user("65534:65534", "", ""), Ok((65534, 65534)));
        assert!(resolve_user("nobody", passwd, group).is_err());
    }
}
