//! TLS termination: the SNI certificate resolver and the rustls server
//! configuration.
//!
//! Certificates are looked up, in order: an ACME TLS-ALPN-01 challenge (when
//! the client offers only `acme-tls/1`), installed certificates (ACME or
//! loaded from disk; exact name, then `*.parent`), then the local
//! development CA, which issues and caches a certificate on first use for
//! `localhost`, `*.localhost`, configured names and names in the route table;
//! last, the fallback certificate (`--tls-cert`), if one is set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::pki::{Ca, PkiError};
use crate::routes::normalize_host;
use crate::table::Routes;

/// ALPN protocol id of ACME TLS-ALPN-01 (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Most certificates the local CA keeps issued at once.
const LOCAL_CACHE_MAX: usize = 10_000;

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("rustls configuration")]
    Rustls(#[source] rustls::Error),
    /// A certificate or key is unusable.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A CA PEM holds no certificate.
    #[error("CA PEM holds no valid certificate")]
    CaPem,
    /// The client verifier could not be built.
    #[error("client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// The crypto provider used everywhere in the edge (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide rustls provider, for libraries that use the
/// process default (reqwest, instant-acme). Both ring and aws-lc-rs are
/// compiled into the workspace, so rustls cannot pick one by itself.
/// Idempotent; a provider installed earlier by someone else is kept.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Picks a certificate for each handshake by SNI.
pub struct CertResolver {
    installed: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    fallback: ArcSwap<Option<Arc<CertifiedKey>>>,
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    local: Option<LocalIssuer>,
    routes: Arc<Routes>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

struct LocalIssuer {
    ca: Ca,
    names: Vec<String>,
    cache: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl LocalIssuer {
    fn allowed(&self, name: &str, routes: &Routes) -> bool {
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        let parent = name.split_once('.').map(|(_, p)| p);
        let configured = self.names.iter().any(|n| {
            n == name
                || n.strip_prefix("*.")
                    .is_some_and(|suffix| Some(suffix) == parent)
        });
        configured || routes.load().knows(name)
    }

    fn get(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.get(name) {
            return Some(k.clone());
        }
        let issued = match self
            .ca
            .issue_server(&[name.to_owned()])
            .and_then(|c| c.certified_key())
        {
            Ok(k) => k,
            Err(err) => {
                tracing::warn!(name, error = %crate::proxy::error_chain(&err), "local CA could not issue a certificate");
                return None;
            }
        };
        if cache.len() >= LOCAL_CACHE_MAX {
            cache.clear();
        }
        cache.insert(name.to_owned(), issued.clone());
        Some(issued)
    }
}

impl CertResolver {
    /// A resolver. `local_ca` enables on-demand certificates for
    /// development names (`local_names` are extra names or `*.parent`
    /// patterns it may issue for).
    pub fn new(routes: Arc<Routes>, local_ca: Option<Ca>, local_names: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            installed: ArcSwap::from_pointee(HashMap::new()),
            fallback: ArcSwap::from_pointee(None),
            challenges: Mutex::new(HashMap::new()),
            local: local_ca.map(|ca| LocalIssuer {
                ca,
                names: local_names.iter().map(|n| normalize_host(n)).collect(),
                cache: Mutex::new(HashMap::new()),
            }),
            routes,
        })
    }

    /// Installs (or replaces) the certificate for `name` (`*.parent` allowed).
    pub fn install(&self, name: &str, key: Arc<CertifiedKey>) {
        let name = normalize_host(name);
        self.installed.rcu(|cur| {
            let mut next = HashMap::clone(cur);
            next.insert(name.clone(), key.clone());
            next
        });
    }

    /// Sets the certificate served when no other matches (or the client
    /// sent no SNI), like a default server.
    pub fn set_fallback(&self, key: Option<Arc<CertifiedKey>>) {
        self.fallback.store(Arc::new(key));
    }

    /// The certificate installed for exactly `name`, if any.
    pub fn installed(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.installed.load().get(&normalize_host(name)).cloned()
    }

    /// Sets the TLS-ALPN-01 challenge certificate for `name` (None removes).
    pub fn set_challenge(&self, name: &str, key: Option<Arc<CertifiedKey>>) {
        let mut c = self.challenges.lock().unwrap_or_else(|e| e.into_inner());
        match key {
            Some(k) => c.insert(normalize_host(name), k),
            None => c.remove(&normalize_host(name)),
        };
    }

    fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let installed = self.installed.load();
        if let Some(k) = installed.get(name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = installed.get(&format!("*.{parent}"))
        {
            return Some(k.clone());
        }
        if let Some(local) = &self.local
            && local.allowed(name, &self.routes)
            && let Some(k) = local.get(name)
        {
            return Some(k);
        }
        self.fallback.load().as_ref().clone()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().map(normalize_host) else {
            return self.fallback.load().as_ref().clone();
        };
        let acme = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
        if acme {
            let c = self.challenges.lock().unwrap_or_else(|e| e.into_inner());
            return c.get(&name).cloned();
        }
        self.lookup(&name)
    }
}

/// The edge's TLS server configuration: TLS 1.2 and 1.3, ALPN `h2`,
/// `http/1.1` (and `acme-tls/1` for challenges), certificates by SNI.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}
