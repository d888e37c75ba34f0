//! Instance logs of real apps (process runtime, busybox), read through the
//! node API as the captain does: a 200 KiB line is collected once (split,
//! not truncated) and the lines after it too, whatever the collector's
//! pace; an app logging as fast as it can keeps its records under the cap
//! and its raw output freed, while a reader paging with `?from=` gets no
//! line twice and skips only lines already dropped.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use follower::image::{ImageConfig, LocalDirImageSource};
use follower::logs::LogLimits;
use follower::reconciler::Phase;
use follower::runtime::RuntimeChoice;
use follower::{Follower, FollowerConfig};
use meta_schema::pb::DeploymentState;

/// A follower whose instances are stopped when the test ends, also when it
/// fails half-way.
struct Node(Option<Follower>);

impl Node {
    fn f(&self) -> &Follower {
        self.0.as_ref().expect("running")
    }

    async fn stop(mut self) {
        if let Some(f) = self.0.take() {
            f.shutdown_and_stop_instances().await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A failed assertion: stop everything from a runtime of our own
        // (the test's is unwinding).
        if let Some(f) = self.0.take() {
            let _ = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the cleanup")
                    .block_on(f.shutdown_and_stop_instances())
            })
            .join();
        }
    }
}

/// One app of `script` (busybox sh) on a fresh follower; returns the node,
/// the instance id and its work dir once the instance is recorded.
async fn run_app(
    tmp: &Path,
    script: &str,
    limits: LogLimits,
    log_interval: Duration,
) -> (Node, String, PathBuf) {
    let store = tmp.join("store");
    let digest = common::busybox_image(
        &store,
        &ImageConfig {
            entrypoint: vec![
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                script.into(),
            ],
            cmd: vec![],
            ..common::httpd_config(8080)
        },
    );
    let meta = common::Meta::new(tmp);
    let mut cfg = FollowerConfig::new(tmp.join("node"), meta.url());
    cfg.node_id = Some("node-l".into());
    cfg.runtime = RuntimeChoice::Process;
    cfg.instance_range = Some(common::random_range());
    cfg.images = Some(Arc::new(LocalDirImageSource::new(&store)));
    cfg.poll_interval = Duration::from_millis(200);
    cfg.reconcile_interval = Duration::from_millis(300);
    cfg.log_interval = log_interval;
    cfg.log_limits = limits;
    let node = Node(Some(Follower::start(cfg).await.unwrap()));
    let r = meta.release("logs", &digest, 8080);
    let d = meta.deployment(&r, DeploymentState::RollingOut, None, "node-l", 1);
    meta.commit(&[&r], &[&d], &[], "deploy");
    node.f().notify.notify_one();
    let (id, dir) = common::wait_for(60, "the instance started", || {
        let s = node.f().reconciler.instances.borrow().clone();
        let r = s.values().next()?;
        r.handle.as_ref()?;
        Some((r.instance_id.clone(), r.work_dir.clone()))
    })
    .await;
    (node, id, dir)
}

#[derive(Debug, Clone, serde::Deserialize)]
struct Line {
    t: u64,
    line: String,
}

/// One page of the node API: lines after `from` and `X-Last-Log-Nano`.
async fn page(f: &Follower, id: &str, from: u64, limit: usize) -> (Vec<Line>, u64) {
    let resp = reqwest::Client::new()
        .get(format!(
            "http://{}/v1/instances/{id}/logs?from={from}&limit={limit}",
            f.api_addr
        ))
        .bearer_auth(&f.node_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let last = resp.headers()["x-last-log-nano"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (resp.json().await.unwrap(), last)
}

/// Every line from `from`, `limit` a page.
async fn page_all(f: &Follower, id: &str, mut from: u64, limit: usize) -> Vec<Line> {
    let mut all = Vec::new();
    loop {
        let (lines, last) = page(f, id, from, limit).await;
        if lines.is_empty() {
            return all;
        }
        assert_eq!(last, lines.last().unwrap().t);
        from = last;
        all.extend(lines);
    }
}

/// Bytes of records (log.jsonl and its segments) and disk bytes of the raw
/// output.
fn disk(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut records = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("log.") && name.ends_with(".jsonl") {
            records += e.metadata().map_or(0, |m| m.len());
        }
    }
    let raw = std::fs::metadata(dir.join("stdout.log")).map_or(0, |m| m.blocks() * 512);
    (records, raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_kib_line_and_the_lines_after_it_are_collected_once() {
    let tmp = tempfile::tempdir().unwrap();
    // 200 KiB of x on one line; a second for the collector to go over it
    // (the long line is the newest record then); 20 lines; then serve.
    let script = "s=x; i=0; while [ $i -lt 10 ]; do s=\"$s$s\"; i=$((i+1)); done; \
                  t=; i=0; while [ $i -lt 200 ]; do t=\"$t$s\"; i=$((i+1)); done; \
                  echo \"$t\"; busybox sleep 1; \
                  i=0; while [ $i -lt 20 ]; do echo \"normal $i\"; i=$((i+1)); done; \
                  exec busybox httpd -f -p 8080 -h /www";
    let (node, id, dir) = run_app(
        tmp.path(),
        script,
        LogLimits::default(),
        Duration::from_millis(100),
    )
    .await;
    let f = node.f();
    common::wait_for(60, "healthy", || {
        let s = f.reconciler.instances.borrow().clone();
        (s.get(&id)?.phase == Phase::Healthy).then_some(())
    })
    .await;
    // Many collector passes after the last line.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let check = |all: &[Line]| {
        assert!(all.windows(2).all(|w| w[0].t < w[1].t), "in order, once");
        let xs: Vec<&Line> = all
            .iter()
            .filter(|l| !l.line.is_empty() && l.line.bytes().all(|b| b == b'x'))
            .collect();
        assert_eq!(xs.len(), 13, "200 KiB in 16 KiB records, once");
        let joined: usize = xs.iter().map(|l| l.line.len()).sum();
        assert_eq!(joined, 200 * 1024, "split, not truncated");
        let normal: Vec<&str> = all
            .iter()
            .filter(|l| l.line.starts_with("normal "))
            .map(|l| l.line.as_str())
            .collect();
        let want: Vec<String> = (0..20).map(|i| format!("normal {i}")).collect();
        assert_eq!(normal, want, "each line after it once");
    };
    let first = page_all(f, &id, 0, 7).await;
    check(&first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = page_all(f, &id, 0, 1000).await;
    check(&again);
    assert_eq!(
        again[..first.len()].iter().map(|l| l.t).collect::<Vec<_>>(),
        first.iter().map(|l| l.t).collect::<Vec<_>>(),
        "nothing collected twice"
    );

    let (records, raw) = disk(&dir);
    println!("records {records} bytes, stdout.log {raw} bytes on disk");
    assert!(records < 256 * 1024, "records: {records} bytes");
    assert!(raw <= 72 * 1024, "stdout.log keeps {raw} bytes on disk");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_logging_fast_stays_under_the_cap_and_paging_stays_exact() {
    // 5 MB in bursts of 250 KB as fast as the shell writes them, 100 ms
    // apart (faster than the collector of a debug build keeps up with).
    const LINES: u64 = 100_000;
    const BURST: u64 = 5_000;
    let tmp = tempfile::tempdir().unwrap();
    let script = format!(
        "i=0; while [ $i -lt {LINES} ]; do echo \"n $i {}\"; i=$((i+1)); \
         if [ $((i % {BURST})) -eq 0 ]; then busybox usleep 100000; fi; done; \
         exec busybox httpd -f -p 8080 -h /www",
        "z".repeat(40)
    );
    let limits = LogLimits {
        max_line: 1024,
        max_bytes: 256 * 1024,
    };
    let (node, id, dir) = run_app(tmp.path(), &script, limits, Duration::from_millis(50)).await;
    let f = node.f();
    let num =
        |l: &Line| -> Option<u64> { l.line.strip_prefix("n ")?.split(' ').next()?.parse().ok() };

    let started = Instant::now();
    let (mut from, mut seen, mut gaps) = (0u64, Vec::<u64>::new(), 0);
    let (mut max_records, mut max_raw) = (0u64, 0u64);
    while seen.last() != Some(&(LINES - 1)) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the last line never came"
        );
        let (records, raw) = disk(&dir);
        assert!(
            records <= limits.max_bytes,
            "{records} bytes of records over the cap"
        );
        max_records = max_records.max(records);
        max_raw = max_raw.max(raw);
        let (lines, last) = page(f, &id, from, 1000).await;
        from = last;
        let nums: Vec<u64> = lines.iter().filter_map(num).collect();
        assert!(
            nums.windows(2).all(|w| w[1] == w[0] + 1),
            "a page is contiguous: {nums:?}"
        );
        if let (Some(&prev), Some(&next)) = (seen.last(), nums.first())
            && next != prev + 1
        {
            // Skipped: only what is no longer kept.
            let (oldest, _) = page(f, &id, 0, 1).await;
            let oldest = oldest.first().and_then(num);
            assert!(
                oldest.is_some_and(|o| o >= next),
                "line {} was kept but skipped (oldest kept {oldest:?})",
                prev + 1
            );
            gaps += 1;
        }
        seen.extend(nums);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "no line twice");
    // Quiet now: a last collection frees what was read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (records, raw) = disk(&dir);
    println!(
        "{LINES} lines ({} MB) in {:?}; read {} of them over {gaps} gaps; \
         records at most {max_records} bytes (cap {}), stdout.log at most {max_raw} \
         bytes on disk, {raw} at the end",
        LINES * 51 / 1_000_000,
        started.elapsed(),
        seen.len(),
        limits.max_bytes
    );
    assert!(records <= limits.max_bytes);
    assert!(raw <= 72 * 1024, "stdout.log keeps {raw} bytes on disk");
    // Freed as collected: at most what the app wrote between collections
    // (the test's bound is loose, the figure above is the measure).
    assert!(
        max_raw < LINES * 51 / 2,
        "stdout.log grew to {max_raw} bytes: not freed as collected"
    );
    // What is kept is the newest lines, each once, to the last.
    let kept: Vec<u64> = page_all(f, &id, 0, 500)
        .await
        .iter()
        .filter_map(num)
        .collect();
    assert_eq!(kept.last(), Some(&(LINES - 1)));
    assert!(kept.windows(2).all(|w| w[1] == w[0] + 1));
    assert!(kept[0] > 0, "the oldest were dropped");
    node.stop().await;
}
