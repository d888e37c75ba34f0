//! Instance networking on a node: addresses from a node-local IPv6 range and
//! one network namespace per instance, joined to the host by a veth pair.
//!
//! Layout: the node's instance range is a /64 (`fd00:7a77:0:<subnet>::/64`
//! by default, the subnet derived from the node id). Instance slot `n`
//! (1..=65535) owns the /112 `<range>::n:0`; the host end of its veth holds
//! `<range>::n:1` (gateway, and the node's source address towards it), the
//! instance holds `<range>::n:2`. Forwarding from or to any instance
//! interface (`zwi*`) is dropped by an nftables table, so an instance reaches
//! the node but never another instance; the node reaches every instance on
//! a directly connected /112. The shell side is `scripts/instance-net.sh`.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

/// Prefix length of one instance's link.
pub const INSTANCE_PREFIX_LEN: u8 = 112;

const INSTANCE_NET_SH: &str = include_str!("../../scripts/instance-net.sh");

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("instance range {0} is not a /64 written as an address ending in ::")]
    BadRange(String),
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

    /// Lowest slot not in `used`.
    pub fn free_slot(&self, used: impl IntoIterator<Item = u16>) -> Result<u16, NetError> {
        let used: std::collections::BTreeSet<u16> = used.into_iter().collect();
        (1..=u16::MAX)
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
        })
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
        self.run(&[
            "up",
            &names.netns,
            &names.host_if,
            &gateway_of(addr).to_string(),
            &addr.to_string(),
            &INSTANCE_PREFIX_LEN.to_string(),
        ])
        .await
    }

    /// Removes them; idempotent.
    pub async fn down(&self, names: &InstanceNetNames) -> Result<(), NetError> {
        self.run(&["down", &names.netns, &names.host_if]).await
    }

    async fn run(&self, args: &[&str]) -> Result<(), NetError> {
        let action = args.join(" ");
        let mut cmd = tokio::process::Command::new("bash");
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
