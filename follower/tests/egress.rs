//! Instance networking against real network namespaces (issue 13,
//! "Instances can reach the outside world"; issue 14 item 8): a namespace
//! plays the node, another "the internet" with a plain HTTP server on a
//! routed address (and, on addresses of their own, a captain and a cloud
//! metadata service). From inside an instance the internet answers over
//! IPv4 and IPv6; the captain, the metadata address, another instance and
//! anything bound on the node (its API, its node-proxy) do not. Then the
//! node's table is deleted and the same connections go through: the rules
//! are what refused them.
//!
//! Only addresses inside namespaces this test makes are used (documentation
//! ranges and the node's private ranges). Needs root, iproute2, nftables and
//! busybox-static.

mod common;

use std::net::Ipv6Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use follower::net::{InstanceNet, InstanceNetNames, NetPolicy, gateway_of, ipv4_of};

const NODE_UPLINK4: &str = "203.0.113.1";
const NODE_UPLINK6: &str = "2001:db8:7a::1";
const INTERNET4: &str = "198.51.100.80";
const INTERNET6: &str = "2001:db8:ff::80";
const CAPTAIN4: &str = "198.51.100.7";
const CAPTAIN6: &str = "2001:db8:ff::7";
const METADATA4: &str = "169.254.169.254";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces and servers of the test, removed however it ends.
#[derive(Default)]
struct World {
    namespaces: Vec<String>,
    servers: Vec<std::process::Child>,
}

impl Drop for World {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Deleting a namespace removes its links, addresses, routes and
        // nftables tables with it.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl World {
    fn netns(&mut self, name: &str) {
        sh(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_string());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }

    /// `busybox httpd` in `ns` on every address, serving `body`.
    fn httpd(&mut self, ns: &str, port: u16, dir: &std::path::Path, body: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("index.html"), body).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "busybox", "httpd", "-f", "-p"])
            .arg(port.to_string())
            .arg("-h")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
    }
}

/// GET / from inside `ns` (busybox nc, 2 s): the body, or `None`.
async fn get_from(ns: &str, addr: &str, port: u16) -> Option<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "nc", "-w", "2", addr])
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .ok()?
        .ok()?;
    drop(stdin);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_string())
}

/// Every target in `targets` from `ns`, at once: (target, answer).
async fn probe_all(ns: &str, targets: &[(&str, String, u16)]) -> Vec<(String, Option<String>)> {
    let futs = targets.iter().map(|(what, addr, port)| async move {
        (what.to_string(), get_from(ns, addr, *port).await)
    });
    futures::future::join_all(futs).await
}

#[tokio::test]
async fn instances_reach_the_internet_but_not_the_node_other_instances_or_the_captain() {
    let tmp = tempfile::tempdir().unwrap();
    let tag = ulid::Ulid::new().to_string()[20..].to_lowercase();
    let node = format!("zwtn{tag}");
    let inet = format!("zwtw{tag}");
    let mut world = World::default();
    world.netns(&node);
    world.netns(&inet);

    // The node's uplink to the internet.
    sh(&[
        "ip", "-n", &node, "link", "add", "uplink", "type", "veth", "peer", "name", "eth0",
        "netns", &inet,
    ]);
    for (ns, dev, a4, a6) in [
        (&node, "uplink", NODE_UPLINK4, NODE_UPLINK6),
        (&inet, "eth0", "203.0.113.2", "2001:db8:7a::2"),
    ] {
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{a4}/24"),
            "dev",
            dev,
        ]);
        sh(&[
            "ip",
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{a6}/64"),
            "dev",
            dev,
            "nodad",
        ]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    // The internet's hosts, the captain and a metadata service: addresses
    // routed to it, not on the node's link.
    for a in [INTERNET4, CAPTAIN4, METADATA4] {
        sh(&[
            "ip",
            "-n",
            &inet,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ]);
    }
    for a in [INTERNET6, CAPTAIN6] {
        sh(&[
            "ip",
            "-n",
            &inet,
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "lo",
        ]);
    }
    sh(&[
        "ip",
        "-n",
        &node,
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "203.0.113.2",
    ]);
    sh(&[
        "ip",
        "-n",
        &node,
        "route",
        "add",
        "169.254.169.254/32",
        "via",
        "203.0.113.2",
    ]);
    sh(&[
        "ip",
        "-n",
        &node,
        "-6",
        "route",
        "add",
        "2001:db8:ff::/64",
        "via",
        "2001:db8:7a::2",
    ]);
    // Routes back to the instances' own addresses, so that only the rules
    // (not a missing route) can make a connection fail.
    sh(&[
        "ip",
        "-n",
        &inet,
        "route",
        "add",
        "100.64.0.0/10",
        "via",
        NODE_UPLINK4,
    ]);
    sh(&[
        "ip",
        "-n",
        &inet,
        "-6",
        "route",
        "add",
        "fd00:7a77::/32",
        "via",
        NODE_UPLINK6,
    ]);

    world.httpd(
        &inet,
        80,
        &tmp.path().join("internet"),
        "the internet answers\n",
    );
    world.httpd(&node, 9000, &tmp.path().join("node-api"), "node api\n");
    world.httpd(&node, 4433, &tmp.path().join("node-proxy"), "node proxy\n");

    // Two instances of the node, under a policy that blocks the captain.
    let policy = NetPolicy {
        table: format!("zeitwork_t{tag}"),
        ..NetPolicy::for_node(&node)
    }
    .block([CAPTAIN4.parse().unwrap(), CAPTAIN6.parse().unwrap()]);
    let net = InstanceNet::new(&tmp.path().join("scripts"))
        .unwrap()
        .within(&node)
        .with_policy(policy.clone());
    let range = common::random_range();
    let mut inst = Vec::new();
    for slot in [1u16, 2] {
        let names = InstanceNetNames::for_instance(&format!("egress-{slot}-{tag}"));
        world.namespaces.push(names.netns.clone());
        let ip6 = range.instance_addr(slot);
        net.up(&names, ip6).await.unwrap();
        world.httpd(
            &names.netns,
            8080,
            &tmp.path().join(format!("inst{slot}")),
            &format!("instance {slot}\n"),
        );
        inst.push((names, ip6));
    }
    let (a, b) = (&inst[0], &inst[1]);
    let a_ns = &a.0.netns;
    let (a_gw4, a_ip4) = ipv4_of(a.1);
    let (_, b_ip4) = ipv4_of(b.1);
    let a_gw6: Ipv6Addr = gateway_of(a.1);

    // The servers are up: the node itself reaches all of them.
    for (addr, port) in [
        (INTERNET4.to_string(), 80),
        (CAPTAIN6.to_string(), 80),
        (METADATA4.to_string(), 80),
        (b.1.to_string(), 8080),
        (a.1.to_string(), 8080),
    ] {
        let mut ok = false;
        for _ in 0..50 {
            if get_from(&node, &addr, port).await.is_some() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "the node cannot reach {addr}:{port}");
    }

    // From the instance: the internet answers, over IPv4 and IPv6.
    for addr in [INTERNET4, INTERNET6] {
        assert_eq!(
            get_from(a_ns, addr, 80).await.as_deref(),
            Some("the internet answers\n"),
            "instance -> internet {addr}"
        );
    }
    let refused: Vec<(&str, String, u16)> = vec![
        ("captain v4", CAPTAIN4.into(), 80),
        ("captain v6", CAPTAIN6.into(), 80),
        ("metadata", METADATA4.into(), 80),
        ("instance b v6", b.1.to_string(), 8080),
        ("instance b v4", b_ip4.to_string(), 8080),
        ("node api via gateway v4", a_gw4.to_string(), 9000),
        ("node api via gateway v6", a_gw6.to_string(), 9000),
        ("node api on its uplink", NODE_UPLINK4.into(), 9000),
        ("node api on its uplink v6", NODE_UPLINK6.into(), 9000),
        ("node-proxy", a_gw6.to_string(), 4433),
    ];
    let answers = probe_all(a_ns, &refused).await;
    let reached: Vec<_> = answers.iter().filter(|(_, r)| r.is_some()).collect();
    assert!(reached.is_empty(), "the instance reached {reached:?}");
    // The instance is still reachable from the node (the node-proxy's way).
    assert!(get_from(&node, &a.1.to_string(), 8080).await.is_some());
    assert!(get_from(&node, &a_ip4.to_string(), 8080).await.is_some());

    // Control: without the node's table every one of them answers.
    sh(&[
        "ip",
        "netns",
        "exec",
        &node,
        "nft",
        "delete",
        "table",
        "inet",
        &policy.table,
    ]);
    let answers = probe_all(a_ns, &refused).await;
    let still: Vec<_> = answers.iter().filter(|(_, r)| r.is_none()).collect();
    assert!(
        still.is_empty(),
        "unreachable even without the rules (so the test proves nothing): {still:?}"
    );

    for (names, _) in &inst {
        net.down(names).await.unwrap();
    }
}
