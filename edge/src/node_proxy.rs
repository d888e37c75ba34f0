//! The node-proxy: the mTLS server the follower runs on every node. It is the
//! only way into the node's instances from the edge.
//!
//! - Accepts only TLS clients presenting a certificate signed by the cluster
//!   CA with the clientAuth usage (the edge's, see [`crate::pki`]); anything
//!   else fails the handshake and never reaches HTTP.
//! - Every request names its instance in [`INSTANCE_HEADER`]; the follower
//!   supplies the [`InstanceResolver`] that maps it to the instance's address.
//! - Plain requests and upgrades (websockets) are forwarded over HTTP/1.1;
//!   `CONNECT` opens a raw tunnel to the instance (TLS passthrough routes).
//! - When the instance refuses the connection, the answer is a 502 with
//!   `x-zeitwork-upstream: connect-failed`, so the edge can try another one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::forward::{is_upgrade_request, splice_upgrades, strip_hop_by_hop};
use crate::pki::IssuedCert;
use crate::proxy::{UPSTREAM_CONNECT_FAILED, UPSTREAM_STATUS_HEADER, error_chain};
use crate::routes::INSTANCE_HEADER;
use crate::tls::{TlsError, provider};

/// Maps an instance id to the address its app listens on.
pub trait InstanceResolver: Send + Sync + 'static {
    /// The instance's address, or None when this node does not run it.
    fn resolve(&self, instance_id: &str) -> Option<SocketAddr>;
}

impl<F> InstanceResolver for F
where
    F: Fn(&str) -> Option<SocketAddr> + Send + Sync + 'static,
{
    fn resolve(&self, instance_id: &str) -> Option<SocketAddr> {
        self(instance_id)
    }
}

/// Node-proxy tunables.
#[derive(Debug, Clone)]
pub struct NodeProxyConfig {
    /// Open connections from edges.
    pub max_connections: usize,
    /// TLS handshake timeout.
    pub handshake_timeout: Duration,
    /// Request head timeout (also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// Connect timeout towards an instance.
    pub connect_timeout: Duration,
}

impl Default for NodeProxyConfig {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

/// The node-proxy server.
pub struct NodeProxy {
    tls: tokio_rustls::TlsAcceptor,
    resolver: Arc<dyn InstanceResolver>,
    client: Client<HttpConnector, Incoming>,
    config: NodeProxyConfig,
    conns: Arc<Semaphore>,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

type NpBody = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: &'static str) -> Response<NpBody> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(msg.as_bytes()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// The rustls server config of a node-proxy: `server` is the node's
/// certificate; clients must present a clientAuth certificate signed by the
/// CA in `ca_pem`.
pub fn server_config(
    ca_pem: &str,
    server: &IssuedCert,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|_| TlsError::CaPem)?)
            .map_err(TlsError::Rustls)?;
    }
    if roots.is_empty() {
        return Err(TlsError::CaPem);
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(TlsError::Verifier)?;
    let (chain, key) = server.to_rustls()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

impl NodeProxy {
    /// A node-proxy with the node's certificate, trusting edges signed by
    /// the CA in `ca_pem`.
    pub fn new(
        ca_pem: &str,
        server: &IssuedCert,
        resolver: Arc<dyn InstanceResolver>,
        config: NodeProxyConfig,
    ) -> Result<Arc<Self>, TlsError> {
        let tls = server_config(ca_pem, server)?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(http);
        Ok(Arc::new(Self {
            tls: tokio_rustls::TlsAcceptor::from(tls),
            resolver,
            client,
            conns: Arc::new(Semaphore::new(config.max_connections)),
            config,
        }))
    }

    /// Serves until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let (stream, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                res = listener.accept() => match res {
                    Ok(p) => p,
                    Err(err) => {
                        tracing::warn!(error = %err, "node-proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                tracing::warn!(client = %remote, "node-proxy connection limit reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                this.connection(stream, remote, shutdown).await;
                drop(permit);
            });
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        remote: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let tls = match tokio::time::timeout(self.config.handshake_timeout, self.tls.accept(stream))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                tracing::warn!(client = %remote, error = %err, "node-proxy refused a client (TLS)");
                return;
            }
            Err(_) => {
                tracing::warn!(client = %remote, "node-proxy TLS handshake timed out");
                return;
            }
        };
        let this = self.clone();
        let svc = service_fn(move |req| this.clone().handle(req));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_timeout)
            .serve_connection(TokioIo::new(tls), svc)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let res = tokio::select! {
            r = conn.as_mut() => r,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(err) = res {
            tracing::debug!(client = %remote, error = %err, "node-proxy connection ended with an error");
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<NpBody>, std::convert::Infallible> {
        let Some(instance) = req
            .headers()
            .get(INSTANCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "missing x-zeitwork-instance\n",
            ));
        };
        let Some(addr) = self.resolver.resolve(&instance) else {
            let mut r = text(StatusCode::BAD_GATEWAY, "instance not on this node\n");
            r.headers_mut().insert(
                UPSTREAM_STATUS_HEADER,
                HeaderValue::from_static(UPSTREAM_CONNECT_FAILED),
            );
            return Ok(r);
        };
        if req.method() == Method::CONNECT {
            return Ok(self.tunnel(req, addr, instance).await);
        }
        let upgrade = is_upgrade_request(req.version(), req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(INSTANCE_HEADER);
        parts.version = Version::HTTP_11;
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(pq)
            .build()
        {
            Ok(u) => u,
            Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "invalid request target\n")),
        };
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(mut resp) => {
                let is_101 = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                if is_101 && let Some(cu) = client_upgrade {
                    let uu = hyper::upgrade::on(&mut resp);
                    splice_upgrades(cu, uu, instance);
                }
                let (mut rparts, body) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers, is_101);
                Ok(Response::from_parts(rparts, body.boxed()))
            }
            Err(err) => {
                let connect = err.is_connect();
                tracing::warn!(instance, %addr, error = %error_chain(&err), "node-proxy could not reach the instance");
                let mut r = text(StatusCode::BAD_GATEWAY, "instance unreachable\n");
                if connect {
                    r.headers_mut().insert(
                        UPSTREAM_STATUS_HEADER,
                        HeaderValue::from_static(UPSTREAM_CONNECT_FAILED),
                    );
                }
                Ok(r)
            }
        }
    }

    async fn tunnel(
        &self,
        req: Request<Incoming>,
        addr: SocketAddr,
        instance: String,
    ) -> Response<NpBody> {
        let upstream =
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => s,
                _ => {
                    let mut r = text(StatusCode::BAD_GATEWAY, "instance unreachable\n");
                    r.headers_mut().insert(
                        UPSTREAM_STATUS_HEADER,
                        HeaderValue::from_static(UPSTREAM_CONNECT_FAILED),
                    );
                    return r;
                }
            };
        let _ = upstream.set_nodelay(true);
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let Ok(client) = on_upgrade.await else { return };
            let mut client = TokioIo::new(client);
            let mut upstream = upstream;
            if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(instance, error = %err, "tunnel ended");
            }
        });
        Response::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed())
    }
}
