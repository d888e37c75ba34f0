//! `kill -9` of a real follower process in the middle of convergence, then a
//! restart on the same data dir: the instances it had started are adopted
//! (same processes), the missing ones started, none duplicated; a release
//! removed while the follower is down is stopped by the next one, leaving
//! nothing behind.
//!
//! The follower runs as a child process: this very test binary, re-run with
//! `--exact child_follower_process` and its configuration in the
//! environment.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use follower::image::LocalDirImageSource;
use follower::net::InstanceRange;
use follower::runtime::RuntimeChoice;
use follower::{Follower, FollowerConfig};
use meta_schema::pb::DeploymentState;

const ENV_DIR: &str = "ZW_TEST_FOLLOWER_DIR";

/// The child side: a follower until killed (at most 5 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_follower_process() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("follower=info")
        .try_init();
    let env = |k: &str| std::env::var(k).unwrap();
    let mut cfg = FollowerConfig::new(PathBuf::from(dir), env("ZW_TEST_META"));
    cfg.node_id = Some("node-k".into());
    cfg.runtime = RuntimeChoice::Process;
    cfg.instance_range = Some(InstanceRange::parse(&env("ZW_TEST_RANGE")).unwrap());
    cfg.images = Some(Arc::new(LocalDirImageSource::new(env("ZW_TEST_STORE"))));
    cfg.poll_interval = Duration::from_millis(200);
    cfg.reconcile_interval = Duration::from_millis(200);
    let _f = Follower::start(cfg).await.unwrap();
    tokio::time::sleep(Duration::from_secs(300)).await;
}

struct Child9 {
    child: Option<Child>,
    data: PathBuf,
}

impl Child9 {
    fn spawn(data: &Path, meta: &str, store: &Path, range: InstanceRange, log: &Path) -> Child9 {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_follower_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(ENV_DIR, data)
            .env("ZW_TEST_META", meta)
            .env("ZW_TEST_STORE", store)
            .env("ZW_TEST_RANGE", range.to_string())
            .env("RUST_LOG", "follower=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Child9 {
            child: Some(child),
            data: data.to_path_buf(),
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }
}

impl Drop for Child9 {
    fn drop(&mut self) {
        self.kill9();
        // Leave nothing behind when an assertion failed half-way.
        for (pid, _) in supervisors(&self.data) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-(pid as i32)),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for id in ledger(&self.data)
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys().cloned())
        {
            let n = follower::net::InstanceNetNames::for_instance(&id);
            let _ = Command::new("ip").args(["netns", "del", &n.netns]).status();
        }
    }
}

/// The instances of the ledger on disk, as JSON (`{id: record}`).
fn ledger(data: &Path) -> serde_json::Value {
    std::fs::read(data.join("ledger/instances.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| v["data"]["instances"].clone())
        .unwrap_or(serde_json::json!({}))
}

/// Live supervisors of instances under `data` (pid, cmdline), from /proc.
fn supervisors(data: &Path) -> Vec<(u32, String)> {
    let needle = format!("run\0{}/instances/", data.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).into_owned();
        if cmd.contains("process-instance.sh") && cmd.contains(&needle) {
            out.push((pid, cmd));
        }
    }
    out
}

fn handles(l: &serde_json::Value) -> Vec<(String, u64)> {
    l.as_object()
        .unwrap()
        .iter()
        .filter(|(_, r)| !r["handle"].is_null())
        .map(|(id, r)| (id.clone(), r["handle"]["pid"].as_u64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_convergence_then_restart_adopts_without_duplicates() {
    if std::env::var(ENV_DIR).is_ok() {
        return; // we are the child of another run
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let digest = common::busybox_image(&store, &common::httpd_config(8080));
    let meta = common::Meta::new(tmp.path());
    let data = tmp.path().join("node");
    let range = common::random_range();
    let log = tmp.path().join("follower.log");
    let r = meta.release("web", &digest, 8080);
    let d = meta.deployment(&r, DeploymentState::RollingOut, None, "node-k", 3);
    meta.commit(&[&r], &[&d], &[], "deploy");

    let mut child = Child9::spawn(&data, &meta.url(), &store, range, &log);
    // Kill as soon as the first instance's handle is on disk.
    let before = common::wait_for(60, "a first started instance in the ledger", || {
        let h = handles(&ledger(&data));
        (!h.is_empty()).then_some(h)
    })
    .await;
    child.kill9();
    let after_kill = handles(&ledger(&data));
    println!(
        "killed with {} of 3 instances recorded as started",
        after_kill.len()
    );
    for (id, pid) in &after_kill {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "instance {id} (pid {pid}) died with the follower"
        );
    }
    assert!(after_kill.len() >= before.len());

    // Restart on the same data dir.
    let mut child2 = Child9::spawn(&data, &meta.url(), &store, range, &log);
    let healthy = common::wait_for(90, "3 healthy instances after the restart", || {
        let l = ledger(&data);
        let m = l.as_object()?;
        (m.len() == 3 && m.values().all(|r| r["phase"] == "healthy")).then_some(l)
    })
    .await;
    let now = handles(&healthy);
    for (id, pid) in &after_kill {
        assert!(
            now.contains(&(id.clone(), *pid)),
            "{id} was restarted instead of adopted"
        );
    }
    let sups = supervisors(&data);
    assert_eq!(
        sups.len(),
        3,
        "exactly one supervisor per instance: {sups:#?}"
    );
    let expected: std::collections::BTreeSet<u64> = now.iter().map(|(_, p)| *p).collect();
    let actual: std::collections::BTreeSet<u64> = sups.iter().map(|(p, _)| u64::from(*p)).collect();
    assert_eq!(expected, actual);

    // Killed again; while it is down the release is removed. The next
    // follower stops every instance it adopts: nothing is left behind.
    child2.kill9();
    let log_of_two = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        supervisors(&data).len(),
        3,
        "instances outlive the follower"
    );
    meta.commit(
        &[],
        &[],
        &[meta_schema::layout::release_path("prod", "web", &r.id)],
        "remove web",
    );
    let mut child3 = Child9::spawn(&data, &meta.url(), &store, range, &log);
    common::wait_for(60, "no instances in the ledger", || {
        ledger(&data).as_object()?.is_empty().then_some(())
    })
    .await;
    common::wait_for(10, "no supervisor left", || {
        supervisors(&data).is_empty().then_some(())
    })
    .await;
    child3.kill9();
    let adopted = log_of_two
        .lines()
        .filter(|l| l.contains("adopted a running instance"))
        .count();
    assert_eq!(
        adopted,
        after_kill.len(),
        "the restart adopted what the killed follower started: {log_of_two}"
    );
}
