//! ACME certificates (instant-acme) for the domains in the route table,
//! answered with HTTP-01 (served by the proxy on plain HTTP) or TLS-ALPN-01
//! (served by the certificate resolver), renewed before expiry, and stored
//! so they survive restarts.
//!
//! Storage under `state_dir`: `account.json` (account credentials, 0600) and
//! `certs/<domain>.crt|.key` (0600 key). On start every stored certificate
//! is installed at once; [`AcmeManager::run`] then orders certificates for
//! route domains that have none or whose certificate expires within
//! [`AcmeConfig::renew_before`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::pki::{IssuedCert, PkiError, write_atomic};
use crate::routes::RouteKind;
use crate::table::Routes;
use crate::tls::CertResolver;

/// Path prefix of HTTP-01 challenges.
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// ACME failures.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server or client failed.
    #[error("ACME {step} failed")]
    Acme {
        step: &'static str,
        #[source]
        source: instant_acme::Error,
    },
    /// The order ended in a state other than ready.
    #[error("ACME order for {domain} ended {status:?}")]
    Order { domain: String, status: OrderStatus },
    /// The CA offered no challenge of the configured type.
    #[error("ACME server offered no {kind:?} challenge for {domain}")]
    NoChallenge { domain: String, kind: ChallengeType },
    /// An authorization is in a state that cannot be completed.
    #[error("ACME authorization for {domain} is {status:?}")]
    Authorization {
        domain: String,
        status: AuthorizationStatus,
    },
    /// Certificate handling.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The stored account cannot be read.
    #[error("ACME account file {path} is unreadable")]
    Account {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The challenge certificate could not be built.
    #[error("TLS-ALPN-01 certificate")]
    ChallengeCert(#[source] rcgen::Error),
    /// The certificate's expiry could not be read.
    #[error("cannot read the expiry of the certificate for {domain}")]
    Expiry { domain: String },
}

fn acme(step: &'static str) -> impl FnOnce(instant_acme::Error) -> AcmeError {
    move |source| AcmeError::Acme { step, source }
}

/// Which challenge the edge answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Challenge {
    /// `http://<domain>/.well-known/acme-challenge/<token>` on port 80.
    Http01,
    /// A special certificate over ALPN `acme-tls/1` on port 443.
    TlsAlpn01,
}

/// ACME settings.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// Directory URL (Let's Encrypt, its staging, or pebble).
    pub directory_url: String,
    /// Contact URIs (`mailto:...`).
    pub contact: Vec<String>,
    /// PEM file of the ACME server's own HTTPS root (pebble), if not public.
    pub server_root: Option<PathBuf>,
    /// Where the account and certificates are kept.
    pub state_dir: PathBuf,
    /// Renew when the certificate expires within this.
    pub renew_before: Duration,
    /// Challenge type.
    pub challenge: Challenge,
    /// How often the route table is scanned for domains needing a certificate.
    pub scan_interval: Duration,
    /// Wait before retrying a domain whose order failed.
    pub retry_after_failure: Duration,
}

/// Pending HTTP-01 tokens, answered by the proxy.
#[derive(Debug, Default)]
pub struct Http01Tokens {
    tokens: RwLock<HashMap<String, String>>,
}

impl Http01Tokens {
    /// The key authorization for a token, if one is pending.
    pub fn get(&self, token: &str) -> Option<String> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }
    /// Adds (Some) or removes (None) a pending token.
    pub fn set(&self, token: &str, key_auth: Option<String>) {
        let mut t = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        match key_auth {
            Some(k) => t.insert(token.to_owned(), k),
            None => t.remove(token),
        };
    }
}

/// Obtains and renews certificates.
pub struct AcmeManager {
    config: AcmeConfig,
    resolver: Arc<CertResolver>,
    tokens: Arc<Http01Tokens>,
    account: tokio::sync::OnceCell<Account>,
    expiry: Mutex<HashMap<String, OffsetDateTime>>,
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn cert_dir(cfg: &AcmeConfig) -> PathBuf {
    cfg.state_dir.join("certs")
}

fn expiry_of(domain: &str, cert: &IssuedCert) -> Result<OffsetDateTime, AcmeError> {
    let (chain, _) = cert.to_rustls()?;
    not_after(&chain[0]).ok_or_else(|| AcmeError::Expiry {
        domain: domain.to_owned(),
    })
}

/// Reads `tbsCertificate.validity.notAfter` from a DER certificate
/// (RFC 5280 4.1).
pub fn not_after(der: &[u8]) -> Option<OffsetDateTime> {
    // Returns (tag, content, rest) of one DER element.
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)? as usize;
        let (len, hdr) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *b.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let content = b.get(hdr..hdr + len)?;
        Some((tag, content, &b[hdr + len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    let (_, _, r) = tlv(rest)?; // serial
    let (_, _, r) = tlv(r)?; // signature algorithm
    let (_, _, r) = tlv(r)?; // issuer
    let (_, validity, _) = tlv(r)?;
    let (_, _, r) = tlv(validity)?; // notBefore
    let (tag, t, _) = tlv(r)?;
    let t = std::str::from_utf8(t).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = t.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, t.get(2..)?)
        }
        0x18 => (t.get(..4)?.parse().ok()?, t.get(4..)?),
        _ => return None,
    };
    let num = |i: usize| -> Option<u8> { rest.get(i..i + 2)?.parse().ok() };
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(num(0)?).ok()?, num(2)?).ok()?;
    let tod = time::Time::from_hms(num(4)?, num(6)?, num(8)?).ok()?;
    Some(time::PrimitiveDateTime::new(date, tod).assume_utc())
}

impl AcmeManager {
    /// Creates the manager and installs every stored certificate.
    pub fn new(
        config: AcmeConfig,
        resolver: Arc<CertResolver>,
        tokens: Arc<Http01Tokens>,
    ) -> Arc<Self> {
        crate::tls::install_default_provider();
        let this = Arc::new(Self {
            config,
            resolver,
            tokens,
            account: tokio::sync::OnceCell::new(),
            expiry: Mutex::new(HashMap::new()),
        });
        this.load_stored();
        this
    }

    fn load_stored(&self) {
        let dir = cert_dir(&self.config);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(domain) = name.strip_suffix(".crt") else {
                continue;
            };
            match IssuedCert::load(&dir, domain).and_then(|c| Ok((c.certified_key()?, c))) {
                Ok((key, cert)) => match expiry_of(domain, &cert) {
                    Ok(exp) => {
                        self.resolver.install(domain, key);
                        self.expiry
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(domain.to_owned(), exp);
                        tracing::info!(domain, expires = %exp, "installed stored ACME certificate");
                    }
                    Err(err) => tracing::warn!(domain, error = %err, "ignoring stored certificate"),
                },
                Err(err) => {
                    tracing::warn!(domain, error = %crate::proxy::error_chain(&err), "ignoring stored certificate")
                }
            }
        }
    }

    /// Whether `domain` has a certificate that is not due for renewal.
    pub fn is_fresh(&self, domain: &str) -> bool {
        let exp = self
            .expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(domain)
            .copied();
        exp.is_some_and(|e| e - OffsetDateTime::now_utc() > self.config.renew_before)
    }

    async fn account(&self) -> Result<&Account, AcmeError> {
        self.account
            .get_or_try_init(|| async {
                let path = self.config.state_dir.join("account.json");
                let builder = match &self.config.server_root {
                    Some(root) => Account::builder_with_root(root).map_err(acme("HTTP client"))?,
                    None => Account::builder().map_err(acme("HTTP client"))?,
                };
                if let Ok(bytes) = std::fs::read(&path) {
                    let creds = serde_json::from_slice(&bytes).map_err(|e| AcmeError::Account {
                        path: path.clone(),
                        source: Box::new(e),
                    })?;
                    return builder
                        .from_credentials(creds)
                        .await
                        .map_err(acme("restore account"));
                }
                let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
                let (account, creds) = builder
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory_url.clone(),
                        None,
                    )
                    .await
                    .map_err(acme("create account"))?;
                let json = serde_json::to_vec(&creds).expect("credentials serialise");
                write_atomic(&path, &json, 0o600)?;
                Ok(account)
            })
            .await
    }

    /// Orders a certificate for `domain` now, stores and installs it.
    pub async fn issue(&self, domain: &str) -> Result<(), AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(domain.to_owned())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(acme("new order"))?;
        let kind = match self.config.challenge {
            Challenge::Http01 => ChallengeType::Http01,
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let mut cleanup = Vec::new();
        let mut auths = order.authorizations();
        while let Some(auth) = auths.next().await {
            let mut auth = auth.map_err(acme("authorization"))?;
            match auth.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(AcmeError::Authorization {
                        domain: domain.to_owned(),
                        status,
                    });
                }
            }
            let mut challenge =
                auth.challenge(kind.clone())
                    .ok_or_else(|| AcmeError::NoChallenge {
                        domain: domain.to_owned(),
                        kind: kind.clone(),
                    })?;
            let key_auth = challenge.key_authorization();
            match self.config.challenge {
                Challenge::Http01 => {
                    self.tokens
                        .set(&challenge.token, Some(key_auth.as_str().to_owned()));
                    cleanup.push(challenge.token.clone());
                }
                Challenge::TlsAlpn01 => {
                    let key = alpn_challenge_cert(domain, key_auth.digest().as_ref())?;
                    self.resolver.set_challenge(domain, Some(key));
                }
            }
            challenge
                .set_ready()
                .await
                .map_err(acme("challenge ready"))?;
        }
        let policy = RetryPolicy::new().timeout(Duration::from_secs(60));
        let status = order.poll_ready(&policy).await.map_err(acme("poll order"));
        for token in cleanup {
            self.tokens.set(&token, None);
        }
        self.resolver.set_challenge(domain, None);
        let status = status?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order {
                domain: domain.to_owned(),
                status,
            });
        }
        let key_pem = order.finalize().await.map_err(acme("finalize"))?;
        let chain_pem = order
            .poll_certificate(&policy)
            .await
            .map_err(acme("download certificate"))?;
        let cert = IssuedCert { chain_pem, key_pem };
        let expires = expiry_of(domain, &cert)?;
        cert.save(&cert_dir(&self.config), domain)?;
        self.resolver.install(domain, cert.certified_key()?);
        self.expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(domain.to_owned(), expires);
        tracing::info!(domain, %expires, "ACME certificate installed");
        Ok(())
    }

    /// Keeps every HTTP route domain (not wildcards, not `*.localhost`)
    /// covered until `shutdown`.
    pub async fn run(self: Arc<Self>, routes: Arc<Routes>, shutdown: CancellationToken) {
        let mut failed: HashMap<String, tokio::time::Instant> = HashMap::new();
        loop {
            let router = routes.load();
            let wanted: Vec<String> = router
                .domains()
                .filter(|(d, kind)| {
                    *kind == RouteKind::Http
                        && !d.starts_with("*.")
                        && *d != "localhost"
                        && !d.ends_with(".localhost")
                })
                .map(|(d, _)| d.to_owned())
                .collect();
            for domain in wanted {
                if self.is_fresh(&domain)
                    || failed
                        .get(&domain)
                        .is_some_and(|t| t.elapsed() < self.config.retry_after_failure)
                {
                    continue;
                }
                let res = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = self.issue(&domain) => r,
                };
                match res {
                    Ok(()) => {
                        failed.remove(&domain);
                    }
                    Err(err) => {
                        tracing::warn!(domain, error = %crate::proxy::error_chain(&err), "ACME order failed; will retry");
                        failed.insert(domain, tokio::time::Instant::now());
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.scan_interval) => {}
            }
        }
    }
}

/// The self-signed certificate of RFC 8737 carrying the key authorization
/// digest in the acmeIdentifier extension.
fn alpn_challenge_cert(
    domain: &str,
    digest: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, AcmeError> {
    let mut params =
        CertificateParams::new(vec![domain.to_owned()]).map_err(AcmeError::ChallengeCert)?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let key = KeyPair::generate().map_err(AcmeError::ChallengeCert)?;
    let cert = params.self_signed(&key).map_err(AcmeError::ChallengeCert)?;
    let issued = IssuedCert {
        chain_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    Ok(issued.certified_key()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_not_after_of_issued_certificates() {
        let ca = crate::pki::Ca::generate("t").unwrap();
        let cert = ca.issue_server(&["a.test".into()]).unwrap();
        let exp = expiry_of("a.test", &cert).unwrap();
        let expected = OffsetDateTime::now_utc() + crate::pki::LEAF_VALIDITY;
        assert!(
            (exp - expected).abs() < time::Duration::minutes(5),
            "{exp} vs {expected}"
        );
        assert!(not_after(b"\x30\x03garbage").is_none());
    }
}
