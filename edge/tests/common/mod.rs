//! Test harness: real backends, a real edge, real clients, all on loopback.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use edge::proxy::{Proxy, ProxyConfig};
use edge::routes::{Backend, Route, RouteKind, RouteTable, Transport};
use edge::server::{Limits, Server};
use edge::table::Routes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

/// A backend HTTP server: answers `<name> <path>` plus the forwarding
/// headers it saw (as `x-seen-*` response headers), and echoes websockets on
/// any upgrade request.
pub async fn backend(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = Arc::new(name.to_owned());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| backend_handle(name.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn backend_handle(
    name: Arc<String>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(key) = req.headers().get("sec-websocket-key").cloned() {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on_upgrade.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    if ws.send(msg).await.is_err() {
                        return;
                    }
                } else if msg.is_close() {
                    return;
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        return Ok(resp);
    }
    let body_in = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(format!("{name} {}", body_in.len()))));
    let _ = &resp;
    resp.headers_mut()
        .insert("x-backend", name.parse().unwrap());
    Ok(resp)
}

/// Same as [`backend`], but the response also reports what it received.
pub async fn echo_backend(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let name = name.clone();
                    async move {
                        let mut resp =
                            Response::new(Full::new(Bytes::from(format!("{name} {}", req.uri()))));
                        for h in [
                            "host",
                            "x-forwarded-for",
                            "x-forwarded-proto",
                            "x-forwarded-host",
                            "x-request-id",
                            "x-zeitwork-instance",
                        ] {
                            if let Some(v) = req.headers().get(h) {
                                resp.headers_mut().insert(
                                    http::HeaderName::from_bytes(format!("x-seen-{h}").as_bytes())
                                        .unwrap(),
                                    v.clone(),
                                );
                            }
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An address nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

pub fn plain(id: &str, addr: SocketAddr) -> Backend {
    Backend {
        instance_id: id.into(),
        node_id: "node-1".into(),
        node_proxy: addr.to_string(),
        transport: Transport::Plain,
    }
}

pub fn route(domain: &str, app: &str, backends: Vec<Backend>) -> Route {
    Route {
        domain: domain.into(),
        env: "prod".into(),
        app: app.into(),
        kind: RouteKind::Http,
        backends,
    }
}

pub fn table(version: u64, routes: Vec<Route>) -> RouteTable {
    let t = RouteTable { version, routes };
    t.validate().unwrap();
    t
}

/// A running edge on loopback.
pub struct TestEdge {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub routes: Arc<Routes>,
    pub server: Server,
    pub proxy: Arc<Proxy>,
    pub shutdown: CancellationToken,
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestEdge {
    /// The HTTP-01 token store the edge's proxy answers from.
    pub fn server_http01(&self) -> Arc<edge::acme::Http01Tokens> {
        self.proxy.http01().clone()
    }
}

pub struct EdgeOptions {
    pub limits: Limits,
    pub proxy: ProxyConfig,
    pub mtls: Option<Arc<rustls::ClientConfig>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub routes: Option<Arc<Routes>>,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            proxy: ProxyConfig {
                access_log: false,
                ..ProxyConfig::default()
            },
            mtls: None,
            tls: None,
            routes: None,
        }
    }
}

pub async fn start_edge(t: &RouteTable, opts: EdgeOptions) -> TestEdge {
    let routes = opts.routes.unwrap_or_else(|| Arc::new(Routes::new()));
    routes.replace(t);
    let proxy = Proxy::new(routes.clone(), opts.mtls, opts.proxy);
    let shutdown = CancellationToken::new();
    let server = Server::new(proxy.clone(), opts.limits, shutdown.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = l.local_addr().unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.serve_http(l).await });
    let mut https = None;
    if let Some(tls) = opts.tls {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        https = Some(l.local_addr().unwrap());
        let s = server.clone();
        tokio::spawn(async move { s.serve_https(l, tls).await });
    }
    TestEdge {
        http,
        https,
        routes,
        server,
        proxy,
        shutdown,
    }
}

pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `path` with `Host: host` through the edge; returns status, headers, body.
pub async fn get(
    c: &TestClient,
    edge: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, String), String> {
    let req = Request::get(format!("http://{edge}{path}"))
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// Opens a websocket through the edge to `host`.
pub async fn websocket(
    edge: SocketAddr,
    host: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{edge}/ws").into_client_request().unwrap();
    req.headers_mut().insert("host", host.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Sends a text message and expects it back.
pub async fn ws_echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text.to_owned())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("websocket echo in time")
        .expect("websocket open")
        .expect("websocket frame");
    assert_eq!(got.into_text().unwrap().as_str(), text);
}

/// Reads one request head (and a `Content-Length` body) from `s`; `None`
/// at EOF.
pub async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A backend that answers every request as if keeping the connection,
/// then closes it: a pooled connection is always found closed.
pub async fn closing_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_request(&mut s, &mut buf).await.is_some() {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce")
                        .await;
                }
            });
        }
    });
    (addr, served)
}
