//! The OCI runtime configuration (`config.json`) of a `process` instance,
//! and the seccomp profile it carries.
//!
//! - User namespace: container ids 0..65536 are host ids `base..` (see
//!   [`super::rootfs::IdMap`]); the image's root is never host root.
//! - Capabilities: the default set of the containers tools (podman's
//!   `default_capabilities`: no `NET_RAW`, `MKNOD`, `AUDIT_WRITE`), in the
//!   bounding set always and effective/permitted only for uid 0, as Docker
//!   does; `noNewPrivileges`.
//! - Seccomp: the distribution's default profile of the containers tools
//!   (`/usr/share/containers/seccomp.json`, Debian package
//!   `golang-github-containers-common`), converted from its own format
//!   (`archMap`, `includes`/`excludes` by capability, architecture and
//!   kernel) to the OCI form for the capabilities granted here, the way
//!   Docker and podman convert it. Without `CAP_SYS_ADMIN` it is tightened
//!   as Docker's profile is: namespace and mount syscalls, keyrings, bpf and
//!   perf are refused, and `clone` only without namespace flags (`clone3`
//!   answers ENOSYS so libc falls back to `clone`).
//! - Mounts: the overlay root (made by [`super::rootfs`]), `/proc`, a
//!   `/dev` tmpfs with the standard devices only, `/dev/pts`, `/dev/shm`,
//!   `/dev/mqueue`; every writable one `nodev,nosuid` (but `/dev/pts`,
//!   whose ptys are devices). No `/sys`: sysfs
//!   cannot be mounted from a user namespace into a network namespace it
//!   does not own, and the host's is not the app's business.
//! - cgroup limits: memory, CPU quota and pids (see [`Limits`]).
//! - The environment: only here, in memory, then in a file on tmpfs that
//!   is removed as soon as the container runs.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::rootfs::IdMap;

/// The distribution's default seccomp profile (containers-common).
pub const SECCOMP_PROFILE: &str = "/usr/share/containers/seccomp.json";

/// Capabilities an instance's root gets: the containers tools' default.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// Syscalls refused without `CAP_SYS_ADMIN` on top of the distribution's
/// profile (Docker's default profile refuses them too): they reach new
/// namespaces, mounts, keyrings, bpf and perf.
const ADMIN_ONLY: &[&str] = &[
    "unshare",
    "setns",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "move_mount",
    "mount_setattr",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
];

/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
/// CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET`.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("reading the seccomp profile {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the seccomp profile {path} is not valid")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the seccomp profile has no entry for this architecture ({0})")]
    Arch(String),
}

/// cgroup limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_mb: u32,
    pub vcpus: u32,
    pub pids: u32,
}

impl Limits {
    /// From the release's resources (the reconciler fills their defaults:
    /// 1 vCPU, 256 MiB). Tasks (processes and threads): 4 per MiB of memory
    /// (a fork bomb stops long before the node does), at least 128.
    pub fn new(memory_mb: u32, vcpus: u32) -> Limits {
        let memory_mb = memory_mb.max(16);
        Limits {
            memory_mb,
            vcpus: vcpus.max(1),
            pids: memory_mb.saturating_mul(4).clamp(128, 32768),
        }
    }
}

/// What varies per instance in its `config.json`.
pub struct ContainerSpec<'a> {
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub hostname: &'a str,
    pub root: &'a Path,
    pub netns: &'a Path,
    pub cgroups_path: &'a str,
    pub idmap: IdMap,
    pub limits: Limits,
    /// A `resolv.conf` to bind (read-only) over the image's, if any.
    pub resolv_conf: Option<&'a Path>,
}

/// The complete OCI runtime config of an instance.
pub fn config(c: &ContainerSpec<'_>, seccomp: &Value) -> Value {
    let caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    let live: Vec<&str> = if c.uid == 0 { caps.clone() } else { Vec::new() };
    let env: Vec<String> = c.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let map = json!([{"containerID": 0, "hostID": c.idmap.host_base, "size": c.idmap.size}]);
    let memory = u64::from(c.limits.memory_mb) << 20;
    let mut mounts = json!([
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "noexec", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
    ]);
    if let (Some(resolv), Some(list)) = (c.resolv_conf, mounts.as_array_mut()) {
        list.push(
            json!({"destination": "/etc/resolv.conf", "type": "bind", "source": resolv,
                         "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}),
        );
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": c.uid, "gid": c.gid},
            "args": c.args,
            "env": env,
            "cwd": c.cwd,
            "capabilities": {
                "bounding": caps,
                "effective": live,
                "permitted": live,
            },
            "noNewPrivileges": true,
        },
        "root": {"path": c.root, "readonly": false},
        "hostname": c.hostname,
        "mounts": mounts,
        "linux": {
            "uidMappings": map,
            "gidMappings": map,
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "user"}, {"type": "cgroup"},
                {"type": "network", "path": c.netns},
            ],
            "cgroupsPath": c.cgroups_path,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": memory},
                "cpu": {"quota": i64::from(c.limits.vcpus) * 100_000, "period": 100_000u64},
                "pids": {"limit": c.limits.pids},
            },
            "rootfsPropagation": "private",
            "seccomp": seccomp,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

/// The host's resolvers an instance can use: those of `/etc/resolv.conf`
/// that are not loopback (a resolver on the node itself is out of an
/// instance's reach), as a `resolv.conf`; `None` when there are none.
pub fn instance_resolv_conf(host: &str) -> Option<String> {
    let servers: Vec<&str> = host
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .filter(|s| {
            s.parse::<std::net::IpAddr>()
                .is_ok_and(|a| !a.is_loopback() && !a.is_unspecified())
        })
        .collect();
    if servers.is_empty() {
        return None;
    }
    let mut out: String = servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect();
    if let Some(search) = host.lines().find(|l| l.starts_with("search ")) {
        out.push_str(search);
        out.push('\n');
    }
    Some(out)
}

/// Reads the distribution's profile and converts it (see [`convert`]).
pub fn load_seccomp(path: &Path) -> Result<Value, SeccompError> {
    let text = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let profile: Value = serde_json::from_str(&text).map_err(|source| SeccompError::Parse {
        path: path.display().to_string(),
        source,
    })?;
    convert(
        &profile,
        std::env::consts::ARCH,
        &kernel_release(),
        DEFAULT_CAPS,
    )
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `6.18.44-foo` -> (6, 18).
fn kernel_version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Converts a profile in the containers/Docker format to the OCI
/// `linux.seccomp` object for architecture `arch` (Rust's name), kernel
/// `release` and the capabilities `caps`.
pub fn convert(
    profile: &Value,
    arch: &str,
    release: &str,
    caps: &[&str],
) -> Result<Value, SeccompError> {
    let (scmp_arch, go_arch) = match arch {
        "x86_64" => ("SCMP_ARCH_X86_64", "amd64"),
        "aarch64" => ("SCMP_ARCH_AARCH64", "arm64"),
        other => return Err(SeccompError::Arch(other.to_string())),
    };
    let mut arches = vec![scmp_arch.to_string()];
    let entry = profile["archMap"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["architecture"] == scmp_arch)
        .ok_or_else(|| SeccompError::Arch(arch.to_string()))?;
    arches.extend(
        entry["subArchitectures"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from)),
    );
    let kernel = kernel_version(release);
    let has_cap = |c: &Value| c.as_str().is_some_and(|c| caps.contains(&c));
    let strs = |v: &Value| -> Vec<Value> { v.as_array().cloned().unwrap_or_default() };
    let min_kernel_ok = |v: &Value| v.as_str().is_none_or(|k| kernel >= kernel_version(k));
    let admin = caps.contains(&"CAP_SYS_ADMIN");

    let mut syscalls = Vec::new();
    for call in profile["syscalls"].as_array().into_iter().flatten() {
        let (inc, exc) = (&call["includes"], &call["excludes"]);
        let exc_arches = strs(&exc["arches"]);
        if exc_arches.iter().any(|a| a == go_arch)
            || strs(&exc["caps"]).iter().any(has_cap)
            || (exc["minKernel"].is_string() && min_kernel_ok(&exc["minKernel"]))
        {
            continue;
        }
        let inc_arches = strs(&inc["arches"]);
        if (!inc_arches.is_empty() && !inc_arches.iter().any(|a| a == go_arch))
            || !strs(&inc["caps"]).iter().all(has_cap)
            || !min_kernel_ok(&inc["minKernel"])
        {
            continue;
        }
        let allow = call["action"] == "SCMP_ACT_ALLOW";
        let names: Vec<Value> = strs(&call["names"])
            .into_iter()
            .filter(|n| {
                let n = n.as_str().unwrap_or_default();
                admin || !allow || !(ADMIN_ONLY.contains(&n) || n == "clone" || n == "clone3")
            })
            .collect();
        if names.is_empty() {
            continue;
        }
        let mut rule = serde_json::Map::new();
        rule.insert("names".into(), Value::Array(names));
        rule.insert("action".into(), call["action"].clone());
        if let Some(e) = call["errnoRet"].as_u64() {
            rule.insert("errnoRet".into(), e.into());
        }
        if let Some(args) = call["args"].as_array().filter(|a| !a.is_empty()) {
            rule.insert("args".into(), Value::Array(args.clone()));
        }
        syscalls.push(Value::Object(rule));
    }
    if !admin {
        syscalls.push(json!({
            "names": ADMIN_ONLY, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM,
        }));
        syscalls.push(json!({
            "names": ["clone"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0,
                      "op": "SCMP_CMP_MASKED_EQ"}],
        }));
        syscalls.push(json!({
            "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS,
        }));
    }
    let mut out = serde_json::Map::new();
    out.insert("defaultAction".into(), profile["defaultAction"].clone());
    if let Some(e) = profile["defaultErrnoRet"].as_u64() {
        out.insert("defaultErrnoRet".into(), e.into());
    }
    out.insert("architectures".into(), json!(arches));
    out.insert("syscalls".into(), Value::Array(syscalls));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Value {
        json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "archMap": [
                {"architecture": "SCMP_ARCH_X86_64",
                 "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
            ],
            "syscalls": [
                {"names": ["read", "write", "mount", "clone", "unshare"], "action": "SCMP_ACT_ALLOW",
                 "args": [], "includes": {}, "excludes": {}},
                {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"arches": ["amd64", "x32"]}, "excludes": {}},
                {"names": ["set_tls"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"arches": ["arm", "arm64"]}, "excludes": {}},
                {"names": ["chroot"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_CHROOT"]}, "excludes": {}},
                {"names": ["chroot"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                 "includes": {}, "excludes": {"caps": ["CAP_SYS_CHROOT"]}},
                {"names": ["bpf"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"caps": ["CAP_SYS_ADMIN"]}, "excludes": {}},
                {"names": ["bpf"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                 "includes": {}, "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["newthing"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "99.0"}, "excludes": {}},
                {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 16, "valueTwo": 0, "op": "SCMP_CMP_NE"}],
                 "includes": {}, "excludes": {}},
            ],
        })
    }

    fn rules_for<'a>(v: &'a Value, name: &str) -> Vec<&'a Value> {
        v["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["names"].as_array().unwrap().iter().any(|n| n == name))
            .collect()
    }

    #[test]
    fn conversion_follows_arch_caps_and_kernel() {
        let v = convert(&profile(), "x86_64", "6.18.4-x", DEFAULT_CAPS).unwrap();
        assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(v["defaultErrnoRet"], 38);
        assert_eq!(
            v["architectures"],
            json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        );
        assert_eq!(rules_for(&v, "arch_prctl").len(), 1);
        assert!(rules_for(&v, "set_tls").is_empty());
        assert!(rules_for(&v, "newthing").is_empty());
        // CAP_SYS_CHROOT is granted: only the allow rule is kept.
        let chroot = rules_for(&v, "chroot");
        assert_eq!(chroot.len(), 1);
        assert_eq!(chroot[0]["action"], "SCMP_ACT_ALLOW");
        // CAP_SYS_ADMIN is not: bpf is refused, never allowed.
        assert!(
            rules_for(&v, "bpf")
                .iter()
                .all(|r| r["action"] == "SCMP_ACT_ERRNO")
        );
        // Namespaces and mounts are refused; clone only without ns flags.
        assert!(
            rules_for(&v, "mount")
                .iter()
                .chain(rules_for(&v, "unshare").iter())
                .all(|r| r["action"] == "SCMP_ACT_ERRNO" && r["errnoRet"] == libc::EPERM)
        );
        let clone = rules_for(&v, "clone");
        assert_eq!(clone.len(), 1);
        assert_eq!(clone[0]["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert!(rules_for(&v, "read")[0]["action"] == "SCMP_ACT_ALLOW");
        assert!(rules_for(&v, "socket")[0]["args"].is_array());
        // With CAP_SYS_ADMIN nothing is tightened.
        let v = convert(&profile(), "aarch64", "6.1", &["CAP_SYS_ADMIN"]).unwrap();
        assert_eq!(rules_for(&v, "set_tls").len(), 1);
        assert!(rules_for(&v, "arch_prctl").is_empty());
        assert_eq!(rules_for(&v, "bpf")[0]["action"], "SCMP_ACT_ALLOW");
        assert!(rules_for(&v, "chroot")[0]["action"] == "SCMP_ACT_ERRNO");
        assert!(convert(&profile(), "riscv64", "6.1", DEFAULT_CAPS).is_err());
    }

    #[test]
    fn the_installed_profile_converts() {
        let path = Path::new(SECCOMP_PROFILE);
        if !path.exists() {
            return; // not a node with containers-common
        }
        let v = load_seccomp(path).unwrap();
        assert!(rules_for(&v, "read")[0]["action"] == "SCMP_ACT_ALLOW");
        assert!(rules_for(&v, "mount")[0]["action"] == "SCMP_ACT_ERRNO");
    }

    #[test]
    fn resolvers_on_the_node_itself_are_dropped() {
        assert_eq!(
            instance_resolv_conf(
                "# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nsearch example.org\n"
            ),
            Some("nameserver 10.0.0.2\nsearch example.org\n".into())
        );
        assert_eq!(instance_resolv_conf("nameserver 127.0.0.53\n"), None);
    }

    #[test]
    fn limits_have_floors() {
        assert_eq!(
            Limits::new(0, 0),
            Limits {
                memory_mb: 16,
                vcpus: 1,
                pids: 128
            }
        );
        assert_eq!(Limits::new(256, 2).pids, 1024);
    }
}
