//! The edge's HTTP/1.1 framing ([`edge::framing`]) against `httparse` and a
//! reference framing written here from RFC 9112 (sections 6.3, 7.1, 9.3)
//! and the own path's documented contract. Any disagreement is a finding:
//! a request the edge frames differently from the reference is a
//! smuggling risk; a response head whose framing the client reads
//! differently from how the edge relays it is a desync.

use edge::framing::{self, BodyKind, ChunkScan, Parsed, RequestHead};
use http::HeaderValue;

/// `OWS` of RFC 9110 5.6.3.
fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let Some(start) = start else {
        return &v[..0];
    };
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(start);
    &v[start..=end]
}

/// The non-empty elements of a comma-separated list (RFC 9110 5.6.1:
/// empty elements are ignored), trimmed.
fn list(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

/// A `Content-Length` value: 1*DIGIT, at most 19 digits (the own path's
/// limit; it always fits a u64).
fn content_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn lower(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// What the reference says of a request the own path takes.
#[derive(Debug)]
struct Take<'b> {
    body_len: usize,
    close: bool,
    host: Option<&'b [u8]>,
    /// Lower-case header names listed in `Connection` (not `close`).
    tokens: Vec<String>,
}

/// The own path's contract (`edge::framing` docs): origin-form HTTP/1.1,
/// one `Host` at most, no `Transfer-Encoding`, `Expect` or upgrade, valid
/// and agreeing `Content-Length`s of at most `MAX_BUFFERED_BODY`, at most 8
/// header names in `Connection`. Anything else goes to hyper (`Err`, why).
fn reference_request<'b>(r: &httparse::Request<'_, 'b>) -> Result<Take<'b>, &'static str> {
    if r.version != Some(1) {
        return Err("not HTTP/1.1");
    }
    if !r.path.is_some_and(|p| p.starts_with('/')) {
        return Err("not origin-form");
    }
    let mut hosts = Vec::new();
    let mut length: Option<u64> = None;
    let mut close = false;
    let mut tokens = Vec::new();
    for h in r.headers.iter() {
        match lower(h.name).as_str() {
            "host" => hosts.push(h.value),
            "transfer-encoding" => return Err("transfer-encoding"),
            "expect" => return Err("expect"),
            "upgrade" => return Err("upgrade"),
            "content-length" => {
                let n = content_length(h.value).ok_or("invalid content-length")?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting content-lengths");
                }
                length = Some(n);
            }
            "connection" => {
                for t in list(h.value) {
                    let t = String::from_utf8_lossy(t).to_ascii_lowercase();
                    match t.as_str() {
                        "close" => close = true,
                        "upgrade" => return Err("connection: upgrade"),
                        _ => tokens.push(t),
                    }
                }
            }
            _ => {}
        }
    }
    if hosts.len() > 1 {
        return Err("two Host headers");
    }
    if tokens.len() > 8 {
        return Err("more than 8 connection options");
    }
    let body_len = length.unwrap_or(0);
    if body_len > framing::MAX_BUFFERED_BODY as u64 {
        return Err("body larger than the own path buffers");
    }
    Ok(Take {
        body_len: body_len as usize,
        close,
        host: hosts.first().copied(),
        tokens,
    })
}

/// Request heads (first byte: the header storage size, 1 to 128; then the
/// client's bytes): [`framing::parse_request`] classifies the head as
/// `httparse` does, takes exactly the requests the reference takes, with
/// the same body length, `Host` and close, and writes a head for the
/// backend that parses back to the same request without a hop-by-hop
/// header.
pub fn request(data: &[u8]) {
    let Some((&n, buf)) = data.split_first() else {
        return;
    };
    let n = usize::from(n) % 128 + 1;
    let mut storage = vec![httparse::EMPTY_HEADER; n];
    let got = framing::parse_request(buf, &mut storage, "host");

    let mut ref_storage = vec![httparse::EMPTY_HEADER; n];
    let mut r = httparse::Request::new(&mut ref_storage);
    let head_len = match (r.parse(buf), &got) {
        (Ok(httparse::Status::Partial), RequestHead::Partial) => return,
        (Err(httparse::Error::TooManyHeaders), RequestHead::TooManyHeaders) => return,
        (Err(e), RequestHead::Invalid) if e != httparse::Error::TooManyHeaders => return,
        (Ok(httparse::Status::Complete(len)), RequestHead::Handoff { .. })
        | (Ok(httparse::Status::Complete(len)), RequestHead::Ready(_)) => len,
        (theirs, ours) => panic!("framing says {ours:?}, httparse says {theirs:?}"),
    };
    let expected = reference_request(&r);
    let req = match (got, expected) {
        (RequestHead::Handoff { head_len: h }, Err(_)) => {
            assert_eq!(h, head_len, "head length");
            return;
        }
        (RequestHead::Handoff { .. }, Ok(take)) => {
            panic!("the own path hands off a request the reference takes: {take:?}")
        }
        (RequestHead::Ready(req), Err(why)) => {
            panic!("the own path takes a request it must hand off ({why}): {req:?}")
        }
        (RequestHead::Ready(req), Ok(take)) => {
            assert_eq!(req.head_len, head_len, "head length");
            assert_eq!(Some(req.method), r.method, "method");
            assert_eq!(Some(req.path), r.path, "path");
            assert_eq!(req.scan.body_len, take.body_len, "body length");
            assert_eq!(req.scan.close, take.close, "connection: close");
            assert_eq!(req.scan.key, take.host, "Host");
            let mut ours: Vec<String> = req
                .scan
                .connection_tokens()
                .iter()
                .map(|t| String::from_utf8_lossy(t).to_ascii_lowercase())
                .collect();
            ours.sort();
            let mut theirs = take.tokens.clone();
            theirs.sort();
            assert_eq!(ours, theirs, "connection options");
            (req, take)
        }
        (other, _) => unreachable!("classified above: {other:?}"),
    };
    let (req, take) = req;

    // The head for the backend: the request line, the end-to-end headers
    // in their order, nothing else.
    const SKIP: &str = "x-forwarded-for";
    let mut out = Vec::new();
    framing::write_request_head(
        &mut out,
        req.method,
        req.path,
        req.headers,
        &req.scan,
        &[SKIP],
    );
    out.extend_from_slice(b"\r\n");
    let mut storage = vec![httparse::EMPTY_HEADER; n + 1];
    let mut again = httparse::Request::new(&mut storage);
    match again.parse(&out) {
        Ok(httparse::Status::Complete(len)) => assert_eq!(len, out.len(), "one head, no more"),
        other => panic!(
            "the head written for the backend does not parse: {other:?}: {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
    assert_eq!(again.method, Some(req.method));
    assert_eq!(again.path, Some(req.path));
    assert_eq!(again.version, Some(1));
    let expected: Vec<(&str, &[u8])> = req
        .headers
        .iter()
        .filter(|h| {
            let name = lower(h.name);
            !framing::HOP_BY_HOP.contains(&name.as_str())
                && name != SKIP
                && (MESSAGE_HEADERS.contains(&name.as_str()) || !take.tokens.contains(&name))
        })
        .map(|h| (h.name, h.value))
        .collect();
    let written: Vec<(&str, &[u8])> = again.headers.iter().map(|h| (h.name, h.value)).collect();
    assert_eq!(written, expected, "headers forwarded to the backend");

    // The backend frames and routes the request as the edge did: the same
    // body length (else the body, or part of it, is a request the edge
    // never saw), the same Host.
    let mut lengths = Vec::new();
    let mut hosts = Vec::new();
    for h in again.headers.iter() {
        match lower(h.name).as_str() {
            "content-length" => lengths.push(content_length(h.value)),
            "transfer-encoding" => panic!("a forwarded request with Transfer-Encoding"),
            "host" => hosts.push(h.value),
            _ => {}
        }
    }
    let backend_len = match lengths.first() {
        None => Some(0),
        Some(first) => {
            assert!(lengths.iter().all(|l| l == first), "lengths {lengths:?}");
            *first
        }
    };
    assert_eq!(
        backend_len,
        Some(req.scan.body_len as u64),
        "the body length the backend reads"
    );
    assert_eq!(
        hosts.first().copied(),
        take.host,
        "the Host the backend sees"
    );
}

/// Headers a connection option never removes (RFC 9110 7.6.1 aside): they
/// frame or route the message, see `edge::framing::MESSAGE_HEADERS`.
const MESSAGE_HEADERS: [&str; 3] = ["content-length", "transfer-encoding", "host"];

/// What the reference makes of a response head.
#[derive(Debug, PartialEq, Eq)]
enum RefResponse {
    More,
    Informational(usize),
    ConnectFailed,
    Refused,
    Final {
        head_len: usize,
        code: u16,
        body: BodyKind,
        reusable: bool,
        close_client: bool,
        /// The head the client must get: (name, value), in order.
        headers: Vec<(String, Vec<u8>)>,
    },
}

const REQUEST_ID: &str = "fuzz-request-id";

fn reference_response(
    rbuf: &[u8],
    head_request: bool,
    client_close: bool,
    with_id: bool,
) -> RefResponse {
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut r = httparse::Response::new(&mut storage);
    let head_len = match r.parse(rbuf) {
        Ok(httparse::Status::Partial) => return RefResponse::More,
        Err(_) => return RefResponse::Refused,
        Ok(httparse::Status::Complete(n)) => n,
    };
    let code = r.code.unwrap_or(0);
    // RFC 9110 15: three digits, the first from 1 to 5 (the edge passes on
    // the unregistered 6xx to 9xx too, as `http::StatusCode` does).
    if code < 100 {
        return RefResponse::Refused;
    }
    if (100..200).contains(&code) {
        return if code == 101 {
            RefResponse::Refused
        } else {
            RefResponse::Informational(head_len)
        };
    }
    let mut length: Option<u64> = None;
    let mut codings: Vec<Vec<u8>> = Vec::new();
    let mut te = false;
    let mut close = false;
    let mut keep_alive = false;
    let mut tokens: Vec<String> = Vec::new();
    for h in r.headers.iter() {
        match lower(h.name).as_str() {
            "content-length" => {
                let Some(n) = content_length(h.value) else {
                    return RefResponse::Refused;
                };
                if length.is_some_and(|l| l != n) {
                    return RefResponse::Refused;
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                te = true;
                codings.extend(list(h.value).map(<[u8]>::to_vec));
            }
            "connection" => {
                for t in list(h.value) {
                    let t = String::from_utf8_lossy(t).to_ascii_lowercase();
                    match t.as_str() {
                        "close" => close = true,
                        "keep-alive" => keep_alive = true,
                        _ => {}
                    }
                    tokens.push(t);
                }
            }
            "x-zeitwork-upstream" if with_id && code == 502 && h.value == b"connect-failed" => {
                return RefResponse::ConnectFailed;
            }
            _ => {}
        }
    }
    // RFC 9112 9.3: `close` ends the connection; HTTP/1.0 persists only
    // when it asks to.
    let backend_close = close || (r.version == Some(0) && !keep_alive);
    // RFC 9112 6.3.
    let chunked = codings
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
    let body = if head_request || code == 204 || code == 304 {
        BodyKind::None
    } else if te {
        if chunked {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        }
    } else if let Some(n) = length {
        BodyKind::Length(n)
    } else {
        BodyKind::UntilClose
    };
    let close_client = client_close || body == BodyKind::UntilClose;
    let mut headers: Vec<(String, Vec<u8>)> = r
        .headers
        .iter()
        .filter(|h| {
            let name = lower(h.name);
            let hop = framing::HOP_BY_HOP.contains(&name.as_str());
            !((hop && !(te && name == "transfer-encoding"))
                || (te && name == "content-length")
                || (with_id && (name == "x-zeitwork-upstream" || name == "x-request-id"))
                || (tokens.contains(&name) && !MESSAGE_HEADERS.contains(&name.as_str())))
        })
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    if with_id {
        headers.push(("x-request-id".into(), REQUEST_ID.as_bytes().to_vec()));
    }
    if close_client {
        headers.push(("connection".into(), b"close".to_vec()));
    }
    RefResponse::Final {
        head_len,
        code,
        body,
        reusable: !backend_close && body != BodyKind::UntilClose,
        close_client,
        headers,
    }
}

/// How a client reads the body of a response with these headers (RFC 9112
/// 6.3), for a request that is not HEAD and a status with a body.
fn client_framing(headers: &[httparse::Header<'_>]) -> BodyKind {
    // Some(final coding): the `Transfer-Encoding` lists combined.
    let mut te: Option<Option<Vec<u8>>> = None;
    let mut length = None;
    for h in headers {
        match lower(h.name).as_str() {
            "transfer-encoding" => {
                let last = list(h.value).last().map(<[u8]>::to_vec);
                te = Some(last.or(te.flatten()));
            }
            "content-length" => length = content_length(h.value),
            _ => {}
        }
    }
    let te = te.map(|last| last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
    match (te, length) {
        (Some(true), _) => BodyKind::Chunked,
        (Some(false), _) | (None, None) => BodyKind::UntilClose,
        (None, Some(n)) => BodyKind::Length(n),
    }
}

/// Response heads from a backend (first byte: flags for a HEAD request, a
/// client that asked to close, an edge with a request id (not a
/// node-proxy); then the backend's bytes): [`framing::parse_response`]
/// decides as the reference does, and the head it writes for the client
/// parses back to the same framing, without hop-by-hop headers.
pub fn response(data: &[u8]) {
    let Some((&flags, rbuf)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 != 0;
    let client_close = flags & 2 != 0;
    let with_id = flags & 4 != 0;
    let rid = HeaderValue::from_static(REQUEST_ID);
    let mut out = Vec::new();
    let got = framing::parse_response(
        rbuf,
        &mut out,
        head_request,
        client_close,
        with_id.then_some(&rid),
    );
    let expected = reference_response(rbuf, head_request, client_close, with_id);
    let resp = match (got, expected) {
        (Ok(Parsed::More), RefResponse::More)
        | (Ok(Parsed::ConnectFailed), RefResponse::ConnectFailed)
        | (Err(_), RefResponse::Refused) => return,
        (Ok(Parsed::Informational(a)), RefResponse::Informational(b)) => {
            assert_eq!(a, b, "1xx head length");
            return;
        }
        (
            Ok(Parsed::Response(resp)),
            RefResponse::Final {
                head_len,
                code,
                body,
                reusable,
                close_client,
                headers,
            },
        ) => {
            assert_eq!(resp.head_len, head_len, "head length");
            assert_eq!(resp.status.as_u16(), code, "status");
            assert_eq!(resp.body, body, "body framing");
            assert_eq!(resp.reusable, reusable, "backend connection reuse");
            assert_eq!(resp.close_client, close_client, "client connection close");
            (resp, headers)
        }
        (ours, theirs) => panic!("framing says {ours:?}, the reference {theirs:?}"),
    };
    let (resp, expected_headers) = resp;

    // The head for the client.
    let mut storage = [httparse::EMPTY_HEADER; 130];
    let mut again = httparse::Response::new(&mut storage);
    match again.parse(&out) {
        Ok(httparse::Status::Complete(len)) => assert_eq!(len, out.len(), "one head, no more"),
        other => panic!(
            "the head written for the client does not parse: {other:?}: {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
    assert_eq!(again.version, Some(1), "HTTP/1.1 to the client");
    assert_eq!(again.code, Some(resp.status.as_u16()));
    let written: Vec<(String, Vec<u8>)> = again
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    assert_eq!(written, expected_headers, "headers relayed to the client");
    if resp.body != BodyKind::None {
        assert_eq!(
            client_framing(again.headers),
            resp.body,
            "the client reads the body as the edge relays it"
        );
    }
}

/// Where a chunked body ends, by RFC 9112 7.1 (chunk sizes of at most 15
/// hex digits, the own limit): `Ok(Some(end))`, `Ok(None)` when every byte
/// so far fits a valid body that has not ended, `Err` otherwise.
fn reference_chunked(b: &[u8]) -> Result<Option<usize>, ()> {
    let mut i = 0;
    macro_rules! at {
        () => {
            match b.get(i) {
                Some(&c) => c,
                None => return Ok(None),
            }
        };
    }
    macro_rules! expect {
        ($c:expr) => {
            if at!() != $c {
                return Err(());
            }
            i += 1;
        };
    }
    loop {
        let mut size: u64 = 0;
        let mut digits = 0;
        loop {
            let c = at!();
            let Some(d) = (c as char).to_digit(16) else {
                break;
            };
            if digits == 15 {
                return Err(());
            }
            size = size * 16 + u64::from(d);
            digits += 1;
            i += 1;
        }
        if digits == 0 {
            return Err(());
        }
        // [BWS] [";" chunk-ext] CRLF
        while matches!(at!(), b' ' | b'\t') {
            i += 1;
        }
        if at!() == b';' {
            i += 1;
            while !matches!(at!(), b'\r' | b'\n') {
                i += 1;
            }
        }
        expect!(b'\r');
        expect!(b'\n');
        if size == 0 {
            break;
        }
        let left = (b.len() - i) as u64;
        if left < size {
            return Ok(None);
        }
        i += size as usize;
        expect!(b'\r');
        expect!(b'\n');
    }
    // trailer-section CRLF: field lines end with CRLF, no bare CR or LF.
    loop {
        if at!() == b'\r' {
            i += 1;
            expect!(b'\n');
            return Ok(Some(i));
        }
        loop {
            match at!() {
                b'\r' => break,
                b'\n' => return Err(()),
                _ => i += 1,
            }
        }
        expect!(b'\r');
        expect!(b'\n');
    }
}

/// Feeds `body` to a [`ChunkScan`] `stride` bytes at a time.
fn scan(body: &[u8], stride: usize) -> Result<Option<usize>, ()> {
    let mut s = ChunkScan::default();
    let mut done = 0;
    for piece in body.chunks(stride.max(1)) {
        match s.feed(piece) {
            Err(_) => return Err(()),
            Ok(Some(n)) => {
                assert!(n <= piece.len(), "end past the bytes fed");
                return Ok(Some(done + n));
            }
            Ok(None) => done += piece.len(),
        }
    }
    Ok(None)
}

/// Chunked bodies (first byte: a stride; then the body): the scanner finds
/// the same end however the bytes are split, and the end the reference
/// finds (or fails where it fails).
pub fn chunked(data: &[u8]) {
    let Some((&stride, body)) = data.split_first() else {
        return;
    };
    let whole = scan(body, body.len());
    let split = scan(body, usize::from(stride % 32) + 1);
    assert_eq!(whole, split, "the same body split differently");
    let expected = reference_chunked(body);
    assert_eq!(whole, expected, "end of the chunked body (Err: malformed)");
}
