//! The GitHub tarball source, against recorded API responses served by a
//! loopback HTTP server that octocrab's base URI points to.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use builder::{
    BuildError, BuildOptions, GitHubSource, InputError, LocalStore, MemoryLog, Source, fetch_image,
};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
struct Request {
    path: String,
    authorization: Option<String>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/github")
}

/// Serve the recorded responses; requests without the recorded token get 401.
async fn serve_recorded() -> (String, Arc<Mutex<Vec<Request>>>, String) {
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("responses.json")).unwrap()).unwrap();
    let token = recorded["token"].as_str().unwrap().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (seen2, base2, token2) = (seen.clone(), base.clone(), token.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (recorded, seen, base, token) = (
                recorded.clone(),
                seen2.clone(),
                base2.clone(),
                token2.clone(),
            );
            tokio::spawn(async move {
                // Read the request head (bounded to 64 KiB).
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let mut lines = head.lines();
                let mut first = lines.next().unwrap_or_default().split_whitespace();
                let (method, path) = (
                    first.next().unwrap_or_default().to_string(),
                    first.next().unwrap_or_default().to_string(),
                );
                let authorization = lines
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                    .map(|(_, v)| v.trim().to_string());
                seen.lock().unwrap().push(Request {
                    path: path.clone(),
                    authorization: authorization.clone(),
                });
                let route = recorded["routes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["method"] == method.as_str() && r["path"] == path.as_str());
                let authorized = authorization
                    .as_deref()
                    .is_some_and(|a| a.ends_with(&token));
                let (status, headers, body) = match route {
                    Some(_) if !authorized => (
                        401,
                        serde_json::json!({"content-type": "application/json"}),
                        br#"{"message":"Bad credentials"}"#.to_vec(),
                    ),
                    Some(r) => {
                        let body = match r["body_file"].as_str() {
                            Some(f) => std::fs::read(fixtures().join(f)).unwrap(),
                            None => Vec::new(),
                        };
                        (r["status"].as_u64().unwrap(), r["headers"].clone(), body)
                    }
                    None => {
                        let nf = &recorded["not_found"];
                        (
                            nf["status"].as_u64().unwrap(),
                            nf["headers"].clone(),
                            nf["body"].as_str().unwrap().as_bytes().to_vec(),
                        )
                    }
                };
                let mut resp = format!("HTTP/1.1 {status} X\r\nconnection: close\r\n");
                for (k, v) in headers.as_object().unwrap() {
                    if k != "content-length" {
                        resp.push_str(&format!(
                            "{k}: {}\r\n",
                            v.as_str().unwrap().replace("{base}", &base)
                        ));
                    }
                }
                resp.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (base, seen, token)
}

fn source(base: &str, repo: &str, token: &str) -> Source {
    Source::GitHub(GitHubSource {
        owner: "zeitwork".into(),
        repo: repo.into(),
        reference: "main".into(),
        token: Some(token.into()),
        api_base: Some(base.into()),
    })
}

#[tokio::test]
async fn github_tarball_from_recorded_response() {
    require_tools(&["buildah", "mkfs.ext4", "debugfs"]);
    let (base, seen, token) = serve_recorded().await;
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(tmp.path().join("store")));
    let (builder, _) = buildah_builder(store.clone(), &tmp.path().join("data"));
    let log = MemoryLog::new();
    let artifact = builder
        .build(source(&base, "demo", &token), BuildOptions::default(), &log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(artifact.config.cmd, vec!["/app/run"]);
    assert!(artifact.config.env.contains(&"FROM_GITHUB=1".to_string()));

    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests[0].path, "/repos/zeitwork/demo/tarball/main");
    assert!(
        requests
            .iter()
            .any(|r| r.path.starts_with("/codeload/zeitwork/demo/")),
        "redirect followed: {requests:?}"
    );
    assert!(
        requests[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.contains(&token)),
        "token sent: {requests:?}"
    );

    let (dir, _) = fetch_image(store.as_ref(), &artifact.digest, &tmp.path().join("cache"))
        .await
        .unwrap();
    let img = dir.join("rootfs.ext4");
    assert_eq!(
        debugfs(&img, "cat /hello.txt").trim(),
        "hello from a GitHub tarball"
    );
    let stat = debugfs(&img, "stat /app/run");
    assert!(
        stat.contains("0775") || stat.contains("0755"),
        "executable bit kept: {stat}"
    );
}

#[tokio::test]
async fn github_errors_name_the_cause() {
    let (base, _, token) = serve_recorded().await;
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(tmp.path().join("store")));
    let (builder, calls) = buildah_builder(store, &tmp.path().join("data"));

    let err = builder
        .build(
            source(&base, "missing", &token),
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::Input(InputError::GitHub { repo, .. }) if repo == "missing"),
        "{err}"
    );
    assert!(err.to_string().contains("not found"), "{err}");

    let err = builder
        .build(
            source(&base, "demo", "wrong-token"),
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::Input(InputError::GitHub { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
}
