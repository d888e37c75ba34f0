//! Test fixtures: real ext4 images of busybox, made without the builder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use follower::image::ImageConfig;



/// Builds an image in the object-store layout under `store`
/// (`images/<hex>/rootfs.ext4` + `config.json`) from a directory holding a
/// static busybox, an `index.html` and a passwd/group with `nobody`.
/// Returns its digest (`sha256:` of the rootfs file).
pub fn busybox_image(store: &Path, config: &ImageConfig) -> String {
    let staging = tempfile::tempdir().unwrap();
    let root = staging.path().join("root");
    for d in ["bin", "www", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    std::fs::write(root.join("www/index.html"), "hello from zeitwork\n").unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    let img = staging.path().join("rootfs.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("16M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is installed");
    assert!(st.success(), "mkfs.ext4 failed");
    let out = Command::new("sha256sum").arg(&img).output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    // Give each config its own digest even with the same rootfs.
    let cfg = serde_json::to_vec(config).unwrap();
    let hex = sha_of(&[hex.as_bytes(), &cfg].concat());
    let dir = store.join("images").join(&hex);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&img, dir.join("rootfs.ext4")).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    format!("sha256:{hex}")
}

fn sha_of(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// A busybox httpd serving /www on `port`, as `nobody`.
pub fn httpd_config(port: u16) -> ImageConfig {
    ImageConfig {
        entrypoint: vec!["/bin/busybox".into(), "httpd".into(), "-f".into(), "-v".into()],
        cmd: vec!["-p".into(), port.to_string(), "-h".into(), "/www".into()],
        env: [("PATH".to_string(), "/bin".to_string())].into_iter().collect(),
        workdir: "/www".into(),
        user: "nobody".into(),
        exposed_ports: vec![port],
        rootfs_bytes: 16 << 20,
    }
}

/// The path of the image directory of `digest` in `store`.
pub fn image_dir(store: &Path, digest: &str) -> PathBuf {
    store.join("images").join(digest.trim_start_matches("sha256:"))
}

/// A random node-local range, so concurrent tests never share addresses.
pub fn random_range() -> follower::net::InstanceRange {
    let n = ulid::Ulid::new().random() as u16 | 0x8000;
    follower::net::InstanceRange::parse(&format!("fd00:7a77:0:{n:x}::/64")).unwrap()
}

/// GET over plain TCP (no proxy, no client library between the test and the
/// socket): status line and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(3), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
