//! Connections from the edge to backends: mTLS to node-proxies, or plain TCP
//! to loopback instances. Pooled by `scheme://host:port` in hyper-util's
//! client, so all instances behind one node-proxy share its connections.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why a connection to a backend could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URI has no host or port.
    #[error("backend URI {0} has no host:port")]
    BadUri(Uri),
    /// TCP connect failed.
    #[error("connect to {addr} failed")]
    Tcp {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// TCP connect took too long.
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    /// An mTLS backend was asked for but the edge has no client certificate.
    #[error("no edge client certificate configured; cannot reach mTLS backend {addr}")]
    NoClientCert { addr: String },
    /// The TLS handshake with the node-proxy failed.
    #[error("TLS handshake with {addr} failed")]
    Tls {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The host is not a valid TLS server name.
    #[error("{host:?} is not a valid TLS server name")]
    ServerName { host: String },
}

/// A hyper-util connector for backend URIs: `http://` is plain TCP,
/// `https://` is mTLS with the edge's client certificate.
#[derive(Clone)]
pub struct UpstreamConnector {
    tls: Option<TlsConnector>,
    connect_timeout: Duration,
}

impl UpstreamConnector {
    /// `tls` is the client config for node-proxies (None: mTLS backends fail
    /// with [`ConnectError::NoClientCert`]).
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, connect_timeout: Duration) -> Self {
        Self {
            tls: tls.map(TlsConnector::from),
            connect_timeout,
        }
    }

    /// Opens a raw stream to `host:port`, mTLS when `tls` is set. Used for
    /// passthrough tunnels as well as by the HTTP client.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        tls: bool,
    ) -> Result<UpstreamStream, ConnectError> {
        let addr = format!("{host}:{port}");
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
        {
            Err(_) => {
                return Err(ConnectError::Timeout {
                    addr,
                    after: self.connect_timeout,
                });
            }
            Ok(Err(source)) => return Err(ConnectError::Tcp { addr, source }),
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        if !tls {
            return Ok(UpstreamStream::Plain(tcp));
        }
        let Some(connector) = &self.tls else {
            return Err(ConnectError::NoClientCert { addr });
        };
        let name = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => {
                ServerName::try_from(host.to_owned()).map_err(|_| ConnectError::ServerName {
                    host: host.to_owned(),
                })?
            }
        };
        let handshake = connector.connect(name, tcp);
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Err(_) => Err(ConnectError::Timeout {
                addr,
                after: self.connect_timeout,
            }),
            Ok(Err(source)) => Err(ConnectError::Tls { addr, source }),
            Ok(Ok(s)) => Ok(UpstreamStream::Tls(Box::new(s))),
        }
    }
}

impl tower::Service<Uri> for UpstreamConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
                return Err(ConnectError::BadUri(uri));
            };
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            this.connect(&host, port, tls).await.map(TokioIo::new)
        })
    }
}

/// A connection to a backend.
pub enum UpstreamStream {
    /// Plain TCP (loopback only).
    Plain(TcpStream),
    /// mTLS to a node-proxy.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The rustls client config the edge uses towards node-proxies: trusts only
/// the cluster CA and presents the edge's client certificate.
pub fn mtls_client_config(
    ca_pem: &str,
    client: &crate::pki::IssuedCert,
) -> Result<Arc<rustls::ClientConfig>, crate::tls::TlsError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|_| crate::tls::TlsError::CaPem)?;
        roots.add(cert).map_err(crate::tls::TlsError::Rustls)?;
    }
    if roots.is_empty() {
        return Err(crate::tls::TlsError::CaPem);
    }
    let (chain, key) = client.to_rustls()?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(crate::tls::TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(crate::tls::TlsError::Rustls)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
