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

/// The edge's client certificate towards node-proxies, swapped when it is
/// renewed (connections made afterwards present the new one).
#[derive(Debug)]
pub struct ClientCert(arc_swap::ArcSwap<rustls::sign::CertifiedKey>);

impl ClientCert {
    pub fn new(cert: &crate::pki::IssuedCert) -> Result<Arc<ClientCert>, crate::tls::TlsError> {
        Ok(Arc::new(ClientCert(arc_swap::ArcSwap::new(
            cert.certified_key()?,
        ))))
    }

    pub fn set(&self, cert: &crate::pki::IssuedCert) -> Result<(), crate::tls::TlsError> {
        self.0.store(cert.certified_key()?);
        Ok(())
    }
}

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The rustls client config the edge uses towards node-proxies: trusts only
/// the cluster CA and presents the edge's client certificate.
pub fn mtls_client_config(
    ca_pem: &str,
    client: &crate::pki::IssuedCert,
) -> Result<Arc<rustls::ClientConfig>, crate::tls::TlsError> {
    mtls_client_config_with(ca_pem, ClientCert::new(client)?)
}

/// [`mtls_client_config`] with a certificate that can be swapped.
pub fn mtls_client_config_with(
    ca_pem: &str,
    client: Arc<ClientCert>,
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
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(crate::tls::TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_client_cert_resolver(client);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Body type the edge sends upstream.
pub type UpstreamBody =
    http_body_util::Either<hyper::body::Incoming, http_body_util::Empty<bytes::Bytes>>;

type Sender = hyper::client::conn::http1::SendRequest<UpstreamBody>;
/// Idle connections by `host:port`, one map per transport (plain, mTLS).
type IdleMap = std::collections::HashMap<Arc<str>, Vec<(Sender, std::time::Instant)>>;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made; the request was not sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The HTTP/1 handshake on a new connection failed; not sent.
    #[error("HTTP handshake with the backend failed")]
    Handshake(#[source] hyper::Error),
    /// The exchange failed after the request was (maybe) sent.
    #[error("backend exchange failed")]
    Exchange(#[source] hyper::Error),
}

impl SendError {
    /// True when the request surely never reached the backend.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Handshake(_))
    }
}

/// HTTP/1.1 connections to backends, kept alive and reused. Keyed by
/// transport and `host:port`, so instances behind one node-proxy share them.
///
/// A connection goes back to the pool only once its response body has been
/// read to the end ([`Checkin`]); an upgraded or abandoned connection is
/// never reused.
pub struct Pool {
    connector: UpstreamConnector,
    idle: std::sync::Mutex<[IdleMap; 2]>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// Returns a connection to the pool when dropped after [`Checkin::done`].
pub struct Checkin {
    pool: Arc<Pool>,
    tls: bool,
    key: Arc<str>,
    sender: Option<Sender>,
}

impl Checkin {
    /// The response was read completely: the connection can serve another.
    pub fn done(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.put(self.tls, &self.key, sender);
        }
    }
}

impl Pool {
    /// A pool that connects with `connector`.
    pub fn new(connector: UpstreamConnector, max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            connector,
            idle: Default::default(),
            max_idle,
            idle_timeout,
        })
    }

    fn take(&self, tls: bool, key: &str) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle[usize::from(tls)].get_mut(key)?;
        while let Some((sender, since)) = list.pop() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, tls: bool, key: &Arc<str>, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let map = &mut idle[usize::from(tls)];
        let list = match map.get_mut(&**key) {
            Some(list) => list,
            None => map.entry(key.clone()).or_default(),
        };
        if list.len() < self.max_idle {
            list.push((sender, std::time::Instant::now()));
        }
    }

    async fn connect(&self, tls: bool, host: &str, port: u16) -> Result<Sender, SendError> {
        let stream = self.connector.connect(host, port, tls).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(error = %err, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, Host set) to `host:port` (`key` is
    /// that address as the route table spells it); `tls` selects mTLS. A
    /// pooled connection that turns out to be closed is replaced by a fresh
    /// one without the request being lost. When the request surely never
    /// left ([`SendError::is_connect`]), it is handed back for a retry.
    pub async fn send(
        self: &Arc<Self>,
        tls: bool,
        key: &Arc<str>,
        host: &str,
        port: u16,
        mut req: http::Request<UpstreamBody>,
    ) -> Result<
        (http::Response<hyper::body::Incoming>, Checkin),
        (SendError, Option<http::Request<UpstreamBody>>),
    > {
        // Pooled connections first; each failure that hands the request
        // back moves on to the next, then to a new connection.
        loop {
            let (mut sender, fresh) = match self.take(tls, key) {
                Some(s) => (s, false),
                // Boxed: the connect (and mTLS handshake) future is large,
                // and rarely needed; inline it would be moved around with
                // every request's future.
                None => match Box::pin(self.connect(tls, host, port)).await {
                    Ok(s) => (s, true),
                    Err(e) => return Err((e, Some(req))),
                },
            };
            if sender.ready().await.is_err() {
                if fresh {
                    let err = SendError::Connect(ConnectError::Tcp {
                        addr: key.to_string(),
                        source: io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "closed right after connect",
                        ),
                    });
                    return Err((err, Some(req)));
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let checkin = Checkin {
                        pool: self.clone(),
                        tls,
                        key: key.clone(),
                        sender: Some(sender),
                    };
                    return Ok((resp, checkin));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => req = back,
                    _ => return Err((SendError::Exchange(e.into_error()), None)),
                },
            }
        }
    }
}

/// Idle backend connections for the edge's own HTTP/1.1 path
/// ([`crate::h1`]), which writes request heads itself instead of going
/// through hyper's client. Keyed like [`Pool`] (transport and
/// `host:port`); most recently used first out, so a few connections stay
/// hot and the rest age out.
/// (The node-proxy keeps one too, keyed by instance address.)
pub struct RawPool<K = Arc<str>> {
    idle: std::sync::Mutex<[RawIdleMap<K>; 2]>,
    max_idle: usize,
    idle_timeout: Duration,
}

type RawIdleMap<K> = std::collections::HashMap<K, Vec<(UpstreamStream, std::time::Instant)>>;

/// A pooled connection idle for less than this is used without first
/// checking that the backend has not closed it (the check costs a system
/// call per request); a request that then finds it closed before any byte of
/// a response came is sent again on a new connection when it is idempotent.
pub const RAW_POOL_TRUST: Duration = Duration::from_secs(1);

impl<K: std::hash::Hash + Eq + Clone> RawPool<K> {
    /// An empty pool.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Default::default(),
            max_idle,
            idle_timeout,
        }
    }

    /// An idle connection to `key`, if one is usable: not older than the
    /// idle timeout and, when `check` is set or it has been idle for a while,
    /// not closed by the backend. Also says how long it was idle.
    pub fn take<Q>(&self, tls: bool, key: &Q, check: bool) -> Option<UpstreamStream>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        loop {
            let (conn, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle[usize::from(tls)].get_mut(key)?.pop()?
            };
            let age = since.elapsed();
            if age >= self.idle_timeout {
                // The rest of the list is older still.
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(list) = idle[usize::from(tls)].get_mut(key) {
                    list.clear();
                }
                return None;
            }
            if (check || age >= RAW_POOL_TRUST) && !conn.is_open() {
                continue;
            }
            return Some(conn);
        }
    }

    /// Returns a connection whose last exchange ended cleanly.
    pub fn put(&self, tls: bool, key: &K, conn: UpstreamStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let map = &mut idle[usize::from(tls)];
        let list = match map.get_mut(key) {
            Some(list) => list,
            None => map.entry(key.clone()).or_default(),
        };
        if list.len() >= self.max_idle {
            // Drop the oldest.
            list.remove(0);
        }
        list.push((conn, std::time::Instant::now()));
    }
}

impl UpstreamStream {
    /// False when the backend has closed the connection or sent something
    /// unasked (either way it cannot carry another exchange). One
    /// non-blocking `recv(MSG_PEEK)`: the runtime's readiness flags may not
    /// have seen a close that just arrived.
    pub fn is_open(&self) -> bool {
        use std::os::fd::AsRawFd;
        let tcp = match self {
            UpstreamStream::Plain(s) => s,
            UpstreamStream::Tls(s) => s.get_ref().0,
        };
        let mut byte = 0u8;
        // SAFETY: the descriptor is open for the lifetime of `tcp`; the
        // buffer is one valid byte.
        let n = unsafe {
            libc::recv(
                tcp.as_raw_fd(),
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }
}
