//! The multi-host harness (`scripts/cluster.sh`, `test_support::cluster`)
//! end to end with today's binaries: hosts reach Postgres, S3, the git
//! server and the "internet" over the cluster's network; two `zw captain`
//! processes on two operator hosts share one Postgres and answer from the
//! other hosts; `kill -9`, a partition and its heal, and a host's power cut
//! are seen; and nothing is left behind, after a passing test, a panicking one, or a test process
//! killed with SIGKILL.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::cluster::{Cluster, Family, leftovers};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
const CAPTAIN_PORT: u16 = 7700;
/// Where a child test process writes its cluster's name, directory and pids.
const CHILD_REPORT: &str = "ZW_CLUSTER_HARNESS_CHILD_REPORT";

fn health_url(c: &Cluster, host: &str, family: Family) -> String {
    format!(
        "http://{}/v1/health",
        c.socket(host, CAPTAIN_PORT, family).unwrap()
    )
}

/// One GET from `host` with a short timeout: Ok(body) or Err(curl's error).
fn get(c: &Cluster, host: &str, url: &str, max_secs: &str) -> Result<String, String> {
    let out = c
        .exec(host, &["curl", "-fsS", "--max-time", max_secs, url])
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_cluster_of_hosts_runs_the_real_binaries() {
    let t0 = Instant::now();
    let c = Cluster::up("harn")
        .expect("cluster up")
        .with_zw(env!("CARGO_BIN_EXE_zw"));
    let name = c.name().to_string();
    let dir = c.dir().to_path_buf();
    eprintln!("cluster {name} up in {:?}", t0.elapsed());
    assert_eq!(c.hosts().count(), 9, "{:?}", c.hosts().collect::<Vec<_>>());
    for h in ["op1", "op2", "w1", "w2", "w3"] {
        let addrs = c
            .exec_ok(h, &["ip", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        for family in [Family::V4, Family::V6] {
            let ip = c.ip(h, family).unwrap().to_string();
            assert!(addrs.contains(&format!(" {ip}/")), "{h} {ip}: {addrs}");
        }
        assert_eq!(c.exec_ok(h, &["hostname"]).unwrap().trim(), h);
    }

    // Postgres from op1, over both families: user and database zw.
    for url in [c.url_of("pg").unwrap(), &c.service("pg").unwrap().url6] {
        let who = c
            .exec_ok(
                "op1",
                &[
                    PSQL,
                    url,
                    "-tAc",
                    "select current_user || ' ' || current_database()",
                ],
            )
            .unwrap();
        assert_eq!(who.trim(), "zw zw", "{url}");
    }

    // S3 from op2: an object put there (a signed request, as the captain
    // makes) is read back from w1 over IPv6.
    let s3 = c.service("s3").unwrap();
    let bucket = s3.get("bucket").unwrap().to_string();
    let keys = format!(
        "{}:{}",
        s3.get("access_key_id").unwrap(),
        s3.get("secret_access_key").unwrap()
    );
    let sigv4 = format!("aws:amz:{}:s3", s3.get("region").unwrap());
    let s3_curl = |host: &str, base: &str, extra: &[&str]| {
        let object = format!("{base}/{bucket}/harness-probe");
        let mut a = vec![
            "curl",
            "-fsS",
            "--max-time",
            "5",
            "--aws-sigv4",
            &sigv4,
            "--user",
            &keys,
        ];
        a.extend_from_slice(extra);
        a.push(&object);
        c.exec_ok(host, &a).unwrap()
    };
    let put = ["-X", "PUT", "-H", "Content-Type: application/octet-stream"];
    s3_curl(
        "op2",
        &s3.url,
        &[&put[..], &["--data-binary", "stored on s3"]].concat(),
    );
    assert_eq!(s3_curl("w1", &s3.url6, &[]), "stored on s3");

    // The git server: op1 pushes over smart HTTP, op2 fetches over the git
    // protocol and pushes on top, op1 sees that; a force push is refused.
    let git = c.service("git").unwrap();
    let (http_url, daemon_url) = (git.url.clone(), git.get("git_url").unwrap().to_string());
    let as_user = |h: &str, args: &[&str]| {
        let mut a = vec!["git", "-c", "user.name=harness", "-c", "user.email=h@zw"];
        a.extend_from_slice(args);
        c.exec_ok(h, &a)
            .unwrap_or_else(|e| panic!("{h}: git {args:?}: {e}"))
    };
    as_user("op1", &["init", "-q", "-b", "main", "work"]);
    c.exec_ok("op1", &["cp", "/etc/hostname", "work/first"])
        .unwrap();
    as_user("op1", &["-C", "work", "add", "first"]);
    as_user("op1", &["-C", "work", "commit", "-qm", "first from op1"]);
    as_user("op1", &["-C", "work", "push", "-q", &http_url, "main"]);
    as_user("op2", &["clone", "-q", &daemon_url, "work"]);
    let log = as_user("op2", &["-C", "work", "log", "--format=%s"]);
    assert_eq!(log.trim(), "first from op1");
    as_user(
        "op2",
        &[
            "-C",
            "work",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "second from op2",
        ],
    );
    as_user("op2", &["-C", "work", "push", "-q", "origin", "main"]);
    as_user(
        "op1",
        &["-C", "work", "pull", "-q", "--ff-only", &http_url, "main"],
    );
    let log = as_user("op1", &["-C", "work", "log", "--format=%s"]);
    assert_eq!(log.trim(), "second from op2\nfirst from op1");
    as_user("op1", &["-C", "work", "reset", "-q", "--hard", "HEAD~1"]);
    as_user(
        "op1",
        &[
            "-C",
            "work",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "diverged",
        ],
    );
    let forced = c
        .exec(
            "op1",
            &["git", "-C", "work", "push", "--force", &http_url, "main"],
        )
        .unwrap();
    assert!(
        !forced.status.success(),
        "a non-fast-forward push is refused: {forced:?}"
    );

    // The internet host answers the workers, over both families.
    let internet = c.service("internet").unwrap();
    let body = internet.get("body").unwrap().trim().to_string();
    // A "public" address: egress rules that keep instances off private
    // ranges let it through.
    let std::net::IpAddr::V4(public) = c.ip("internet", Family::V4).unwrap() else {
        unreachable!()
    };
    assert!(!public.is_private(), "{public}");
    assert!(
        internet.url.contains(&public.to_string()),
        "{}",
        internet.url
    );
    for w in ["w1", "w2", "w3"] {
        for url in [&internet.url, &internet.url6] {
            assert_eq!(c.http_get(w, url).unwrap().trim(), body, "{w} {url}");
        }
    }

    // Two captains on op1 and op2, one Postgres; each answers from the
    // other hosts, over IPv4 and IPv6.
    let pg = c.url_of("pg").unwrap().to_string();
    let s3_url = s3.url.clone();
    let t1 = Instant::now();
    for op in ["op1", "op2"] {
        c.zw_env(
            op,
            "captain",
            &[
                ("AWS_ACCESS_KEY_ID", s3.get("access_key_id").unwrap()),
                (
                    "AWS_SECRET_ACCESS_KEY",
                    s3.get("secret_access_key").unwrap(),
                ),
                ("ZW_LOG", "info"),
            ],
            &[
                "captain",
                "--data-dir",
                "captain",
                "--listen",
                &format!("[::]:{CAPTAIN_PORT}"),
                "--database-url",
                &pg,
                "--s3-endpoint",
                &s3_url,
                "--s3-bucket",
                &bucket,
                "--build-workers",
                "0",
            ],
        )
        .unwrap();
    }
    for (from, to, family) in [
        ("op2", "op1", Family::V4),
        ("w1", "op1", Family::V6),
        ("op1", "op2", Family::V6),
        ("w3", "op2", Family::V4),
    ] {
        let h = c
            .wait_http(from, &health_url(&c, to, family), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", c.log(to, "captain")));
        assert!(h.contains(r#""database":"postgres""#), "{to}: {h}");
    }
    eprintln!("two captains healthy in {:?}", t1.elapsed());
    // They share the database: both see the same tables, made once.
    let tables = c
        .exec_ok(
            "w2",
            &[
                PSQL,
                &pg,
                "-tAc",
                "select count(*) from pg_tables where tablename = 'builds'",
            ],
        )
        .unwrap();
    assert_eq!(tables.trim(), "1");

    // A client in this test process, inside the internet host (a user out
    // there): its sockets are in that namespace (it can bind the host's own
    // address), and it reaches both captains through the router.
    let urls = [
        health_url(&c, "op1", Family::V4),
        health_url(&c, "op2", Family::V6),
    ];
    let internet_ip = c.ip("internet", Family::V4).unwrap();
    let user = c
        .in_host("internet", move || {
            // Checked first: no request leaves from another namespace.
            let own = std::net::TcpListener::bind((internet_ip, 0)).map(|_| ());
            if own.is_err() {
                return (own, Vec::new());
            }
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut failed = Vec::new();
            for i in 0..100 {
                let url = &urls[i % urls.len()];
                match client.get(url).send() {
                    Ok(r) if r.status().is_success() => {}
                    other => failed.push(format!("{url}: {other:?}")),
                }
            }
            (own, failed)
        })
        .unwrap();
    let (own, failed) = user.join().unwrap();
    own.expect("the thread is in the internet host's namespace");
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());

    // kill -9 of op2's captain is seen; op1's keeps serving.
    let captain2 = c.pid("op2", "captain").expect("captain runs on op2");
    c.kill("op2", "captain").unwrap();
    assert!(!c.alive("op2", "captain"));
    assert!(!test_support::cluster::process_runs(captain2));
    let refused = get(&c, "op1", &health_url(&c, "op2", Family::V4), "3");
    assert!(refused.is_err(), "a killed captain answered: {refused:?}");
    get(&c, "op2", &health_url(&c, "op1", Family::V4), "3").unwrap();

    // A partition makes op1 unreachable (from op2, and op1 reaches nothing),
    // its captain keeps running; the heal brings it back.
    c.partition("op1").unwrap();
    for family in [Family::V4, Family::V6] {
        let cut = get(&c, "op2", &health_url(&c, "op1", family), "2");
        assert!(cut.is_err(), "op1 answered through a partition: {cut:?}");
    }
    assert!(get(&c, "op1", &internet.url, "2").is_err());
    assert!(c.alive("op1", "captain"));
    c.heal("op1").unwrap();
    for family in [Family::V4, Family::V6] {
        c.wait_http(
            "op2",
            &health_url(&c, "op1", family),
            Duration::from_secs(10),
        )
        .unwrap();
    }

    // A power cut of w1 kills its agent and the agent's instances (in a
    // namespace of their own, not recorded by the harness), removes the
    // namespaces made from it; w2 is untouched and w1 can start again.
    c.spawn(
        "w1",
        "agent",
        &["unshare", "--net", "--fork", "--", "sleep", "300"],
    )
    .unwrap();
    let instance_ns = format!("zwi{}", c.name());
    c.exec_ok("w1", &["ip", "netns", "add", &instance_ns])
        .unwrap();
    c.spawn(
        "w1",
        "instance",
        &["ip", "netns", "exec", &instance_ns, "sleep", "300"],
    )
    .unwrap();
    c.spawn("w2", "agent", &["sleep", "300"]).unwrap();
    let before = c.pids().unwrap();
    c.crash("w1").unwrap();
    let after = c.pids().unwrap();
    let gone: Vec<_> = before.iter().filter(|p| !after.contains(p)).collect();
    assert_eq!(
        gone.len(),
        3,
        "agent, its child, instance: {before:?} -> {after:?}"
    );
    assert!(!c.alive("w1", "agent") && !c.alive("w1", "instance"));
    assert!(c.alive("w2", "agent"));
    assert!(
        !std::path::Path::new("/run/netns")
            .join(&instance_ns)
            .exists()
    );
    assert!(c.alive("op1", "captain"), "other hosts are untouched");
    assert_eq!(c.http_get("w1", &internet.url).unwrap().trim(), body);
    c.spawn("w1", "agent", &["sleep", "300"]).unwrap();

    // Down: nothing of the cluster is left (down() checks it too).
    let pids = c.pids().unwrap();
    assert!(pids.len() >= 6, "services and captain: {pids:?}");
    c.down().unwrap();
    let left = leftovers(&name, &dir, &pids);
    assert!(left.is_empty(), "{left:?}");
    eprintln!("whole test {:?}", t0.elapsed());
}

/// What a child test process reported about its cluster.
struct ChildReport {
    name: String,
    dir: PathBuf,
    pids: Vec<u32>,
}

fn read_report(path: &std::path::Path) -> Option<ChildReport> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let name = lines.next()?.to_string();
    let dir = PathBuf::from(lines.next()?);
    let pids: Vec<u32> = lines
        .next()?
        .split(' ')
        .filter_map(|p| p.parse().ok())
        .collect();
    lines.next().filter(|l| *l == "end")?;
    Some(ChildReport { name, dir, pids })
}

/// The name of the network namespace a child cluster's "instance" runs in.
fn instance_netns(cluster: &str) -> String {
    format!("zwi{cluster}")
}

/// What is left of a child's cluster, its instance namespace included.
fn child_leftovers(r: &ChildReport) -> Vec<String> {
    let mut left = leftovers(&r.name, &r.dir, &r.pids);
    let ns = instance_netns(&r.name);
    if std::path::Path::new("/run/netns").join(&ns).exists() {
        left.push(format!("network namespace {ns}"));
    }
    left
}

/// Brings a cluster up with a process of its own in two hosts and reports it.
fn child_cluster(report: &str) -> Cluster {
    let c = Cluster::up("child").expect("cluster up");
    c.spawn("w1", "sleeper", &["sleep", "300"]).unwrap();
    // Processes in network namespaces made from a host, as a follower makes
    // for its instances: a child of a spawned process (not recorded by the
    // harness) in an anonymous one, and one in a named one joined to the
    // host by a veth.
    c.spawn(
        "w2",
        "instance",
        &["unshare", "--net", "--fork", "--", "sleep", "300"],
    )
    .unwrap();
    let ns = instance_netns(c.name());
    c.exec_ok("w3", &["ip", "netns", "add", &ns]).unwrap();
    c.exec_ok(
        "w3",
        &[
            "ip", "link", "add", "zwhv0", "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
    )
    .unwrap();
    c.spawn(
        "w3",
        "named-instance",
        &["ip", "netns", "exec", &ns, "sleep", "300"],
    )
    .unwrap();
    let pids = c.pids().unwrap();
    assert!(pids.len() >= 7, "{pids:?}");
    let text = format!(
        "{}\n{}\n{}\nend\n",
        c.name(),
        c.dir().display(),
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    std::fs::write(report, text).unwrap();
    c
}

fn run_child(test: &str, report: &std::path::Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_REPORT, report)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "the child process of a_test_that_panics_leaves_nothing_behind"]
fn child_panics_with_a_cluster_up() {
    let report =
        std::env::var(CHILD_REPORT).expect("run by a_test_that_panics_leaves_nothing_behind");
    let _c = child_cluster(&report);
    panic!("deliberate panic with the cluster up");
}

#[test]
fn a_test_that_panics_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report");
    let out = run_child("child_panics_with_a_cluster_up", &report)
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("deliberate panic with the cluster up")
            || stdout.contains("deliberate panic with the cluster up"),
        "{stdout}\n{stderr}"
    );
    let r = read_report(&report).unwrap_or_else(|| panic!("no report:\n{stdout}\n{stderr}"));
    let left = child_leftovers(&r);
    assert!(left.is_empty(), "{left:?}\n{stderr}");
}

#[test]
#[ignore = "the child process of a_killed_test_process_leaves_nothing_behind"]
fn child_killed_with_a_cluster_up() {
    let report =
        std::env::var(CHILD_REPORT).expect("run by a_killed_test_process_leaves_nothing_behind");
    let _c = child_cluster(&report);
    // The parent kills this process with SIGKILL; bounded all the same.
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_test_process_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report");
    let mut child = run_child("child_killed_with_a_cluster_up", &report);
    let deadline = Instant::now() + Duration::from_secs(90);
    let r = loop {
        if let Some(r) = read_report(&report) {
            break r;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "child exited ({status}) without a report: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "no report from the child");
        std::thread::sleep(Duration::from_millis(100));
    };
    // The check sees a live cluster: every process, the instance namespace.
    let alive = child_leftovers(&r);
    let instance = format!("network namespace {}", instance_netns(&r.name));
    assert!(alive.contains(&instance), "{alive:?}");
    for pid in &r.pids {
        assert!(
            alive.contains(&format!("process {pid}")),
            "{pid}: {alive:?}"
        );
    }
    // SIGKILL: no Drop runs; the reaper `up` left takes the cluster down.
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = child_leftovers(&r);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
