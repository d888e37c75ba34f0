//! Route-table wire types shared by the captain (producer) and the edge
//! (consumer).
//!
//! # The stream: `GET /v1/routes/stream`
//!
//! The captain serves the route table as server-sent events
//! (`Content-Type: text/event-stream`), authenticated with
//! `Authorization: Bearer <token>`. Every event carries the *whole* table,
//! never a diff, so any single event is enough to serve from:
//!
//! ```text
//! event: routes
//! id: 42
//! data: {"version":42,"routes":[...]}
//!
//! ```
//!
//! - The first event is sent as soon as the stream opens (the current table);
//!   one more event follows every change. `id:` repeats the table's `version`.
//! - `data:` is one [`RouteTable`] serialised as JSON on one line (a producer
//!   may split it over several `data:` lines; they are joined with `\n`).
//! - Comment lines (`: keepalive`) may be sent at any time to keep proxies
//!   from closing an idle stream; the edge ignores them. Events with another
//!   `event:` name are ignored, so the format can grow.
//! - `version` increases with every change. The edge swaps in every valid
//!   table it receives (the captain is the authority, even after a database
//!   restore lowers the counter) and keeps the last valid one on disk.
//!
//! A table is validated by [`RouteTable::validate`] before it is used; an
//! invalid event is logged and ignored, the previous table keeps serving.

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The header the edge sets on every request it sends to a node-proxy: the id
/// of the instance the request is for.
pub const INSTANCE_HEADER: &str = "x-zeitwork-instance";

/// The path of the captain's route stream.
pub const STREAM_PATH: &str = "/v1/routes/stream";

/// The SSE event name that carries a [`RouteTable`].
pub const STREAM_EVENT: &str = "routes";

/// Everything the edge needs to route traffic, as of one `version`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Increases with every change of the table.
    pub version: u64,
    /// One entry per domain.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// One domain and where its traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Host name, lower case, without port. A leading `*.` matches exactly one
    /// more label (`*.example.com` matches `a.example.com`, not
    /// `a.b.example.com` nor `example.com`). Exact names win over wildcards.
    pub domain: String,
    /// Environment the app lives in.
    pub env: String,
    /// App the domain belongs to.
    pub app: String,
    /// How the edge handles the connection.
    #[serde(default)]
    pub kind: RouteKind,
    /// Healthy instances of the app's promoted deployment, on every node.
    /// Empty means the app exists but nothing can serve it (the edge answers
    /// 503).
    #[serde(default)]
    pub backends: Vec<Backend>,
}

/// How the edge treats connections for a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// The edge terminates TLS and proxies HTTP (HTTP/1.1, HTTP/2, websockets).
    #[default]
    Http,
    /// The edge reads the SNI of the TLS ClientHello and splices the raw TCP
    /// stream to a backend, which terminates TLS itself.
    Passthrough,
}

/// One instance that can serve a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// The instance's id; sent to the node-proxy in [`INSTANCE_HEADER`].
    pub instance_id: String,
    /// The node the instance runs on.
    pub node_id: String,
    /// `host:port` of the node's mTLS node-proxy (or of the instance itself
    /// when `transport` is [`Transport::Plain`]).
    pub node_proxy: String,
    /// How the edge reaches `node_proxy`.
    #[serde(default)]
    pub transport: Transport,
}

/// How the edge connects to a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// mTLS to the node-proxy, which forwards to the instance named in
    /// [`INSTANCE_HEADER`]. The only transport allowed across machines.
    #[default]
    Mtls,
    /// Plain TCP straight to the instance. Only allowed for loopback
    /// addresses (single-machine development and benchmarks); a table that
    /// names a non-loopback plain backend is rejected.
    Plain,
}

/// Why a route table is refused.
#[derive(Debug, thiserror::Error)]
pub enum RouteTableError {
    /// The JSON does not decode.
    #[error("route table is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// A domain name is not usable.
    #[error("route {index}: invalid domain {domain:?}: {reason}")]
    InvalidDomain {
        index: usize,
        domain: String,
        reason: &'static str,
    },
    /// The same domain appears twice.
    #[error("route {index}: domain {domain:?} appears more than once")]
    DuplicateDomain { index: usize, domain: String },
    /// A backend address is not `host:port`.
    #[error("route {domain:?}: backend {instance_id:?}: invalid address {addr:?}")]
    InvalidBackendAddr {
        domain: String,
        instance_id: String,
        addr: String,
    },
    /// A plain backend is not on loopback.
    #[error(
        "route {domain:?}: backend {instance_id:?}: plain transport to {addr} is only allowed on loopback"
    )]
    PlaintextNotLoopback {
        domain: String,
        instance_id: String,
        addr: String,
    },
    /// An instance id is empty or cannot be sent as a header value.
    #[error("route {domain:?}: backend with invalid instance id {instance_id:?}")]
    InvalidInstanceId { domain: String, instance_id: String },
}

impl RouteTable {
    /// Decodes and validates a table from JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RouteTableError> {
        let mut table: RouteTable = serde_json::from_slice(bytes).map_err(RouteTableError::Json)?;
        table.normalize();
        table.validate()?;
        Ok(table)
    }

    /// Encodes the table as one line of JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a RouteTable always serialises")
    }

    /// Lower-cases domains and strips a trailing dot.
    pub fn normalize(&mut self) {
        for route in &mut self.routes {
            route.domain = normalize_host(&route.domain);
        }
    }

    /// Checks every rule the edge relies on.
    pub fn validate(&self) -> Result<(), RouteTableError> {
        let mut seen = HashSet::new();
        for (index, route) in self.routes.iter().enumerate() {
            validate_domain(&route.domain).map_err(|reason| RouteTableError::InvalidDomain {
                index,
                domain: route.domain.clone(),
                reason,
            })?;
            if !seen.insert(route.domain.as_str()) {
                return Err(RouteTableError::DuplicateDomain {
                    index,
                    domain: route.domain.clone(),
                });
            }
            for backend in &route.backends {
                if backend.instance_id.is_empty()
                    || http::HeaderValue::from_str(&backend.instance_id).is_err()
                {
                    return Err(RouteTableError::InvalidInstanceId {
                        domain: route.domain.clone(),
                        instance_id: backend.instance_id.clone(),
                    });
                }
                let (host, _port) = split_host_port(&backend.node_proxy).ok_or_else(|| {
                    RouteTableError::InvalidBackendAddr {
                        domain: route.domain.clone(),
                        instance_id: backend.instance_id.clone(),
                        addr: backend.node_proxy.clone(),
                    }
                })?;
                if backend.transport == Transport::Plain && !is_loopback_host(host) {
                    return Err(RouteTableError::PlaintextNotLoopback {
                        domain: route.domain.clone(),
                        instance_id: backend.instance_id.clone(),
                        addr: backend.node_proxy.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Lower-cases a host name and strips one trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

fn validate_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("empty");
    }
    if domain.len() > 253 {
        return Err("longer than 253 characters");
    }
    let rest = domain.strip_prefix("*.").unwrap_or(domain);
    for label in rest.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err("only a-z, 0-9, '-' and '_' are allowed in a label");
        }
    }
    Ok(())
}

/// Splits `host:port` (IPv6 in brackets) into its parts.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        let host_end = addr.rfind(':')?;
        let host = addr[..host_end]
            .trim_start_matches('[')
            .trim_end_matches(']');
        return Some((host, sa.port()));
    }
    let (host, port) = addr.rsplit_once(':')?;
    if host.is_empty() || host.contains(':') || host.contains('[') {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some((host, port))
}

fn is_loopback_host(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// Incremental parser for a `text/event-stream` body. Feed it bytes as they
/// arrive; it yields the `data` of each complete event named
/// [`STREAM_EVENT`] (or unnamed).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: String,
    event: Option<String>,
    has_data: bool,
}

/// Longest line the parser accepts (a route table of a large cluster fits).
pub const SSE_MAX_LINE: usize = 64 * 1024 * 1024;

/// Why an event stream is broken.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// A line grew beyond [`SSE_MAX_LINE`].
    #[error("event-stream line longer than {SSE_MAX_LINE} bytes")]
    LineTooLong,
    /// A line is not UTF-8.
    #[error("event-stream line is not UTF-8")]
    NotUtf8,
}

impl SseParser {
    /// Adds bytes; returns the payloads of the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            let mut line = &self.buf[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
            if line.is_empty() {
                if self.has_data
                    && self
                        .event
                        .as_deref()
                        .is_none_or(|e| e == STREAM_EVENT || e == "message")
                {
                    out.push(std::mem::take(&mut self.data));
                }
                self.data.clear();
                self.event = None;
                self.has_data = false;
            } else if !line.starts_with(':') {
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "data" => {
                        if self.has_data {
                            self.data.push('\n');
                        }
                        self.data.push_str(value);
                        self.has_data = true;
                    }
                    "event" => self.event = Some(value.to_owned()),
                    _ => {}
                }
            }
            start = end + 1;
        }
        self.buf.drain(..start);
        if self.buf.len() + self.data.len() > SSE_MAX_LINE {
            return Err(SseError::LineTooLong);
        }
        Ok(out)
    }
}

/// Formats one table as an SSE event, exactly as the captain must send it.
pub fn sse_event(table: &RouteTable) -> String {
    let json = String::from_utf8(table.to_json()).expect("serde_json writes UTF-8");
    format!(
        "event: {STREAM_EVENT}\nid: {}\ndata: {json}\n\n",
        table.version
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(addr: &str, transport: Transport) -> Backend {
        Backend {
            instance_id: "i1".into(),
            node_id: "n1".into(),
            node_proxy: addr.into(),
            transport,
        }
    }

    fn table(domain: &str, b: Backend) -> RouteTable {
        RouteTable {
            version: 1,
            routes: vec![Route {
                domain: domain.into(),
                env: "prod".into(),
                app: "a".into(),
                kind: RouteKind::Http,
                backends: vec![b],
            }],
        }
    }

    #[test]
    fn roundtrip_and_defaults() {
        let json = br#"{"version":3,"routes":[{"domain":"A.Example.COM.","env":"p","app":"x",
            "backends":[{"instance_id":"i","node_id":"n","node_proxy":"[::1]:9000"}]}]}"#;
        let t = RouteTable::from_json(json).unwrap();
        assert_eq!(t.routes[0].domain, "a.example.com");
        assert_eq!(t.routes[0].kind, RouteKind::Http);
        assert_eq!(t.routes[0].backends[0].transport, Transport::Mtls);
        assert_eq!(RouteTable::from_json(&t.to_json()).unwrap(), t);
    }

    #[test]
    fn rejects_bad_tables() {
        let plain_remote = table("a.com", backend("10.0.0.1:80", Transport::Plain));
        assert!(matches!(
            plain_remote.validate(),
            Err(RouteTableError::PlaintextNotLoopback { .. })
        ));
        table("a.com", backend("[::1]:80", Transport::Plain))
            .validate()
            .unwrap();
        let bad_addr = table("a.com", backend("nope", Transport::Mtls));
        assert!(matches!(
            bad_addr.validate(),
            Err(RouteTableError::InvalidBackendAddr { .. })
        ));
        let bad_domain = table("a b.com", backend("1.2.3.4:1", Transport::Mtls));
        assert!(matches!(
            bad_domain.validate(),
            Err(RouteTableError::InvalidDomain { .. })
        ));
        let mut dup = table("a.com", backend("1.2.3.4:1", Transport::Mtls));
        dup.routes.push(dup.routes[0].clone());
        assert!(matches!(
            dup.validate(),
            Err(RouteTableError::DuplicateDomain { .. })
        ));
        assert!(matches!(
            RouteTable::from_json(b"{"),
            Err(RouteTableError::Json(_))
        ));
    }

    #[test]
    fn split_host_port_forms() {
        assert_eq!(split_host_port("[::1]:80"), Some(("::1", 80)));
        assert_eq!(split_host_port("1.2.3.4:5"), Some(("1.2.3.4", 5)));
        assert_eq!(
            split_host_port("node-1.internal:443"),
            Some(("node-1.internal", 443))
        );
        assert_eq!(split_host_port("::1:80"), None);
        assert_eq!(split_host_port("host"), None);
    }

    #[test]
    fn sse_parser_splits_events_across_chunks() {
        let t = table("a.com", backend("1.2.3.4:1", Transport::Mtls));
        let ev = sse_event(&t);
        let mut p = SseParser::default();
        let mut got = Vec::new();
        let stream = format!(": keepalive\n\nevent: other\ndata: x\n\n{ev}{ev}");
        for chunk in stream.as_bytes().chunks(7) {
            got.extend(p.push(chunk).unwrap());
        }
        assert_eq!(got.len(), 2);
        for g in got {
            assert_eq!(RouteTable::from_json(g.as_bytes()).unwrap(), t);
        }
        let mut p = SseParser::default();
        assert_eq!(p.push(b"data: a\r\ndata: b\r\n\r\n").unwrap(), vec!["a\nb"]);
    }
}
