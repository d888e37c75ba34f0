//! Instance networking on a node: addresses from a node-local IPv6 range
//! and a private IPv4 block, one network namespace per instance, joined to
//! the host by a veth pair (or, for microVMs, a tap).
//!
//! Layout: the node's instance range is a /64 (`fd00:7a77:0:<subnet>::/64`
//! by default, the subnet derived from the node id). Instance slot `n`
//! (1..=65535) owns the /112 `<range>::n:0`; the host end of its link holds
//! `<range>::n:1` (gateway, and the node's source address towards it), the
//! instance holds `<range>::n:2`. IPv4: the node's block is one of the 32
//! /15 of 100.64.0.0/10 (shared address space, by the subnet), slot `n`
//! the /31 at `block + 2n` (host end even, instance odd).
//!
//! The rules ([`NetPolicy`], `scripts/instance-net.sh`) live in one nftables
//! table per node: an instance reaches nothing on its node (input chain),
//! no other instance (forward), no link-local or metadata address and no
//! captain; with egress on, anything else, masqueraded behind the node (IPv4
//! and IPv6). The node reaches every instance directly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Prefix length of one instance's link.
pub const INSTANCE_PREFIX_LEN: u8 = 112;

const INSTANCE_NET_SH: &str = include_str!("../../scripts/instance-net.sh");

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("instance range {0} is not a /64 written as an address ending in ::")]
    BadRange(String),
    #[error("{0} is not an address or address/prefix-length")]
    BadCidr(String),
    #[error("no free instance slot left in the node's range")]
    Exhausted,
    #[error("writing the network script to {path}")]
    WriteScript {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running instance-net.sh {action}")]
    Spawn {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("instance-net.sh {action} failed ({status}): {stderr}")]
    Failed {
        action: String,
        status: String,
        stderr: String,
    },
}

/// The node-local range instances take their addresses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceRange {
    /// The /64, with its lower 64 bits zero.
    pub prefix: Ipv6Addr,
}

impl InstanceRange {
    /// `fd00:7a77:0:<16 bits of a hash of node_id>::/64`.
    pub fn for_node(node_id: &str) -> Self {
        let subnet = (stable_hash(node_id) & 0xffff) as u16;
        InstanceRange {
            prefix: Ipv6Addr::new(0xfd00, 0x7a77, 0, subnet, 0, 0, 0, 0),
        }
    }

    /// Parses `fd00:7a77:0:12::` or `fd00:7a77:0:12::/64`.
    pub fn parse(s: &str) -> Result<Self, NetError> {
        let addr = s.strip_suffix("/64").unwrap_or(s);
        let prefix: Ipv6Addr = addr
            .parse()
            .map_err(|_| NetError::BadRange(s.to_string()))?;
        if prefix.segments()[4..].iter().any(|&x| x != 0) {
            return Err(NetError::BadRange(s.to_string()));
        }
        Ok(InstanceRange { prefix })
    }

    fn addr(&self, slot: u16, host: u16) -> Ipv6Addr {
        let s = self.prefix.segments();
        Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, slot, host)
    }

    /// The instance's own address in slot `slot`.
    pub fn instance_addr(&self, slot: u16) -> Ipv6Addr {
        self.addr(slot, 2)
    }

    /// The slot of an address of this range, if it is an instance address.
    pub fn slot_of(&self, addr: Ipv6Addr) -> Option<u16> {
        let (a, p) = (addr.segments(), self.prefix.segments());
        (a[..6] == p[..6] && a[7] == 2 && a[6] != 0).then_some(a[6])
    }

    /// Lowest slot not in `used`. The last slot is never given out: its
    /// host id range (see `runtime::rootfs::IdMap`) is the builds'.
    pub fn free_slot(&self, used: impl IntoIterator<Item = u16>) -> Result<u16, NetError> {
        let used: std::collections::BTreeSet<u16> = used.into_iter().collect();
        (1..u16::MAX)
            .find(|s| !used.contains(s))
            .ok_or(NetError::Exhausted)
    }
}

impl std::fmt::Display for InstanceRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/64", self.prefix)
    }
}

/// Gateway (host end) of the link of an instance address.
pub fn gateway_of(instance: Ipv6Addr) -> Ipv6Addr {
    let mut s = instance.segments();
    s[7] = 1;
    Ipv6Addr::from(s)
}

/// The IPv4 gateway (host end) and address of the instance at `instance`
/// (see the module doc).
pub fn ipv4_of(instance: Ipv6Addr) -> (Ipv4Addr, Ipv4Addr) {
    let s = instance.segments();
    let block = u32::from(s[3] & 0x1f);
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (block << 17);
    let gw = base + 2 * u32::from(s[6]);
    (Ipv4Addr::from(gw), Ipv4Addr::from(gw + 1))
}

/// Destinations no instance may reach, whatever else is allowed: link-local
/// (and with it the cloud metadata services on 169.254.169.254), the IPv6
/// metadata address of EC2, and Alibaba's.
pub const DEFAULT_BLOCKED: &[&str] = &[
    "169.254.0.0/16",
    "100.100.100.200/32",
    "fe80::/10",
    "fd00:ec2::254/128",
];

/// What instances of a node may reach. Kept in the node's own nftables
/// table, so followers (and tests) sharing a host never flush each other's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPolicy {
    /// The `inet` table of this node.
    pub table: String,
    /// Destinations never reached from an instance (`addr` or `addr/len`):
    /// [`DEFAULT_BLOCKED`] and the captains' addresses.
    pub blocked: Vec<(IpAddr, u8)>,
    /// Outbound connections (masqueraded); the host's forwarding is turned
    /// on for them.
    pub egress: bool,
}

impl Default for NetPolicy {
    /// A shared table, the default block list, no egress.
    fn default() -> Self {
        NetPolicy {
            table: "zeitwork".into(),
            blocked: DEFAULT_BLOCKED
                .iter()
                .map(|b| parse_cidr(b).expect("valid default"))
                .collect(),
            egress: false,
        }
    }
}

impl NetPolicy {
    /// The policy of a node: its own table, egress on.
    pub fn for_node(node_id: &str) -> Self {
        NetPolicy {
            table: format!("zeitwork_{:012x}", stable_hash(node_id) & 0xffff_ffff_ffff),
            egress: true,
            ..NetPolicy::default()
        }
    }

    /// Adds destinations to the block list.
    pub fn block(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        for a in addrs {
            let len = if a.is_ipv4() { 32 } else { 128 };
            if !self.blocked.contains(&(a, len)) {
                self.blocked.push((a, len));
            }
        }
        self
    }

    fn list(&self, v4: bool) -> String {
        self.blocked
            .iter()
            .filter(|(a, _)| a.is_ipv4() == v4)
            .map(|(a, l)| format!("{a}/{l}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `10.0.0.0/8`, `fd00::1` (a host).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), NetError> {
    let bad = || NetError::BadCidr(s.to_string());
    let (a, l) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match l {
        Some(l) => l.parse::<u8>().map_err(|_| bad())?,
        None => max,
    };
    if len > max {
        return Err(bad());
    }
    Ok((addr, len))
}

/// The addresses of the host of `url` (`http://host:port/...`), resolved
/// now: what instances must not reach of a captain.
pub fn url_addresses(url: &str) -> Vec<IpAddr> {
    use std::net::ToSocketAddrs;
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let with_port = if authority.starts_with('[') || authority.matches(':').count() == 1 {
        if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:80")
        } else {
            authority.to_string()
        }
    } else if authority.contains(':') {
        format!("[{authority}]:80")
    } else {
        format!("{authority}:80")
    };
    let mut out: Vec<IpAddr> = with_port
        .to_socket_addrs()
        .map(|it| it.map(|sa| sa.ip()).collect())
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// FNV-1a: stable across builds and platforms (unlike `DefaultHasher`).
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Names of the kernel objects of one instance: interface names are at most
/// 15 bytes, so both are `zwi` + 12 hex digits of a hash of the instance id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNetNames {
    pub netns: String,
    pub host_if: String,
}

impl InstanceNetNames {
    pub fn for_instance(instance_id: &str) -> Self {
        let name = format!("zwi{:012x}", stable_hash(instance_id) & 0xffff_ffff_ffff);
        InstanceNetNames {
            netns: name.clone(),
            host_if: name,
        }
    }
}

/// Runs `scripts/instance-net.sh`, written once into the follower's data dir.
#[derive(Debug, Clone)]
pub struct InstanceNet {
    script: PathBuf,
    /// Network namespace playing the host, when the node itself runs in
    /// one (nested setups); `None` is the real host.
    host_netns: Option<String>,
    policy: NetPolicy,
}

impl InstanceNet {
    pub fn new(scripts_dir: &Path) -> Result<Self, NetError> {
        let script = scripts_dir.join("instance-net.sh");
        write_script(&script, INSTANCE_NET_SH).map_err(|source| NetError::WriteScript {
            path: script.clone(),
            source,
        })?;
        Ok(InstanceNet {
            script,
            host_netns: None,
            policy: NetPolicy::default(),
        })
    }

    /// What instances may reach (the default: [`NetPolicy::default`]).
    pub fn with_policy(mut self, policy: NetPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn policy(&self) -> &NetPolicy {
        &self.policy
    }

    /// Builds instance networks as seen from the named network namespace
    /// instead of the host's: host ends of the veths, routes and the
    /// nftables table live there.
    pub fn within(mut self, host_netns: &str) -> Self {
        self.host_netns = Some(host_netns.to_string());
        self
    }

    /// Creates the namespace and link of an instance. Fails if they exist.
    pub async fn up(&self, names: &InstanceNetNames, addr: Ipv6Addr) -> Result<(), NetError> {
        let (gw4, addr4) = ipv4_of(addr);
        self.run(&[
            "up",
            &names.netns,
            &names.host_if,
            &gateway_of(addr).to_string(),
            &addr.to_string(),
            &INSTANCE_PREFIX_LEN.to_string(),
            &gw4.to_string(),
            &addr4.to_string(),
        ])
        .await
    }

    /// The host side of a microVM's link: a tap holding the gateways of the
    /// instance at `addr`, under the same rules. Replaces a leftover tap.
    /// `owner`: the uid the VMM runs as (it may then attach to the tap
    /// without CAP_NET_ADMIN).
    pub async fn tap_up(
        &self,
        tap: &str,
        addr: Ipv6Addr,
        owner: Option<u32>,
    ) -> Result<(), NetError> {
        let owner = owner.map(|o| o.to_string()).unwrap_or_default();
        self.run(&[
            "tap-up",
            tap,
            &gateway_of(addr).to_string(),
            &INSTANCE_PREFIX_LEN.to_string(),
            &ipv4_of(addr).0.to_string(),
            &owner,
        ])
        .await
    }

    /// Removes a tap; idempotent.
    pub async fn tap_down(&self, tap: &str) -> Result<(), NetError> {
        self.run(&["tap-down", tap]).await
    }

    /// Removes them; idempotent.
    pub async fn down(&self, names: &InstanceNetNames) -> Result<(), NetError> {
        self.run(&["down", &names.netns, &names.host_if]).await
    }

    async fn run(&self, args: &[&str]) -> Result<(), NetError> {
        let action = args.join(" ");
        let mut cmd = tokio::process::Command::new("bash");
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("ZW_NFT_TABLE", &self.policy.table)
            .env("ZW_BLOCKED4", self.policy.list(true))
            .env("ZW_BLOCKED6", self.policy.list(false))
            .env("ZW_EGRESS", if self.policy.egress { "1" } else { "0" });
        if let Some(ns) = &self.host_netns {
            cmd.env("ZW_HOST_NETNS", ns);
        }
        let out = cmd
            .arg(&self.script)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| NetError::Spawn {
                action: action.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NetError::Failed {
                action,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

/// Writes an embedded script atomically (so a concurrent reader never sees
/// half of it), mode 0755.
pub(crate) fn write_script(path: &Path, body: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read_to_string(path).is_ok_and(|cur| cur == body) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, body)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_a_slot() {
        let r = InstanceRange::parse("fd00:7a77:0:12::/64").unwrap();
        let a = r.instance_addr(3);
        assert_eq!(a, "fd00:7a77:0:12::3:2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            gateway_of(a),
            "fd00:7a77:0:12::3:1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(r.slot_of(a), Some(3));
        assert_eq!(r.slot_of(gateway_of(a)), None);
        assert_eq!(r.free_slot([1, 2, 4]).unwrap(), 3);
        assert!(InstanceRange::parse("fd00:7a77:0:12::5").is_err());
        assert!(InstanceRange::parse("nope").is_err());
    }

    #[test]
    fn ipv4_links_are_31s_of_the_node_block() {
        let r = InstanceRange::parse("fd00:7a77:0:21::/64").unwrap();
        let (gw, addr) = ipv4_of(r.instance_addr(3));
        // subnet 0x21 & 0x1f = 1: the second /15.
        assert_eq!(gw, Ipv4Addr::new(100, 66, 0, 6));
        assert_eq!(addr, Ipv4Addr::new(100, 66, 0, 7));
        let (gw, _) = ipv4_of(r.instance_addr(u16::MAX));
        assert_eq!(gw, Ipv4Addr::new(100, 67, 255, 254));
    }

    #[test]
    fn policies_and_block_lists() {
        let p = NetPolicy::for_node("n1").block(["10.1.2.3".parse().unwrap()]);
        assert!(p.table.starts_with("zeitwork_") && p.table.len() <= 32);
        assert_ne!(p.table, NetPolicy::for_node("n2").table);
        assert!(p.egress);
        assert_eq!(
            p.list(true),
            "169.254.0.0/16 100.100.100.200/32 10.1.2.3/32"
        );
        assert_eq!(p.list(false), "fe80::/10 fd00:ec2::254/128");
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope").is_err());
        assert_eq!(
            url_addresses("http://127.0.0.1:7700/v1"),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            url_addresses("https://[fd00::5]:7700"),
            vec!["fd00::5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            url_addresses("http://u:p@[::1]/x"),
            vec!["::1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn names_fit_an_interface_name() {
        let n = InstanceNetNames::for_instance("01JDZ8Y1Q0V4M3N2K1H0G9F8E7");
        assert_eq!(n.host_if.len(), 15);
        assert!(n.host_if.starts_with("zwi"));
        assert_ne!(
            n,
            InstanceNetNames::for_instance("01JDZ8Y1Q0V4M3N2K1H0G9F8E8")
        );
    }
}
