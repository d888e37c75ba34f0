//! Attacks on the edge from its clients, each performed for real on
//! loopback: a request whose target names one app and whose `Host` names
//! another, and one address opening more connections than its share.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use edge::server::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Reads one response head from `s`, and the bytes of the body that came
/// with it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            return (head, buf[end + 4..].to_vec());
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap_or(0);
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one response with a `Content-Length`: head and body.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let (head, mut body) = read_head(s).await;
    let len: usize = header(&head, "content-length")
        .expect("content-length")
        .parse()
        .unwrap();
    let mut rest = vec![0u8; len - body.len()];
    s.read_exact(&mut rest).await.unwrap();
    body.extend_from_slice(&rest);
    (head, body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// RFC 9112 3.2.2: a server receiving an absolute-form target ignores the
/// `Host` header and uses the target's authority. The edge routes such a
/// request by its authority (it goes to hyper); the app must then see that
/// authority as `Host` and `X-Forwarded-Host`, never the other app's name
/// the client put in `Host` (an app that trusts `Host` for tenancy, links
/// or password-reset mails would otherwise act for a name it does not
/// serve).
#[tokio::test]
async fn absolute_form_target_is_the_host_the_app_sees() {
    let a = echo_backend("a").await;
    let b = echo_backend("b").await;
    let t = table(
        1,
        vec![
            route("a.example", "a", vec![plain("a1", a)]),
            route("b.example", "b", vec![plain("b1", b)]),
        ],
    );
    let edge = start_edge(&t, EdgeOptions::default()).await;
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    for (target, host, app, seen) in [
        ("http://a.example/x", "b.example", "a", "a.example"),
        (
            "http://b.example:8080/y",
            "a.example",
            "b",
            "b.example:8080",
        ),
        ("http://user@a.example/z", "b.example", "a", "a.example"),
    ] {
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = read_response(&mut s).await;
        let body = String::from_utf8(body).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
        assert!(body.starts_with(&format!("{app} ")), "{target}: {body}");
        assert_eq!(header(&head, "x-seen-host"), Some(seen), "{target}: {head}");
        assert_eq!(
            header(&head, "x-seen-x-forwarded-host"),
            Some(seen),
            "{target}: {head}"
        );
    }
}

/// A client connection from `ip` (any of 127.0.0.0/8 is this machine).
async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(ip.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    sock.connect(to).await.unwrap()
}

async fn get_ok(s: &mut TcpStream) {
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// One address opens more connections than its share: the extra ones are
/// refused with a 429 and closed, while its open connections (working or
/// parked idle) and every other client are served; a closed connection
/// gives its place back.
#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    const SHARE: usize = 4;
    let b = backend("app").await;
    let t = table(1, vec![route("app.example", "app", vec![plain("b1", b)])]);
    let edge = start_edge(
        &t,
        EdgeOptions {
            limits: Limits {
                max_connections_per_ip: SHARE,
                ..Limits::default()
            },
            ..EdgeOptions::default()
        },
    )
    .await;

    let mut mine = Vec::new();
    for _ in 0..SHARE {
        let mut s = connect_from("127.0.0.2", edge.http).await;
        get_ok(&mut s).await;
        mine.push(s);
    }
    // Idle long enough to be parked: still counted.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        edge.server.parked_connections() >= SHARE,
        "{} parked",
        edge.server.parked_connections()
    );
    for _ in 0..3 {
        let mut extra = connect_from("127.0.0.2", edge.http).await;
        let _ = extra
            .write_all(b"GET /ok HTTP/1.1\r\nHost: app.example\r\n\r\n")
            .await;
        let (head, _) = read_head(&mut extra).await;
        assert!(head.starts_with("HTTP/1.1 429"), "{head}");
        assert_eq!(header(&head, "connection"), Some("close"), "{head}");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut rest))
            .await
            .expect("closed by the edge");
        assert!(n.is_ok());
    }
    // Everyone else is served, and so are the address's own connections.
    for ip in ["127.0.0.3", "127.0.0.4"] {
        let mut s = connect_from(ip, edge.http).await;
        get_ok(&mut s).await;
    }
    for s in &mut mine {
        get_ok(s).await;
    }
    // A closed connection gives its place back.
    drop(mine.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut s = connect_from("127.0.0.2", edge.http).await;
        s.write_all(b"GET /ok HTTP/1.1\r\nHost: app.example\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_head(&mut s).await;
        if head.starts_with("HTTP/1.1 200") {
            again = Some(head);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again.is_some(),
        "the place of a closed connection came back"
    );
}

/// A backend that records the request line (and `Host`) of every request it
/// reads, framing them by `Content-Length` as any server does, and answers
/// each; with `respond`, the answer is those bytes.
async fn recording_backend(
    respond: &'static [u8],
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, _)) = read_request(&mut s, &mut buf).await {
                    let line = head.lines().next().unwrap_or("").to_owned();
                    let host = header(&head, "host").unwrap_or("-").to_owned();
                    log.lock().unwrap().push(format!("{line} host={host}"));
                    if s.write_all(respond).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Request smuggling through `Connection`: a client names `Content-Length`
/// (and `Host`) as connection options. The edge frames the request by that
/// `Content-Length` (its body is the smuggled request); had it dropped the
/// header as hop-by-hop, the app would read the body as a second request
/// the edge never saw (no `X-Forwarded-For` of the edge's, a response
/// queued for the next client on the pooled connection). The headers that
/// frame and route a message are never removed by a connection option.
#[tokio::test]
async fn connection_options_cannot_unframe_a_request() {
    let (b, seen) = recording_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let t = table(1, vec![route("app.example", "app", vec![plain("b1", b)])]);
    let edge = start_edge(&t, EdgeOptions::default()).await;
    let smuggled = "GET /admin HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
    let mut s = TcpStream::connect(edge.http).await.unwrap();
    s.write_all(
        format!(
            "POST /form HTTP/1.1\r\nHost: app.example\r\nConnection: content-length, host\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
    // Anything the app read as a second request would be logged by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec!["POST /form HTTP/1.1 host=app.example".to_owned()],
        "what the app read"
    );
}

/// The same from the app's side: a response that names its own framing
/// headers in `Connection`, or lists more connection options than the edge
/// kept track of. The client must get a response it frames as the edge
/// relays it (else it waits for a close that never comes, or reads the
/// next response as this body), and no header the app declared hop-by-hop.
#[tokio::test]
async fn connection_options_cannot_unframe_a_response() {
    let many: String = (0..12).map(|i| format!("x-hop-{i}, ")).collect();
    for options in [
        "transfer-encoding, x-hop-11".to_owned(),
        format!("{many}content-length"),
    ] {
        let response: &'static [u8] = format!(
            "HTTP/1.1 200 OK\r\nConnection: {options}\r\nx-hop-11: secret\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )
        .into_bytes()
        .leak();
        let (b, _) = recording_backend(response).await;
        let t = table(1, vec![route("app.example", "app", vec![plain("b1", b)])]);
        let edge = start_edge(&t, EdgeOptions::default()).await;
        let mut s = TcpStream::connect(edge.http).await.unwrap();
        for _ in 0..2 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
                .await
                .unwrap();
            let (head, mut body) = read_head(&mut s).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{options}: {head}");
            assert_eq!(
                header(&head, "transfer-encoding"),
                Some("chunked"),
                "{options}: the client frames the body as the edge relays it: {head}"
            );
            assert_eq!(header(&head, "x-hop-11"), None, "{options}: {head}");
            while !body.ends_with(b"0\r\n\r\n") {
                let mut chunk = [0u8; 1024];
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                    .await
                    .expect("the chunked body")
                    .unwrap();
                assert!(n > 0);
                body.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(body, b"2\r\nok\r\n0\r\n\r\n");
        }
    }
}
