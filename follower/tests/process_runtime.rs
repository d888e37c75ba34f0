//! The `process` runtime against the real kernel: namespaces, loop-mounted
//! ext4, veth + nftables isolation. Needs root.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use follower::runtime::process::ProcessRuntime;
use follower::runtime::{InstanceSpec, Liveness, Runtime, RuntimeError};

fn spec(
    id: &str,
    dir: &std::path::Path,
    image_dir: &std::path::Path,
    ip: std::net::Ipv6Addr,
    argv: &[&str],
) -> InstanceSpec {
    InstanceSpec {
        instance_id: id.into(),
        env: "test".into(),
        app: "web".into(),
        image_dir: image_dir.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env_vars: BTreeMap::from([
            ("PATH".into(), "/bin".into()),
            ("PORT".into(), "8080".into()),
        ]),
        workdir: "/www".into(),
        user: "nobody".into(),
        ip,
        port: 8080,
        vcpus: 1,
        memory_mb: 64,
        work_dir: dir.join("instances").join(id),
    }
}

const HTTPD: &[&str] = &["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"];

async fn wait_serving(addr: SocketAddr) -> (u16, String) {
    for _ in 0..200 {
        if let Ok(r) = common::http_get(addr, "/").await {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{addr} never answered");
}

/// From inside instance `from`'s network namespace (the host's busybox, so
/// the same network view as the app): can it open a TCP connection?
async fn can_connect_from_ns(netns: &str, to: SocketAddr) -> bool {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "busybox",
            "nc",
            "-w",
            "2",
            &to.ip().to_string(),
            &to.port().to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    out.status.success()
}

#[tokio::test]
async fn instances_are_isolated_from_each_other_but_reachable_from_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let digest = common::busybox_image(&store, &common::httpd_config(8080));
    let image_dir = common::image_dir(&store, &digest);
    let range = common::random_range();
    let rt = ProcessRuntime::new(&tmp.path().join("scripts"), Arc::default()).unwrap();

    let id_a = format!("a{}", ulid::Ulid::new());
    let id_b = format!("b{}", ulid::Ulid::new());
    let mut guard = common::ProcessInstances::default();
    guard.add(&id_a, &tmp.path().join("instances").join(&id_a));
    guard.add(&id_b, &tmp.path().join("instances").join(&id_b));
    let a = rt
        .start(&spec(
            &id_a,
            tmp.path(),
            &image_dir,
            range.instance_addr(1),
            HTTPD,
        ))
        .await
        .unwrap();
    let b = rt
        .start(&spec(
            &id_b,
            tmp.path(),
            &image_dir,
            range.instance_addr(2),
            HTTPD,
        ))
        .await
        .unwrap();
    let addr_a = SocketAddr::new(a.ip.into(), 8080);
    let addr_b = SocketAddr::new(b.ip.into(), 8080);

    // The node reaches both, and they serve the image's files.
    assert_eq!(
        wait_serving(addr_a).await,
        (200, "hello from zeitwork\n".into())
    );
    assert_eq!(
        wait_serving(addr_b).await,
        (200, "hello from zeitwork\n".into())
    );

    // Each instance reaches itself (the probe works) but not the other.
    let ns_a = &a.extra["netns"];
    let ns_b = &b.extra["netns"];
    assert!(
        can_connect_from_ns(ns_a, addr_a).await,
        "the probe itself must work"
    );
    assert!(
        !can_connect_from_ns(ns_a, addr_b).await,
        "instance a reached instance b"
    );
    assert!(
        !can_connect_from_ns(ns_b, addr_a).await,
        "instance b reached instance a"
    );

    // New connections into instances are dropped on the host, and
    // instances reach nothing on the node itself.
    let table = follower::net::NetPolicy::default().table;
    // A listing may be interrupted by another test's rule change: retried.
    let mut out = None;
    for _ in 0..5 {
        let o = std::process::Command::new("nft")
            .args(["list", "table", "inet", &table])
            .output()
            .unwrap();
        if o.status.success() {
            out = Some(o);
            break;
        }
        out = Some(o);
        std::thread::sleep(Duration::from_millis(50));
    }
    let nft = out.unwrap();
    let err = String::from_utf8_lossy(&nft.stderr).into_owned();
    let nft = String::from_utf8_lossy(&nft.stdout);
    assert!(
        nft.contains("oifname @ifaces drop") && nft.contains("iifname @ifaces drop"),
        "{nft}{err}"
    );

    // The app runs as the image's user (mapped onto the instance's host id
    // range: uid 65534 of slot 1), in its own pid namespace, in the image's
    // root.
    let app_pid: u32 = std::fs::read_to_string(a.work_dir.join("app.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let st = std::fs::read_to_string(format!("/proc/{app_pid}/status")).unwrap();
    let host_uid = follower::runtime::rootfs::IdMap::for_slot(1).host(65534);
    assert!(
        st.lines().any(|l| l.starts_with("Uid:")
            && l.split_whitespace()
                .skip(1)
                .all(|u| u == host_uid.to_string())),
        "{st}"
    );
    assert!(
        st.lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "{st}"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{app_pid}/root/www/index.html")).unwrap(),
        "hello from zeitwork\n"
    );
    // Secrets and env reach the app only through its environment.
    let environ = std::fs::read(format!("/proc/{app_pid}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("PORT=8080"));

    assert_eq!(rt.liveness(&a), Liveness::Running);
    rt.stop(&a).await.unwrap();
    assert!(matches!(rt.liveness(&a), Liveness::Exited(_)));
    assert!(
        common::http_get(addr_a, "/").await.is_err(),
        "a still serves after stop"
    );
    // Stop is idempotent and leaves b alone.
    rt.stop(&a).await.unwrap();
    assert_eq!(wait_serving(addr_b).await.0, 200);
    rt.stop(&b).await.unwrap();
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(&a.extra["host_if"]) && !links.contains(&b.extra["host_if"]),
        "{links}"
    );
}

#[tokio::test]
async fn bad_rootfs_and_instant_exit_are_reported_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let digest = common::busybox_image(&store, &common::httpd_config(8080));
    let good = common::image_dir(&store, &digest);
    let range = common::random_range();
    let rt = ProcessRuntime::new(&tmp.path().join("scripts"), Arc::default()).unwrap();
    let mut guard = common::ProcessInstances::default();

    // A rootfs that is not ext4 at all.
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("rootfs.ext4"), vec![0x5a; 1 << 20]).unwrap();
    let id = format!("c{}", ulid::Ulid::new());
    guard.add(&id, &tmp.path().join("instances").join(&id));
    let err = rt
        .start(&spec(
            &id,
            tmp.path(),
            &corrupt,
            range.instance_addr(1),
            HTTPD,
        ))
        .await
        .unwrap_err();
    match &err {
        RuntimeError::StartFailed { reason, .. } => {
            assert!(reason.contains("cannot be mounted"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }

    // An entrypoint that exits at once.
    let id = format!("x{}", ulid::Ulid::new());
    guard.add(&id, &tmp.path().join("instances").join(&id));
    let h = rt
        .start(&spec(
            &id,
            tmp.path(),
            &good,
            range.instance_addr(2),
            &["/bin/busybox", "sh", "-c", "echo bye; exit 3"],
        ))
        .await;
    let code = match h {
        // It may already be gone before the supervisor is seen ready.
        Err(RuntimeError::StartFailed { reason, .. }) => {
            assert!(reason.contains("status 3"), "{reason}");
            3
        }
        Ok(h) => {
            let mut code = None;
            for _ in 0..200 {
                if let Liveness::Exited(c) = rt.liveness(&h) {
                    code = c;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            rt.stop(&h).await.unwrap();
            assert!(
                std::fs::read_to_string(h.work_dir.join("stdout.log"))
                    .unwrap()
                    .contains("bye")
            );
            code.expect("exit code recorded")
        }
        Err(e) => panic!("unexpected {e:?}"),
    };
    assert_eq!(code, 3);

    // An unknown user in the image.
    let id = format!("u{}", ulid::Ulid::new());
    guard.add(&id, &tmp.path().join("instances").join(&id));
    let mut s = spec(&id, tmp.path(), &good, range.instance_addr(3), HTTPD);
    s.user = "nosuchuser".into();
    match rt.start(&s).await.unwrap_err() {
        RuntimeError::StartFailed { reason, .. } => {
            assert!(reason.contains("nosuchuser"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn auto_says_which_runtime_it_chose_and_why() {
    use follower::runtime::{RuntimeChoice, VmOptions, choose};
    let tmp = tempfile::tempdir().unwrap();
    let scripts = tmp.path().join("scripts");
    // No guest kernels configured: both VM drivers are skipped, with reasons.
    let (rt, reason) = choose(
        RuntimeChoice::Auto,
        &scripts,
        &VmOptions::default(),
        Arc::default(),
    )
    .unwrap();
    assert_eq!(rt.name(), "process");
    assert!(reason.starts_with("auto chose process because"), "{reason}");
    assert!(
        reason.contains("firecracker skipped:") && reason.contains("qemu skipped:"),
        "{reason}"
    );
    // Asking for a VM driver that cannot run here is an error naming why.
    match choose(
        RuntimeChoice::Qemu,
        &scripts,
        &VmOptions::default(),
        Arc::default(),
    ) {
        Err(RuntimeError::Unavailable {
            driver: "qemu",
            reason,
        }) => assert!(!reason.is_empty()),
        Err(e) => panic!("unexpected {e:?}"),
        Ok((rt, _)) => panic!("qemu without a guest kernel chose {}", rt.name()),
    }
    let (rt, reason) = choose(
        RuntimeChoice::Process,
        &scripts,
        &VmOptions::default(),
        Arc::default(),
    )
    .unwrap();
    assert_eq!(
        (rt.name(), reason.as_str()),
        ("process", "process: asked for with --runtime process")
    );
}

/// The isolation does not lean on the host having forwarding off: in a
/// namespace playing the host, with IPv6 forwarding on, the nftables rules
/// alone keep instances apart; without them the same packets get through.
#[tokio::test]
async fn nftables_keeps_instances_apart_even_with_forwarding_on() {
    use follower::net::{InstanceNet, InstanceNetNames};
    let tmp = tempfile::tempdir().unwrap();
    let host = format!("zwthost{}", &ulid::Ulid::new().to_string()[20..]).to_lowercase();
    let sh = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&["ip", "netns", "add", &host]);
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for ns in &self.0 {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", ns])
                    .status();
            }
        }
    }
    let mut cleanup = Cleanup(vec![host.clone()]);
    // /proc/sys/net belongs to the network namespace of whoever opens it.
    {
        use std::io::Write;
        let mut tee = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &host,
                "tee",
                "/proc/sys/net/ipv6/conf/all/forwarding",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tee.stdin.take().unwrap().write_all(b"1\n").unwrap();
        assert!(tee.wait().unwrap().success());
    }
    let fwd = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &host,
            "cat",
            "/proc/sys/net/ipv6/conf/all/forwarding",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&fwd.stdout).trim(),
        "1",
        "forwarding is on in the host namespace"
    );
    sh(&["ip", "-n", &host, "link", "set", "lo", "up"]);

    let net = InstanceNet::new(&tmp.path().join("scripts"))
        .unwrap()
        .within(&host);
    let range = common::random_range();
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hi\n").unwrap();
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for (slot, id) in [(1u16, "iso-a"), (2, "iso-b")] {
        let names = InstanceNetNames::for_instance(&format!("{id}-{host}"));
        cleanup.0.push(names.netns.clone());
        let ip = range.instance_addr(slot);
        net.up(&names, ip).await.unwrap();
        servers.push(
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &names.netns,
                    "busybox",
                    "httpd",
                    "-f",
                    "-p",
                    "8080",
                    "-h",
                ])
                .arg(&www)
                .spawn()
                .unwrap(),
        );
        addrs.push((names.netns, std::net::SocketAddr::new(ip.into(), 8080)));
    }
    let reach = |from: &str, to: std::net::SocketAddr| {
        let mut ok = false;
        // The server may still be starting: a few tries, bounded.
        for _ in 0..20 {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    from,
                    "busybox",
                    "nc",
                    "-w",
                    "1",
                    &to.ip().to_string(),
                    "8080",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            if from != host {
                break; // between instances one try is the answer
            }
        }
        ok
    };
    let (a, b) = (addrs[0].clone(), addrs[1].clone());
    assert!(
        reach(&host, a.1) && reach(&host, b.1),
        "the node reaches both"
    );
    assert!(
        !reach(&a.0, b.1) && !reach(&b.0, a.1),
        "instances reached each other through the node"
    );
    // Control: without the rules, forwarding carries the same connection.
    sh(&[
        "ip",
        "netns",
        "exec",
        &host,
        "nft",
        "delete",
        "table",
        "inet",
        &follower::net::NetPolicy::default().table,
    ]);
    assert!(
        reach(&a.0, b.1),
        "with the rules gone the path works: so the rules are what blocked it"
    );
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    for (ns, _) in &addrs {
        net.down(&InstanceNetNames {
            netns: ns.clone(),
            host_if: ns.clone(),
        })
        .await
        .unwrap();
    }
}

/// Issue 14 item 1: an app's environment (image env, release env vars,
/// secrets) reaches only the app's own process. Every variable below makes
/// a host shell or a dynamically linked host program run a command (it
/// creates a marker file on the host) if the supervisor, or any tool it
/// runs, is started with the app's environment. The app itself must still
/// see every one of them, unchanged.
#[tokio::test]
async fn app_environment_never_reaches_a_host_program() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let digest = common::busybox_image(&store, &common::httpd_config(8080));
    let image_dir = common::image_dir(&store, &digest);
    let range = common::random_range();
    let rt = ProcessRuntime::new(&tmp.path().join("scripts"), Arc::default()).unwrap();

    let marker = |name: &str| tmp.path().join(format!("marker-{name}"));
    // A directory of look-alike host tools, for PATH games.
    let evil_bin = tmp.path().join("evil-bin");
    std::fs::create_dir_all(&evil_bin).unwrap();
    for tool in [
        "bash", "ip", "nft", "mount", "umount", "unshare", "awk", "mkdir", "touch", "runc", "env",
        "rm", "cat", "chmod", "sleep",
    ] {
        let shim = evil_bin.join(tool);
        std::fs::write(
            &shim,
            format!("#!/bin/sh\n: > {}\n", marker("path").display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bash_env_script = tmp.path().join("bash-env.sh");
    std::fs::write(
        &bash_env_script,
        format!(": > {}\n", marker("bash-env-file").display()),
    )
    .unwrap();
    let hostile: Vec<(String, String)> = vec![
        ("ZW_CANARY".into(), "app-only-7d3".into()),
        (
            "BASH_ENV".into(),
            format!("$(: > {})", marker("bash-env-subst").display()),
        ),
        ("ENV".into(), bash_env_script.display().to_string()),
        ("SHELLOPTS".into(), "xtrace".into()),
        ("PS4".into(), format!("$(: > {})", marker("ps4").display())),
        (
            "BASH_FUNC_mkdir%%".into(),
            format!("() {{ : > {}; }}", marker("bash-func").display()),
        ),
        (
            "LD_PRELOAD".into(),
            tmp.path().join("zw-no-such-lib.so").display().to_string(),
        ),
        (
            "LD_LIBRARY_PATH".into(),
            tmp.path().join("zw-no-such-dir").display().to_string(),
        ),
        ("PATH".into(), format!("{}:/bin", evil_bin.display())),
    ];
    let id = format!("e{}", ulid::Ulid::new());
    let mut guard = common::ProcessInstances::default();
    guard.add(&id, &tmp.path().join("instances").join(&id));
    let mut s = spec(
        &id,
        tmp.path(),
        &image_dir,
        range.instance_addr(1),
        &[
            "/bin/busybox",
            "sh",
            "-c",
            // The app's own environment as the kernel gave it (a shell
            // passes on only variables with valid names).
            "/bin/busybox tr '\\000' '\\n' </proc/1/environ; \
             exec /bin/busybox httpd -f -p 8080 -h /www",
        ],
    );
    s.env_vars.extend(hostile.iter().cloned());
    let h = rt.start(&s).await.unwrap();
    let served = wait_serving(SocketAddr::new(h.ip.into(), 8080)).await;

    // No host process carries the app's environment: the supervisor and
    // every process of its session other than the app itself.
    let mut leaked = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).ok()
            != Some(nix::unistd::Pid::from_raw(h.pid as i32))
        {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if String::from_utf8_lossy(&environ).contains("app-only-7d3")
            && !cmdline.starts_with("/bin/busybox")
        {
            leaked.push(cmdline);
        }
    }
    rt.stop(&h).await.unwrap();
    let log = std::fs::read_to_string(h.work_dir.join("stdout.log")).unwrap();

    let fired: Vec<_> = [
        "path",
        "bash-env-file",
        "bash-env-subst",
        "ps4",
        "bash-func",
    ]
    .into_iter()
    .filter(|m| marker(m).exists())
    .collect();
    assert!(
        fired.is_empty(),
        "the app's environment ran host commands ({fired:?}); log:\n{log}"
    );
    assert!(
        !log.contains("cannot be preloaded"),
        "LD_PRELOAD reached a host program:\n{log}"
    );
    assert!(
        leaked.is_empty(),
        "host processes with the app's env: {leaked:?}"
    );
    assert_eq!(served.0, 200);
    // The app saw all of it, as given.
    for (k, v) in &hostile {
        assert!(
            log.contains(&format!("{k}={v}\n")),
            "app lacks {k}={v}:\n{log}"
        );
    }
}

/// The cgroup directory of a container for a controller (`pids`,
/// `memory`): v1 hierarchies here, the unified one elsewhere.
fn cgroup_dir(controller: &str, container: &str) -> std::path::PathBuf {
    let v1 = std::path::Path::new("/sys/fs/cgroup").join(controller);
    if v1.is_dir() {
        v1.join(container)
    } else {
        std::path::Path::new("/sys/fs/cgroup").join(container)
    }
}

/// Waits for `needle` in an instance's log; returns the log.
async fn wait_log(work: &std::path::Path, needle: &str) -> String {
    for _ in 0..600 {
        let log = std::fs::read_to_string(work.join("stdout.log")).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "no {needle:?} in the log:\n{}",
        std::fs::read_to_string(work.join("stdout.log")).unwrap_or_default()
    );
}

/// Issue 14 item 6: an app running as its image's root tries what host
/// root could do. Each attempt prints its outcome; the test also checks
/// from the host side.
#[tokio::test]
async fn the_image_root_is_not_host_root() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let digest = common::busybox_image(&store, &common::httpd_config(8080));
    let image_dir = common::image_dir(&store, &digest);
    let range = common::random_range();
    let rt = ProcessRuntime::new(&tmp.path().join("scripts"), Arc::default()).unwrap();
    let id = format!("r{}", ulid::Ulid::new());
    let mut guard = common::ProcessInstances::default();
    guard.add(&id, &tmp.path().join("instances").join(&id));
    let script = r#"b=/bin/busybox
try() { what=$1; shift; if "$@" 2>/dev/null; then echo "ATTACK $what: succeeded"; else echo "attack $what: refused"; fi; }
echo "uid $($b id -u)"
try mknod-block $b mknod /tmp/sda b 8 0
try mknod-char $b mknod /tmp/mem c 1 1
try mount $b mount -t tmpfs zw /tmp
try unshare-user $b unshare -U -r true
try unshare-mount $b unshare -m true
try sysctl $b sh -c 'echo zw > /proc/sys/kernel/domainname'
try ip-addr $b ip addr add 10.9.9.9/32 dev eth0
try raw-socket $b ping -c 1 -W 1 127.0.0.1
echo x > /dev/null && echo "dev-null works"
echo "written by the image root" > /owned && echo "wrote /owned"
echo "caps $($b grep CapEff /proc/self/status)"
$b sed 's/^/resolv: /' /etc/resolv.conf
echo checks-done
exec $b httpd -f -p 8080 -h /www"#;
    let mut s = spec(
        &id,
        tmp.path(),
        &image_dir,
        range.instance_addr(1),
        &["/bin/busybox", "sh", "-c", script],
    );
    s.user = String::new(); // the image's root
    let h = rt.start(&s).await.unwrap();
    let log = wait_log(&h.work_dir, "checks-done").await;
    assert_eq!(
        wait_serving(SocketAddr::new(h.ip.into(), 8080)).await.0,
        200
    );

    let app: u32 = std::fs::read_to_string(h.work_dir.join("app.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let map = follower::runtime::rootfs::IdMap::for_slot(1);
    // Inside it is uid 0; on the host an unprivileged id of its own range.
    assert!(log.contains("uid 0\n"), "{log}");
    let status = std::fs::read_to_string(format!("/proc/{app}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == map.host_base.to_string()),
        "{uid_line}"
    );
    // The file it wrote as root belongs to that id, and lives in the
    // instance's own layer: the image is untouched.
    use std::os::unix::fs::MetadataExt;
    let owned = std::fs::metadata(format!("/proc/{app}/root/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (map.host_base, map.host_base));
    assert!(log.contains("wrote /owned"), "{log}");
    assert!(log.contains("dev-null works"), "{log}");
    // The node's resolvers it can reach, and none on loopback.
    if let Some(expected) = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|h| follower::runtime::oci::instance_resolv_conf(&h))
    {
        for line in expected.lines() {
            assert!(log.contains(&format!("resolv: {line}")), "{log}");
        }
    }
    assert!(!log.contains("resolv: nameserver 127."), "{log}");
    // Everything that needs host root, or reaches past the sandbox, fails.
    assert!(!log.contains("ATTACK"), "{log}");
    for what in [
        "mknod-block",
        "mknod-char",
        "mount",
        "unshare-user",
        "unshare-mount",
        "sysctl",
        "ip-addr",
        "raw-socket",
    ] {
        assert!(log.contains(&format!("attack {what}: refused")), "{log}");
    }
    // Default capabilities only: no CAP_SYS_ADMIN (21), CAP_NET_ADMIN (12),
    // CAP_MKNOD (27), CAP_NET_RAW (13), CAP_SYS_PTRACE (19).
    let caps = log
        .lines()
        .find_map(|l| l.strip_prefix("caps CapEff:"))
        .map(|c| u64::from_str_radix(c.trim(), 16).unwrap())
        .unwrap();
    for bit in [21, 12, 27, 13, 19] {
        assert_eq!(caps & (1 << bit), 0, "capability {bit} in {caps:x}");
    }
    assert_ne!(caps, 0, "the image root keeps the default set");
    // Writable mounts are nodev,nosuid.
    let mounts = std::fs::read_to_string(format!("/proc/{app}/mounts")).unwrap();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let opts: Vec<&str> = f[3].split(',').collect();
        // devtmpfs: the bind-mounted standard devices (/dev/null, ...);
        // devpts: the instance's own ptys.
        if opts.contains(&"rw") && f[2] != "devtmpfs" && f[2] != "devpts" {
            assert!(
                opts.contains(&"nodev") && opts.contains(&"nosuid"),
                "writable mount without nodev,nosuid: {line}"
            );
        }
    }
    rt.stop(&h).await.unwrap();
    let image_after = std::process::Command::new("debugfs")
        .args(["-R", "stat /owned"])
        .arg(image_dir.join("rootfs.ext4"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&image_after.stderr).contains("not found"),
        "the image itself was written"
    );
}

/// Issue 14 item 6: cgroup limits hold. A fork bomb stops at the pids
/// limit (and the instance serves on afterwards); an allocation past the
/// memory limit is OOM-killed inside the instance.
#[tokio::test]
async fn cgroup_limits_hold_a_fork_bomb_and_a_memory_hog() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let digest = common::busybox_image(&store, &common::httpd_config(8080));
    let image_dir = common::image_dir(&store, &digest);
    let range = common::random_range();
    let rt = ProcessRuntime::new(&tmp.path().join("scripts"), Arc::default()).unwrap();
    let id = format!("f{}", ulid::Ulid::new());
    let mut guard = common::ProcessInstances::default();
    guard.add(&id, &tmp.path().join("instances").join(&id));
    let script = r#"b=/bin/busybox
( while :; do $b sleep 1000 & done ) 2>/dev/null
echo "fork bomb stopped"
kill -9 -1; wait
$b awk 'BEGIN { s = "0123456789abcdef"; while (1) s = s s }'
echo "allocation ended with status $?"
exec $b httpd -f -p 8080 -h /www"#;
    let mut s = spec(
        &id,
        tmp.path(),
        &image_dir,
        range.instance_addr(1),
        &["/bin/busybox", "sh", "-c", script],
    );
    s.memory_mb = 64;
    let limits = follower::runtime::oci::Limits::new(64, 1);
    let h = rt.start(&s).await.unwrap();
    let container = &h.extra["container"];
    let log = wait_log(&h.work_dir, "allocation ended").await;
    assert!(log.contains("fork bomb stopped"), "{log}");
    // The bomb ran into the limit and never past it.
    let pids = cgroup_dir("pids", container);
    let read = |f: &str| std::fs::read_to_string(pids.join(f)).unwrap();
    assert_eq!(read("pids.max").trim(), limits.pids.to_string());
    let events = read("pids.events");
    let refused: u64 = events
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refused > 0, "no fork was refused: {events}");
    if pids.join("pids.peak").exists() {
        assert!(read("pids.peak").trim().parse::<u32>().unwrap() <= limits.pids);
    }
    // The hog was killed by the OOM killer (SIGKILL: 128 + 9).
    assert!(log.contains("allocation ended with status 137"), "{log}");
    let memory = cgroup_dir("memory", container);
    let oom = ["memory.oom_control", "memory.events"]
        .iter()
        .find_map(|f| std::fs::read_to_string(memory.join(f)).ok())
        .unwrap();
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(kills >= 1, "{oom}");
    // And the instance itself lives on and serves.
    assert_eq!(
        wait_serving(SocketAddr::new(h.ip.into(), 8080)).await.0,
        200
    );
    rt.stop(&h).await.unwrap();
    assert!(!pids.exists(), "the cgroup outlived the instance");
}

/// Invariant 4 for the process runtime: the environment is on tmpfs only
/// while runc reads it, and nowhere afterwards: not in the bundle, not in
/// runc's state, not in any host process but the app.
#[tokio::test]
async fn secrets_leave_no_trace_on_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let digest = common::busybox_image(&store, &common::httpd_config(8080));
    let image_dir = common::image_dir(&store, &digest);
    let range = common::random_range();
    let rt = ProcessRuntime::new(&tmp.path().join("scripts"), Arc::default()).unwrap();
    let id = format!("s{}", ulid::Ulid::new());
    let mut guard = common::ProcessInstances::default();
    guard.add(&id, &tmp.path().join("instances").join(&id));
    const SECRET: &str = "zw-secret-value-41c9e";
    let mut s = spec(&id, tmp.path(), &image_dir, range.instance_addr(1), HTTPD);
    s.env_vars.insert("DATABASE_PASSWORD".into(), SECRET.into());
    let h = rt.start(&s).await.unwrap();
    assert_eq!(
        wait_serving(SocketAddr::new(h.ip.into(), 8080)).await.0,
        200
    );

    let run = follower::runtime::process::run_dir().unwrap();
    let fs = nix::sys::statfs::statfs(&run).unwrap();
    assert_eq!(fs.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let bundle = run.join("bundles").join(&h.extra["container"]);
    assert!(
        !bundle.join("config.json").exists(),
        "config.json outlived the start"
    );
    // Nothing under the run dir, the work dir or the ledger-side files
    // holds the value.
    let grep = std::process::Command::new("grep")
        .args(["-rl", SECRET])
        .arg(&run)
        .arg(&h.work_dir)
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "secret found in {}",
        String::from_utf8_lossy(&grep.stdout)
    );
    // Only the app's process has it in its environment.
    let app: u32 = std::fs::read_to_string(h.work_dir.join("app.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut holders = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if String::from_utf8_lossy(&environ).contains(SECRET) {
            holders.push(pid);
        }
    }
    assert_eq!(holders, vec![app], "processes holding the secret");
    rt.stop(&h).await.unwrap();
    assert!(!bundle.exists(), "the bundle outlived the instance");
}
