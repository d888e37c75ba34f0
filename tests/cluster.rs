//! The platform on several hosts (network namespaces of the harness, each
//! running the real `zw` binary as its own process): two captains on op1
//! and op2 share Postgres, S3 and a meta remote on the git host; three
//! workers and two edges join with single-use join tokens (a reused or
//! wrong-role or expired token is refused); an app deployed through op1 is served by
//! both edges from instances on at least two workers, over the node-proxy's
//! mTLS (a client without the cluster's certificate is refused); `kill -9`
//! of the leading captain: the other takes the lease and rolls out the next
//! release, and the edges keep serving; a worker's power cut: its
//! instances are replaced on the others; `git revert` pushed to the meta
//! remote by a person rolls back.
//! Only the harness's namespaces are network targets; every wait is bounded.

#[path = "common/secrets.rs"]
mod secrets_common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_support::cluster::{Cluster, Family};

const CAPTAIN_PORT: u16 = 7700;
const PROXY_PORT: u16 = 7810;
const EDGE_PORT: u16 = 8080;
const DOMAIN: &str = "zw.test";

fn captain_url(c: &Cluster, host: &str) -> String {
    format!(
        "http://{}",
        c.socket(host, CAPTAIN_PORT, Family::V4).unwrap()
    )
}

/// One API call with curl from `host`: (status, body as JSON or Null).
fn call(
    c: &Cluster,
    host: &str,
    method: &str,
    url: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {token}");
    let data = body.map(|b| b.to_string());
    let mut a = vec![
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-X",
        method,
        "-H",
        &auth,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    if let Some(d) = &data {
        a.extend_from_slice(&["-H", "Content-Type: application/json", "--data-binary", d]);
    }
    a.push(url);
    let out = c.exec(host, &a).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let status = status.trim().parse().unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn ok(c: &Cluster, host: &str, method: &str, url: &str, token: &str, body: Option<Value>) -> Value {
    let (status, v) = call(c, host, method, url, token, body.as_ref());
    assert!((200..300).contains(&status), "{method} {url}: {status} {v}");
    v
}

/// GET through an edge with the app's Host: Ok(body) or Err(why).
fn through_edge(c: &Cluster, from: &str, edge: &str, host: &str) -> Result<String, String> {
    let url = format!("http://{}/", c.socket(edge, EDGE_PORT, Family::V4).unwrap());
    let h = format!("Host: {host}");
    let out = c
        .exec(from, &["curl", "-fsS", "--max-time", "3", "-H", &h, &url])
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn wait<T>(secs: u64, what: &str, c: &Cluster, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            let mut logs = String::new();
            for (h, p) in [
                ("op1", "captain"),
                ("op2", "captain"),
                ("w1", "follower"),
                ("w2", "follower"),
                ("w3", "follower"),
                ("op1", "edge"),
            ] {
                let l = c.log(h, p);
                let tail: Vec<&str> = l.lines().rev().take(25).collect();
                logs.push_str(&format!("\n--- {h}/{p}\n"));
                for line in tail.into_iter().rev() {
                    logs.push_str(line);
                    logs.push('\n');
                }
            }
            panic!("timed out after {secs}s waiting for {what}{logs}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Healthy instances of a release: (instance id, node id).
fn healthy(c: &Cluster, host: &str, token: &str, release: &str) -> BTreeSet<(String, String)> {
    let url = format!("{}/v1/instances", captain_url(c, host));
    let (status, v) = call(c, host, "GET", &url, token, None);
    if status != 200 {
        return BTreeSet::new();
    }
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["state"] == "healthy" && i["release_id"] == release)
        .map(|i| {
            (
                i["id"].as_str().unwrap_or("").to_string(),
                i["node_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A busybox httpd image serving `$API_KEY` at /secret.txt, as the builder
/// stores one (`images/<hex>/{rootfs.ext4,config.json}` with the integrity
/// fields a follower checks after downloading it).
fn image(store: &std::path::Path) -> String {
    use builder::image::{FORMAT, ImageConfig, StoredConfig, image_digest};
    let rootfs = secrets_common::busybox_rootfs();
    let config = ImageConfig {
        entrypoint: vec!["/bin/busybox".into(), "sh".into(), "-c".into()],
        cmd: vec![
            "echo \"$API_KEY\" > /www/secret.txt && exec /bin/busybox httpd -f -p 8080 -h /www"
                .into(),
        ],
        env: vec!["PATH=/bin".into()],
        workdir: "/www".into(),
        user: "root".into(),
        exposed_ports: vec![8080],
        rootfs_bytes: rootfs.len() as u64,
    };
    let manifest = format!(
        "sha256:{}",
        secrets_common::sha256_hex(b"a manifest of the test")
    );
    let digest = image_digest(FORMAT, &manifest, &config);
    let stored = StoredConfig {
        config,
        format: FORMAT.into(),
        oci_manifest: manifest,
        rootfs_sha256: format!("sha256:{}", secrets_common::sha256_hex(&rootfs)),
    };
    let dir = store
        .join("images")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rootfs.ext4"), rootfs).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&stored).unwrap(),
    )
    .unwrap();
    digest
}

/// GETs through both edges from the internet host until stopped (at most
/// 2 minutes and 50,000 requests): (answered, failed, the first failures).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: test_support::cluster::HostThread<(u64, u64, Vec<String>)>,
}

impl Load {
    fn start(c: &Cluster, host: &str) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let urls: Vec<String> = ["op1", "op2"]
            .iter()
            .map(|e| format!("http://{}/", c.socket(e, EDGE_PORT, Family::V4).unwrap()))
            .collect();
        let (flag, host) = (stop.clone(), host.to_string());
        let thread = c
            .in_host("internet", move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(120);
                let (mut answered, mut failed, mut first) = (0u64, 0u64, Vec::new());
                for i in 0..50_000usize {
                    if flag.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline
                    {
                        break;
                    }
                    let url = &urls[i % urls.len()];
                    match client.get(url).header("Host", &host).send() {
                        Ok(r) if r.status().is_success() => answered += 1,
                        other => {
                            failed += 1;
                            if first.len() < 5 {
                                first.push(format!("{url}: {other:?}"));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                (answered, failed, first)
            })
            .unwrap();
        Load { stop, thread }
    }

    fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn a_cluster_joins_serves_through_both_edges_and_survives_the_leaders_death() {
    let t0 = Instant::now();
    let c = Cluster::up("clus")
        .expect("cluster up")
        .with_zw(env!("CARGO_BIN_EXE_zw"));
    eprintln!("cluster up in {:?}", t0.elapsed());
    let dir = c.dir().to_path_buf();
    let key_file = dir.join("cluster.key");
    std::fs::write(&key_file, format!("{}\n", "5a".repeat(32))).unwrap();
    let key_file = key_file.to_str().unwrap().to_string();

    let s3 = c.service("s3").unwrap().clone();
    let bucket = s3.get("bucket").unwrap().to_string();
    let git = c.service("git").unwrap();
    let meta_remote = git.get("git_url").unwrap().to_string();
    let pg = c.url_of("pg").unwrap().to_string();
    let captains = format!("{},{}", captain_url(&c, "op1"), captain_url(&c, "op2"));

    // Two captains; op1 first, so it writes the first admin token.
    let t1 = Instant::now();
    for op in ["op1", "op2"] {
        let advertise = captain_url(&c, op);
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
                &format!("0.0.0.0:{CAPTAIN_PORT}"),
                "--advertise-url",
                &advertise,
                "--database-url",
                &pg,
                "--s3-endpoint",
                &s3.url,
                "--s3-bucket",
                &bucket,
                "--build-workers",
                "0",
                "--meta-remote",
                &meta_remote,
                "--cluster-key-file",
                &key_file,
                "--platform-domain",
                DOMAIN,
                "--poll-interval-secs",
                "1",
                "--heartbeat-interval-secs",
                "1",
                "--node-grace-seconds",
                "12",
            ],
        )
        .unwrap();
        c.wait_http(
            "w1",
            &format!("{advertise}/v1/health"),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log(op, "captain")));
    }
    eprintln!("two captains healthy in {:?}", t1.elapsed());
    let admin = std::fs::read_to_string(dir.join("hosts/op1/captain/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let op1 = captain_url(&c, "op1");
    let op2 = captain_url(&c, "op2");

    // Join tokens: one per host, single use, bound to a role.
    let token = |role: &str| -> String {
        let v = ok(
            &c,
            "op1",
            "POST",
            &format!("{op1}/v1/cluster/join-tokens"),
            &admin,
            Some(json!({"role": role, "ttl_seconds": 600})),
        );
        v["token"].as_str().unwrap().to_string()
    };
    let write_token = |host: &str, t: &str| -> String {
        let p = dir.join("hosts").join(host).join("join.token");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, t).unwrap();
        p.to_str().unwrap().to_string()
    };

    // A wrong-role token is refused at once, and the refusal is final.
    let edge_token_for_a_worker = write_token("w3", &token("edge"));
    let refused = c
        .exec(
            "w3",
            &[
                "timeout",
                "30",
                env!("CARGO_BIN_EXE_zw"),
                "follower",
                "--data-dir",
                "refused",
                "--captain",
                &captains,
                "--join-token-file",
                &edge_token_for_a_worker,
                "--proxy-listen",
                &format!("0.0.0.0:{PROXY_PORT}"),
                "--address",
                &c.ip("w3", Family::V4).unwrap().to_string(),
            ],
        )
        .unwrap();
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("for the edge role"),
        "a worker joined with an edge token: {refused:?}"
    );

    // An expired one too.
    let v = ok(
        &c,
        "op1",
        "POST",
        &format!("{op1}/v1/cluster/join-tokens"),
        &admin,
        Some(json!({"role": "worker", "ttl_seconds": 1})),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = call(
        &c,
        "w3",
        "POST",
        &format!("{op2}/v1/cluster/join"),
        v["token"].as_str().unwrap(),
        Some(&json!({"role": "worker", "name": "late", "csr_pem": ""})),
    );
    assert!(
        status == 403 && body.to_string().contains("expired"),
        "an expired join token answered {status} {body}"
    );

    let t2 = Instant::now();
    let mut worker_tokens = Vec::new();
    for w in ["w1", "w2", "w3"] {
        let t = token("worker");
        let f = write_token(w, &t);
        worker_tokens.push(t);
        let ip = c.ip(w, Family::V4).unwrap().to_string();
        c.zw_env(
            w,
            "follower",
            &[("ZW_LOG", "info")],
            &[
                "follower",
                "--data-dir",
                "follower",
                "--captain",
                &captains,
                "--join-token-file",
                &f,
                "--proxy-listen",
                &format!("0.0.0.0:{PROXY_PORT}"),
                "--listen",
                "0.0.0.0:7710",
                "--address",
                &ip,
                "--runtime",
                "process",
                "--poll-seconds",
                "1",
            ],
        )
        .unwrap();
    }
    for op in ["op1", "op2"] {
        let f = write_token(op, &token("edge"));
        c.zw_env(
            op,
            "edge",
            &[("ZW_LOG", "info")],
            &[
                "edge",
                "--data-dir",
                "edge",
                "--captain",
                &captains,
                "--join-token-file",
                &f,
                "--http",
                &format!("0.0.0.0:{EDGE_PORT}"),
                "--no-https",
                "--no-access-log",
            ],
        )
        .unwrap();
    }
    let nodes = wait(60, "three workers online", &c, || {
        let v = ok(&c, "op2", "GET", &format!("{op2}/v1/nodes"), &admin, None);
        let online: BTreeSet<String> = v
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "online")
            .map(|n| n["id"].as_str().unwrap_or("").to_string())
            .collect();
        (online.len() == 3).then_some(online)
    });
    eprintln!("3 workers and 2 edges joined in {:?}", t2.elapsed());
    // A used join token does not admit a second host.
    let (status, v) = call(
        &c,
        "w1",
        "POST",
        &format!("{op2}/v1/cluster/join"),
        &worker_tokens[0],
        Some(&json!({"role": "worker", "name": "intruder", "csr_pem": ""})),
    );
    assert!(
        status == 403 && v.to_string().contains("used already"),
        "a reused join token answered {status} {v}"
    );

    // The app: an image put into the shared bucket, recorded, deployed
    // through op1.
    let staging = tempfile::tempdir().unwrap();
    let digest = image(staging.path());
    let hex = digest.trim_start_matches("sha256:");
    let keys = format!(
        "{}:{}",
        s3.get("access_key_id").unwrap(),
        s3.get("secret_access_key").unwrap()
    );
    let sigv4 = format!("aws:amz:{}:s3", s3.get("region").unwrap());
    let mut size = 0;
    for file in ["rootfs.ext4", "config.json"] {
        let local = staging.path().join("images").join(hex).join(file);
        size += std::fs::metadata(&local).unwrap().len();
        let object = format!("{}/{bucket}/images/{hex}/{file}", s3.url);
        c.exec_ok(
            "op1",
            &[
                "curl",
                "-fsS",
                "--max-time",
                "30",
                "--aws-sigv4",
                &sigv4,
                "--user",
                &keys,
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &format!("@{}", local.display()),
                &object,
            ],
        )
        .unwrap();
    }
    ok(
        &c,
        "op1",
        "POST",
        &format!("{op1}/v1/images"),
        &admin,
        Some(json!({"digest": digest, "size_bytes": size})),
    );
    let project = ok(
        &c,
        "op1",
        "POST",
        &format!("{op1}/v1/projects"),
        &admin,
        Some(json!({"name": "web", "repo": "https://example.invalid/web.git"})),
    );
    let pid = project["id"].as_str().unwrap().to_string();
    let app = ok(
        &c,
        "op1",
        "POST",
        &format!("{op1}/v1/projects/{pid}/apps"),
        &admin,
        Some(json!({"name": "web", "env": "production"})),
    );
    let app_id = app["id"].as_str().unwrap().to_string();
    let host = format!("web.{DOMAIN}");
    let t3 = Instant::now();
    let d1 = ok(
        &c,
        "op1",
        "POST",
        &format!("{op1}/v1/deployments"),
        &admin,
        Some(
            json!({"app_id": app_id, "image_digest": digest, "port": 8080,
                    "health_check_path": "/", "env_vars": {"API_KEY": "release-one"}}),
        ),
    );
    let r1 = d1["id"].as_str().unwrap_or_default().to_string();
    assert!(!r1.is_empty(), "{d1}");
    let placed = wait(180, "3 healthy instances of release one", &c, || {
        let h = healthy(&c, "op2", &admin, &r1);
        (h.len() >= 3).then_some(h)
    });
    let on: BTreeSet<&String> = placed.iter().map(|(_, n)| n).collect();
    assert!(on.len() >= 2, "instances on one node only: {placed:?}");
    assert!(
        on.iter().all(|n| nodes.contains(*n)),
        "{placed:?} {nodes:?}"
    );
    for edge in ["op1", "op2"] {
        wait(60, &format!("the app through {edge}'s edge"), &c, || {
            through_edge(&c, "internet", edge, &host).ok()
        });
    }
    eprintln!("deployed and served by both edges in {:?}", t3.elapsed());
    let secret_page = format!(
        "http://{}/secret.txt",
        c.socket("op1", EDGE_PORT, Family::V4).unwrap()
    );
    let page = c
        .exec_ok(
            "internet",
            &["curl", "-fsS", "-H", &format!("Host: {host}"), &secret_page],
        )
        .unwrap();
    assert_eq!(page.trim(), "release-one");

    // The node-proxy speaks only mutual TLS with the cluster's certificates:
    // a client without one (from an edge host, even) is refused.
    let proxy = format!(
        "https://{}/",
        c.socket("w1", PROXY_PORT, Family::V4).unwrap()
    );
    let plain = c
        .exec(
            "op1",
            &[
                "curl",
                "-ksS",
                "--max-time",
                "3",
                "-H",
                &format!("Host: {host}"),
                &proxy,
            ],
        )
        .unwrap();
    assert!(
        !plain.status.success(),
        "the node-proxy answered a client without a certificate: {}",
        String::from_utf8_lossy(&plain.stdout)
    );

    // kill -9 of the leading captain: the other takes the lease, the edges
    // keep serving (they fail over their route stream), and a release
    // deployed through the survivor rolls out.
    let leader = wait(30, "a leader", &c, || {
        ["op1", "op2"].into_iter().find(|op| {
            let (s, v) = call(
                &c,
                op,
                "GET",
                &format!("{}/v1/health", captain_url(&c, op)),
                "",
                None,
            );
            s == 200 && v["leader"] == true
        })
    });
    let survivor = if leader == "op1" { "op2" } else { "op1" };
    let survivor_url = captain_url(&c, survivor);
    let load = Load::start(&c, &host);
    std::thread::sleep(Duration::from_millis(500));
    let t4 = Instant::now();
    c.kill(leader, "captain").unwrap();
    wait(60, "the survivor to lead", &c, || {
        let (s, v) = call(
            &c,
            survivor,
            "GET",
            &format!("{survivor_url}/v1/health"),
            "",
            None,
        );
        (s == 200 && v["leader"] == true).then_some(())
    });
    eprintln!(
        "{survivor} leads {:?} after kill -9 of {leader}",
        t4.elapsed()
    );
    for edge in ["op1", "op2"] {
        let body = through_edge(&c, "internet", edge, &host)
            .unwrap_or_else(|e| panic!("{edge}'s edge after the leader died: {e}"));
        assert!(body.contains("up"), "{body}");
    }
    let (answered, failed, first) = load.stop();
    eprintln!("under the leader's death: {answered} answered, {failed} failed");
    assert!(answered > 0 && failed == 0, "{failed} failed: {first:?}");
    let d2 = ok(
        &c,
        survivor,
        "POST",
        &format!("{survivor_url}/v1/deployments"),
        &admin,
        Some(
            json!({"app_id": app_id, "image_digest": digest, "port": 8080,
                    "health_check_path": "/", "env_vars": {"API_KEY": "release-two"}}),
        ),
    );
    let r2 = d2["id"].as_str().unwrap_or_default().to_string();
    wait(180, "release two healthy and served", &c, || {
        let h = healthy(&c, survivor, &admin, &r2);
        if h.len() < 3 {
            return None;
        }
        let p = c
            .exec_ok(
                "internet",
                &[
                    "curl",
                    "-fsS",
                    "--max-time",
                    "3",
                    "-H",
                    &format!("Host: {host}"),
                    &secret_page,
                ],
            )
            .ok()?;
        (p.trim() == "release-two").then_some(())
    });
    eprintln!("release two rolled out by {survivor} in {:?}", t4.elapsed());

    // A worker's power cut: after the grace period its instances are
    // replaced on the other two, and the app keeps answering.
    let w3_ip = c.ip("w3", Family::V4).unwrap().to_string();
    let v = ok(
        &c,
        survivor,
        "GET",
        &format!("{survivor_url}/v1/nodes"),
        &admin,
        None,
    );
    let w3 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["address"].as_str() == Some(w3_ip.as_str()))
        .and_then(|n| n["id"].as_str())
        .unwrap_or_else(|| panic!("no node with address {w3_ip}: {v}"))
        .to_string();
    let load = Load::start(&c, &host);
    std::thread::sleep(Duration::from_millis(500));
    let t5 = Instant::now();
    c.crash("w3").unwrap();
    // (The dead node's last report stays in the instance list, marked by
    // its node's state; what counts is what serves elsewhere.)
    let replaced = wait(
        90,
        "release two's instances off the dead worker",
        &c,
        || {
            let h: BTreeSet<(String, String)> = healthy(&c, survivor, &admin, &r2)
                .into_iter()
                .filter(|(_, n)| *n != w3)
                .collect();
            (h.len() >= 3 && through_edge(&c, "internet", "op1", &host).is_ok()).then_some(h)
        },
    );
    let on: BTreeSet<&String> = replaced.iter().map(|(_, n)| n).collect();
    assert!(on.len() == 2 && !on.contains(&w3), "{replaced:?}");
    eprintln!(
        "w3's instances replaced in {:?} after its power cut",
        t5.elapsed()
    );
    let (answered, failed, first) = load.stop();
    eprintln!("under w3's power cut: {answered} answered, {failed} failed {first:?}");
    assert!(answered > 0 && failed == 0, "{failed} failed: {first:?}");

    // Rollback is `git revert` on the meta remote, by a person with a
    // clone: the captains follow it and release one serves again.
    let release_file = d2["path"].as_str().unwrap().to_string();
    let git_as = |args: &[&str]| {
        let mut a = vec!["git", "-c", "user.name=ops", "-c", "user.email=ops@zw.test"];
        a.extend_from_slice(args);
        c.exec_ok("op2", &a)
            .unwrap_or_else(|e| panic!("git {args:?}: {e}"))
    };
    git_as(&["clone", "-q", &meta_remote, "meta"]);
    let added = git_as(&[
        "-C",
        "meta",
        "log",
        "--format=%H",
        "--diff-filter=A",
        "--",
        &release_file,
    ]);
    let added = added.trim();
    assert_eq!(
        added.len(),
        40,
        "the commit adding {release_file}: {added:?}"
    );
    git_as(&["-C", "meta", "revert", "--no-edit", added]);
    git_as(&["-C", "meta", "push", "-q", "origin", "main"]);
    let t6 = Instant::now();
    wait(90, "release one served again after the revert", &c, || {
        let p = c
            .exec_ok(
                "internet",
                &[
                    "curl",
                    "-fsS",
                    "--max-time",
                    "3",
                    "-H",
                    &format!("Host: {host}"),
                    &secret_page,
                ],
            )
            .ok()?;
        (p.trim() == "release-one").then_some(())
    });
    eprintln!(
        "the revert pushed to the meta remote served in {:?}",
        t6.elapsed()
    );
    c.down().unwrap();
}
