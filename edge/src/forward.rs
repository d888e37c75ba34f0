//! Header hygiene and upgrade splicing shared by the edge proxy and the
//! node-proxy.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::framing;

/// [`framing::HOP_BY_HOP`] as `HeaderName`s (the one table of hop-by-hop
/// headers, `upgrade` included).
const HOP_BY_HOP: [HeaderName; framing::HOP_BY_HOP.len()] = {
    let names = framing::HOP_BY_HOP;
    [
        HeaderName::from_static(names[0]),
        HeaderName::from_static(names[1]),
        HeaderName::from_static(names[2]),
        HeaderName::from_static(names[3]),
        HeaderName::from_static(names[4]),
        HeaderName::from_static(names[5]),
        HeaderName::from_static(names[6]),
        HeaderName::from_static(names[7]),
        HeaderName::from_static(names[8]),
    ]
};

/// Whether an HTTP/1.1 request asks for a protocol upgrade (websockets).
pub fn is_upgrade_request(version: http::Version, headers: &HeaderMap) -> bool {
    version == http::Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those named in `Connection` (but
/// never [`framing::MESSAGE_HEADERS`], as on the own HTTP/1.1 path). When
/// `upgrade` is set, `Connection: upgrade` and `Upgrade` are kept (they must
/// travel to the next hop for the upgrade to happen).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .filter(|n| !framing::is_message_header(n.as_str()))
            .collect();
        for name in named {
            if upgrade && name == header::UPGRADE {
                continue;
            }
            headers.remove(&name);
        }
    }
    for name in &HOP_BY_HOP {
        // `Upgrade` travels with an upgrade (and `Connection: upgrade`).
        if upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Once both sides have upgraded, copies bytes both ways until either side
/// closes. Runs as its own task; independent of the route table.
pub fn splice_upgrades(client: OnUpgrade, upstream: OnUpgrade, request_id: String) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(err) => {
                tracing::debug!(%request_id, error = %err, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => {
                tracing::debug!(%request_id, bytes_up = up, bytes_down = down, "upgraded stream closed")
            }
            Err(err) => tracing::debug!(%request_id, error = %err, "upgraded stream ended"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_named_and_standard_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let mut up = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));

        // Options that name the headers framing or routing the message do
        // not remove them; an option list that is not text still counts.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"content-length, host, x-secret, \xff").unwrap(),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::HOST));
        up.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        assert!(is_upgrade_request(http::Version::HTTP_11, &up));
        assert!(!is_upgrade_request(http::Version::HTTP_2, &up));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(up.get(header::CONNECTION).unwrap(), "upgrade");
    }
}
