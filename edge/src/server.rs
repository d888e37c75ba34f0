//! Listeners: accept loops with a connection limit, HTTP/1.1 (with
//! upgrades) and HTTP/2 by ALPN, TLS termination, TLS passthrough, timeouts
//! and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::passthrough::{Hello, Prefixed, open_tunnel, read_client_hello};
use crate::proxy::{ConnInfo, Proxy};
use crate::routes::RouteKind;
use crate::tls::ACME_TLS_ALPN;

/// Bounds on what one client may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open client connections across all listeners; more are refused (HTTP:
    /// a `503` and close; TLS: closed before the handshake).
    pub max_connections: usize,
    /// Time a client has to send a complete request head. Also bounds an
    /// idle keep-alive HTTP/1 connection (the timer runs while waiting for
    /// the next request).
    pub header_timeout: Duration,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Largest request head (request line + headers); larger gets `431`.
    pub max_header_bytes: usize,
    /// Most request headers; more gets `431`.
    pub max_headers: usize,
    /// HTTP/2: ping interval on an idle connection; a ping not answered
    /// within the same time closes it.
    pub h2_keepalive: Duration,
    /// HTTP/2: concurrent streams per connection.
    pub h2_max_streams: u32,
    /// Time in-flight requests get to finish on shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            header_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            h2_keepalive: Duration::from_secs(60),
            h2_max_streams: 256,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Shared state of the listeners of one edge.
#[derive(Clone)]
pub struct Server {
    proxy: Arc<Proxy>,
    limits: Arc<Limits>,
    conns: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Refused connections being answered at once; more are closed silently.
const MAX_PENDING_REFUSALS: usize = 1024;

const OVERLOAD_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 25\r\nconnection: close\r\nretry-after: 1\r\n\r\ntoo many open connections";

impl Server {
    /// Listeners for `proxy`; `shutdown` stops them.
    pub fn new(proxy: Arc<Proxy>, limits: Limits, shutdown: CancellationToken) -> Self {
        Self {
            conns: Arc::new(Semaphore::new(limits.max_connections)),
            refusals: Arc::new(Semaphore::new(MAX_PENDING_REFUSALS)),
            limits: Arc::new(limits),
            proxy,
            shutdown,
        }
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.limits.max_connections - self.conns.available_permits()
    }

    /// Serves plain HTTP/1.1 on `listener` until shutdown, then waits (up to
    /// the grace period) for open connections to finish.
    pub async fn serve_http(&self, listener: TcpListener) {
        self.accept_loop(listener, None).await
    }

    /// Serves TLS (HTTP/1.1 and HTTP/2 by ALPN, plus TLS passthrough routes).
    pub async fn serve_https(&self, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        self.accept_loop(listener, Some(tokio_rustls::TlsAcceptor::from(tls)))
            .await
    }

    async fn accept_loop(&self, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
        loop {
            let (stream, remote) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                res = listener.accept() => match res {
                    Ok(pair) => pair,
                    Err(err) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                // Answer a bounded number of refused clients with a 503;
                // beyond that, close at once.
                if let Ok(refusal) = self.refusals.clone().try_acquire_owned() {
                    let is_tls = tls.is_some();
                    tokio::spawn(async move {
                        refuse(stream, is_tls).await;
                        drop(refusal);
                    });
                }
                continue;
            };
            let this = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => this.serve_plain(stream, remote, permit).await,
                    Some(acceptor) => this.serve_tls(stream, remote, acceptor, permit).await,
                }
            });
        }
        drop(listener);
        self.drain().await;
    }

    async fn drain(&self) {
        let all = self.limits.max_connections as u32;
        let wait = self.conns.acquire_many(all);
        if tokio::time::timeout(self.limits.shutdown_grace, wait)
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.open_connections(),
                "shutdown grace period over; closing connections"
            );
        }
    }

    async fn serve_plain(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        _permit: OwnedSemaphorePermit,
    ) {
        let info = ConnInfo { remote, tls: false };
        self.serve_h1(stream, info).await;
    }

    async fn serve_tls(
        &self,
        mut stream: TcpStream,
        remote: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        _permit: OwnedSemaphorePermit,
    ) {
        let info = ConnInfo { remote, tls: true };
        let deadline = self.limits.handshake_timeout;
        if self.proxy.routes().load().has_passthrough() {
            let (buf, hello) =
                match tokio::time::timeout(deadline, read_client_hello(&mut stream)).await {
                    Ok(Ok(pair)) => pair,
                    Ok(Err(_)) | Err(_) => return,
                };
            if let Hello::Complete(Some(name)) = &hello {
                let router = self.proxy.routes().load();
                if let Some(entry) = router.lookup(name)
                    && entry.route.kind == RouteKind::Passthrough
                {
                    self.passthrough(stream, buf, entry.clone(), name, remote)
                        .await;
                    return;
                }
            }
            let stream = Prefixed::new(Bytes::from(buf), stream);
            self.terminate(stream, acceptor, info).await;
        } else {
            self.terminate(stream, acceptor, info).await;
        }
    }

    async fn passthrough(
        &self,
        mut stream: TcpStream,
        hello: Vec<u8>,
        entry: Arc<crate::table::RouteEntry>,
        name: &str,
        remote: SocketAddr,
    ) {
        let mut tried = Vec::new();
        for _ in 0..3 {
            let exclude: Vec<_> = tried.iter().collect();
            let Some(backend) = entry.pick(&exclude) else {
                break;
            };
            let guard = backend.start();
            match open_tunnel(self.proxy.connector(), &backend).await {
                Ok(mut upstream) => {
                    backend.mark_ok();
                    tracing::info!(target: "edge::access", client = %remote, host = name, backend = %backend.backend.instance_id, "tls passthrough");
                    if upstream.write_all(&hello).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
                    drop(guard);
                    return;
                }
                Err(err) => {
                    tracing::warn!(host = name, backend = %backend.backend.instance_id, error = %crate::proxy::error_chain(&err), "passthrough connect failed");
                    backend.mark_failed(Duration::from_secs(10));
                    drop(guard);
                    tried.push(backend);
                }
            }
        }
        tracing::warn!(host = name, "no passthrough backend reachable; closing");
    }

    async fn terminate<S>(&self, stream: S, acceptor: tokio_rustls::TlsAcceptor, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tls = match tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                tracing::debug!(client = %info.remote, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(client = %info.remote, "TLS handshake timed out");
                return;
            }
        };
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        match alpn.as_deref() {
            Some(b"h2") => self.serve_h2(tls, info).await,
            Some(ACME_TLS_ALPN) => {} // challenge answered by the handshake itself
            _ => self.serve_h1(tls, info).await,
        }
    }

    async fn serve_h1<S>(&self, stream: S, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.proxy.clone();
        let svc = service_fn(move |req| proxy.clone().handle(req, info));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout)
            .max_headers(self.limits.max_headers)
            .max_buf_size(self.limits.max_header_bytes.max(8192))
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        drive(conn, &self.shutdown, info).await
    }

    async fn serve_h2<S>(&self, stream: S, info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.proxy.clone();
        let svc = service_fn(move |req| proxy.clone().handle(req, info));
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.limits.h2_keepalive)
            .keep_alive_timeout(self.limits.h2_keepalive)
            .max_concurrent_streams(self.limits.h2_max_streams)
            .max_header_list_size(self.limits.max_header_bytes as u32)
            .serve_connection(TokioIo::new(stream), svc);
        drive(conn, &self.shutdown, info).await
    }
}

/// A hyper connection that can be asked to finish gracefully.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn start_graceful(self: Pin<&mut Self>);
}

impl<I, S> Graceful for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn start_graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, E> Graceful for http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn start_graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

async fn drive<C: Graceful>(conn: C, shutdown: &CancellationToken, info: ConnInfo) {
    let mut conn = std::pin::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        _ = shutdown.cancelled() => {
            conn.as_mut().start_graceful();
            conn.as_mut().await
        }
    };
    if let Err(err) = res {
        tracing::debug!(client = %info.remote, error = %err, "client connection ended with an error");
    }
}

async fn refuse(mut stream: TcpStream, tls: bool) {
    tracing::warn!("connection limit reached; refusing a connection");
    if !tls {
        let _ =
            tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVERLOAD_RESPONSE)).await;
        let _ = stream.shutdown().await;
    }
}
