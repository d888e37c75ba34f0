//! The build sandbox (issue 14 item 6): a Dockerfile is hostile input, and
//! its RUN steps run code. Run as root, buildah runs in a user namespace
//! whose root is an unprivileged host id, in a cgroup with limits and under
//! a deadline. These builds attack the host and must come to nothing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use builder::backend::{BUILD_ID_BASE, BuildLimits, BuildahBackend};
use builder::{BuildError, BuildOptions, Builder, LocalStore, MemoryLog, Source};
use common::busybox_context;

fn builder_with(data: &Path, limits: Option<BuildLimits>) -> Builder {
    common::require_tools(&["buildah", "mkfs.ext4"]);
    let mut backend = BuildahBackend::new(&data.join("buildah")).expect("buildah backend");
    if let Some(l) = limits {
        backend = backend.with_limits(l);
    }
    let mut cfg = common::config(data);
    cfg.retry = common::fast_retry(1);
    Builder::with_backend(
        Arc::new(LocalStore::new(data.join("store"))),
        Box::new(backend),
        cfg,
    )
}

fn run_step(script: &str) -> String {
    format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    )
}

fn log_text(log: &MemoryLog) -> String {
    log.lines()
        .iter()
        .map(|l| l.text.clone())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_run_step_cannot_read_a_root_only_file_or_write_outside_its_layer() {
    if !nix_is_root() {
        eprintln!("SKIPPED: the sandbox is what root builds get");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Only each file's own mode protects it: the directories are open.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = tmp.path().join("captain-data");
    std::fs::create_dir_all(host.join("out")).unwrap();
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = host.join("admin.token");
    std::fs::write(&secret, "zw-admin-token-7f3a91\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = host.join("out");
    // A kernel file only host root may read, which a build sees (/sys).
    let root_only = root_only_sys_file().expect("a 0400/0600 root file under /sys/kernel");
    // Every way in this RUN step can think of: the host's root through any
    // process's /proc/<pid>/root, the host's /root, root-only kernel files.
    let script = format!(
        "b=/bin/busybox; echo \"run step: $($b id)\"; \
         $b cat {root_only} >/dev/null 2>&1 && echo \"read root-only /sys file\"; \
         for p in /proc/[0-9]*; do \
           $b cat $p/root{secret} 2>/dev/null && echo \"read via $p\"; \
           echo pwned 2>/dev/null > $p/root{out}/pwned && echo \"wrote via $p\"; \
           $b ls $p/root/root/ >/dev/null 2>&1 && echo \"listed /root via $p\"; \
         done; echo probe-done",
        secret = secret.display(),
        out = out.display(),
        root_only = root_only.display()
    );
    let ctx = busybox_context(&tmp.path().join("src"), &run_step(&script));
    let builder = builder_with(&tmp.path().join("data"), None);
    let log = MemoryLog::new();
    let built = builder
        .build(Source::Local(ctx), BuildOptions::default(), &log)
        .await;
    let text = log_text(&log);
    assert!(built.is_ok(), "{built:?}\n{text}");
    assert!(text.contains("probe-done"), "{text}");
    // The step is root in its namespace, an unprivileged id on the host.
    assert!(text.contains("run step: uid=0"), "{text}");
    assert!(
        !text.contains("zw-admin-token-7f3a91"),
        "the secret leaked:\n{text}"
    );
    assert!(!text.contains("read via /proc"), "{text}");
    assert!(
        !text.contains("read root-only /sys file\n") && !text.ends_with("read root-only /sys file"),
        "the step read {}:\n{text}",
        root_only.display()
    );
    assert!(!text.contains("wrote via /proc"), "{text}");
    assert!(!text.contains("listed /root via /proc"), "{text}");
    assert!(!out.join("pwned").exists(), "the step wrote on the host");
    // The build's files on the host belong to the build's id, not root.
    use std::os::unix::fs::MetadataExt;
    let storage = tmp.path().join("data/buildah/storage");
    assert_eq!(std::fs::metadata(storage).unwrap().uid(), BUILD_ID_BASE);
}

#[tokio::test]
async fn a_fork_bomb_and_an_endless_step_end_at_the_build_limits() {
    if !nix_is_root() {
        eprintln!("SKIPPED: the sandbox is what root builds get");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let limits = BuildLimits {
        memory_mb: 512,
        pids: 64,
        cpus: 1,
        timeout: Duration::from_secs(60),
    };
    let bomb = busybox_context(
        &tmp.path().join("bomb"),
        &run_step("while :; do /bin/busybox sleep 600 & done"),
    );
    let builder = builder_with(&tmp.path().join("data"), Some(limits));
    let log = MemoryLog::new();
    let err = builder
        .build(Source::Local(bomb), BuildOptions::default(), &log)
        .await
        .unwrap_err();
    let BuildError::User { message, .. } = &err else {
        panic!("a fork bomb is the user's fault: {err}")
    };
    assert!(message.contains("process limit"), "{message}");

    let slow = busybox_context(
        &tmp.path().join("slow"),
        &run_step("/bin/busybox sleep 600"),
    );
    let builder = builder_with(
        &tmp.path().join("data2"),
        Some(BuildLimits {
            timeout: Duration::from_secs(5),
            ..limits
        }),
    );
    let started = std::time::Instant::now();
    let err = builder
        .build(
            Source::Local(slow),
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(60));
    let BuildError::User { message, .. } = &err else {
        panic!("an endless step is the user's fault: {err}")
    };
    assert!(message.contains("longer than its limit"), "{message}");
    // Nothing of either build runs on.
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", "busybox sleep 600"])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "processes outlived their build: {}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
}

/// A regular file under /sys/kernel that only root may read.
fn root_only_sys_file() -> Option<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut dirs = vec![std::path::PathBuf::from("/sys/kernel")];
    let mut depth = 0;
    while depth < 3 {
        let mut next = Vec::new();
        for d in dirs {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if m.is_dir() {
                    next.push(e.path());
                } else if m.is_file()
                    && m.uid() == 0
                    && m.mode() & 0o077 == 0
                    && m.mode() & 0o400 != 0
                    && std::fs::read(e.path()).is_ok()
                {
                    return Some(e.path());
                }
            }
        }
        dirs = next;
        depth += 1;
    }
    None
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
