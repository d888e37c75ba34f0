//! TLS termination (local CA, SNI, ALPN h2), mTLS to node-proxies, and TLS
//! passthrough, with real rustls on both sides.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use edge::node_proxy::{NodeProxy, NodeProxyConfig};
use edge::pki::{Ca, IssuedCert};
use edge::routes::{Backend, RouteKind, Transport};
use edge::tls::{CertResolver, provider, server_config};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

fn client_config(
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
    cert: Option<&IssuedCert>,
) -> Arc<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(c) => {
            let (chain, key) = c.to_rustls().unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(cfg)
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

/// One HTTP/1.1 GET over an established stream.
async fn h1_get<S>(
    stream: S,
    host: &str,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, String), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

fn local_tls(edge_routes: &Arc<edge::table::Routes>, ca: &Ca) -> Arc<rustls::ServerConfig> {
    let ca = Ca::from_pem(ca.cert_pem(), &ca_key(ca)).unwrap();
    let resolver = CertResolver::new(edge_routes.clone(), Some(ca), vec!["*.dev.test".into()]);
    server_config(resolver).unwrap()
}

fn ca_key(ca: &Ca) -> String {
    let dir = tempfile::tempdir().unwrap();
    ca.save(dir.path()).unwrap();
    std::fs::read_to_string(dir.path().join("ca.key")).unwrap()
}

#[tokio::test]
async fn terminates_tls_with_local_ca_and_speaks_h2() {
    let b = echo_backend("app").await;
    let t = table(
        1,
        vec![
            route("app.localhost", "app", vec![plain("i1", b)]),
            route("x.dev.test", "app", vec![plain("i1", b)]),
        ],
    );
    let routes = Arc::new(edge::table::Routes::new());
    let local_ca = Ca::generate("local dev CA").unwrap();
    let tls = local_tls(&routes, &local_ca);
    let edge = start_edge(
        &t,
        EdgeOptions {
            tls: Some(tls),
            routes: Some(routes),
            ..EdgeOptions::default()
        },
    )
    .await;
    let https = edge.https.unwrap();

    // HTTP/2 chosen by ALPN.
    let s = tls_connect(
        https,
        "app.localhost",
        client_config(local_ca.root_store(), &[b"h2", b"http/1.1"], None),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::get(format!("https://app.localhost/h2/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-seen-x-forwarded-proto"], "https");
        assert_eq!(resp.headers()["x-seen-host"], "app.localhost");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], format!("app /h2/{i}").as_bytes());
    }

    // HTTP/1.1 over TLS for a configured wildcard name.
    let s = tls_connect(
        https,
        "x.dev.test",
        client_config(local_ca.root_store(), &[b"http/1.1"], None),
    )
    .await
    .unwrap();
    let (status, headers, _) = h1_get(s, "x.dev.test", "/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-seen-x-forwarded-proto"], "https");

    // A name the edge has no business serving gets no certificate.
    let err = tls_connect(
        https,
        "bank.example.com",
        client_config(local_ca.root_store(), &[b"http/1.1"], None),
    )
    .await;
    assert!(err.is_err(), "no certificate for an unknown name");
}

struct Cluster {
    ca: Ca,
    edge_cert: IssuedCert,
    node_cert: IssuedCert,
    node_proxy: SocketAddr,
    _stop: CancellationToken,
}

async fn cluster(instances: Vec<(&'static str, SocketAddr)>) -> Cluster {
    let ca = Ca::generate("cluster CA").unwrap();
    let node_cert = ca
        .issue_node_proxy("node-1", &["127.0.0.1".into()])
        .unwrap();
    let edge_cert = ca.issue_edge_client("edge-1").unwrap();
    let map: std::collections::HashMap<String, SocketAddr> = instances
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let resolver = Arc::new(move |id: &str| map.get(id).copied());
    let np = NodeProxy::new(
        ca.cert_pem(),
        &node_cert,
        resolver,
        NodeProxyConfig::default(),
    )
    .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node_proxy = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(np.serve(l, stop.clone()));
    Cluster {
        ca,
        edge_cert,
        node_cert,
        node_proxy,
        _stop: stop,
    }
}

fn mtls(id: &str, node_proxy: SocketAddr) -> Backend {
    Backend {
        instance_id: id.into(),
        node_id: "node-1".into(),
        node_proxy: node_proxy.to_string(),
        transport: Transport::Mtls,
    }
}

#[tokio::test]
async fn edge_reaches_instances_through_mtls_node_proxy() {
    let inst = backend("inst-1").await;
    let echo = echo_backend("inst-2").await;
    let gone = dead_addr().await;
    let c = cluster(vec![("inst-1", inst), ("inst-2", echo), ("gone", gone)]).await;
    let mtls_cfg = edge::upstream::mtls_client_config(c.ca.cert_pem(), &c.edge_cert).unwrap();
    let t = table(
        1,
        vec![
            route("a.test", "a", vec![mtls("inst-1", c.node_proxy)]),
            route("e.test", "e", vec![mtls("inst-2", c.node_proxy)]),
            route(
                "g.test",
                "g",
                vec![mtls("gone", c.node_proxy), mtls("inst-1", c.node_proxy)],
            ),
        ],
    );
    let edge = start_edge(
        &t,
        EdgeOptions {
            mtls: Some(mtls_cfg),
            ..EdgeOptions::default()
        },
    )
    .await;
    let hc = client();
    let (status, _, body) = get(&hc, edge.http, "a.test", "/").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("inst-1"));
    let (status, headers, _) = get(&hc, edge.http, "e.test", "/x").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-seen-x-forwarded-for"], "127.0.0.1");
    assert!(
        !headers.contains_key("x-seen-x-zeitwork-instance"),
        "the node-proxy strips the instance header"
    );
    // An instance the node-proxy cannot reach counts as a failed connect: retried elsewhere.
    for _ in 0..5 {
        let (status, _, body) = get(&hc, edge.http, "g.test", "/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("inst-1"));
    }
    // Websockets pass through edge and node-proxy.
    let mut ws = websocket(edge.http, "a.test").await;
    ws_echo(&mut ws, "through mTLS").await;
}

#[tokio::test]
async fn node_proxy_refuses_peers_without_the_edge_certificate() {
    let inst = backend("inst-1").await;
    let c = cluster(vec![("inst-1", inst)]).await;
    let roots = c.ca.root_store();
    let attempt = |cert: Option<IssuedCert>| {
        let cfg = client_config(roots.clone(), &[b"http/1.1"], cert.as_ref());
        let addr = c.node_proxy;
        async move {
            let s = tls_connect(addr, "127.0.0.1", cfg)
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = Request::get("/")
                .header("host", "x")
                .header(edge::routes::INSTANCE_HEADER, "inst-1")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
                .await
                .map_err(|_| "timeout".to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<StatusCode, String>(resp.status())
        }
    };
    // The edge's certificate works.
    assert_eq!(attempt(Some(c.edge_cert.clone())).await, Ok(StatusCode::OK));
    // No client certificate: refused.
    assert!(attempt(None).await.is_err());
    // A node's own (server-only) certificate: refused.
    assert!(attempt(Some(c.node_cert.clone())).await.is_err());
    // A client certificate from another CA: refused.
    let other = Ca::generate("other CA")
        .unwrap()
        .issue_edge_client("edge-x")
        .unwrap();
    assert!(attempt(Some(other)).await.is_err());
    // Plain HTTP: refused (never an HTTP answer).
    let mut s = TcpStream::connect(c.node_proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nx-zeitwork-instance: inst-1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(!buf.starts_with(b"HTTP/1.1 200"));
}

/// A TLS backend with its own certificate for `name`; answers "passthrough".
async fn tls_backend(name: &str) -> (SocketAddr, Ca, IssuedCert) {
    let ca = Ca::generate("backend's own CA").unwrap();
    let cert = ca.issue_server(&[name.to_owned()]).unwrap();
    let (chain, key) = cert.to_rustls().unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"passthrough")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca, cert)
}

#[tokio::test]
async fn passthrough_delivers_the_backends_own_certificate() {
    let (backend_addr, backend_ca, backend_cert) = tls_backend("pass.test").await;
    let c = cluster(vec![("tls-inst", backend_addr)]).await;
    let mtls_cfg = edge::upstream::mtls_client_config(c.ca.cert_pem(), &c.edge_cert).unwrap();
    let http_b = echo_backend("terminated").await;
    let mut direct = route("pass.test", "p", vec![plain("tls-inst", backend_addr)]);
    direct.kind = RouteKind::Passthrough;
    let mut via_node = route("pass2.test", "p", vec![mtls("tls-inst", c.node_proxy)]);
    via_node.kind = RouteKind::Passthrough;
    let t = table(
        1,
        vec![
            direct,
            via_node,
            route("app.localhost", "a", vec![plain("h", http_b)]),
        ],
    );
    let routes = Arc::new(edge::table::Routes::new());
    let local_ca = Ca::generate("local dev CA").unwrap();
    let tls = local_tls(&routes, &local_ca);
    let edge = start_edge(
        &t,
        EdgeOptions {
            tls: Some(tls),
            mtls: Some(mtls_cfg),
            routes: Some(routes),
            ..EdgeOptions::default()
        },
    )
    .await;
    let https = edge.https.unwrap();
    let expected_leaf = backend_cert.to_rustls().unwrap().0[0].clone();

    for (sni, backend_name) in [("pass.test", "pass.test"), ("pass2.test", "pass.test")] {
        // Trust only the backend's CA, verifying the backend's own name:
        // the handshake succeeds only if the backend's certificate arrives.
        let cfg = client_config(backend_ca.root_store(), &[b"http/1.1"], None);
        let tcp = TcpStream::connect(https).await.unwrap();
        let mut cfg_sni = (*cfg).clone();
        cfg_sni.enable_sni = true;
        let s = TlsConnector::from(Arc::new(cfg_sni))
            .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
            .await;
        if sni == "pass2.test" {
            // The backend's certificate names pass.test only: verification
            // against pass2.test must fail, proving it is the backend's cert.
            assert!(
                s.is_err(),
                "certificate for pass.test presented to pass2.test"
            );
            let s = tls_connect_no_verify(https, sni).await;
            let peer = s.get_ref().1.peer_certificates().unwrap()[0].clone();
            assert_eq!(peer, expected_leaf);
            let (status, _, body) = h1_get(s, backend_name, "/").await.unwrap();
            assert_eq!((status, body.as_str()), (StatusCode::OK, "passthrough"));
            continue;
        }
        let s = s.unwrap();
        let peer = s.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(
            peer, expected_leaf,
            "the client sees the backend's certificate"
        );
        let (status, _, body) = h1_get(s, sni, "/").await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "passthrough"));
    }

    // Terminated routes still work on the same listener.
    let s = tls_connect(
        https,
        "app.localhost",
        client_config(local_ca.root_store(), &[b"http/1.1"], None),
    )
    .await
    .unwrap();
    let (status, _, body) = h1_get(s, "app.localhost", "/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("terminated"));
}

/// Connects without verifying the server (to inspect what certificate a
/// passthrough route delivers for a name the backend does not hold).
async fn tls_connect_no_verify(
    addr: SocketAddr,
    sni: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

/// Sends raw bytes over `s` and reads one response (head, body by
/// Content-Length).
async fn raw_exchange<S>(s: &mut S, req: &[u8]) -> (String, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(req).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed inside a body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            return (head, body);
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap();
        assert!(
            n > 0,
            "closed before an answer: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn node_proxy_answers_what_the_edge_needs_on_one_connection() {
    let inst = backend("inst-1").await;
    let gone = dead_addr().await;
    let c = cluster(vec![("inst-1", inst), ("gone", gone)]).await;
    let cfg = client_config(c.ca.root_store(), &[b"http/1.1"], Some(&c.edge_cert));
    let mut s = tls_connect(c.node_proxy, "127.0.0.1", cfg).await.unwrap();
    let get = |inst: &str, path: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: a.test\r\nx-zeitwork-instance: {inst}\r\n\r\n")
            .into_bytes()
    };

    let (head, body) = raw_exchange(&mut s, &get("inst-1", "/")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "inst-1 0");
    // A small body, then one too large for the own path (hyper takes the
    // connection over), then a GET again on the same connection.
    let (_, body) = raw_exchange(
        &mut s,
        b"POST / HTTP/1.1\r\nhost: a.test\r\nx-zeitwork-instance: inst-1\r\ncontent-length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(body, "inst-1 5");
    let mut big = b"POST / HTTP/1.1\r\nhost: a.test\r\nx-zeitwork-instance: inst-1\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    big.extend_from_slice(b"4\r\nabcd\r\n0\r\n\r\n");
    let (head, body) = raw_exchange(&mut s, &big).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "inst-1 4");
    let (_, body) = raw_exchange(&mut s, &get("inst-1", "/again")).await;
    assert_eq!(body, "inst-1 0");

    // Each answer the edge acts on, on a fresh connection.
    let cfg = client_config(c.ca.root_store(), &[b"http/1.1"], Some(&c.edge_cert));
    let mut s = tls_connect(c.node_proxy, "127.0.0.1", cfg).await.unwrap();
    // No instance named: 400.
    let (head, _) = raw_exchange(&mut s, b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Not on this node, or not reachable: 502 saying the connect failed
    // (the edge then tries another instance).
    for inst in ["elsewhere", "gone"] {
        let (head, _) = raw_exchange(&mut s, &get(inst, "/")).await;
        assert!(head.starts_with("HTTP/1.1 502"), "{inst}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-zeitwork-upstream: connect-failed"),
            "{inst}: {head}"
        );
    }
    // And the connection still serves.
    let (head, body) = raw_exchange(&mut s, &get("inst-1", "/")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "inst-1 0");
}

#[tokio::test]
async fn node_proxy_loses_no_request_to_instance_connections_closed_while_pooled() {
    let (inst, served) = closing_backend().await;
    let c = cluster(vec![("inst-1", inst)]).await;
    let cfg = client_config(c.ca.root_store(), &[b"http/1.1"], Some(&c.edge_cert));
    let mut s = tls_connect(c.node_proxy, "127.0.0.1", cfg).await.unwrap();
    // The instance answers as if keeping each connection, then closes it:
    // GETs back to back are sent again on a new connection when the pooled
    // one turns out closed before any byte of an answer.
    for i in 0..20 {
        let (head, body) = raw_exchange(
            &mut s,
            b"GET / HTTP/1.1\r\nhost: a.test\r\nx-zeitwork-instance: inst-1\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "GET {i}: {head}");
        assert_eq!(body, "once");
    }
    // A POST is never sent twice: the pooled connection is checked first.
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (head, body) = raw_exchange(
            &mut s,
            b"POST / HTTP/1.1\r\nhost: a.test\r\nx-zeitwork-instance: inst-1\r\ncontent-length: 1\r\n\r\nx",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "POST {i}: {head}");
        assert_eq!(body, "once");
    }
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        25,
        "each request reached the instance once"
    );
}
