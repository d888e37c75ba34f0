//! What the `process` runtime's sandbox costs at start: start to first
//! HTTP 200 of busybox httpd as an instance (rootfs mounts with an idmap,
//! OCI bundle, runc with a user namespace, seccomp and cgroups), against
//! the app's own start time: the same httpd started by hand in the same
//! kind of network namespace, without any sandbox. Prints one JSON line
//! (see BENCH.md).
//!
//! Run (as root): cargo bench -p follower --bench process_start --profile dev

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use follower::net::{InstanceNet, InstanceNetNames, InstanceRange};
use follower::runtime::process::ProcessRuntime;
use follower::runtime::{InstanceSpec, Runtime};

const SAMPLES: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// An ext4 rootfs with a static busybox and /www/index.html.
fn rootfs(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("root");
    for d in ["bin", "www", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    std::fs::write(root.join("www/index.html"), "hi\n").unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
    )
    .unwrap();
    let image = dir.join("image");
    std::fs::create_dir_all(&image).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&root)
        .arg(image.join("rootfs.ext4"))
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    image
}

async fn until_200(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{addr} never answered");
}

#[tokio::main]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let image = rootfs(tmp.path());
    let rt = ProcessRuntime::new(&tmp.path().join("scripts"), Arc::default()).unwrap();
    let net = InstanceNet::new(&tmp.path().join("scripts")).unwrap();
    let n = ulid::Ulid::new().random() as u16 | 0x8000;
    let range = InstanceRange::parse(&format!("fd00:7a77:0:{n:x}::/64")).unwrap();
    let argv: Vec<String> = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
        .map(String::from)
        .to_vec();

    let (mut ours, mut reference) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        // Ours: the runtime, sandbox and all.
        let id = format!("bench{}", ulid::Ulid::new());
        let spec = InstanceSpec {
            instance_id: id.clone(),
            env: "bench".into(),
            app: "web".into(),
            image_dir: image.clone(),
            argv: argv.clone(),
            env_vars: BTreeMap::from([("PATH".into(), "/bin".into())]),
            workdir: "/www".into(),
            user: "nobody".into(),
            ip: range.instance_addr(1),
            port: 8080,
            vcpus: 1,
            memory_mb: 128,
            work_dir: tmp.path().join("instances").join(&id),
        };
        let t = Instant::now();
        let h = rt.start(&spec).await.expect("start");
        until_200(SocketAddr::new(spec.ip.into(), 8080)).await;
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        rt.stop(&h).await.unwrap();

        // Reference: the same httpd started by hand in a namespace of the
        // same network (made beforehand, as the runtime's is part of ours).
        let names = InstanceNetNames::for_instance(&format!("benchref{i}-{n}"));
        let ip = range.instance_addr(2);
        net.up(&names, ip).await.unwrap();
        let www = tmp.path().join("root/www");
        let t = Instant::now();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &names.netns,
                "busybox",
                "httpd",
                "-f",
                "-p",
                "8080",
                "-h",
            ])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        until_200(SocketAddr::new(ip.into(), 8080)).await;
        reference.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = child.kill();
        let _ = child.wait();
        net.down(&names).await.unwrap();
    }
    let (o, r) = (median(ours.clone()), median(reference.clone()));
    eprintln!("ours (ms): {ours:.1?}\nreference (ms): {reference:.1?}");
    println!(
        "{}",
        serde_json::json!({
            "bench": "process_start_to_healthy",
            "ours": (o * 10.0).round() / 10.0,
            "reference": (r * 10.0).round() / 10.0,
            "ratio": ((o / r) * 100.0).round() / 100.0,
            "unit": "ms, median of 7",
        })
    );
}
