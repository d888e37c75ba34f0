//! Writes the seed inputs of every fuzz target into `fuzz/corpus/<target>/`
//! (`seed-*` files): the shapes each parser meets in practice, and the
//! attacks its tests already know. Run once when a target is added
//! (`cargo run -p fuzz-checks --example seeds`); the fuzzer grows and
//! `cargo fuzz cmin` shrinks the corpus from there.

use std::io::Write;
use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut n = 0;
    let mut put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed");
        n += 1;
    };

    // HTTP/1.1 requests (first byte: header storage, 127 -> 128 headers).
    for (name, head) in [
        (
            "get",
            "GET /a?b=c HTTP/1.1\r\nHost: app.example.com\r\nAccept: */*\r\n\r\n",
        ),
        (
            "post",
            "POST /p HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nhello",
        ),
        (
            "conn-tokens",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-private, close\r\nx-private: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n\r\n",
        ),
        (
            "chunked",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "cl-te",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "two-cl",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
        ),
        ("two-hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        (
            "upgrade",
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        ),
        (
            "absolute",
            "GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
        ),
        ("http10", "GET / HTTP/1.0\r\nHost: a\r\n\r\n"),
        (
            "expect",
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        ),
        (
            "pipelined",
            "GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        ("partial", "GET / HTTP/1.1\r\nHost: a\r\nX-Lo"),
    ] {
        let mut b = vec![127u8];
        b.extend_from_slice(head.as_bytes());
        put("http1_request", name, &b);
    }

    // Backend responses (first byte: 1 HEAD, 2 client close, 4 edge).
    for (name, flags, head) in [
        (
            "length",
            4,
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        ),
        (
            "chunked",
            4,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "te-and-cl",
            4,
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "gzip",
            0,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        (
            "http10-keepalive",
            4,
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
        ),
        (
            "hop",
            6,
            "HTTP/1.1 200 OK\r\nConnection: x-private, close\r\nx-private: secret\r\nKeep-Alive: timeout=5\r\nx-request-id: app\r\nContent-Length: 3\r\n\r\nhop",
        ),
        ("head", 5, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        ("204", 4, "HTTP/1.1 204 No Content\r\n\r\n"),
        (
            "304",
            0,
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "early-hints",
            4,
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ),
        (
            "connect-failed",
            4,
            "HTTP/1.1 502 Bad Gateway\r\nx-zeitwork-upstream: connect-failed\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "connect-failed-np",
            0,
            "HTTP/1.1 502 Bad Gateway\r\nx-zeitwork-upstream: connect-failed\r\ncontent-length: 0\r\n\r\n",
        ),
        ("close-delimited", 0, "HTTP/1.1 200 OK\r\n\r\nuntil close"),
        (
            "101",
            4,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        ),
    ] {
        let mut b = vec![flags];
        b.extend_from_slice(head.as_bytes());
        put("http1_response", name, &b);
    }

    // Chunked bodies (first byte: the stride of the split feed).
    for (name, body) in [
        ("exts-trailers", &b"5\r\nhello\r\n6;name=\"v\"\r\n world\r\n10\r\n0123456789abcdef\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\n"[..]),
        ("last-only", b"0\r\n\r\n"),
        ("then-next", b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"),
        ("big-size", b"fffffffffffffff\r\n"),
        ("incomplete", b"a\r\n01234"),
    ] {
        let mut b = vec![3u8];
        b.extend_from_slice(body);
        put("http1_chunked", name, &b);
    }

    // The example meta repository, whole and file by file.
    let meta_dir = repo.join("example-meta");
    let mut files = Vec::new();
    collect(&meta_dir, &meta_dir, &mut files);
    files.sort();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    put(
        "meta_tree",
        "example-meta",
        &fuzz_checks::meta::encode(&refs),
    );
    for (i, f) in refs.iter().enumerate() {
        put(
            "meta_tree",
            &format!("file-{i}"),
            &fuzz_checks::meta::encode(&[*f]),
        );
    }

    // The real-sops fixtures.
    let sops_dir = repo.join("meta-schema/tests/fixtures/sops");
    for e in std::fs::read_dir(&sops_dir).expect("fixtures") {
        let path = e.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && !name.contains("plaintext") {
            put("sops", &name, &std::fs::read(&path).expect("fixture"));
        }
    }

    // Tar streams (uncompressed; the check gzips them).
    use tar::EntryType as E;
    for (name, entries) in [
        (
            "plain",
            vec![
                ("top/", E::Directory, ""),
                ("top/Dockerfile", E::Regular, "FROM scratch\n"),
                ("top/app/main.sh", E::Regular, "echo hi\n"),
            ],
        ),
        (
            "symlink-in",
            vec![("top/a", E::Regular, "a"), ("top/b", E::Symlink, "a")],
        ),
        (
            "symlink-out",
            vec![
                ("top/up", E::Symlink, "../../../../outside"),
                ("top/up/secret", E::Regular, "x"),
            ],
        ),
        (
            "hardlink-out",
            vec![("top/x", E::Link, "top/../../../../outside/secret")],
        ),
        (
            "hardlink-in",
            vec![("top/a", E::Regular, "a"), ("top/b", E::Link, "top/a")],
        ),
        (
            "dotdot",
            vec![("top/../../../../outside/new", E::Regular, "x")],
        ),
        ("absolute", vec![("/tmp/zw-fuzz-absolute", E::Regular, "x")]),
    ] {
        put("tar_extract", name, &tar_stream(&entries));
    }

    // Webhooks: secret, signature, body.
    let body = br#"{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567","repository":{"clone_url":"https://github.com/o/r.git","html_url":"https://github.com/o/r","ssh_url":"git@github.com:o/r.git","git_url":"git://github.com/o/r.git"}}"#;
    let secret = b"webhook-secret";
    let good = captain::webhook::sign(secret, body);
    for (name, sig) in [
        ("signed", good.clone()),
        (
            "upper",
            good.to_ascii_uppercase().replace("SHA256=", "sha256="),
        ),
        ("unsigned", String::new()),
        ("sha1", "sha1=0123".to_owned()),
    ] {
        let mut b = vec![secret.len() as u8];
        b.extend_from_slice(secret);
        b.push(sig.len() as u8);
        b.extend_from_slice(sig.as_bytes());
        b.extend_from_slice(body);
        put("webhook", name, &b);
    }

    // Route tables and their event stream.
    let table = br#"{"version":7,"routes":[{"domain":"app.example.com","env":"production","app":"web","backends":[{"instance_id":"i-1","node_id":"n-1","node_proxy":"10.0.0.1:4443"},{"instance_id":"i-2","node_id":"n-2","node_proxy":"127.0.0.1:8080","transport":"plain"}]},{"domain":"*.example.org","env":"staging","app":"api","kind":"passthrough","backends":[]}]}"#;
    put("routes", "table", table);
    let parsed = edge::routes::RouteTable::from_json(table).expect("seed table");
    put("routes", "sse", edge::routes::sse_event(&parsed).as_bytes());
    put("routes", "bad-plain", br#"{"version":1,"routes":[{"domain":"a.example","env":"e","app":"a","backends":[{"instance_id":"i","node_id":"n","node_proxy":"10.0.0.1:80","transport":"plain"}]}]}"#);

    println!("wrote {n} seeds under {}", root.display());
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).expect("example-meta") {
        let path = e.expect("entry").path();
        if path.is_dir() {
            collect(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, std::fs::read(&path).expect("file")));
        }
    }
}

/// A tar stream with names and link names written as an attacker would
/// (the checked setters refuse `..` and absolute paths).
fn tar_stream(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        let body: &[u8] = if kind.is_file() {
            h.set_size(data.len() as u64);
            data.as_bytes()
        } else {
            h.set_size(0);
            h.as_old_mut().linkname[..data.len()].copy_from_slice(data.as_bytes());
            &[]
        };
        h.set_cksum();
        b.append(&h, body).expect("entry");
    }
    let mut out = b.into_inner().expect("tar");
    out.flush().expect("flush");
    out
}
