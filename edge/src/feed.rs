//! The route feed: the captain's SSE stream (see [`crate::routes`]) in, the
//! live [`Routes`] and the on-disk cache out.
//!
//! At start the edge loads the cached table (if any) and serves from it
//! before the captain answers; each valid table from the stream is swapped in
//! and then written to the cache (temp file, fsync, rename). A broken stream
//! is reopened with capped exponential backoff; a stream silent for longer
//! than [`FeedConfig::idle_timeout`] is treated as broken (the captain sends a
//! `: keepalive` comment every 15 s).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::routes::{RouteTable, RouteTableError, STREAM_PATH, SseError, SseParser};
use crate::table::Routes;

/// Feed failures.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The cache file could not be read.
    #[error("cannot read route cache {path}")]
    ReadCache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The cache file holds no valid table.
    #[error("route cache {path} is invalid")]
    BadCache {
        path: PathBuf,
        #[source]
        source: RouteTableError,
    },
    /// The cache file could not be written.
    #[error("cannot write route cache")]
    WriteCache(#[source] crate::pki::PkiError),
    /// HTTP to the captain failed.
    #[error("route stream request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The captain answered with an error status.
    #[error("route stream {url} answered {status}")]
    Status { url: String, status: u16 },
    /// The stream is not a valid event stream.
    #[error("route stream is malformed")]
    Sse(#[from] SseError),
    /// Nothing arrived for too long.
    #[error("route stream silent for {0:?}")]
    Idle(Duration),
    /// The captain closed the stream.
    #[error("route stream closed by the captain")]
    Closed,
    /// No captain to follow.
    #[error("no captain given")]
    NoCaptain,
    /// The captain CA is not valid PEM.
    #[error("captain CA certificate is not valid PEM")]
    CaPem(#[source] reqwest::Error),
}

/// Where and how to follow the captain.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// The captains' base URLs (`https://captain:8443`): the stream is read
    /// from one, the next is tried when it fails.
    pub captains: Arc<crate::member::Captains>,
    /// Bearer token.
    pub token: String,
    /// Where the last good table is kept.
    pub cache_path: Option<PathBuf>,
    /// Extra CA (PEM) trusted for the captain's HTTPS.
    pub captain_ca_pem: Option<String>,
    /// A stream silent for this long is reopened.
    pub idle_timeout: Duration,
    /// Longest wait between reconnects.
    pub max_backoff: Duration,
}

/// Loads the cached table; `Ok(None)` when there is no cache yet.
pub fn load_cache(path: &Path) -> Result<Option<RouteTable>, FeedError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FeedError::ReadCache {
                path: path.to_owned(),
                source,
            });
        }
    };
    RouteTable::from_json(&bytes)
        .map(Some)
        .map_err(|source| FeedError::BadCache {
            path: path.to_owned(),
            source,
        })
}

/// Writes the table to the cache atomically.
pub fn save_cache(path: &Path, table: &RouteTable) -> Result<(), FeedError> {
    crate::pki::write_atomic(path, &table.to_json(), 0o600).map_err(FeedError::WriteCache)
}

/// Follows the captain's stream until `shutdown`, swapping every valid table
/// into `routes` and the cache.
pub async fn follow(
    cfg: FeedConfig,
    routes: Arc<Routes>,
    shutdown: CancellationToken,
) -> Result<(), FeedError> {
    crate::tls::install_default_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    if let Some(pem) = &cfg.captain_ca_pem {
        let cert = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(FeedError::CaPem)?;
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().map_err(|source| FeedError::Http {
        url: STREAM_PATH.to_string(),
        source,
    })?;
    let mut backoff = Duration::from_millis(200);
    loop {
        let (index, Some(captain)) = cfg.captains.current() else {
            return Err(FeedError::NoCaptain);
        };
        let url = format!("{}{}", captain.trim_end_matches('/'), STREAM_PATH);
        let res = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            res = stream_once(&client, &url, &cfg, &routes) => res,
        };
        match res {
            Ok(got_table) => {
                if got_table {
                    backoff = Duration::from_millis(200);
                }
            }
            Err(err) => {
                // The next captain is tried at once; the backoff grows only
                // when a whole round failed.
                cfg.captains.failed(index);
                tracing::warn!(error = %crate::proxy::error_chain(&err), retry_in = ?backoff, "route stream interrupted; serving the last table");
                if cfg.captains.all().len() > 1 && (index + 1) % cfg.captains.all().len() != 0 {
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
}

/// One connection to the stream. Returns `Ok(true)` if at least one table was
/// applied before the stream ended cleanly.
async fn stream_once(
    client: &reqwest::Client,
    url: &str,
    cfg: &FeedConfig,
    routes: &Routes,
) -> Result<bool, FeedError> {
    let http_err = |source| FeedError::Http {
        url: url.to_owned(),
        source,
    };
    let resp = tokio::time::timeout(
        cfg.idle_timeout,
        client
            .get(url)
            .bearer_auth(&cfg.token)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send(),
    )
    .await
    .map_err(|_| FeedError::Idle(cfg.idle_timeout))?
    .map_err(http_err)?;
    if !resp.status().is_success() {
        return Err(FeedError::Status {
            url: url.to_owned(),
            status: resp.status().as_u16(),
        });
    }
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::default();
    let mut applied = false;
    loop {
        let chunk = match tokio::time::timeout(cfg.idle_timeout, body.next()).await {
            Err(_) => return Err(FeedError::Idle(cfg.idle_timeout)),
            Ok(None) => {
                return if applied {
                    Ok(true)
                } else {
                    Err(FeedError::Closed)
                };
            }
            Ok(Some(Err(e))) => return Err(http_err(e)),
            Ok(Some(Ok(chunk))) => chunk,
        };
        for data in parser.push(&chunk)? {
            match RouteTable::from_json(data.as_bytes()) {
                Ok(table) => {
                    apply(routes, &table, cfg.cache_path.as_deref());
                    applied = true;
                }
                Err(err) => {
                    tracing::warn!(error = %crate::proxy::error_chain(&err), "ignoring an invalid route table from the captain");
                }
            }
        }
    }
}

/// Swaps a table in and writes it to the cache (a failed write is logged;
/// serving never waits for the disk to be fixed).
pub fn apply(routes: &Routes, table: &RouteTable, cache: Option<&Path>) {
    let previous = routes.load().version;
    routes.replace(table);
    tracing::info!(
        version = table.version,
        previous,
        routes = table.routes.len(),
        "route table applied"
    );
    if let Some(path) = cache
        && let Err(err) = save_cache(path, table)
    {
        tracing::error!(error = %crate::proxy::error_chain(&err), "could not write the route cache");
    }
}
