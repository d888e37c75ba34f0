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

    // Forwarding from and to instance interfaces is dropped on the host.
    let nft = std::process::Command::new("nft")
        .args(["list", "table", "inet", "zeitwork_instances"])
        .output()
        .unwrap();
    let nft = String::from_utf8_lossy(&nft.stdout);
    assert!(
        nft.contains("iifname \"zwi*\" drop") && nft.contains("oifname \"zwi*\" drop"),
        "{nft}"
    );

    // The app runs as the image's user, in its own pid namespace, chrooted.
    let status =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", a.pid, a.pid)).unwrap();
    let unshare_pid: u32 = status.split_whitespace().next().unwrap().parse().unwrap();
    let app_pid: u32 =
        std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
    let st = std::fs::read_to_string(format!("/proc/{app_pid}/status")).unwrap();
    assert!(
        st.lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{st}"
    );
    assert!(
        st.lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "{st}"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{app_pid}/root")).unwrap(),
        a.work_dir.join("root")
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

    // A rootfs that is not ext4 at all.
    let corrupt = tmp.path().join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("rootfs.ext4"), vec![0x5a; 1 << 20]).unwrap();
    let id = format!("c{}", ulid::Ulid::new());
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
        "zeitwork_instances",
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
