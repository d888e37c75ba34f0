//! The HTTP proxy core over real loopback servers.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use edge::server::Limits;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn two_domains_reach_two_apps_and_unknown_is_404() {
    let a1 = backend("app-a/1").await;
    let a2 = backend("app-a/2").await;
    let b1 = echo_backend("app-b/1").await;
    let t = table(
        1,
        vec![
            route("a.test", "app-a", vec![plain("a1", a1), plain("a2", a2)]),
            route("b.test", "app-b", vec![plain("b1", b1)]),
            route("*.wild.test", "app-b", vec![plain("b1", b1)]),
        ],
    );
    let edge = start_edge(&t, EdgeOptions::default()).await;
    let c = client();

    let mut seen = HashSet::new();
    for _ in 0..10 {
        let (status, headers, body) = get(&c, edge.http, "a.test", "/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("app-a/"), "{body}");
        seen.insert(headers["x-backend"].to_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "both instances of app-a serve: {seen:?}");

    let (status, headers, body) = get(&c, edge.http, "B.Test:8080", "/p?q=1").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "app-b/1 /p?q=1");
    assert_eq!(headers["x-seen-host"], "B.Test:8080");
    assert_eq!(headers["x-seen-x-forwarded-host"], "B.Test:8080");
    assert_eq!(headers["x-seen-x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-seen-x-forwarded-proto"], "http");
    let rid = headers["x-request-id"].to_str().unwrap();
    assert_eq!(headers["x-seen-x-request-id"], rid);
    assert_eq!(rid.len(), 20);
    assert!(
        !headers.contains_key("x-seen-x-zeitwork-instance"),
        "plain backends get no instance header"
    );

    let (status, _, body) = get(&c, edge.http, "x.wild.test", "/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("app-b/1"));

    let (status, headers, body) = get(&c, edge.http, "nope.test", "/").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body.contains("404 Not Found") && body.contains("nope.test"),
        "{body}"
    );
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let (status, _, body) = get(&c, edge.http, "<script>.test", "/").await.unwrap_or((
        StatusCode::BAD_REQUEST,
        Default::default(),
        String::new(),
    ));
    assert!(
        status == StatusCode::BAD_REQUEST
            || (status == StatusCode::NOT_FOUND && !body.contains("<script>"))
    );

    // A client can not spoof the forwarding headers.
    let req = http::Request::get(format!("http://{}/", edge.http))
        .header("host", "b.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-zeitwork-instance", "other")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.headers()["x-seen-x-forwarded-for"], "127.0.0.1");
    assert!(!resp.headers().contains_key("x-seen-x-zeitwork-instance"));
}

async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn bad_input_is_bounded() {
    let a = backend("a").await;
    let t = table(1, vec![route("a.test", "a", vec![plain("a1", a)])]);
    let edge = start_edge(
        &t,
        EdgeOptions {
            limits: Limits {
                max_connections: 3,
                header_timeout: Duration::from_millis(300),
                max_header_bytes: 8192,
                ..Limits::default()
            },
            ..EdgeOptions::default()
        },
    )
    .await;

    // No Host at all (HTTP/1.0 allows that).
    let resp = raw(edge.http, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.0 400") || resp.starts_with("HTTP/1.1 400"),
        "{resp}"
    );

    // Oversized headers.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a.test\r\nx-big: {}\r\n\r\n",
        "x".repeat(64 * 1024)
    );
    let resp = raw(edge.http, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.100}");

    // Garbage.
    let resp = raw(edge.http, b"\x00\x01\x02 nonsense\r\n\r\n").await;
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
        "{resp:.100}"
    );

    // A slow client that never finishes its headers is disconnected.
    let mut slow = TcpStream::connect(edge.http).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a.te")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
        .await
        .expect("the edge closes a slow client")
        .unwrap_or(0);
    let _ = n; // hyper may close silently or answer 408; either way the socket is done.
    let n2 = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n2, 0, "connection closed after the header timeout");

    // Too many connections: hold 3 open, the 4th is refused with 503.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(edge.http).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let resp = raw(edge.http, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    drop(held);
    // Capacity comes back once the held connections are gone.
    let mut ok = false;
    for _ in 0..100 {
        if raw(
            edge.http,
            b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        )
        .await
        .starts_with("HTTP/1.1 200")
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "connections are served again after the limit clears");
}

#[tokio::test]
async fn failed_connects_are_retried_and_skipped() {
    let good = backend("good").await;
    let dead = dead_addr().await;
    let t = table(
        1,
        vec![
            route(
                "a.test",
                "a",
                vec![plain("dead", dead), plain("good", good)],
            ),
            route("down.test", "d", vec![plain("dead", dead)]),
            route("empty.test", "e", vec![]),
        ],
    );
    let edge = start_edge(&t, EdgeOptions::default()).await;
    let c = client();
    for _ in 0..20 {
        let (status, _, body) = get(&c, edge.http, "a.test", "/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("good"));
    }
    let router = edge.routes.load();
    let dead_state = router
        .lookup("a.test")
        .unwrap()
        .backends
        .iter()
        .find(|b| b.backend.instance_id == "dead")
        .unwrap()
        .clone();
    assert!(!dead_state.is_healthy(), "the dead backend is marked down");

    // A POST with a body is not retried: it fails cleanly with 502 when the
    // only backend is dead.
    let (status, _, _) = get(&c, edge.http, "down.test", "/").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (status, _, body) = get(&c, edge.http, "empty.test", "/").await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("No instance of e"));

    // Request bodies reach the backend.
    let hc: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::post(format!("http://{}/upload", edge.http))
        .header("host", "a.test")
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            7u8;
            100_000
        ])))
        .unwrap();
    let resp = hc.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"good 100000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_route_changes_under_load_drop_nothing() {
    let v1: Vec<_> = futures::future::join_all(
        (0..3).map(|i| backend(Box::leak(format!("v1-{i}").into_boxed_str()))),
    )
    .await;
    let v2: Vec<_> = futures::future::join_all(
        (0..3).map(|i| backend(Box::leak(format!("v2-{i}").into_boxed_str()))),
    )
    .await;
    let other = backend("other").await;
    let make = |version: u64, set: &[std::net::SocketAddr], tag: &str| {
        table(
            version,
            vec![
                route(
                    "app.test",
                    "app",
                    set.iter()
                        .enumerate()
                        .map(|(i, a)| plain(&format!("{tag}-{i}"), *a))
                        .collect(),
                ),
                route(
                    &format!("extra-{version}.test"),
                    "other",
                    vec![plain("o", other)],
                ),
            ],
        )
    };
    let edge = start_edge(&make(0, &v1, "v1"), EdgeOptions::default()).await;

    let mut ws = websocket(edge.http, "app.test").await;
    ws_echo(&mut ws, "hello before").await;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        let addr = edge.http;
        loaders.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u64, Vec::new());
            // Bounded: stops when told, and never more than 100k requests.
            while !stop.is_cancelled() && ok + (failed.len() as u64) < 100_000 {
                match get(&c, addr, "app.test", "/").await {
                    Ok((StatusCode::OK, _, body)) if body.starts_with("v") => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }));
    }
    for i in 1..=100u64 {
        let t = if i % 2 == 1 {
            make(i, &v2, "v2")
        } else {
            make(i, &v1, "v1")
        };
        edge.routes.replace(&t);
        if i % 10 == 0 {
            ws_echo(&mut ws, &format!("during {i}")).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    let mut total_ok = 0;
    for l in loaders {
        let (ok, failed) = l.await.unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total_ok += ok;
    }
    assert!(total_ok > 0);
    assert_eq!(edge.routes.load().version, 100);
    ws_echo(&mut ws, "hello after").await;
    println!("requests during 100 route changes: {total_ok} ok, 0 failed; websocket open");
}

/// A backend that counts accepted connections; `keep_alive` false closes
/// each connection after one response.
async fn counting_backend(
    keep_alive: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"counted")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn backend_connections_are_reused_and_closed_ones_replaced() {
    use std::sync::atomic::Ordering;
    let (keep, keep_count) = counting_backend(true).await;
    let (close, close_count) = counting_backend(false).await;
    let t = table(
        1,
        vec![
            route("keep.test", "k", vec![plain("k1", keep)]),
            route("close.test", "c", vec![plain("c1", close)]),
        ],
    );
    let edge = start_edge(&t, EdgeOptions::default()).await;
    let c = client();
    for _ in 0..50 {
        let (status, _, body) = get(&c, edge.http, "keep.test", "/").await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "counted"));
    }
    assert_eq!(
        keep_count.load(Ordering::SeqCst),
        1,
        "sequential requests share one kept-alive backend connection"
    );
    for _ in 0..20 {
        let (status, _, body) = get(&c, edge.http, "close.test", "/").await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "counted"));
    }
    assert_eq!(close_count.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_stops_accepting() {
    // A backend that answers after a pause, so the request is in flight
    // when the edge is told to stop.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = l.local_addr().unwrap();
    let (arrived_tx, arrived_rx) = tokio::sync::oneshot::channel::<()>();
    let arrived_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(arrived_tx)));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let arrived_tx = arrived_tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let arrived_tx = arrived_tx.clone();
                    async move {
                        if let Some(tx) = arrived_tx.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"slow but done")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let t = table(1, vec![route("slow.test", "s", vec![plain("s1", slow)])]);
    let edge = start_edge(&t, EdgeOptions::default()).await;
    let addr = edge.http;
    let in_flight = tokio::spawn(async move {
        let c = client();
        get(&c, addr, "slow.test", "/").await
    });
    arrived_rx.await.unwrap();
    edge.shutdown.cancel();
    let (status, _, body) = in_flight.await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow but done"));
    // The listener is closed: new clients are not served.
    let mut refused = false;
    for _ in 0..100 {
        match TcpStream::connect(addr).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(refused, "no new connections after shutdown");
}

/// Reads one HTTP/1.1 response with a `content-length` body; returns its head
/// and body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("response head in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[tokio::test]
async fn idle_keep_alive_connections_park_and_resume() {
    let a = backend("a").await;
    let t = table(1, vec![route("a.test", "a", vec![plain("a1", a)])]);
    let timeout = Duration::from_millis(1500);
    let edge = start_edge(
        &t,
        EdgeOptions {
            limits: Limits {
                header_timeout: timeout,
                ..Limits::default()
            },
            ..EdgeOptions::default()
        },
    )
    .await;
    let req = b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    // Connected but silent for a while, then a request.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(req).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains('a'), "{body}");

    // Idle past the parking point, then a head sent in two pieces with a
    // pause long enough to park in between.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(&req[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(&req[10..]).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );

    // A complete request plus the start of the next in one write: the
    // partial head survives parking.
    let mut two = req.to_vec();
    two.extend_from_slice(&req[..12]);
    s.write_all(&two).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(&req[12..]).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Silent after a response: closed once the header timeout has passed
    // since that response, parked or not.
    let idle = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an idle connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = idle.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(200) && waited < timeout * 3,
        "closed after {waited:?}"
    );

    // A websocket upgrade on a connection that has parked, open past the
    // header timeout.
    let mut c = TcpStream::connect(edge.http).await.unwrap();
    c.write_all(req).await.unwrap();
    let _ = read_response(&mut c).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ws_req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws",
            edge.http
        ))
        .unwrap();
    ws_req
        .headers_mut()
        .insert("host", "a.test".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(ws_req, c).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws_echo(&mut ws, "after parking").await;
    tokio::time::sleep(timeout + Duration::from_millis(300)).await;
    ws_echo(&mut ws, "still open").await;

    // A connection that never sends anything is closed too.
    let mut silent = TcpStream::connect(edge.http).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("a silent connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn more_than_the_default_header_count_is_431() {
    let a = backend("a").await;
    let t = table(1, vec![route("a.test", "a", vec![plain("a1", a)])]);
    let edge = start_edge(&t, EdgeOptions::default()).await;
    let mut ok = String::from("GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n");
    for i in 0..90 {
        ok.push_str(&format!("x-h{i}: 1\r\n"));
    }
    let resp = raw(edge.http, format!("{ok}\r\n").as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:.100}");
    let mut many = ok;
    for i in 90..110 {
        many.push_str(&format!("x-h{i}: 1\r\n"));
    }
    let resp = raw(edge.http, format!("{many}\r\n").as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.100}");
}
