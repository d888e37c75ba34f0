//! Listeners: accept loops with a connection limit, HTTP/1.1 (with
//! upgrades) and HTTP/2 by ALPN, TLS termination, TLS passthrough, timeouts
//! and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::h1;
use crate::limit::{ConnPermit, PerIp};
use crate::park::{Parkable, ParkingLot};
use crate::passthrough::{Hello, Prefixed, open_tunnel, read_client_hello};
use crate::proxy::{ConnInfo, Proxy, ProxyBody};
use crate::routes::RouteKind;
use crate::tls::ACME_TLS_ALPN;

/// Bounds on what one client may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open client connections across all listeners; more are refused (HTTP:
    /// a `503` and close; TLS: closed before the handshake).
    pub max_connections: usize,
    /// Open connections of one client (an IPv4 address, an IPv6 /64); more
    /// are refused (HTTP: a `429` and close; TLS: closed before the
    /// handshake), so that one client cannot take them all. 0: no limit.
    pub max_connections_per_ip: usize,
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
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
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

/// Default of [`Limits::max_connections_per_ip`]: far above what browsers
/// open (6 per host) even for many users behind one NAT, far below what it
/// takes to exhaust [`Limits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1024;

/// Shared state of the listeners of one edge.
#[derive(Clone)]
pub struct Server {
    proxy: Arc<Proxy>,
    limits: Arc<Limits>,
    conns: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    refusals: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// HTTP/1.1 connections parked since the allocator was last trimmed.
    parked: Arc<AtomicUsize>,
    /// Times a connection served by hyper dropped hyper's state while idle.
    hyper_idle_drops: Arc<AtomicUsize>,
    /// Where idle plain connections wait (made on first use; `None` when
    /// the system refused an epoll set: connections then wait in their
    /// tasks).
    lot: Arc<OnceLock<Option<Arc<ParkingLot>>>>,
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

const CLIENT_LIMIT_RESPONSE: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: 43\r\nconnection: close\r\nretry-after: 1\r\n\r\ntoo many open connections from your address";

impl Server {
    /// Listeners for `proxy`; `shutdown` stops them.
    pub fn new(proxy: Arc<Proxy>, limits: Limits, shutdown: CancellationToken) -> Self {
        Self {
            conns: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: PerIp::new(limits.max_connections_per_ip),
            refusals: Arc::new(Semaphore::new(MAX_PENDING_REFUSALS)),
            limits: Arc::new(limits),
            proxy,
            shutdown,
            parked: Arc::default(),
            hyper_idle_drops: Arc::default(),
            lot: Arc::default(),
        }
    }

    /// How many times an idle connection served by hyper (handed over by
    /// [`crate::h1`], or HTTP/1.1 over TLS after a handoff) has dropped
    /// hyper's state to wait for its next request.
    pub fn hyper_idle_drops(&self) -> usize {
        self.hyper_idle_drops.load(Ordering::Relaxed)
    }

    /// Idle plain connections parked now.
    pub fn parked_connections(&self) -> usize {
        match self.lot.get() {
            Some(Some(lot)) => lot.len(),
            _ => 0,
        }
    }

    /// The parking lot, made (and its task started) on first use.
    fn lot(&self) -> Option<&Arc<ParkingLot>> {
        self.lot
            .get_or_init(|| match ParkingLot::new() {
                Ok(lot) => {
                    tokio::spawn(self.clone().run_lot(lot.clone()));
                    Some(lot)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "no epoll set for idle connections; they wait in their tasks");
                    None
                }
            })
            .as_ref()
    }

    /// Resumes parked connections as they become readable, closes those
    /// past their header deadline, and all of them on shutdown.
    async fn run_lot(self, lot: Arc<ParkingLot>) {
        let mut sweep = tokio::time::interval(ParkingLot::sweep_every());
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut woken = Vec::new();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    lot.close_all();
                    return;
                }
                _ = sweep.tick() => {
                    lot.sweep(self.limits.header_timeout);
                }
                res = lot.wake(&mut woken) => {
                    if let Err(err) = res {
                        tracing::error!(error = %err, "waiting on parked connections failed; closing them");
                        lot.close_all();
                        return;
                    }
                    for w in woken.drain(..) {
                        let this = self.clone();
                        tokio::spawn(async move {
                            this.serve_plain(w.stream, w.remote, w.permit, w.idle_since, true)
                                .await
                        });
                    }
                }
            }
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
        let mut trim = tokio::time::interval(TRIM_EVERY);
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (stream, remote) = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = trim.tick() => {
                    // Parked connections freed their HTTP buffers, but
                    // between the small allocations of other connections
                    // those pages stay resident until given back.
                    if self.parked.load(Ordering::Relaxed) >= TRIM_AFTER_PARKED {
                        self.parked.store(0, Ordering::Relaxed);
                        release_free_memory();
                    }
                    continue;
                }
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
            let is_tls = tls.is_some();
            let Ok(total) = self.conns.clone().try_acquire_owned() else {
                self.refuse(
                    stream,
                    remote,
                    is_tls,
                    OVERLOAD_RESPONSE,
                    "connection limit reached",
                );
                continue;
            };
            let Some(ip) = self.per_ip.acquire(remote.ip()) else {
                drop(total);
                self.refuse(
                    stream,
                    remote,
                    is_tls,
                    CLIENT_LIMIT_RESPONSE,
                    "client's connection limit reached",
                );
                continue;
            };
            let permit = ConnPermit {
                _total: total,
                _ip: ip,
            };
            let this = self.clone();
            let tls = tls.clone();
            // The TLS future (rustls and HTTP/2 state) is boxed so that a
            // plain connection's task is only as large as it needs to be.
            match tls {
                None => tokio::spawn(async move {
                    this.serve_plain(stream, remote, permit, tokio::time::Instant::now(), false)
                        .await
                }),
                Some(acceptor) => tokio::spawn(Box::pin(async move {
                    this.serve_tls(stream, remote, acceptor, permit).await
                })),
            };
        }
        drop(listener);
        self.drain().await;
    }

    /// Answers a refused client (a bounded number at once; beyond that,
    /// closes at once).
    fn refuse(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        tls: bool,
        answer: &'static [u8],
        why: &'static str,
    ) {
        if let Ok(refusal) = self.refusals.clone().try_acquire_owned() {
            tokio::spawn(async move {
                tracing::warn!(client = %remote.ip(), "{why}; refusing a connection");
                refuse(stream, tls, answer).await;
                drop(refusal);
            });
        }
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

    /// A plain HTTP/1.1 connection, new or woken from the parking lot
    /// (`readable`).
    async fn serve_plain(
        &self,
        mut stream: TcpStream,
        remote: SocketAddr,
        mut permit: ConnPermit,
        mut idle_since: tokio::time::Instant,
        mut readable: bool,
    ) {
        let info = ConnInfo { remote, tls: false };
        let mut park = true;
        loop {
            let ctx = h1::Ctx {
                proxy: &self.proxy,
                limits: &self.limits,
                shutdown: &self.shutdown,
                release_after: PARK_AFTER,
                park,
            };
            match h1::serve(&ctx, stream, info, idle_since, readable).await {
                h1::Exit::Closed => return,
                h1::Exit::Handoff(stream, prefix) => {
                    // Boxed: hyper's connection state is large and rarely
                    // needed.
                    Box::pin(self.serve_h1(stream, info, prefix)).await;
                    return;
                }
                h1::Exit::Park(s, since) => {
                    let Some(lot) = self.lot() else {
                        (stream, idle_since, park, readable) = (s, since, false, false);
                        continue;
                    };
                    match lot.park(s, remote, permit, since) {
                        Ok(()) => {
                            self.parked.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Err(w) => {
                            let w = *w;
                            (stream, permit, idle_since, park, readable) =
                                (w.stream, w.permit, w.idle_since, false, false);
                        }
                    }
                }
            }
        }
    }

    async fn serve_tls(
        &self,
        mut stream: TcpStream,
        remote: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        _permit: ConnPermit,
    ) {
        let info = ConnInfo { remote, tls: true };
        let deadline = self.limits.handshake_timeout;
        // No TLS state for a client that has sent nothing yet.
        let start = tokio::time::Instant::now();
        tokio::select! {
            res = tokio::time::timeout(deadline, stream.readable()) => match res {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            },
            _ = self.shutdown.cancelled() => return,
        }
        let deadline = deadline.saturating_sub(start.elapsed());
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
            self.terminate(stream, acceptor, info, deadline).await;
        } else {
            self.terminate(stream, acceptor, info, deadline).await;
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

    async fn terminate<S: Parkable>(
        &self,
        stream: S,
        acceptor: tokio_rustls::TlsAcceptor,
        info: ConnInfo,
        handshake_timeout: Duration,
    ) {
        let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
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
            _ => self.serve_http1(tls, info).await,
        }
    }

    /// HTTP/1.1 over TLS: the edge's own path ([`crate::h1`]) until a
    /// request it does not take, then hyper for the rest of the connection.
    /// (An idle TLS connection keeps its task: its TLS state cannot park.)
    async fn serve_http1<S: Parkable>(&self, stream: S, info: ConnInfo) {
        let ctx = h1::Ctx {
            proxy: &self.proxy,
            limits: &self.limits,
            shutdown: &self.shutdown,
            release_after: PARK_AFTER,
            park: false,
        };
        let now = tokio::time::Instant::now();
        if let h1::Exit::Handoff(stream, prefix) = h1::serve(&ctx, stream, info, now, false).await {
            // Boxed: hyper's connection state is large and rarely needed.
            Box::pin(self.serve_h1(stream, info, prefix)).await;
        }
    }

    /// HTTP/1.1 with keep-alive, holding no HTTP state while the client is
    /// idle: hyper serves the connection while requests come; once it has
    /// been idle (all responses written and flushed, nothing to read) for
    /// [`PARK_AFTER`], hyper's state (buffers, timers) is dropped and the
    /// bare stream waits for its next bytes. The time a client has to send a
    /// complete head, counted from the end of the previous response (or the
    /// accept), stays `header_timeout` across parking.
    ///
    /// A plain connection waits for its first bytes the same way; over TLS
    /// the handshake has already waited (and rustls may hold the request).
    async fn serve_h1<S: Parkable>(&self, mut stream: S, info: ConnInfo, mut prefix: Bytes) {
        let timeout = self.limits.header_timeout;
        // When the current wait for a request head started.
        let mut idle_since = tokio::time::Instant::now();
        let mut wait = !info.tls;
        loop {
            if wait && prefix.is_empty() {
                let readable = std::future::poll_fn(|cx| stream.poll_readable(cx));
                tokio::select! {
                    res = tokio::time::timeout_at(idle_since + timeout, readable) => match res {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) | Err(_) => return,
                    },
                    _ = self.shutdown.cancelled() => return,
                }
            }
            wait = true;
            // Boxed: a parked connection keeps none of the round's state.
            match Box::pin(self.h1_round(stream, prefix, info, &mut idle_since)).await {
                Some((s, p)) => {
                    stream = s;
                    prefix = p;
                    self.parked.fetch_add(1, Ordering::Relaxed);
                    self.hyper_idle_drops.fetch_add(1, Ordering::Relaxed);
                }
                None => return,
            }
        }
    }

    /// Serves requests with one hyper connection until the client has been
    /// idle for [`PARK_AFTER`] (then hands back the stream and any bytes
    /// read past the last request), or the connection ends (`None`).
    async fn h1_round<S: Parkable>(
        &self,
        stream: S,
        prefix: Bytes,
        info: ConnInfo,
        idle_since: &mut tokio::time::Instant,
    ) -> Option<(S, Bytes)> {
        let timeout = self.limits.header_timeout;
        let park_after = PARK_AFTER.min(timeout);
        let state = Arc::new(ConnState::default());
        let proxy = self.proxy.clone();
        let svc_state = state.clone();
        let svc = service_fn(move |req| {
            svc_state.started.fetch_add(1, Ordering::Relaxed);
            svc_state.in_flight.fetch_add(1, Ordering::Relaxed);
            let state = svc_state.clone();
            // Boxed once here rather than moved (kilobytes) through the
            // wrapper and into hyper.
            let fut = proxy.clone().handle(req, info);
            async move {
                let resp = fut.await?;
                Ok::<_, std::convert::Infallible>(resp.map(|body| CountedBody { body, state }))
            }
        });
        let io = ParkIo {
            prefix,
            inner: stream,
            state: state.clone(),
        };
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .max_buf_size(self.limits.max_header_bytes.max(8192))
            .keep_alive(true);
        // hyper's own limit is 100 headers, parsed into stack arrays left
        // uninitialised; an explicit limit costs a filled array per request.
        if self.limits.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            builder.max_headers(self.limits.max_headers);
        }
        let mut conn = Box::new(
            builder
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades(),
        );
        let mut sleep = std::pin::pin!(tokio::time::sleep_until(*idle_since + park_after));
        let mut seen = (0, 0); // (started, done) when the timer was last set
        let mut shutting_down = false;
        let res = std::future::poll_fn(|cx| {
            loop {
                if let Poll::Ready(res) = Pin::new(&mut *conn).poll(cx) {
                    return Poll::Ready(res);
                }
                if !shutting_down && self.shutdown.is_cancelled() {
                    shutting_down = true;
                    Pin::new(&mut *conn).graceful_shutdown();
                    continue;
                }
                if state.parking.load(Ordering::Relaxed) || shutting_down {
                    return Poll::Pending;
                }
                // A request came or a response ended: the wait for the
                // next head starts (again) when nothing is in flight.
                let now_seen = (
                    state.started.load(Ordering::Relaxed),
                    state.done.load(Ordering::Relaxed),
                );
                if now_seen != seen {
                    seen = now_seen;
                    if state.in_flight.load(Ordering::Relaxed) == 0 {
                        // The timer is moved only when it fires (not on
                        // every request).
                        *idle_since = tokio::time::Instant::now();
                    }
                }
                if state.in_flight.load(Ordering::Relaxed) > 0 {
                    return Poll::Pending;
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let now = tokio::time::Instant::now();
                if now < *idle_since + park_after {
                    sleep.as_mut().reset(*idle_since + park_after);
                    continue;
                }
                if now >= *idle_since + timeout {
                    // No complete head in time (hyper's header timeout).
                    return Poll::Ready(Ok(()));
                }
                if state.is_parkable() {
                    state.parking.store(true, Ordering::Relaxed);
                    Pin::new(&mut *conn).graceful_shutdown();
                    continue;
                }
                // Idle but not quiet (a head arriving slowly, a write
                // not flushed): look again at the header deadline.
                sleep.as_mut().reset(*idle_since + timeout);
            }
        })
        .await;
        if let Err(err) = res {
            tracing::debug!(client = %info.remote, error = %err, "client connection ended with an error");
            return None;
        }
        if !state.parking.load(Ordering::Relaxed) || shutting_down {
            return None;
        }
        // `None`: upgraded.
        let parts = (*conn).into_parts()?;
        let io = parts.io.into_inner();
        // Copied (rarely non-empty): even an empty `read_buf` would keep
        // hyper's whole read buffer alive.
        let prefix = if parts.read_buf.is_empty() && io.prefix.is_empty() {
            Bytes::new()
        } else {
            let mut b = bytes::BytesMut::with_capacity(parts.read_buf.len() + io.prefix.len());
            b.extend_from_slice(&parts.read_buf);
            b.extend_from_slice(&io.prefix);
            b.freeze()
        };
        Some((io.inner, prefix))
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

async fn refuse(mut stream: TcpStream, tls: bool, answer: &[u8]) {
    if !tls {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
        let _ = stream.shutdown().await;
    }
}

/// The number of request headers hyper allows when not told otherwise.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// How long an HTTP/1.1 connection is idle before its HTTP state is dropped.
const PARK_AFTER: Duration = Duration::from_millis(200);

/// How often the listeners consider giving freed memory back to the OS, and
/// how many parkings since the last time make it worth it.
const TRIM_EVERY: Duration = Duration::from_secs(1);
const TRIM_AFTER_PARKED: usize = 1024;

/// Returns free heap pages to the kernel (glibc keeps pages of freed chunks
/// that sit between live ones resident otherwise).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes no pointers; it only releases free memory.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

/// What the connection driver knows of hyper's progress on one hyper
/// connection (one round between parkings).
#[derive(Default)]
struct ConnState {
    /// Requests handed to the proxy.
    started: AtomicUsize,
    /// Responses whose body hyper has dropped.
    done: AtomicUsize,
    /// Requests whose response body hyper still holds.
    in_flight: AtomicUsize,
    /// The last read found nothing to read.
    read_pending: AtomicBool,
    /// Written since the last flush (hyper flushes the stream only once its
    /// own buffer is empty).
    dirty: AtomicBool,
    /// The driver asked hyper to stop at the idle point; the stream is
    /// kept open.
    parking: AtomicBool,
}

impl ConnState {
    /// hyper is between requests: it answered one (so it is in its idle
    /// keep-alive state, where a graceful shutdown closes at once without a
    /// `Connection: close`), has nothing unanswered or unflushed, and waits
    /// for bytes.
    fn is_parkable(&self) -> bool {
        self.done.load(Ordering::Relaxed) > 0
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.read_pending.load(Ordering::Relaxed)
            && !self.dirty.load(Ordering::Relaxed)
    }
}

/// A response body that tells the driver when hyper is done with it.
struct CountedBody {
    body: ProxyBody,
    state: Arc<ConnState>,
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.state.done.fetch_add(1, Ordering::Relaxed);
    }
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The client stream as hyper sees it: bytes left over from the previous
/// hyper connection first, then the stream; records what the driver needs
/// to know to park, and keeps the stream open when hyper stops for parking.
struct ParkIo<S> {
    prefix: Bytes,
    inner: S,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for ParkIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.state
            .read_pending
            .store(res.is_pending(), Ordering::Relaxed);
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ParkIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state.dirty.store(true, Ordering::Relaxed);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state.dirty.store(true, Ordering::Relaxed);
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_flush(cx);
        if res.is_ready() {
            this.state.dirty.store(false, Ordering::Relaxed);
        }
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
