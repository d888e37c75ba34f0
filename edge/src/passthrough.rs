//! TLS passthrough: read the ClientHello's SNI without terminating TLS, and
//! splice the raw stream to a backend that holds its own certificate.
//!
//! The edge reaches a passthrough backend like any other: plain TCP on
//! loopback, or an mTLS tunnel to the node-proxy opened with
//! `CONNECT <instance_id> HTTP/1.1` (the node-proxy answers 200 and then
//! copies bytes to the instance).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::routes::{INSTANCE_HEADER, Transport, split_host_port};
use crate::table::BackendState;
use crate::upstream::{ConnectError, UpstreamConnector, UpstreamStream};

/// Largest ClientHello the edge reads before deciding (a record is at most
/// 16 KiB; post-quantum key shares make hellos of a few KiB normal).
const MAX_HELLO: usize = 16 * 1024 + 5;

/// What the first bytes of a TLS connection said.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello record; the server name if it had one.
    Complete(Option<String>),
    /// More bytes are needed.
    Incomplete,
    /// Not a TLS ClientHello.
    NotTls,
}

/// Parses the SNI out of the first TLS record (RFC 8446 4.1.2, RFC 6066 3).
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    if buf.len() < 5 {
        return Hello::Incomplete;
    }
    if buf[0] != 0x16 || buf[1] != 0x03 {
        return Hello::NotTls;
    }
    let rec_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf.len() < 5 + rec_len {
        return Hello::Incomplete;
    }
    match sni(&buf[5..5 + rec_len]) {
        Some(name) => Hello::Complete(name),
        None => Hello::NotTls,
    }
}

/// Returns Some(None) for a well-formed hello without SNI, None when malformed.
fn sni(mut b: &[u8]) -> Option<Option<String>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    fn u8_(b: &mut &[u8]) -> Option<usize> {
        take(b, 1).map(|x| x[0] as usize)
    }
    fn u16_(b: &mut &[u8]) -> Option<usize> {
        take(b, 2).map(|x| u16::from_be_bytes([x[0], x[1]]) as usize)
    }
    if u8_(&mut b)? != 0x01 {
        return None; // not a ClientHello
    }
    let hs_len = {
        let l = take(&mut b, 3)?;
        ((l[0] as usize) << 16) | ((l[1] as usize) << 8) | l[2] as usize
    };
    let mut b = take(&mut b, hs_len)?; // a hello split over records is rejected
    take(&mut b, 2 + 32)?; // version, random
    let sid = u8_(&mut b)?;
    take(&mut b, sid)?;
    let cs = u16_(&mut b)?;
    take(&mut b, cs)?;
    let cm = u8_(&mut b)?;
    take(&mut b, cm)?;
    if b.is_empty() {
        return Some(None);
    }
    let ext_len = u16_(&mut b)?;
    let mut exts = take(&mut b, ext_len)?;
    while !exts.is_empty() {
        let ty = u16_(&mut exts)?;
        let len = u16_(&mut exts)?;
        let mut data = take(&mut exts, len)?;
        if ty == 0 {
            let _list_len = u16_(&mut data)?;
            while !data.is_empty() {
                let name_ty = u8_(&mut data)?;
                let l = u16_(&mut data)?;
                let name = take(&mut data, l)?;
                if name_ty == 0 {
                    let name = std::str::from_utf8(name).ok()?;
                    return Some(Some(crate::routes::normalize_host(name)));
                }
            }
        }
    }
    Some(None)
}

/// Reads from `stream` until a full ClientHello is buffered (or it is clear
/// there is none). Returns what was read and the verdict.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<(Vec<u8>, Hello)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let verdict = parse_client_hello(&buf);
        if verdict != Hello::Incomplete {
            return Ok((buf, verdict));
        }
        if buf.len() >= MAX_HELLO {
            return Ok((buf, Hello::NotTls));
        }
        let mut chunk = [0u8; 4096];
        let want = (MAX_HELLO - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix` before reading from `inner`.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// Whether replayed bytes are left.
    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Why a passthrough tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The backend address is unusable.
    #[error("backend address {0:?} is not host:port")]
    Addr(String),
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The node-proxy refused the tunnel.
    #[error("node-proxy refused the tunnel: {0}")]
    Refused(String),
    /// I/O while setting up the tunnel.
    #[error("tunnel I/O")]
    Io(#[from] io::Error),
}

/// Opens a byte stream to a passthrough backend.
pub async fn open_tunnel(
    connector: &UpstreamConnector,
    backend: &BackendState,
) -> Result<UpstreamStream, TunnelError> {
    let b = &backend.backend;
    let (host, port) =
        split_host_port(&b.node_proxy).ok_or_else(|| TunnelError::Addr(b.node_proxy.clone()))?;
    match b.transport {
        Transport::Plain => Ok(connector.connect(host, port, false).await?),
        Transport::Mtls => {
            let mut s = connector.connect(host, port, true).await?;
            let req = format!(
                "CONNECT {id} HTTP/1.1\r\nHost: {id}\r\n{INSTANCE_HEADER}: {id}\r\n\r\n",
                id = b.instance_id
            );
            s.write_all(req.as_bytes()).await?;
            // Read the response head byte by byte so no tunnelled byte is lost.
            let mut head = Vec::with_capacity(128);
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() > 8192 {
                    return Err(TunnelError::Refused("response head too long".into()));
                }
                let mut byte = [0u8; 1];
                if s.read(&mut byte).await? == 0 {
                    return Err(TunnelError::Refused("connection closed".into()));
                }
                head.push(byte[0]);
            }
            let status_line =
                String::from_utf8_lossy(head.split(|&c| c == b'\r').next().unwrap_or_default())
                    .into_owned();
            if !status_line.starts_with("HTTP/1.1 200") {
                return Err(TunnelError::Refused(status_line));
            }
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn extracts_sni_from_a_real_client_hello() {
        // Capture what a real rustls client sends.
        let (mut client_side, mut server_side) = tokio::io::duplex(64 * 1024);
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let name = rustls_pki_types::ServerName::try_from("Pass.Example.com").unwrap();
        let client = tokio::spawn(async move {
            let _ = connector.connect(name, &mut client_side).await;
        });
        let (bytes, hello) = read_client_hello(&mut server_side).await.unwrap();
        assert_eq!(hello, Hello::Complete(Some("pass.example.com".into())));
        // Every prefix is incomplete, never a wrong answer.
        for n in 0..bytes.len() {
            assert_eq!(parse_client_hello(&bytes[..n]), Hello::Incomplete);
        }
        drop(server_side);
        client.await.unwrap();
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
    }
}
