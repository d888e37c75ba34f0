//! The `firecracker` runtime: one Firecracker VMM per instance, configured
//! through its API socket (a small HTTP/1.1 client over a unix stream).
//!
//! The guest is the one the qemu runtime boots (zw-init in an initramfs,
//! the instance config appended in a memfd handed to the VMM as fd 3, the
//! app's `rootfs.ext4` on `/dev/vda`, console to `work_dir/stdout.log`, a
//! tap per instance), with two differences Firecracker imposes:
//! - its kernel must take virtio-mmio devices from the command line
//!   (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y`, off in Debian's cloud kernel),
//!   so the operator supplies a kernel built for it;
//! - it has no copy-on-write for drives, so the rootfs is attached
//!   read-only (zw-init then mounts it read-only; /tmp is a tmpfs).
//!
//! Verified here: the API requests this driver sends (unit test against a
//! fake API socket). Not verified: a boot under a real Firecracker; none is
//! installable on the development machines, whose nested KVM does not work.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::qemu::{
    BASE_CMDLINE, Exits, INITRD_FD, handle_exit_code, instance_initrd, io_err, kill_vmm, mac_of,
    prepare_vm_start, run_tap, vmm_pre_exec,
};
use super::{InstanceSpec, Liveness, Runtime, RuntimeError, RuntimeHandle, pid_is, proc_stat};
use crate::net::{INSTANCE_PREFIX_LEN, InstanceNetNames, gateway_of};

const DRIVER: &str = "firecracker";
/// The binary looked up on PATH by default.
pub const FIRECRACKER_BINARY: &str = "firecracker";
/// Bound on the API socket appearing and on each API request.
const API_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// `firecracker`, or a path to it.
    pub binary: PathBuf,
    /// An uncompressed kernel (vmlinux) with virtio-mmio command-line devices.
    pub kernel: PathBuf,
    /// The base initramfs (`scripts/build-initramfs.sh`).
    pub initramfs: PathBuf,
    /// Where the embedded scripts are written.
    pub scripts_dir: PathBuf,
    /// What instances may reach (their taps join the node's rules).
    pub net: crate::net::NetPolicy,
}

/// Cheap, cached: root, a runnable `firecracker`, and a `/dev/kvm` that
/// opens. (Firecracker has no software fallback; whether KVM really works
/// is what `qemu::kvm_boot_check` finds out.)
pub fn probe() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                return Err("needs root (tap devices, /dev/kvm)".into());
            }
            let out = std::process::Command::new(FIRECRACKER_BINARY)
                .arg("--version")
                .output()
                .map_err(|e| format!("no runnable `{FIRECRACKER_BINARY}` on PATH: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "`{FIRECRACKER_BINARY} --version` failed: {}",
                    out.status
                ));
            }
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .map_err(|e| format!("/dev/kvm: {e}"))?;
            Ok(())
        })
        .clone()
}

/// One request to Firecracker's API; `Ok` on a 2xx answer, else the status
/// and the API's fault message.
pub async fn api_request(
    sock: &Path,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<(), String> {
    tokio::time::timeout(API_TIMEOUT, async {
        let mut stream = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| format!("connecting to {}: {e}", sock.display()))?;
        let body = body.to_string();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending {method} {path}: {e}"))?;
        let mut response = Vec::new();
        // The answer is small; read until the body announced is complete
        // (the API may keep the connection open despite Connection: close).
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.map_err(|e| format!("reading the answer to {path}: {e}"))?;
            response.extend_from_slice(&buf[..n]);
            if n == 0 || response_complete(&response) {
                break;
            }
            if response.len() > 1 << 20 {
                return Err(format!("the answer to {path} is over 1 MiB"));
            }
        }
        let text = String::from_utf8_lossy(&response);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP status in the answer to {method} {path}"))?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
            Err(format!("{method} {path} answered {status}: {body}"))
        }
    })
    .await
    .map_err(|_| format!("{method} {path} timed out after {API_TIMEOUT:?}"))?
}

fn response_complete(r: &[u8]) -> bool {
    let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&r[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    r.len() >= end + 4 + len
}

pub struct FirecrackerRuntime {
    config: FirecrackerConfig,
    base_initrd: Vec<u8>,
    net: crate::net::InstanceNet,
    exits: Exits,
    on_exit: Arc<Notify>,
}

impl FirecrackerRuntime {
    pub fn new(config: FirecrackerConfig, on_exit: Arc<Notify>) -> Result<Self, RuntimeError> {
        probe().map_err(|reason| RuntimeError::Unavailable {
            driver: DRIVER,
            reason,
        })?;
        if !config.kernel.is_file() {
            return Err(RuntimeError::Unavailable {
                driver: DRIVER,
                reason: format!("no guest kernel at {}", config.kernel.display()),
            });
        }
        let base_initrd = std::fs::read(&config.initramfs).map_err(io_err(format!(
            "reading the guest initramfs {}",
            config.initramfs.display()
        )))?;
        let net = crate::net::InstanceNet::new(&config.scripts_dir)
            .map_err(|e| RuntimeError::Unavailable {
                driver: DRIVER,
                reason: e.to_string(),
            })?
            .with_policy(config.net.clone());
        Ok(FirecrackerRuntime {
            config,
            base_initrd,
            net,
            exits: Default::default(),
            on_exit,
        })
    }

    /// The API calls that configure and boot one instance, in order.
    pub fn boot_requests(
        &self,
        spec: &InstanceSpec,
        tap: &str,
    ) -> Vec<(&'static str, String, serde_json::Value)> {
        let boot_args = format!(
            "{BASE_CMDLINE} zw.ip={}/{INSTANCE_PREFIX_LEN} zw.gw={}",
            spec.ip,
            gateway_of(spec.ip)
        );
        vec![
            (
                "PUT",
                "/machine-config".into(),
                json!({"vcpu_count": spec.vcpus.max(1), "mem_size_mib": spec.memory_mb.max(64)}),
            ),
            (
                "PUT",
                "/boot-source".into(),
                json!({
                    "kernel_image_path": self.config.kernel,
                    "initrd_path": format!("/proc/self/fd/{INITRD_FD}"),
                    "boot_args": boot_args,
                }),
            ),
            (
                "PUT",
                "/drives/rootfs".into(),
                json!({
                    "drive_id": "rootfs",
                    "path_on_host": spec.image_dir.join("rootfs.ext4"),
                    "is_root_device": false,
                    "is_read_only": true,
                }),
            ),
            (
                "PUT",
                "/network-interfaces/eth0".into(),
                json!({"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac_of(&spec.instance_id)}),
            ),
            (
                "PUT",
                "/actions".into(),
                json!({"action_type": "InstanceStart"}),
            ),
        ]
    }

    async fn start_inner(
        &self,
        spec: &InstanceSpec,
        tap: &str,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let failed = |reason: String| RuntimeError::StartFailed {
            instance_id: spec.instance_id.clone(),
            reason,
        };
        let (log, log_offset) = prepare_vm_start(spec)?;
        let sock = spec.work_dir.join("firecracker.sock");
        let _ = std::fs::remove_file(&sock);
        let open_append = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(io_err(format!("opening {}", p.display())))
        };
        // The serial console is Firecracker's stdout; its own log its stderr.
        let console = open_append(&log)?;
        let vmm_log = open_append(&spec.work_dir.join("firecracker.log"))?;
        let initrd = instance_initrd(&self.base_initrd, spec)?;

        run_tap(&self.net, Some(spec.ip), tap)
            .await
            .map_err(failed)?;
        let mut cmd = tokio::process::Command::new(&self.config.binary);
        cmd.arg("--api-sock")
            .arg(&sock)
            .arg("--id")
            .arg(
                spec.instance_id
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .take(64)
                    .collect::<String>(),
            )
            .stdin(std::process::Stdio::null())
            .stdout(console)
            .stderr(vmm_log);
        let raw = initrd.as_raw_fd();
        // SAFETY: vmm_pre_exec makes only async-signal-safe calls.
        unsafe {
            cmd.pre_exec(move || vmm_pre_exec(raw));
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = run_tap(&self.net, None, tap).await;
                return Err(failed(format!(
                    "spawning {}: {e}",
                    self.config.binary.display()
                )));
            }
        };
        drop(initrd);
        let Some(pid) = child.id() else {
            let _ = run_tap(&self.net, None, tap).await;
            return Err(failed("firecracker exited at once".into()));
        };
        let pid_start_ticks = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        let configured = async {
            let deadline = Instant::now() + API_TIMEOUT;
            while !sock.exists() {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "no API socket at {} after {API_TIMEOUT:?}",
                        sock.display()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            for (method, path, body) in self.boot_requests(spec, tap) {
                api_request(&sock, method, &path, &body).await?;
            }
            Ok(())
        }
        .await;
        if let Err(reason) = configured {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let _ = run_tap(&self.net, None, tap).await;
            return Err(failed(reason));
        }
        {
            let exits = Arc::clone(&self.exits);
            let on_exit = Arc::clone(&self.on_exit);
            let id = spec.instance_id.clone();
            tokio::spawn(async move {
                let code = child.wait().await.ok().and_then(|s| s.code());
                exits.lock().expect("exits lock").insert(id, (pid, code));
                on_exit.notify_waiters();
            });
        }
        Ok(RuntimeHandle {
            instance_id: spec.instance_id.clone(),
            driver: DRIVER.into(),
            pid,
            pid_start_ticks,
            ip: spec.ip,
            port: spec.port,
            work_dir: spec.work_dir.clone(),
            extra: BTreeMap::from([
                ("tap".to_string(), tap.to_string()),
                ("api_sock".to_string(), sock.display().to_string()),
                ("log_offset".to_string(), log_offset.to_string()),
            ]),
        })
    }
}

impl Runtime for FirecrackerRuntime {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn start<'a>(
        &'a self,
        spec: &'a InstanceSpec,
    ) -> BoxFuture<'a, Result<RuntimeHandle, RuntimeError>> {
        Box::pin(async move {
            let tap = InstanceNetNames::for_instance(&spec.instance_id).host_if;
            self.start_inner(spec, &tap).await
        })
    }

    fn stop<'a>(&'a self, handle: &'a RuntimeHandle) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            kill_vmm(handle.pid, handle.pid_start_ticks).await;
            if pid_is(handle.pid, handle.pid_start_ticks) {
                return Err(RuntimeError::Io {
                    what: format!(
                        "stopping firecracker pid {} of {}",
                        handle.pid, handle.instance_id
                    ),
                    source: std::io::Error::other("still alive after SIGKILL"),
                });
            }
            let tap = InstanceNetNames::for_instance(&handle.instance_id).host_if;
            let tap = handle.extra.get("tap").cloned().unwrap_or(tap);
            run_tap(&self.net, None, &tap)
                .await
                .map_err(|e| RuntimeError::Io {
                    what: format!("removing tap {tap} of {}", handle.instance_id),
                    source: std::io::Error::other(e),
                })?;
            let _ = std::fs::remove_file(handle.work_dir.join("firecracker.sock"));
            Ok(())
        })
    }

    fn liveness(&self, handle: &RuntimeHandle) -> Liveness {
        let reaped = matches!(
            self.exits.lock().expect("exits lock").get(&handle.instance_id),
            Some((pid, _)) if *pid == handle.pid
        );
        if !reaped && pid_is(handle.pid, handle.pid_start_ticks) {
            Liveness::Running
        } else {
            Liveness::Exited(handle_exit_code(handle))
        }
    }

    fn reclaim<'a>(
        &'a self,
        instance_id: &'a str,
        work_dir: &'a Path,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            // A Firecracker whose start was never recorded: the process
            // whose command line names this instance's API socket.
            let sock = work_dir.join("firecracker.sock").display().to_string();
            if let Ok(dir) = std::fs::read_dir("/proc") {
                for entry in dir.flatten() {
                    let Some(pid) = entry
                        .file_name()
                        .to_str()
                        .and_then(|p| p.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let ours = std::fs::read(entry.path().join("cmdline"))
                        .map(|c| c.split(|b| *b == 0).any(|arg| arg == sock.as_bytes()))
                        .unwrap_or(false);
                    if let (true, Some((_, ticks))) = (ours, proc_stat(pid)) {
                        tracing::warn!(
                            instance = instance_id,
                            pid,
                            "firecracker: reclaiming an unrecorded VM"
                        );
                        kill_vmm(pid, ticks).await;
                    }
                }
            }
            let tap = InstanceNetNames::for_instance(instance_id).host_if;
            run_tap(&self.net, None, &tap)
                .await
                .map_err(|e| RuntimeError::Io {
                    what: format!("removing tap {tap} of {instance_id}"),
                    source: std::io::Error::other(e),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the client sends, checked against a fake API socket; and an
    /// error answer surfaces the API's fault message.
    #[tokio::test]
    async fn api_client_speaks_http_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let mut requests = Vec::new();
            let fault = r#"{"fault_message":"bad vcpus"}"#;
            let answers = [
                "HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n".to_string(),
                format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{fault}",
                    fault.len()
                ),
            ];
            for answer in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !response_complete(&got) {
                    let n = s.read(&mut buf).await.unwrap();
                    assert!(n > 0, "client closed early");
                    got.extend_from_slice(&buf[..n]);
                }
                requests.push(String::from_utf8(got).unwrap());
                s.write_all(answer.as_bytes()).await.unwrap();
            }
            requests
        });
        api_request(
            &sock,
            "PUT",
            "/actions",
            &json!({"action_type": "InstanceStart"}),
        )
        .await
        .unwrap();
        let err = api_request(&sock, "PUT", "/machine-config", &json!({"vcpu_count": 0}))
            .await
            .unwrap_err();
        assert!(err.contains("400") && err.contains("bad vcpus"), "{err}");
        let requests = server.await.unwrap();
        let body = r#"{"action_type":"InstanceStart"}"#;
        assert!(
            requests[0].starts_with("PUT /actions HTTP/1.1\r\n"),
            "{}",
            requests[0]
        );
        assert!(requests[0].contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(requests[0].ends_with(&format!("\r\n\r\n{body}")));
    }
}
