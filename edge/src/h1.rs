//! The edge's own HTTP/1.1 path: client requests are parsed with `httparse`,
//! their heads rewritten straight into the bytes sent to the backend over a
//! pooled connection, and the backend's response relayed back, all within
//! the client connection's task. No hyper server or client, no `HeaderMap`,
//! no per-request task or channel: this is what puts the edge ahead of
//! nginx (see `scripts/bench-edge.sh`).
//!
//! It takes the requests proxies see nearly always: HTTP/1.1, origin-form,
//! no body or a `Content-Length` body of at most
//! [`MAX_BUFFERED_BODY`](crate::framing::MAX_BUFFERED_BODY). Any
//! other request (an upgrade, `Expect`, a chunked or large body, HTTP/1.0,
//! an absolute URI, ...) hands the connection, with every byte read so far,
//! to the hyper path in [`crate::server`] for the rest of its life, so both
//! paths behave the same where they overlap: the same routing, forwarded
//! headers, retries, passive health, error pages and access log.
//!
//! Responses are relayed as they come: `Content-Length` bodies by count,
//! chunked bodies as they are (the chunk framing is only scanned for its
//! end), bodies delimited by the backend closing with the client connection
//! closed after them.
//!
//! This is the connection loop (reads, writes, timeouts, pools, retries,
//! parking); what the bytes mean is decided by the pure framing code in
//! [`crate::framing`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::framing::{
    self, BodyKind, ChunkScan, Parsed, RequestHead, Response, parse_response, push_header,
    simple_response, write_request_head,
};
use crate::park::Parkable;
use crate::proxy::{ConnInfo, Proxy, REQUEST_ID_HEADER, error_body, host_from_header};
use crate::routes::{INSTANCE_HEADER, RouteKind, Transport};
use crate::server::Limits;
use crate::table::{BackendState, RouteEntry};
use crate::upstream::UpstreamStream;

/// Largest response head accepted from a backend.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Initial size of the buffers (client bytes, backend bytes).
pub(crate) const BUF_SIZE: usize = 8 * 1024;

/// How much of a response body is read from the backend at a time.
const RELAY_CHUNK: usize = 16 * 1024;

/// Headers the edge sets itself on the request to the backend.
const SET_BY_EDGE: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    REQUEST_ID_HEADER,
    INSTANCE_HEADER,
];

/// How a connection served here ends.
pub enum Exit<S> {
    /// Closed (by either side, a timeout, an error or shutdown).
    Closed,
    /// A request this path does not take: the stream and every byte read
    /// from it that is not answered yet, for the hyper path.
    Handoff(S, bytes::Bytes),
    /// Idle for [`Ctx::release_after`] (only when [`Ctx::park`]): the
    /// stream, holding no request bytes, and when its wait for a request
    /// began.
    Park(S, Instant),
}

/// What one connection needs from the server.
pub struct Ctx<'a> {
    pub proxy: &'a Proxy,
    pub limits: &'a Limits,
    pub shutdown: &'a CancellationToken,
    /// After this long without a request, the connection's buffers are
    /// given back (and it is parked, when it may be).
    pub release_after: Duration,
    /// Whether an idle connection that can park ([`Parkable::PARKS`]) ends
    /// with [`Exit::Park`] instead of waiting in its task.
    pub park: bool,
}

/// What the wait for a request found.
enum Wait {
    Ready,
    Closed,
    Park,
}

/// The fields of the access log line, kept only when it is written.
struct LogLine {
    method: String,
    path: String,
    host: String,
    start: std::time::Instant,
}

/// A request ready to go to a backend.
struct Forward {
    head_len: usize,
    body_len: usize,
    entry: Arc<RouteEntry>,
    retryable: bool,
    head_request: bool,
    /// The client asked to close after this exchange.
    close: bool,
    /// Length of the upstream head in `out` before the per-backend lines.
    base_len: usize,
}

enum Step {
    /// The head is not complete yet.
    More,
    /// Not for this path.
    Handoff,
    /// The edge answers itself; the answer is in `out`.
    Answer {
        head_len: usize,
        close: bool,
        status: StatusCode,
    },
    Forward(Forward),
}

/// Why an exchange with a backend failed.
pub(crate) enum Failure {
    /// The backend was not reached or said it could not reach the instance;
    /// the request did not reach the app.
    Connect(String),
    /// A reused connection was closed before any byte of a response: the
    /// request may be sent again on a new connection.
    Stale,
    /// No response head in time.
    Timeout,
    /// Anything else before the response head: the request may have
    /// reached the app.
    Exchange(String),
}

/// Per-connection state.
struct Conn<'a, S> {
    ctx: &'a Ctx<'a>,
    info: ConnInfo,
    stream: S,
    /// Bytes from the client not consumed yet.
    buf: Vec<u8>,
    /// Bytes to write (to the backend, then to the client).
    out: Vec<u8>,
    /// Bytes from the backend.
    rbuf: Vec<u8>,
    /// The request being served, for the access log (when it is written).
    log: Option<LogLine>,
}

/// Serves `stream` until it closes, hands off to hyper or parks. The
/// connection holds no buffer until its client sends something;
/// `idle_since` is when its wait for a request head began; `readable` says
/// the client has sent something (or closed) already: read at once.
pub async fn serve<S: Parkable>(
    ctx: &Ctx<'_>,
    stream: S,
    info: ConnInfo,
    idle_since: Instant,
    readable: bool,
) -> Exit<S> {
    let conn = Conn {
        ctx,
        info,
        stream,
        buf: Vec::new(),
        out: Vec::new(),
        rbuf: Vec::new(),
        log: None,
    };
    conn.run(idle_since, readable).await
}

impl<'a, S: Parkable> Conn<'a, S> {
    async fn run(mut self, mut idle_since: Instant, mut readable: bool) -> Exit<S> {
        let limits = self.ctx.limits;
        loop {
            // (A woken connection is read at once: the runtime has not seen
            // its readiness yet, and waiting for it could park it again.)
            if self.buf.is_empty() && !std::mem::take(&mut readable) {
                match self.wait_for_request(idle_since).await {
                    Wait::Ready => {}
                    Wait::Closed => return Exit::Closed,
                    Wait::Park => return Exit::Park(self.stream, idle_since),
                }
            }
            let deadline = idle_since + limits.header_timeout;
            let request_id = self.ctx.proxy.request_id();
            let step = loop {
                match self.prepare(&request_id) {
                    Step::More => {}
                    step => break step,
                }
                if self.buf.len() >= limits.max_header_bytes {
                    let _ = self
                        .answer_now(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, &request_id)
                        .await;
                    return Exit::Closed;
                }
                match tokio::time::timeout_at(deadline, self.read_client()).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(Ok(_)) | Ok(Err(_)) => return Exit::Closed,
                    Err(_) => {
                        if !self.buf.is_empty() {
                            let _ = self
                                .answer_now(StatusCode::REQUEST_TIMEOUT, &request_id)
                                .await;
                        }
                        return Exit::Closed;
                    }
                }
            };
            let keep = match step {
                Step::More => unreachable!("looped above"),
                Step::Handoff => {
                    return Exit::Handoff(self.stream, bytes::Bytes::from(self.buf));
                }
                Step::Answer {
                    head_len,
                    close,
                    status,
                } => {
                    self.buf.drain(..head_len);
                    self.log_edge_answer(status, &request_id);
                    if self.write_client().await.is_err() || close {
                        return Exit::Closed;
                    }
                    true
                }
                Step::Forward(fwd) => {
                    // The body, whole (its size is known and bounded).
                    let need = fwd.head_len + fwd.body_len;
                    while self.buf.len() < need {
                        match tokio::time::timeout_at(deadline, self.read_client()).await {
                            Ok(Ok(n)) if n > 0 => {}
                            _ => return Exit::Closed,
                        }
                    }
                    let keep = self.forward(&fwd, &request_id).await;
                    self.buf.drain(..need);
                    keep && !fwd.close
                }
            };
            if !keep || self.ctx.shutdown.is_cancelled() {
                let _ = self.stream.shutdown().await;
                return Exit::Closed;
            }
            idle_since = Instant::now();
        }
    }

    /// Waits for the client's next bytes; once it has been quiet for a
    /// while, buffers are given back (or the connection parks).
    async fn wait_for_request(&mut self, idle_since: Instant) -> Wait {
        let deadline = idle_since + self.ctx.limits.header_timeout;
        let release_at = (idle_since + self.ctx.release_after).min(deadline);
        let shutdown = self.ctx.shutdown;
        let stream = &mut self.stream;
        let readable = std::future::poll_fn(|cx| stream.poll_readable(cx));
        let first = tokio::select! {
            res = tokio::time::timeout_at(release_at, readable) => res,
            _ = shutdown.cancelled() => return Wait::Closed,
        };
        match first {
            Ok(Ok(())) => return Wait::Ready,
            Ok(Err(_)) => return Wait::Closed,
            Err(_) => {}
        }
        self.buf = Vec::new();
        self.out = Vec::new();
        self.rbuf = Vec::new();
        if self.ctx.park && S::PARKS && Instant::now() < deadline {
            return Wait::Park;
        }
        let stream = &mut self.stream;
        let readable = std::future::poll_fn(|cx| stream.poll_readable(cx));
        tokio::select! {
            res = tokio::time::timeout_at(deadline, readable) => match res {
                Ok(Ok(())) => Wait::Ready,
                _ => Wait::Closed,
            },
            _ = shutdown.cancelled() => Wait::Closed,
        }
    }

    async fn read_client(&mut self) -> std::io::Result<usize> {
        reserve(&mut self.buf, BUF_SIZE);
        self.stream.read_buf(&mut self.buf).await
    }

    async fn write_client(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await
    }

    /// Writes one of the edge's own pages now (limits, timeouts) and closes.
    async fn answer_now(
        &mut self,
        status: StatusCode,
        request_id: &HeaderValue,
    ) -> std::io::Result<()> {
        // No page: hyper's answers to these have no body either.
        self.out.clear();
        simple_response(
            &mut self.out,
            status,
            "text/plain",
            b"",
            Some(request_id),
            true,
        );
        self.log_edge_answer(status, request_id);
        self.write_client().await?;
        self.stream.shutdown().await
    }

    fn log_edge_answer(&self, status: StatusCode, request_id: &HeaderValue) {
        if self.ctx.proxy.config().access_log {
            tracing::info!(
                target: "edge::access",
                request_id = request_id.to_str().unwrap_or(""),
                client = %self.info.remote,
                tls = self.info.tls,
                status = status.as_u16(),
                backend = "-",
                "edge answered"
            );
        }
    }

    /// Parses the head in `buf` and decides; for a forwarded request, the
    /// head for the backend is in `out` (without its last lines).
    fn prepare(&mut self, request_id: &HeaderValue) -> Step {
        let limits = self.ctx.limits;
        let mut storage = [httparse::EMPTY_HEADER; 128];
        let headers = &mut storage[..limits.max_headers.min(128)];
        let too_large = |head_len: usize| head_len > limits.max_header_bytes;
        let req = match framing::parse_request(&self.buf, headers, "host") {
            RequestHead::Partial => return Step::More,
            RequestHead::TooManyHeaders => {
                return answer_step(
                    &mut self.out,
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "",
                    request_id,
                    self.buf.len(),
                    true,
                );
            }
            RequestHead::Invalid => {
                return answer_step(
                    &mut self.out,
                    StatusCode::BAD_REQUEST,
                    "",
                    request_id,
                    self.buf.len(),
                    true,
                );
            }
            RequestHead::Handoff { head_len }
            | RequestHead::Ready(framing::Request { head_len, .. })
                if too_large(head_len) =>
            {
                return answer_step(
                    &mut self.out,
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "",
                    request_id,
                    self.buf.len(),
                    true,
                );
            }
            RequestHead::Handoff { .. } => return Step::Handoff,
            RequestHead::Ready(req) => req,
        };
        let (method, path, head_len, scan) = (req.method, req.path, req.head_len, &req.scan);
        let (host, body_len, close) = (scan.key, scan.body_len, scan.close);
        // Anything the edge answers itself closes the connection when a
        // body would follow (it is not read).
        let close_if_body = close || body_len > 0;

        let host_name = host.and_then(host_from_header);
        let proxy = self.ctx.proxy;
        let log = proxy.config().access_log;
        let Some(host_name) = host_name else {
            return answer_step(
                &mut self.out,
                StatusCode::BAD_REQUEST,
                "The request has no Host.",
                request_id,
                head_len,
                close_if_body,
            );
        };
        if !self.info.tls
            && let Some(token) = path.strip_prefix(crate::acme::HTTP01_PREFIX)
            && let Some(key_auth) = proxy.http01().get(token)
        {
            self.out.clear();
            simple_response(
                &mut self.out,
                StatusCode::OK,
                "application/octet-stream",
                key_auth.as_bytes(),
                None,
                close_if_body,
            );
            return Step::Answer {
                head_len,
                close: close_if_body,
                status: StatusCode::OK,
            };
        }
        let router = proxy.routes().load();
        let Some(entry) = router.lookup(&host_name) else {
            let msg = format!("No app is served at {host_name}.");
            return answer_step(
                &mut self.out,
                StatusCode::NOT_FOUND,
                &msg,
                request_id,
                head_len,
                close_if_body,
            );
        };
        if entry.route.kind == RouteKind::Passthrough {
            let msg = format!("{host_name} is served by TLS passthrough only.");
            return answer_step(
                &mut self.out,
                StatusCode::MISDIRECTED_REQUEST,
                &msg,
                request_id,
                head_len,
                close_if_body,
            );
        }

        // The head for the backend.
        let out = &mut self.out;
        out.clear();
        write_request_head(out, method, path, req.headers, scan, &SET_BY_EDGE);
        if let Some(h) = host {
            push_header(out, b"x-forwarded-host", h);
        }
        push_header(out, b"x-forwarded-for", ip_text(&self.info).as_bytes());
        push_header(
            out,
            b"x-forwarded-proto",
            if self.info.tls { b"https" } else { b"http" },
        );
        push_header(out, REQUEST_ID_HEADER.as_bytes(), request_id.as_bytes());
        let base_len = out.len();
        if log {
            self.log = Some(LogLine {
                method: method.to_owned(),
                path: path.split('?').next().unwrap_or(path).to_owned(),
                host: host_name.into_owned(),
                start: std::time::Instant::now(),
            });
        }
        let idempotent = req.idempotent();
        Step::Forward(Forward {
            head_len,
            body_len,
            entry: entry.clone(),
            retryable: idempotent && body_len == 0,
            head_request: method == "HEAD",
            close,
            base_len,
        })
    }
}

impl<'a, S: Parkable> Conn<'a, S> {
    /// Sends the request to the route's backends (another one after a
    /// failed connect, for idempotent requests) and relays the answer.
    /// False when the client connection must close.
    async fn forward(&mut self, fwd: &Forward, request_id: &HeaderValue) -> bool {
        let cfg = self.ctx.proxy.config();
        let max_attempts = 1 + if fwd.retryable { cfg.retries } else { 0 };
        let mut tried: Vec<Arc<BackendState>> = Vec::new();
        let mut last_err = None;
        for _ in 0..max_attempts {
            let exclude: Vec<&Arc<BackendState>> = tried.iter().collect();
            let Some(backend) = fwd.entry.pick(&exclude) else {
                break;
            };
            let guard = backend.start();
            match self.exchange(fwd, &backend, request_id).await {
                Ok((resp, upstream)) => {
                    backend.mark_ok();
                    let keep = self.relay(resp, upstream, &backend, request_id).await;
                    drop(guard);
                    return keep;
                }
                Err(Failure::Connect(err)) => {
                    tracing::warn!(
                        request_id = request_id.to_str().unwrap_or(""),
                        backend = %backend_label(&backend),
                        error = %err,
                        "backend connect failed; marking it down"
                    );
                    backend.mark_failed(cfg.fail_timeout);
                    last_err = Some(err);
                    drop(guard);
                    tried.push(backend);
                }
                Err(failure) => {
                    let (status, msg, err) = match failure {
                        Failure::Timeout => (
                            StatusCode::GATEWAY_TIMEOUT,
                            "The app did not answer in time.",
                            format!("no response within {:?}", cfg.response_timeout),
                        ),
                        Failure::Exchange(err) => (
                            StatusCode::BAD_GATEWAY,
                            "The app could not be reached.",
                            err,
                        ),
                        Failure::Stale | Failure::Connect(_) => (
                            StatusCode::BAD_GATEWAY,
                            "The app could not be reached.",
                            "the backend closed the connection without answering".to_owned(),
                        ),
                    };
                    tracing::warn!(
                        request_id = request_id.to_str().unwrap_or(""),
                        backend = %backend_label(&backend),
                        error = %err,
                        "backend request failed"
                    );
                    return self
                        .answer(status, msg, request_id, Some(&backend), fwd.close)
                        .await;
                }
            }
        }
        if tried.is_empty() {
            let msg = format!("No instance of {} is available.", fwd.entry.route.app);
            return self
                .answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &msg,
                    request_id,
                    None,
                    fwd.close,
                )
                .await;
        }
        tracing::warn!(
            request_id = request_id.to_str().unwrap_or(""),
            error = last_err.as_deref().unwrap_or("no backend"),
            "all attempts failed"
        );
        self.answer(
            StatusCode::BAD_GATEWAY,
            "The app could not be reached.",
            request_id,
            None,
            fwd.close,
        )
        .await
    }

    /// Answers a forwarded request with one of the edge's pages.
    async fn answer(
        &mut self,
        status: StatusCode,
        msg: &str,
        request_id: &HeaderValue,
        backend: Option<&BackendState>,
        close: bool,
    ) -> bool {
        self.out.clear();
        page(&mut self.out, status, msg, request_id, close);
        self.log_forwarded(status, backend, request_id);
        self.write_client().await.is_ok() && !close
    }

    /// One attempt on one backend: the request sent, the response head
    /// read (and any informational responses passed on).
    async fn exchange(
        &mut self,
        fwd: &Forward,
        backend: &BackendState,
        request_id: &HeaderValue,
    ) -> Result<(Response, UpstreamStream), Failure> {
        let Some((key, host, port)) = backend.address() else {
            return Err(Failure::Exchange(format!(
                "invalid backend address {}",
                backend.backend.node_proxy
            )));
        };
        let tls = backend.transport() == Transport::Mtls;
        self.out.truncate(fwd.base_len);
        if tls {
            push_header(
                &mut self.out,
                INSTANCE_HEADER.as_bytes(),
                backend.instance_header.as_bytes(),
            );
        }
        self.out.extend_from_slice(b"\r\n");
        self.out
            .extend_from_slice(&self.buf[fwd.head_len..fwd.head_len + fwd.body_len]);

        let proxy = self.ctx.proxy;
        let deadline = Instant::now() + proxy.config().response_timeout;
        let pooled = proxy.raw_pool().take(tls, key, !fwd.retryable);
        let mut reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            None => connect(proxy, host, port, tls).await?,
        };
        loop {
            let attempt =
                tokio::time::timeout_at(deadline, self.send_head(&mut conn, fwd, request_id)).await;
            match attempt {
                Err(_) => return Err(Failure::Timeout),
                Ok(Ok(resp)) => return Ok((resp, conn)),
                // A reused connection the backend had closed: the request
                // never reached the app when nothing came back, but only an
                // idempotent request may be sent twice if it did.
                Ok(Err(Failure::Stale)) if reused && fwd.retryable => {
                    reused = false;
                    conn = connect(proxy, host, port, tls).await?;
                }
                Ok(Err(Failure::Stale)) => {
                    return Err(Failure::Exchange(
                        "the backend closed the connection without answering".into(),
                    ));
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    async fn send_head(
        &mut self,
        conn: &mut UpstreamStream,
        fwd: &Forward,
        request_id: &HeaderValue,
    ) -> Result<Response, Failure> {
        send_and_read_head(
            &mut self.stream,
            conn,
            &mut self.out,
            &mut self.rbuf,
            fwd.head_request,
            fwd.close,
            Some(request_id),
        )
        .await
    }

    /// Writes the response head (already in `out`) and relays the body.
    /// False when the client connection must close.
    async fn relay(
        &mut self,
        resp: Response,
        mut conn: UpstreamStream,
        backend: &BackendState,
        request_id: &HeaderValue,
    ) -> bool {
        let status = resp.status;
        let relayed = relay_body(
            &mut self.stream,
            &mut conn,
            &mut self.out,
            &mut self.rbuf,
            &resp,
        )
        .await;
        let (complete, reusable) = match relayed {
            Ok(extra) => (true, resp.reusable && !extra),
            Err(()) => (false, false),
        };
        if complete
            && reusable
            && let Some((key, _, _)) = backend.address()
        {
            self.ctx
                .proxy
                .raw_pool()
                .put(backend.transport() == Transport::Mtls, key, conn);
        }
        self.log_forwarded(status, Some(backend), request_id);
        complete && !resp.close_client
    }

    fn log_forwarded(
        &mut self,
        status: StatusCode,
        backend: Option<&BackendState>,
        request_id: &HeaderValue,
    ) {
        let Some(line) = self.log.take() else {
            return;
        };
        tracing::info!(
            target: "edge::access",
            request_id = request_id.to_str().unwrap_or(""),
            client = %self.info.remote,
            tls = self.info.tls,
            version = "HTTP/1.1",
            method = line.method,
            host = line.host,
            path = line.path,
            status = status.as_u16(),
            backend = %backend.map_or(Cow::Borrowed("-"), |b| Cow::Owned(backend_label(b))),
            ms = line.start.elapsed().as_secs_f64() * 1000.0,
        );
    }
}

/// Writes `out` (a request) to the backend `conn` and reads the response
/// head into `rbuf`, passing 1xx answers to `client` as they come; the head
/// for the client is then in `out` (see [`parse_response`]).
pub(crate) async fn send_and_read_head<C, U>(
    client: &mut C,
    conn: &mut U,
    out: &mut Vec<u8>,
    rbuf: &mut Vec<u8>,
    head_request: bool,
    client_close: bool,
    request_id: Option<&HeaderValue>,
) -> Result<Response, Failure>
where
    C: AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if conn.write_all(out).await.is_err() || conn.flush().await.is_err() {
        return Err(Failure::Stale);
    }
    rbuf.clear();
    loop {
        reserve(rbuf, BUF_SIZE);
        match conn.read_buf(rbuf).await {
            Ok(0) | Err(_) if rbuf.is_empty() => return Err(Failure::Stale),
            Ok(0) => {
                return Err(Failure::Exchange(
                    "the backend closed the connection in the response head".into(),
                ));
            }
            Err(e) => return Err(Failure::Exchange(format!("reading the response: {e}"))),
            Ok(_) => {}
        }
        loop {
            match parse_response(rbuf, out, head_request, client_close, request_id) {
                Err(e) => return Err(Failure::Exchange(crate::proxy::error_chain(&e))),
                Ok(Parsed::More) => {
                    if rbuf.len() > MAX_RESPONSE_HEAD {
                        return Err(Failure::Exchange("the response head is too large".into()));
                    }
                    break;
                }
                Ok(Parsed::ConnectFailed) => {
                    return Err(Failure::Connect(
                        "node-proxy could not connect to the instance".into(),
                    ));
                }
                Ok(Parsed::Informational(n)) => {
                    // 1xx (e.g. 103 Early Hints) pass through as they are.
                    if client.write_all(&rbuf[..n]).await.is_err() {
                        return Err(Failure::Exchange("the client went away".into()));
                    }
                    rbuf.drain(..n);
                    if rbuf.is_empty() {
                        break;
                    }
                }
                Ok(Parsed::Response(resp)) => return Ok(resp),
            }
        }
    }
}

/// Writes the response head (in `out`) to `client` and relays the body from
/// `conn` (its first bytes are in `rbuf` after the head). `Ok(true)` when
/// the backend sent bytes past the body's end (its connection is then not
/// reused); `Err` when either side failed (the client connection must then
/// close: its response is cut short).
pub(crate) async fn relay_body<C, U>(
    client: &mut C,
    conn: &mut U,
    out: &mut Vec<u8>,
    rbuf: &mut Vec<u8>,
    resp: &Response,
) -> Result<bool, ()>
where
    C: AsyncWrite + Unpin,
    U: AsyncRead + Unpin,
{
    let start = resp.head_len;
    let avail = rbuf.len() - start;
    match resp.body {
        BodyKind::None => {
            write_flush(client, out).await?;
            Ok(avail > 0)
        }
        BodyKind::Length(n) => {
            let first = (avail as u64).min(n) as usize;
            out.extend_from_slice(&rbuf[start..start + first]);
            write_flush(client, out).await?;
            let mut extra = avail > first;
            let mut left = n - first as u64;
            while left > 0 {
                let k = read_body(conn, rbuf).await?;
                let take = (k as u64).min(left) as usize;
                extra |= k > take;
                client.write_all(&rbuf[..take]).await.map_err(|_| ())?;
                left -= take as u64;
            }
            client.flush().await.map_err(|_| ())?;
            Ok(extra)
        }
        BodyKind::Chunked => {
            let mut scan = ChunkScan::default();
            let end = scan.feed(&rbuf[start..]).map_err(|_| ())?;
            let first = end.unwrap_or(avail);
            out.extend_from_slice(&rbuf[start..start + first]);
            write_flush(client, out).await?;
            if let Some(end) = end {
                return Ok(avail > end);
            }
            loop {
                let k = read_body(conn, rbuf).await?;
                let end = scan.feed(&rbuf[..k]).map_err(|_| ())?;
                let take = end.unwrap_or(k);
                client.write_all(&rbuf[..take]).await.map_err(|_| ())?;
                if end.is_some() {
                    client.flush().await.map_err(|_| ())?;
                    return Ok(k > take);
                }
            }
        }
        BodyKind::UntilClose => {
            out.extend_from_slice(&rbuf[start..]);
            write_flush(client, out).await?;
            loop {
                rbuf.clear();
                reserve(rbuf, RELAY_CHUNK);
                match conn.read_buf(rbuf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => return Err(()),
                }
                client.write_all(rbuf).await.map_err(|_| ())?;
            }
            client.flush().await.map_err(|_| ())?;
            Ok(false)
        }
    }
}

async fn write_flush<C: AsyncWrite + Unpin>(client: &mut C, bytes: &[u8]) -> Result<(), ()> {
    client.write_all(bytes).await.map_err(|_| ())?;
    client.flush().await.map_err(|_| ())
}

/// Reads the next bytes of a body from the backend into `rbuf` (which it
/// clears); a close is an error here (the body is not complete).
async fn read_body<U: AsyncRead + Unpin>(conn: &mut U, rbuf: &mut Vec<u8>) -> Result<usize, ()> {
    rbuf.clear();
    reserve(rbuf, RELAY_CHUNK);
    match conn.read_buf(rbuf).await {
        Ok(0) | Err(_) => Err(()),
        Ok(n) => Ok(n),
    }
}

fn backend_label(b: &BackendState) -> String {
    format!("{}@{}", b.backend.instance_id, b.backend.node_proxy)
}

async fn connect(
    proxy: &Proxy,
    host: &str,
    port: u16,
    tls: bool,
) -> Result<UpstreamStream, Failure> {
    // Boxed: the connect (and mTLS handshake) future is large and rarely
    // needed; inline it would make every connection's future larger.
    Box::pin(proxy.connector().connect(host, port, tls))
        .await
        .map_err(|e| Failure::Connect(crate::proxy::error_chain(&e)))
}

/// Makes room for at least `min` more bytes.
pub(crate) fn reserve(buf: &mut Vec<u8>, min: usize) {
    if buf.capacity() - buf.len() < min / 4 {
        buf.reserve(min);
    }
}

/// The client's address as text, for `X-Forwarded-For`.
fn ip_text(info: &ConnInfo) -> IpText {
    let mut t = IpText {
        buf: [0; 48],
        len: 0,
    };
    let _ = std::io::Write::write_fmt(&mut t, format_args!("{}", info.remote.ip()));
    t
}

struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::io::Write for IpText {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// [`Step::Answer`] with one of the edge's pages in `out`.
fn answer_step(
    out: &mut Vec<u8>,
    status: StatusCode,
    detail: &str,
    request_id: &HeaderValue,
    head_len: usize,
    close: bool,
) -> Step {
    out.clear();
    page(out, status, detail, request_id, close);
    Step::Answer {
        head_len,
        close,
        status,
    }
}

/// An edge page: the HTML of [`crate::proxy::error_page`], as bytes.
fn page(
    out: &mut Vec<u8>,
    status: StatusCode,
    detail: &str,
    request_id: &HeaderValue,
    close: bool,
) {
    let body = error_body(status, detail);
    simple_response(
        out,
        status,
        "text/html; charset=utf-8",
        body.as_bytes(),
        Some(request_id),
        close,
    );
}
