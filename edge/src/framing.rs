//! HTTP/1.1 framing, pure and synchronous: no I/O, no runtime. The edge's
//! own HTTP/1.1 path ([`crate::h1`]) and the node-proxy
//! ([`crate::node_proxy`]) read and write bytes; this module decides what
//! those bytes are (as pingora's `protocols/http/v1` does for
//! `proxy_h1`):
//!
//! - [`parse_request`] and [`scan_request`]: a request head, and whether the
//!   own path takes it (origin-form HTTP/1.1 without a body or with a small
//!   `Content-Length` one) or hands it to hyper;
//! - [`write_request_head`]: the head for the backend, hop-by-hop headers
//!   dropped;
//! - [`parse_response`]: a backend's response head, how its body is
//!   delimited, whether either connection can be reused, and the head for
//!   the client;
//! - [`ChunkScan`]: where a chunked body ends;
//! - [`simple_response`]: the proxy's own answers.
//!
//! It is also the fuzz target of the edge (`fuzz/`): everything a client or
//! a backend can send reaches these functions first.

use http::{HeaderValue, StatusCode};

use crate::proxy::{REQUEST_ID_HEADER, UPSTREAM_CONNECT_FAILED, UPSTREAM_STATUS_HEADER};

/// Largest request body the own path takes (read whole before the request
/// is sent, so it can be sent again to another backend); larger ones go to
/// hyper, which streams them.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;

/// Headers that describe one hop and are never forwarded as they are (RFC
/// 9110 7.6.1). `upgrade` is one of them, but travels (with `connection:
/// upgrade`) on a request that asks for an upgrade and on its 101 answer:
/// [`crate::forward::strip_hop_by_hop`] keeps it then. The hyper path's
/// list of `HeaderName`s is made from this one.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers that a `Connection` option never removes: they frame the
/// message (the proxy relays the body by them, and must tell the next hop
/// the same) or route it. Dropping `Content-Length` from a request because
/// the client named it in `Connection` would let the body reach the app as
/// a second request (smuggling); dropping it or `Transfer-Encoding` from a
/// response would leave the client framing the body differently from the
/// edge.
pub const MESSAGE_HEADERS: [&str; 3] = ["content-length", "transfer-encoding", "host"];

/// Whether `name` is one of [`MESSAGE_HEADERS`] (any case).
pub fn is_message_header(name: &str) -> bool {
    MESSAGE_HEADERS.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Whether a `Connection` header among `headers` lists `name` as an option
/// (hop-by-hop: not forwarded). [`MESSAGE_HEADERS`] never are.
fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    !is_message_header(name)
        && headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// Whether `name` is one of [`HOP_BY_HOP`] (any case).
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Why a backend's response head is refused.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error("invalid response head from the backend")]
    Head(#[source] httparse::Error),
    #[error("the backend switched protocols unasked")]
    Unasked101,
    #[error("invalid status {0} from the backend")]
    Status(u16),
    #[error("invalid content-length from the backend")]
    ContentLength,
    #[error("conflicting content-length from the backend")]
    ConflictingLength,
}

/// A chunked body that breaks RFC 9112 7.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct ChunkError;

/// What a request head at the start of a buffer is, for the own path.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per request, on the stack
pub enum RequestHead<'h, 'b> {
    /// Not complete yet.
    Partial,
    /// More headers than the storage given holds.
    TooManyHeaders,
    /// Not a valid HTTP/1.x request head.
    Invalid,
    /// A valid head the own path does not take (HTTP/1.0, a request target
    /// that is not origin-form, a body of unknown or large size, an
    /// upgrade, `Expect`, two `key` headers, ...): hyper serves it.
    Handoff {
        /// Length of the head.
        head_len: usize,
    },
    /// A request the own path takes.
    Ready(Request<'h, 'b>),
}

/// A request head the own path takes.
#[derive(Debug)]
pub struct Request<'h, 'b> {
    /// Length of the head; the body (`scan.body_len` bytes) follows.
    pub head_len: usize,
    pub method: &'b str,
    /// The request target, origin-form (starts with `/`).
    pub path: &'b str,
    pub headers: &'h [httparse::Header<'b>],
    pub scan: RequestScan<'b>,
}

impl Request<'_, '_> {
    /// Whether the method is idempotent (RFC 9110 9.2.2): such a request
    /// without a body may be sent again to another backend.
    pub fn idempotent(&self) -> bool {
        matches!(
            self.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }
}

/// Parses the request head at the start of `buf` with at most
/// `storage.len()` headers; `key` is the header the caller routes by (see
/// [`scan_request`]).
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [httparse::Header<'b>],
    key: &str,
) -> RequestHead<'h, 'b> {
    let mut req = httparse::Request::new(storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return RequestHead::Partial,
        Err(httparse::Error::TooManyHeaders) => return RequestHead::TooManyHeaders,
        Err(_) => return RequestHead::Invalid,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return RequestHead::Handoff { head_len };
    };
    if !path.starts_with('/') {
        return RequestHead::Handoff { head_len };
    }
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let Some(scan) = scan_request(headers, key) else {
        return RequestHead::Handoff { head_len };
    };
    RequestHead::Ready(Request {
        head_len,
        method,
        path,
        headers,
        scan,
    })
}

/// What one pass over a request's headers found, for a request the own
/// path takes.
#[derive(Debug)]
pub struct RequestScan<'h> {
    /// The value of the header the caller routes by (`Host`, or the
    /// node-proxy's instance header); `None` when absent.
    pub key: Option<&'h [u8]>,
    /// `Content-Length` (0 without one), at most [`MAX_BUFFERED_BODY`].
    pub body_len: usize,
    /// The client asked to close after this exchange.
    pub close: bool,
    /// Header names listed in `Connection` (hop-by-hop too).
    tokens: [&'h [u8]; 8],
    n_tokens: usize,
}

impl<'h> RequestScan<'h> {
    /// The header names listed in `Connection` (other than `close`).
    pub fn connection_tokens(&self) -> &[&'h [u8]] {
        &self.tokens[..self.n_tokens]
    }
}

/// Scans a request's headers; `None` when the own path does not take the
/// request and hyper should: a second `key` header, a bad or conflicting
/// `Content-Length`, a body over [`MAX_BUFFERED_BODY`], `Transfer-Encoding`,
/// `Expect`, an upgrade, or more than 8 names in `Connection`.
pub fn scan_request<'h>(headers: &[httparse::Header<'h>], key: &str) -> Option<RequestScan<'h>> {
    let mut scan = RequestScan {
        key: None,
        body_len: 0,
        close: false,
        tokens: [b""; 8],
        n_tokens: 0,
    };
    let mut content_length: Option<u64> = None;
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(key.as_bytes()) {
            if scan.key.is_some() {
                return None;
            }
            scan.key = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_u64(h.value)?;
            if content_length.is_some_and(|c| c != n) {
                return None;
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return None;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.is_empty() {
                    continue;
                }
                if token.eq_ignore_ascii_case(b"close") {
                    scan.close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade")
                    || scan.n_tokens == scan.tokens.len()
                {
                    return None;
                } else {
                    scan.tokens[scan.n_tokens] = token;
                    scan.n_tokens += 1;
                }
            }
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BUFFERED_BODY as u64 {
        return None;
    }
    scan.body_len = body_len as usize;
    Some(scan)
}

/// Appends the request line and the headers worth forwarding: not
/// hop-by-hop, not named in `Connection`, not in `skip`. The caller adds its
/// own headers and the final CRLF.
pub fn write_request_head(
    out: &mut Vec<u8>,
    method: &str,
    path: &str,
    headers: &[httparse::Header<'_>],
    scan: &RequestScan<'_>,
    skip: &[&str],
) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let tokens = &scan.tokens[..scan.n_tokens];
    for h in headers {
        let name = h.name;
        if is_hop_by_hop(name)
            || skip.iter().any(|n| name.eq_ignore_ascii_case(n))
            || (!is_message_header(name)
                && tokens
                    .iter()
                    .any(|t| name.as_bytes().eq_ignore_ascii_case(t)))
        {
            continue;
        }
        push_header(out, name.as_bytes(), h.value);
    }
}

/// Framing of a response body from a backend.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BodyKind {
    /// No body (HEAD, 204, 304).
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked: ends where [`ChunkScan`] finds its end.
    Chunked,
    /// Until the backend closes.
    UntilClose,
}

/// A parsed response head from a backend.
#[derive(Debug)]
pub struct Response {
    /// Length of the head in the backend's bytes.
    pub head_len: usize,
    /// The final status.
    pub status: StatusCode,
    /// How the body is delimited.
    pub body: BodyKind,
    /// The backend connection can carry another exchange afterwards.
    pub reusable: bool,
    /// The client connection must close after this response.
    pub close_client: bool,
}

/// What [`parse_response`] found.
#[derive(Debug)]
pub enum Parsed {
    /// The head is not complete yet.
    More,
    /// A 1xx response (not 101) of this many bytes, to pass on as it is;
    /// the final response follows.
    Informational(usize),
    /// A node-proxy's "could not connect to the instance" (edge only).
    ConnectFailed,
    /// A final response; its head for the client is in `out`.
    Response(Response),
}

/// A complete response of the proxy's own: `body` with its length, no
/// caching, the request id, and `connection: close` when `close`.
pub fn simple_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    content_type: &str,
    body: &[u8],
    request_id: Option<&HeaderValue>,
    close: bool,
) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: {content_type}\r\ncache-control: no-store\r\ncontent-length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(id) = request_id {
        push_header(out, REQUEST_ID_HEADER.as_bytes(), id.as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Parses a backend's response head in `rbuf`; for a final response, writes
/// the head for the client into `out`: hop-by-hop headers dropped, and with
/// a `request_id` (the edge) the app's own request id replaced by it and a
/// node-proxy's "could not connect" 502 reported as such (a node-proxy,
/// without one, passes the app's answer on as it is).
pub fn parse_response(
    rbuf: &[u8],
    out: &mut Vec<u8>,
    head_request: bool,
    client_close: bool,
    request_id: Option<&HeaderValue>,
) -> Result<Parsed, ResponseError> {
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut storage);
    let head_len = match resp.parse(rbuf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::More),
        Err(e) => return Err(ResponseError::Head(e)),
    };
    let code = resp.code.unwrap_or(0);
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(ResponseError::Unasked101);
        }
        return Ok(Parsed::Informational(head_len));
    }
    let status = StatusCode::from_u16(code).map_err(|_| ResponseError::Status(code))?;
    let (mut close, mut keep_alive, mut has_connection) = (false, false, false);
    let mut content_length: Option<u64> = None;
    // Some(the final coding is chunked): the last non-empty element of all
    // the `Transfer-Encoding` lists together (RFC 9110 5.6.1, RFC 9112 6.3).
    let mut te: Option<bool> = None;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            has_connection = true;
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_u64(h.value).ok_or(ResponseError::ContentLength)?;
            if content_length.is_some_and(|c| c != n) {
                return Err(ResponseError::ConflictingLength);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = h
                .value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|c| !c.is_empty());
            te = match last {
                Some(c) => Some(c.eq_ignore_ascii_case(b"chunked")),
                None => Some(te.unwrap_or(false)),
            };
        } else if request_id.is_some()
            && status == StatusCode::BAD_GATEWAY
            && name.eq_ignore_ascii_case(UPSTREAM_STATUS_HEADER.as_bytes())
            && h.value == UPSTREAM_CONNECT_FAILED.as_bytes()
        {
            return Ok(Parsed::ConnectFailed);
        }
    }
    // `close` ends the connection whatever else it says; HTTP/1.0 persists
    // only when it asks to (RFC 9112 9.3).
    let backend_close = close || (resp.version == Some(0) && !keep_alive);
    let body = if head_request || code == 204 || code == 304 {
        BodyKind::None
    } else {
        match (te, content_length) {
            (Some(true), _) => BodyKind::Chunked,
            (Some(false), _) => BodyKind::UntilClose,
            (None, Some(n)) => BodyKind::Length(n),
            (None, None) => BodyKind::UntilClose,
        }
    };
    let close_client = client_close || body == BodyKind::UntilClose;

    out.clear();
    {
        use std::io::Write;
        let reason = resp
            .reason
            .filter(|r| !r.is_empty())
            .or(status.canonical_reason())
            .unwrap_or("");
        let _ = write!(out, "HTTP/1.1 {code} {reason}\r\n");
    }
    for h in resp.headers.iter() {
        let name = h.name;
        let keep_te = te.is_some() && name.eq_ignore_ascii_case("transfer-encoding");
        if (!keep_te && is_hop_by_hop(name))
            || (te.is_some() && name.eq_ignore_ascii_case("content-length"))
            || (request_id.is_some()
                && (name.eq_ignore_ascii_case(UPSTREAM_STATUS_HEADER)
                    || name.eq_ignore_ascii_case(REQUEST_ID_HEADER)))
            || (has_connection && named_by_connection(resp.headers, name))
        {
            continue;
        }
        push_header(out, name.as_bytes(), h.value);
    }
    if let Some(id) = request_id {
        push_header(out, REQUEST_ID_HEADER.as_bytes(), id.as_bytes());
    }
    if close_client {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Parsed::Response(Response {
        head_len,
        status,
        body,
        reusable: !backend_close && body != BodyKind::UntilClose,
        close_client,
    }))
}

/// Appends one header line.
pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Finds the end of a chunked body (RFC 9112 7.1) in the bytes fed to it,
/// without changing them.
#[derive(Default, Debug, Clone)]
pub struct ChunkScan {
    state: ChunkState,
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// In the chunk size line's hex digits (`size`, `digits` so far).
    #[default]
    SizeStart,
    Size {
        size: u64,
        digits: u8,
    },
    /// White space after the size: a `;` (an extension) or CR follows.
    Bws {
        size: u64,
    },
    /// In a chunk extension, up to CR.
    Ext {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    TrailerLine,
    /// After the CR ending a trailer line.
    TrailerLf,
    EndLf,
}

impl ChunkScan {
    /// Consumes `bytes`; `Ok(Some(n))` when the body ends after the first
    /// `n` of them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ChunkError> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            if let Data { left } = self.state {
                let n = (left.min((bytes.len() - i) as u64)) as usize;
                i += n;
                let left = left - n as u64;
                self.state = if left == 0 { DataCr } else { Data { left } };
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (SizeStart, b) => match hex(b) {
                    Some(d) => Size {
                        size: u64::from(d),
                        digits: 1,
                    },
                    None => return Err(ChunkError),
                },
                (Size { size, digits }, b) => match hex(b) {
                    Some(_) if digits >= 15 => return Err(ChunkError),
                    Some(d) => Size {
                        size: size * 16 + u64::from(d),
                        digits: digits + 1,
                    },
                    None if b == b'\r' => SizeLf { size },
                    None if b == b';' => Ext { size },
                    None if b == b' ' || b == b'\t' => Bws { size },
                    None => return Err(ChunkError),
                },
                // `chunk-size [ BWS ";" chunk-ext ] CRLF` (RFC 9112 7.1.1):
                // after white space, only an extension or the line's end.
                (Bws { size }, b' ' | b'\t') => Bws { size },
                (Bws { size }, b';') => Ext { size },
                (Bws { size }, b'\r') => SizeLf { size },
                (Bws { .. }, _) => return Err(ChunkError),
                (Ext { size }, b'\r') => SizeLf { size },
                (Ext { .. }, b'\n') => return Err(ChunkError),
                (Ext { size }, _) => Ext { size },
                (SizeLf { size: 0 }, b'\n') => TrailerStart,
                (SizeLf { size }, b'\n') => Data { left: size },
                (SizeLf { .. }, _) => return Err(ChunkError),
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => SizeStart,
                (DataCr | DataLf, _) => return Err(ChunkError),
                (TrailerStart, b'\r') => EndLf,
                // A trailer line ends with CRLF; a bare CR or LF in it is
                // where a client and the edge could disagree on the end.
                (TrailerStart | TrailerLine, b'\n') => return Err(ChunkError),
                (TrailerLine, b'\r') => TrailerLf,
                (TrailerStart | TrailerLine, _) => TrailerLine,
                (TrailerLf, b'\n') => TrailerStart,
                (TrailerLf, _) => return Err(ChunkError),
                (EndLf, b'\n') => return Ok(Some(i)),
                (EndLf, _) => return Err(ChunkError),
                (Data { .. }, _) => unreachable!("handled above"),
            };
        }
        Ok(None)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"5\r\nhello\r\n6;name=\"v\"\r\n world\r\n10\r\n0123456789abcdef\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\n";

    #[test]
    fn chunked_end_is_found_however_the_bytes_are_split() {
        let mut with_next = BODY.to_vec();
        with_next.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..=BODY.len() {
            let mut scan = ChunkScan::default();
            let first = scan.feed(&with_next[..split]).unwrap();
            let end = match first {
                Some(n) => n,
                None => split + scan.feed(&with_next[split..]).unwrap().expect("the end"),
            };
            assert_eq!(end, BODY.len(), "split at {split}");
        }
        // One byte at a time.
        let mut scan = ChunkScan::default();
        let mut end = None;
        for (i, b) in BODY.iter().enumerate() {
            if let Some(n) = scan.feed(std::slice::from_ref(b)).unwrap() {
                assert_eq!(n, 1);
                end = Some(i + 1);
                break;
            }
        }
        assert_eq!(end, Some(BODY.len()));
        // No trailers.
        assert_eq!(ChunkScan::default().feed(b"0\r\n\r\n"), Ok(Some(5)));
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"\r\n",
            b"10000000000000000\r\n",
            b"0\r\n\n",
            b"3;ext\nabc",
            // Found by the fuzzer (fuzz/corpus/http1_chunked/finding-*).
            b"5 junk\r\n",
            b"0\r\nx-a: 1\n\r\n",
            b"0\r\nx-a: 1\rx\r\n\r\n",
        ] {
            assert_eq!(
                ChunkScan::default().feed(bad),
                Err(ChunkError),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn parse(head: &str, head_request: bool) -> Result<(Response, String), String> {
        let mut out = Vec::new();
        let id = HeaderValue::from_static("rid");
        match parse_response(head.as_bytes(), &mut out, head_request, false, Some(&id))
            .map_err(|e| e.to_string())?
        {
            Parsed::Response(r) => Ok((r, String::from_utf8(out).unwrap())),
            Parsed::More => Err("more".into()),
            Parsed::Informational(_) => Err("1xx".into()),
            Parsed::ConnectFailed => Err("connect failed".into()),
        }
    }

    #[test]
    fn response_heads_decide_framing_and_reuse() {
        let (r, out) = parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false).unwrap();
        assert_eq!(
            (r.body, r.reusable, r.close_client),
            (BodyKind::Length(3), true, false)
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-request-id: rid\r\n\r\n"
        );

        // Transfer-Encoding wins over Content-Length, which is dropped.
        let (r, out) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.body, BodyKind::Chunked);
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out}"
        );
        assert!(out.contains("Transfer-Encoding: chunked"), "{out}");

        // A coding other than chunked last: delimited by close.
        let (r, _) = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false).unwrap();
        assert_eq!(
            (r.body, r.reusable, r.close_client),
            (BodyKind::UntilClose, false, true)
        );

        // HTTP/1.0: closes unless it says keep-alive.
        let (r, _) = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap();
        assert!(!r.reusable);
        let (r, out) = parse(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(r.reusable);
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(!out.to_ascii_lowercase().contains("connection"), "{out}");

        // No body for HEAD, 204 and 304, whatever the headers say.
        for (head, is_head) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true),
            ("HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
            ),
        ] {
            let (r, _) = parse(head, is_head).unwrap();
            assert_eq!((r.body, r.reusable), (BodyKind::None, true), "{head}");
        }

        // Refused: conflicting or invalid lengths, a 101 nobody asked for.
        for head in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        ] {
            assert!(parse(head, false).is_err(), "{head}");
        }
        // The node-proxy's "could not connect" is a connect failure.
        assert_eq!(
            parse("HTTP/1.1 502 Bad Gateway\r\nx-zeitwork-upstream: connect-failed\r\ncontent-length: 0\r\n\r\n", false).err().as_deref(),
            Some("connect failed")
        );
        // A node-proxy (no request id of its own) passes the app's answer
        // on as it is, that header and the app's request id included.
        let mut out = Vec::new();
        let head = "HTTP/1.1 502 Bad Gateway\r\nx-zeitwork-upstream: connect-failed\r\nx-request-id: app\r\ncontent-length: 0\r\n\r\n";
        match parse_response(head.as_bytes(), &mut out, false, false, None) {
            Ok(Parsed::Response(r)) => assert_eq!(r.status, StatusCode::BAD_GATEWAY),
            _ => panic!("passed on"),
        }
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("x-zeitwork-upstream: connect-failed\r\n"),
            "{out}"
        );
        assert!(out.contains("x-request-id: app\r\n"), "{out}");
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Le", false)
                .err()
                .as_deref(),
            Some("more")
        );
    }
}
