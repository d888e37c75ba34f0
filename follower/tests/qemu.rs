//! The qemu runtime end to end: a real microVM (KVM if it works here, else
//! TCG) boots Debian's cloud kernel, our static zw-init and an ext4 rootfs
//! made in the test holding only busybox; `busybox httpd` answers the
//! health check from the host over the instance's tap device. Then the app
//! is made to exit and the VM must power off with the app's exit status.
//!
//! Also prints the boot-to-healthy benchmark: the driver against the same
//! QEMU command line started by hand (`{"bench":"qemu_boot_to_healthy",...}`).
//!
//! Needs root, qemu-system-x86, busybox-static, e2fsprogs, cpio, rustc and
//! apt access for the kernel package (scripts/test.sh installs the rest).

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use follower::health::Probe;
use follower::net::{INSTANCE_PREFIX_LEN, InstanceNetNames, InstanceRange, gateway_of};
use follower::runtime::qemu::{self, AccelChoice, QemuConfig, QemuRuntime};
use follower::runtime::{InstanceSpec, Liveness, Runtime, pid_is};

const PORT: u16 = 8080;
const HEALTHY_WITHIN: Duration = Duration::from_secs(45);
/// A value the log must never show.
const SECRET: &str = "zw-test-secret-5b1f0c";

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills a VM and removes its tap when the test ends, however it ends.
struct VmGuard {
    pid: Option<(u32, u64)>,
    child: Option<std::process::Child>,
    tap: String,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((pid, ticks)) = self.pid
            && pid_is(pid, ticks)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("ip").args(["link", "del", &self.tap]).output();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &test_table()])
            .output();
    }
}

async fn wait_healthy(addr: SocketAddr, log: &Path) -> Duration {
    let probe = Probe::Http {
        path: "/index.html".into(),
        timeout: Duration::from_secs(1),
    };
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < HEALTHY_WITHIN {
        match probe.check(addr).await {
            Ok(()) => return start.elapsed(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{addr} not healthy within {HEALTHY_WITHIN:?} ({last}); console log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn build_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootdir");
    for d in ["bin", "www/cgi-bin", "tmp", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static at /bin/busybox");
    std::fs::write(
        root.join("www/index.html"),
        "hello from a zeitwork microVM\n",
    )
    .unwrap();
    // GET /cgi-bin/stop makes the app exit: it SIGTERMs the main httpd,
    // the leader of the session zw-init started the app in.
    let stop = root.join("www/cgi-bin/stop");
    std::fs::write(
        &stop,
        "#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\necho stopping\n\
         echo \"cgi runs as uid $(/bin/busybox id -u)\" >&2\n\
         /bin/busybox kill -TERM \"$(/bin/busybox cut -d' ' -f6 /proc/self/stat)\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&stop, std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = dir.join("image");
    std::fs::create_dir_all(&image).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&root)
        .arg(image.join("rootfs.ext4"))
        .arg("32M"));
    image
}

/// Issue 14 item 6: the VMM is jailed. It runs as an unprivileged uid with
/// no capabilities, no_new_privs and QEMU's seccomp filter, and its root is
/// a jail holding only what it needs: none of the host's files (its
/// /etc/shadow, /root, /home, the follower's data) is there to read.
fn assert_jailed(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_string()
    };
    let uids: Vec<u32> = field("Uid:")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|&u| u >= 65536), "QEMU runs as {uids:?}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "QEMU's -sandbox filter is not on");
    assert_eq!(field("Groups:"), "");
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut entries: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let allowed = [
        "bin",
        "console.log",
        "dev",
        "etc",
        "initrd",
        "kernel",
        "lib",
        "lib64",
        "rootfs.ext4",
        "run-vm",
        "sbin",
        "usr",
    ];
    assert!(
        entries.iter().all(|e| allowed.contains(&e.as_str())),
        "the jail holds {entries:?}"
    );
    for host_file in [
        "etc/shadow",
        "etc/passwd",
        "root",
        "home",
        "var",
        "tmp",
        "proc",
    ] {
        assert!(
            !root.join(host_file).exists(),
            "{host_file} is visible to QEMU"
        );
    }
    let etc: Vec<_> = std::fs::read_dir(root.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(etc, vec![std::ffi::OsString::from("ld.so.cache")]);
}

/// The nftables table of this test's node (removed by the guards).
fn test_table() -> String {
    format!("zeitwork_qemu{}", std::process::id())
}

fn spec(id: &str, image: &Path, ip: Ipv6Addr, work: PathBuf) -> InstanceSpec {
    InstanceSpec {
        instance_id: id.into(),
        env: "test".into(),
        app: "web".into(),
        image_dir: image.to_path_buf(),
        argv: ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
            .map(String::from)
            .to_vec(),
        env_vars: BTreeMap::from([
            ("PORT".into(), PORT.to_string()),
            ("API_TOKEN".into(), SECRET.into()),
        ]),
        workdir: "/".into(),
        user: "65534:65534".into(),
        ip,
        port: PORT,
        vcpus: 1,
        memory_mb: 256,
        work_dir: work,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_microvm_boots_busybox_httpd_and_answers_health_checks() {
    if let Err(why) = qemu::probe() {
        eprintln!("SKIPPED qemu boot test: {why}");
        return;
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cache = std::env::var_os("ZW_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/zeitwork")
        })
        .join("qemu-guest");
    let tmp = tempfile::tempdir().unwrap();

    // The guest: static zw-init (plain rustc, seconds), cached kernel.
    let zw_init = tmp.path().join("zw-init");
    run(Command::new("bash")
        .arg(manifest.join("../scripts/build-guest-init.sh"))
        .arg(manifest.join("src/bin/zw-init.rs"))
        .arg(&zw_init));
    let guest = qemu::prepare_guest(&cache, &zw_init)
        .await
        .expect("guest kernel and initramfs");
    let image = build_rootfs(tmp.path());

    let accel_choice = match std::env::var("ZW_QEMU_ACCEL").as_deref() {
        Ok("kvm") => AccelChoice::Kvm,
        Ok("tcg") => AccelChoice::Tcg,
        _ => AccelChoice::Auto,
    };
    let runtime = QemuRuntime::new(
        QemuConfig {
            guest,
            accel: accel_choice,
            qemu: qemu::QEMU_BINARY.into(),
            scripts_dir: tmp.path().join("scripts"),
            net: follower::net::NetPolicy {
                table: test_table(),
                ..Default::default()
            },
        },
        Arc::new(tokio::sync::Notify::new()),
    )
    .expect("qemu runtime");
    // The KVM boot check runs once per process; keep it out of the timing.
    let probe_start = Instant::now();
    let accel = runtime.accelerator().await;
    eprintln!(
        "accelerator: {} (decided in {:?}; KVM boot check: {:?})",
        accel.as_str(),
        probe_start.elapsed(),
        qemu::kvm_verdict()
    );

    let range = InstanceRange::parse("fd00:7a77:ffff:51::").unwrap();
    let id = format!("qemu-test-{}", std::process::id());
    let spec1 = spec(
        &id,
        &image,
        range.instance_addr(1),
        tmp.path().join("instance"),
    );
    let tap = InstanceNetNames::for_instance(&id).host_if;
    let mut guard = VmGuard {
        pid: None,
        child: None,
        tap: tap.clone(),
    };
    let log = spec1.work_dir.join("stdout.log");

    let t0 = Instant::now();
    let handle = runtime.start(&spec1).await.expect("start");
    guard.pid = Some((handle.pid, handle.pid_start_ticks));
    let addr = SocketAddr::from((spec1.ip, PORT));
    wait_healthy(addr, &log).await;
    let ours = t0.elapsed();
    eprintln!(
        "qemu driver ({}): boot to healthy in {:?}",
        accel.as_str(),
        ours
    );
    assert_eq!(runtime.liveness(&handle), Liveness::Running);
    assert_eq!(
        handle.extra.get("accel").map(String::as_str),
        Some(accel.as_str())
    );
    assert_jailed(handle.pid);

    // The app exits -> zw-init reaps it and powers off -> QEMU exits; the
    // app's status (SIGTERM: 128 + 15) is in the log and in liveness.
    // (Asked again while it runs: an emulated guest on a busy host may be
    // slower than one request's timeout.)
    let stop_app = Probe::Http {
        path: "/cgi-bin/stop".into(),
        timeout: Duration::from_secs(10),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while runtime.liveness(&handle) == Liveness::Running && Instant::now() < deadline {
        let _ = stop_app.check(addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let console = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        runtime.liveness(&handle),
        Liveness::Exited(Some(143)),
        "console log:\n{console}"
    );
    assert!(
        console.contains("cgi runs as uid 65534"),
        "the app does not run as its user:\n{console}"
    );
    assert!(
        console.contains("zw-init: app killed by signal 15"),
        "console log:\n{console}"
    );
    assert!(
        console.contains(&format!("zw-init: eth0 {}/{INSTANCE_PREFIX_LEN}", spec1.ip)),
        "{console}"
    );
    assert!(
        !console.contains(SECRET),
        "a secret value reached the console log"
    );
    runtime.stop(&handle).await.expect("stop");
    runtime.stop(&handle).await.expect("stop is idempotent");
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "tap {tap} left behind"
    );
    drop(guard);

    // Second round, reference first this time (the machine is noisy): the
    // figures reported are the best of each side.
    let reference1 = boot_by_hand(
        &runtime,
        accel,
        &image,
        range.instance_addr(2),
        tmp.path(),
        1,
    )
    .await;
    let reference2 = boot_by_hand(
        &runtime,
        accel,
        &image,
        range.instance_addr(3),
        tmp.path(),
        2,
    )
    .await;
    let id2 = format!("qemu-test2-{}", std::process::id());
    let spec2 = spec(
        &id2,
        &image,
        range.instance_addr(4),
        tmp.path().join("instance2"),
    );
    let mut guard2 = VmGuard {
        pid: None,
        child: None,
        tap: InstanceNetNames::for_instance(&id2).host_if,
    };
    let t2 = Instant::now();
    let handle2 = runtime.start(&spec2).await.expect("start");
    let start_call = t2.elapsed();
    guard2.pid = Some((handle2.pid, handle2.pid_start_ticks));
    wait_healthy(
        SocketAddr::from((spec2.ip, PORT)),
        &spec2.work_dir.join("stdout.log"),
    )
    .await;
    let ours2 = t2.elapsed();
    // A graceful stop: zw-init SIGTERMs the app, reaps it, powers off.
    let stopping = Instant::now();
    runtime.stop(&handle2).await.expect("stop");
    let console2 = std::fs::read_to_string(spec2.work_dir.join("stdout.log")).unwrap();
    assert_eq!(
        runtime.liveness(&handle2),
        Liveness::Exited(Some(143)),
        "{console2}"
    );
    assert!(
        console2.contains("zw-init: stop requested: SIGTERM to the app"),
        "{console2}"
    );
    eprintln!("graceful stop took {:?}", stopping.elapsed());
    drop(guard2);

    let best = |a: Duration, b: Duration| a.min(b).as_secs_f64();
    let (o, r) = (best(ours, ours2), best(reference1, reference2));
    eprintln!(
        "boot to healthy ({}): driver {ours:?} {ours2:?} (start() took {start_call:?}), \
         by hand {reference1:?} {reference2:?}",
        accel.as_str()
    );
    println!(
        "{{\"bench\":\"qemu_boot_to_healthy\",\"accel\":\"{}\",\"ours\":{o:.3},\"reference\":{r:.3},\"ratio\":{:.3}}}",
        accel.as_str(),
        o / r
    );
}

/// The reference: the driver's QEMU command line started by hand, with the
/// same kernel, initramfs (written to a file here) and rootfs, the tap made
/// with `ip`. Returns spawn-to-healthy.
async fn boot_by_hand(
    runtime: &QemuRuntime,
    accel: qemu::Accel,
    image: &Path,
    ip: Ipv6Addr,
    tmp: &Path,
    n: u32,
) -> Duration {
    let ref_id = format!("qemu-ref{n}-{}", std::process::id());
    let spec = spec(&ref_id, image, ip, tmp.join(format!("reference{n}")));
    std::fs::create_dir_all(qemu::vm_dir(&spec.work_dir)).unwrap();
    let initrd = spec.work_dir.join("initrd");
    {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::from(runtime.initrd_memfd(&spec).unwrap());
        f.rewind().unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        std::fs::write(&initrd, bytes).unwrap();
    }
    let tap = InstanceNetNames::for_instance(&ref_id).host_if;
    let args = runtime.command_line(&spec, accel, &tap, initrd.to_str().unwrap());
    let mut guard = VmGuard {
        pid: None,
        child: None,
        tap: tap.clone(),
    };
    let t = Instant::now();
    run(Command::new("ip").args(["tuntap", "add", "dev", &tap, "mode", "tap"]));
    run(Command::new("ip")
        .args(["-6", "addr", "add"])
        .arg(format!("{}/{INSTANCE_PREFIX_LEN}", gateway_of(spec.ip)))
        .args(["dev", &tap, "nodad"]));
    run(Command::new("ip").args(["link", "set", &tap, "up"]));
    guard.child = Some(
        Command::new(qemu::QEMU_BINARY)
            .args(&args)
            .spawn()
            .expect("qemu by hand"),
    );
    wait_healthy(
        SocketAddr::from((spec.ip, PORT)),
        &spec.work_dir.join("stdout.log"),
    )
    .await;
    let took = t.elapsed();
    drop(guard);
    took
}
