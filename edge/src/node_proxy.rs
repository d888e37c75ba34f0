//! The node-proxy: the mTLS server the follower runs on every node. It is the
//! only way into the node's instances from the edge.
//!
//! - Accepts only TLS clients presenting a certificate signed by the cluster
//!   CA with the clientAuth usage (the edge's, see [`crate::pki`]); anything
//!   else fails the handshake and never reaches HTTP.
//! - Every request names its instance in [`INSTANCE_HEADER`]; the follower
//!   supplies the [`InstanceResolver`] that maps it to the instance's address.
//! - Plain requests and upgrades (websockets) are forwarded over HTTP/1.1;
//!   `CONNECT` opens a raw tunnel to the instance (TLS passthrough routes).
//!   Most requests take the edge's own HTTP/1.1 code ([`crate::h1`]:
//!   `httparse`, heads written straight to pooled connections to the
//!   instance); upgrades, `CONNECT`, chunked or large bodies, `Expect` and
//!   HTTP/1.0 go to hyper, which takes the connection over.
//! - When the instance refuses the connection, the answer is a 502 with
//!   `x-zeitwork-upstream: connect-failed`, so the edge can try another one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::forward::{is_upgrade_request, splice_upgrades, strip_hop_by_hop};
use crate::h1;
use crate::pki::IssuedCert;
use crate::proxy::{UPSTREAM_CONNECT_FAILED, UPSTREAM_STATUS_HEADER, error_chain};
use crate::routes::INSTANCE_HEADER;
use crate::tls::{TlsError, provider};
use crate::upstream::{RawPool, UpstreamStream};

/// Maps an instance id to the address its app listens on.
pub trait InstanceResolver: Send + Sync + 'static {
    /// The instance's address, or None when this node does not run it.
    fn resolve(&self, instance_id: &str) -> Option<SocketAddr>;
}

impl<F> InstanceResolver for F
where
    F: Fn(&str) -> Option<SocketAddr> + Send + Sync + 'static,
{
    fn resolve(&self, instance_id: &str) -> Option<SocketAddr> {
        self(instance_id)
    }
}

/// Node-proxy tunables.
#[derive(Debug, Clone)]
pub struct NodeProxyConfig {
    /// Open connections from edges.
    pub max_connections: usize,
    /// TLS handshake timeout.
    pub handshake_timeout: Duration,
    /// Request head timeout (also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// Connect timeout towards an instance.
    pub connect_timeout: Duration,
}

impl Default for NodeProxyConfig {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// The node-proxy server.
pub struct NodeProxy {
    /// Swapped when the node's certificate is renewed.
    tls: arc_swap::ArcSwap<rustls::ServerConfig>,
    ca_pem: String,
    resolver: Arc<dyn InstanceResolver>,
    client: Client<HttpConnector, Incoming>,
    /// Idle connections to instances of the own HTTP/1.1 path.
    pool: RawPool<SocketAddr>,
    config: NodeProxyConfig,
    conns: Arc<Semaphore>,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

type NpBody = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: &'static str) -> Response<NpBody> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(msg.as_bytes()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// The rustls server config of a node-proxy: `server` is the node's
/// certificate; clients must present a clientAuth certificate signed by the
/// CA in `ca_pem`.
pub fn server_config(
    ca_pem: &str,
    server: &IssuedCert,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|_| TlsError::CaPem)?)
            .map_err(TlsError::Rustls)?;
    }
    if roots.is_empty() {
        return Err(TlsError::CaPem);
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(TlsError::Verifier)?;
    let (chain, key) = server.to_rustls()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

impl NodeProxy {
    /// A node-proxy with the node's certificate, trusting edges signed by
    /// the CA in `ca_pem`.
    pub fn new(
        ca_pem: &str,
        server: &IssuedCert,
        resolver: Arc<dyn InstanceResolver>,
        config: NodeProxyConfig,
    ) -> Result<Arc<Self>, TlsError> {
        let tls = server_config(ca_pem, server)?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(http);
        Ok(Arc::new(Self {
            tls: arc_swap::ArcSwap::new(tls),
            ca_pem: ca_pem.to_string(),
            resolver,
            client,
            pool: RawPool::new(512, Duration::from_secs(60)),
            conns: Arc::new(Semaphore::new(config.max_connections)),
            config,
        }))
    }

    /// Serves `server` (a renewed certificate) to the next connections.
    pub fn set_certificate(&self, server: &IssuedCert) -> Result<(), TlsError> {
        self.tls.store(server_config(&self.ca_pem, server)?);
        Ok(())
    }

    /// Serves until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let (stream, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                res = listener.accept() => match res {
                    Ok(p) => p,
                    Err(err) => {
                        tracing::warn!(error = %err, "node-proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                tracing::warn!(client = %remote, "node-proxy connection limit reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                this.connection(stream, remote, shutdown).await;
                drop(permit);
            });
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        remote: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let tls = match tokio::time::timeout(
            self.config.handshake_timeout,
            tokio_rustls::TlsAcceptor::from(self.tls.load_full()).accept(stream),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                tracing::warn!(client = %remote, error = %err, "node-proxy refused a client (TLS)");
                return;
            }
            Err(_) => {
                tracing::warn!(client = %remote, "node-proxy TLS handshake timed out");
                return;
            }
        };
        // The own HTTP/1.1 path first; hyper for what it hands over.
        let Some((tls, prefix)) = self.serve_fast(tls, &shutdown).await else {
            return;
        };
        let stream = crate::passthrough::Prefixed::new(prefix, tls);
        let this = self.clone();
        let svc = service_fn(move |req| this.clone().handle(req));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_timeout)
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let res = tokio::select! {
            r = conn.as_mut() => r,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(err) = res {
            tracing::debug!(client = %remote, error = %err, "node-proxy connection ended with an error");
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<NpBody>, std::convert::Infallible> {
        let Some(instance) = req
            .headers()
            .get(INSTANCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "missing x-zeitwork-instance\n",
            ));
        };
        let Some(addr) = self.resolver.resolve(&instance) else {
            let mut r = text(StatusCode::BAD_GATEWAY, "instance not on this node\n");
            r.headers_mut().insert(
                UPSTREAM_STATUS_HEADER,
                HeaderValue::from_static(UPSTREAM_CONNECT_FAILED),
            );
            return Ok(r);
        };
        if req.method() == Method::CONNECT {
            return Ok(self.tunnel(req, addr, instance).await);
        }
        let upgrade = is_upgrade_request(req.version(), req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(INSTANCE_HEADER);
        parts.version = Version::HTTP_11;
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(pq)
            .build()
        {
            Ok(u) => u,
            Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "invalid request target\n")),
        };
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(mut resp) => {
                let is_101 = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                if is_101 && let Some(cu) = client_upgrade {
                    let uu = hyper::upgrade::on(&mut resp);
                    splice_upgrades(cu, uu, instance);
                }
                let (mut rparts, body) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers, is_101);
                Ok(Response::from_parts(rparts, body.boxed()))
            }
            Err(err) => {
                let connect = err.is_connect();
                tracing::warn!(instance, %addr, error = %error_chain(&err), "node-proxy could not reach the instance");
                let mut r = text(StatusCode::BAD_GATEWAY, "instance unreachable\n");
                if connect {
                    r.headers_mut().insert(
                        UPSTREAM_STATUS_HEADER,
                        HeaderValue::from_static(UPSTREAM_CONNECT_FAILED),
                    );
                }
                Ok(r)
            }
        }
    }

    async fn tunnel(
        &self,
        req: Request<Incoming>,
        addr: SocketAddr,
        instance: String,
    ) -> Response<NpBody> {
        let upstream =
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => s,
                _ => {
                    let mut r = text(StatusCode::BAD_GATEWAY, "instance unreachable\n");
                    r.headers_mut().insert(
                        UPSTREAM_STATUS_HEADER,
                        HeaderValue::from_static(UPSTREAM_CONNECT_FAILED),
                    );
                    return r;
                }
            };
        let _ = upstream.set_nodelay(true);
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let Ok(client) = on_upgrade.await else { return };
            let mut client = TokioIo::new(client);
            let mut upstream = upstream;
            if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(instance, error = %err, "tunnel ended");
            }
        });
        Response::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed())
    }
}

/// What the node-proxy's own HTTP/1.1 path decided for a request head.
enum NpStep {
    /// The head is not complete yet.
    More,
    /// Not for this path (upgrade, CONNECT, chunked or large body, ...).
    Handoff,
    /// The node-proxy answers itself; the answer is in `out`.
    Answer { head_len: usize, close: bool },
    /// To the instance at `addr`; the head for it is in `out`.
    Forward {
        head_len: usize,
        body_len: usize,
        addr: SocketAddr,
        close: bool,
        head_request: bool,
        idempotent: bool,
    },
}

impl NodeProxy {
    /// Serves an edge's connection with the edge's own HTTP/1.1 code
    /// ([`crate::h1`]): heads parsed with `httparse`, the instance header
    /// resolved and dropped, the head written straight to a pooled
    /// connection to the instance, the response relayed as it comes. A
    /// request it does not take hands back the stream and every byte not
    /// answered yet (`Some`), for hyper; `None` when the connection is over.
    /// On shutdown, a request in flight is finished, then the connection
    /// closed.
    async fn serve_fast<S>(&self, mut stream: S, shutdown: &CancellationToken) -> Option<(S, Bytes)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf: Vec<u8> = Vec::new();
        let mut out: Vec<u8> = Vec::new();
        let mut rbuf: Vec<u8> = Vec::new();
        // The request for the instance (kept for a second try).
        let mut request: Vec<u8> = Vec::new();
        loop {
            let deadline = tokio::time::Instant::now() + self.config.header_timeout;
            let step = loop {
                match self.plan(&buf, &mut out) {
                    NpStep::More => {}
                    step => break step,
                }
                if buf.len() > MAX_HEAD {
                    out.clear();
                    h1::simple_response(
                        &mut out,
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "text/plain",
                        b"",
                        None,
                        true,
                    );
                    let _ = stream.write_all(&out).await;
                    return None;
                }
                h1::reserve(&mut buf, h1::BUF_SIZE);
                let idle = buf.is_empty();
                let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf));
                let res = tokio::select! {
                    res = read => res,
                    // Between requests only: a head being read is finished.
                    _ = shutdown.cancelled(), if idle => return None,
                };
                match res {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            };
            let keep = match step {
                NpStep::More => unreachable!("looped above"),
                NpStep::Handoff => return Some((stream, Bytes::from(buf))),
                NpStep::Answer { head_len, close } => {
                    buf.drain(..head_len);
                    stream.write_all(&out).await.is_ok() && stream.flush().await.is_ok() && !close
                }
                NpStep::Forward {
                    head_len,
                    body_len,
                    addr,
                    close,
                    head_request,
                    idempotent,
                } => {
                    let need = head_len + body_len;
                    while buf.len() < need {
                        h1::reserve(&mut buf, h1::BUF_SIZE);
                        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => {}
                            _ => return None,
                        }
                    }
                    out.extend_from_slice(&buf[head_len..need]);
                    std::mem::swap(&mut out, &mut request);
                    let keep = self
                        .forward_fast(
                            &mut stream,
                            &request,
                            &mut out,
                            &mut rbuf,
                            addr,
                            head_request,
                            idempotent && body_len == 0,
                            close,
                        )
                        .await;
                    buf.drain(..need);
                    keep && !close
                }
            };
            if !keep || shutdown.is_cancelled() {
                let _ = stream.shutdown().await;
                return None;
            }
        }
    }

    /// One request (`request`) to the instance at `addr` and its answer
    /// relayed; false when the edge's connection must close.
    #[allow(clippy::too_many_arguments)]
    async fn forward_fast<S>(
        &self,
        stream: &mut S,
        request: &[u8],
        out: &mut Vec<u8>,
        rbuf: &mut Vec<u8>,
        addr: SocketAddr,
        head_request: bool,
        retryable: bool,
        close: bool,
    ) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut pooled = self.pool.take(false, &addr, !retryable);
        let mut reused = pooled.is_some();
        let (resp, mut conn) = loop {
            let mut conn = match pooled.take() {
                Some(c) => c,
                None => match self.connect(addr).await {
                    Ok(c) => c,
                    Err(err) => {
                        tracing::warn!(%addr, error = %err, "node-proxy could not reach the instance");
                        return answer(
                            stream,
                            out,
                            StatusCode::BAD_GATEWAY,
                            "instance unreachable\n",
                            true,
                            close,
                        )
                        .await;
                    }
                },
            };
            out.clear();
            out.extend_from_slice(request);
            let sent =
                h1::send_and_read_head(stream, &mut conn, out, rbuf, head_request, close, None);
            match tokio::time::timeout(RESPONSE_TIMEOUT, sent).await {
                Ok(Ok(resp)) => break (resp, conn),
                // A reused connection the instance had closed: sent again,
                // on a new one, only when the request is idempotent.
                Ok(Err(h1::Failure::Stale)) if reused && retryable => reused = false,
                Ok(Err(err)) => {
                    let why = match err {
                        h1::Failure::Stale => "closed the connection without answering".to_owned(),
                        h1::Failure::Connect(e) | h1::Failure::Exchange(e) => e,
                        h1::Failure::Timeout => "timed out".to_owned(),
                    };
                    tracing::warn!(%addr, error = %why, "node-proxy request to the instance failed");
                    return answer(
                        stream,
                        out,
                        StatusCode::BAD_GATEWAY,
                        "instance unreachable\n",
                        false,
                        close,
                    )
                    .await;
                }
                Err(_) => {
                    tracing::warn!(%addr, "the instance did not answer in time");
                    return answer(
                        stream,
                        out,
                        StatusCode::GATEWAY_TIMEOUT,
                        "instance did not answer in time\n",
                        false,
                        close,
                    )
                    .await;
                }
            }
        };
        match h1::relay_body(stream, &mut conn, out, rbuf, &resp).await {
            Ok(extra) => {
                if resp.reusable && !extra {
                    self.pool.put(false, &addr, conn);
                }
                !resp.close_client
            }
            Err(()) => false,
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<UpstreamStream, String> {
        match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(UpstreamStream::Plain(s))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "connect timed out after {:?}",
                self.config.connect_timeout
            )),
        }
    }

    /// Decides what to do with the head in `buf`; writes the answer or the
    /// head for the instance into `out`.
    fn plan(&self, buf: &[u8], out: &mut Vec<u8>) -> NpStep {
        let mut storage = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut storage);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return NpStep::More,
            // hyper gives the answers to these (400, 431).
            Err(_) => return NpStep::Handoff,
        };
        let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
            return NpStep::Handoff;
        };
        if !path.starts_with('/') || method == "CONNECT" {
            return NpStep::Handoff;
        }
        let Some(scan) = h1::scan_request(req.headers, INSTANCE_HEADER) else {
            return NpStep::Handoff;
        };
        let (instance, body_len, close) = (scan.key, scan.body_len, scan.close);
        // An answer of its own closes the connection when a body would
        // follow (it is not read).
        let close_if_body = close || body_len > 0;
        out.clear();
        let Some(instance) = instance.and_then(|v| std::str::from_utf8(v).ok()) else {
            h1::simple_response(
                out,
                StatusCode::BAD_REQUEST,
                "text/plain",
                b"missing x-zeitwork-instance\n",
                None,
                close_if_body,
            );
            return NpStep::Answer {
                head_len,
                close: close_if_body,
            };
        };
        let Some(addr) = self.resolver.resolve(instance) else {
            connect_failed_page(out, "instance not on this node\n", close_if_body);
            return NpStep::Answer {
                head_len,
                close: close_if_body,
            };
        };
        h1::write_request_head(out, method, path, req.headers, &scan, &[INSTANCE_HEADER]);
        out.extend_from_slice(b"\r\n");
        NpStep::Forward {
            head_len,
            body_len,
            addr,
            close,
            head_request: method == "HEAD",
            idempotent: matches!(
                method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
        }
    }
}

/// Most bytes of a request head the node-proxy reads.
const MAX_HEAD: usize = 64 * 1024;

/// Time an instance has to answer with a response head (the edge has its
/// own, shorter or not, in front).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(300);

/// A 502 that tells the edge the instance was not reached (so it may try
/// another).
fn connect_failed_page(out: &mut Vec<u8>, msg: &str, close: bool) {
    use std::io::Write;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{UPSTREAM_STATUS_HEADER}: {UPSTREAM_CONNECT_FAILED}\r\n",
        msg.len()
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(msg.as_bytes());
}

/// Writes the node-proxy's own answer to a forwarded request; false when the
/// edge's connection must close.
async fn answer<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    status: StatusCode,
    msg: &str,
    connect_failed: bool,
    close: bool,
) -> bool {
    if connect_failed {
        connect_failed_page(out, msg, close);
    } else {
        out.clear();
        h1::simple_response(out, status, "text/plain", msg.as_bytes(), None, close);
    }
    stream.write_all(out).await.is_ok() && stream.flush().await.is_ok() && !close
}
