//! Health checks of instances, from the node: an HTTP GET of the release's
//! path (2xx/3xx is healthy) or a TCP connect to the app port.

use std::net::SocketAddr;
use std::time::Duration;

use meta_schema::pb::{HealthCheck, health_check::Kind};

/// Timeout when the release sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The check to run, resolved from a release's (optional) `HealthCheck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Http { path: String, timeout: Duration },
    Tcp { timeout: Duration },
}

impl Probe {
    /// No health check in the release means a TCP connect to the app port.
    pub fn from_release(hc: Option<&HealthCheck>) -> Probe {
        let timeout = hc
            .filter(|h| h.timeout_ms > 0)
            .map(|h| Duration::from_millis(u64::from(h.timeout_ms)))
            .unwrap_or(DEFAULT_TIMEOUT);
        match hc.and_then(|h| h.kind.as_ref()) {
            Some(Kind::HttpPath(p)) if !p.is_empty() => {
                let path = if p.starts_with('/') {
                    p.clone()
                } else {
                    format!("/{p}")
                };
                Probe::Http { path, timeout }
            }
            _ => Probe::Tcp { timeout },
        }
    }

    /// Runs the check once; `Err` carries why it failed.
    pub async fn check(&self, addr: SocketAddr) -> Result<(), String> {
        match self {
            Probe::Tcp { timeout } => {
                tokio::time::timeout(*timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| format!("tcp connect to {addr} timed out after {timeout:?}"))?
                    .map(drop)
                    .map_err(|e| format!("tcp connect to {addr}: {e}"))
            }
            Probe::Http { path, timeout } => {
                tokio::time::timeout(*timeout, http_status(addr, path))
                    .await
                    .map_err(|_| format!("GET {path} on {addr} timed out after {timeout:?}"))?
                    .and_then(|status| {
                        if (200..400).contains(&status) {
                            Ok(())
                        } else {
                            Err(format!("GET {path} on {addr} answered {status}"))
                        }
                    })
            }
        }
    }
}

/// One HTTP/1.1 GET with `Connection: close`; returns the status code.
async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let host = match addr {
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        SocketAddr::V4(a) => a.to_string(),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zeitwork-follower\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write to {addr}: {e}"))?;
    // The status line fits in the first read of a few hundred bytes.
    let mut buf = vec![0u8; 512];
    let mut n = 0;
    while n < buf.len() {
        let r = s
            .read(&mut buf[n..])
            .await
            .map_err(|e| format!("read from {addr}: {e}"))?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(format!("{addr} did not answer HTTP")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn server(status: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_and_tcp_probes() {
        let ok = server("204 No Content").await;
        let bad = server("503 Service Unavailable").await;
        let hc = HealthCheck {
            kind: Some(Kind::HttpPath("healthz".into())),
            interval_ms: 0,
            timeout_ms: 500,
        };
        let p = Probe::from_release(Some(&hc));
        assert_eq!(
            p,
            Probe::Http {
                path: "/healthz".into(),
                timeout: Duration::from_millis(500)
            }
        );
        p.check(ok).await.unwrap();
        assert!(p.check(bad).await.unwrap_err().contains("503"));

        let tcp = Probe::from_release(None);
        tcp.check(ok).await.unwrap();
        // A port nobody listens on: bind, learn the port, close.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(tcp.check(closed).await.is_err());
    }
}
