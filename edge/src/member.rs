//! A host's membership of the cluster, from the host's side: a worker's
//! follower and an edge both join with a join token, keep what they got in
//! an enrolment file, renew their certificate before it expires, and fail
//! over between the captains they know.
//!
//! - **Join** ([`join`]): the host makes its key here (it never leaves the
//!   host), sends a certificate request with the join token as bearer to
//!   the first captain that answers, and gets a certificate of its role
//!   signed by the cluster CA, the CA certificate, a credential of its role
//!   and the captains' URLs. A captain that refuses (4xx: a used, expired
//!   or wrong-role token) is not asked again by the next captain: its
//!   answer is the cluster's.
//! - **The enrolment file** ([`ENROLMENT_FILE`], mode 0600, written
//!   atomically) holds all of it, key and credential included: a restarted
//!   host needs no token again.
//! - **Renewal** ([`keep_renewed`]): two thirds into its validity a new key
//!   and certificate are requested with the credential; a removed host is
//!   refused, keeps its certificate until it expires, and is then refused
//!   by every peer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api_types::cluster::{JoinRequest, Joined, RenewRequest, Renewed};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::pki::{IssuedCert, PkiError, Role, key_and_csr, write_atomic};

/// The enrolment file's name in a host's data directory.
pub const ENROLMENT_FILE: &str = "enrolment.json";

/// Membership failures.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an enrolment file")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the host's key or certificate")]
    Pki(#[from] PkiError),
    #[error("no captain given")]
    NoCaptain,
    /// Every captain failed to answer (connection, 5xx).
    #[error("no captain answered: {}", .tried.join("; "))]
    Unreachable { tried: Vec<String> },
    /// A captain answered with a refusal: its message says why.
    #[error("{url} refused ({status}): {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("reading the answer of {url}")]
    Answer {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the enrolment file is for a {found} but this host runs as a {wanted}")]
    WrongRole { found: String, wanted: String },
}

impl MemberError {
    /// The captains refused the credential or the host (removed from the
    /// cluster, or a token that cannot be used).
    pub fn is_refusal(&self) -> bool {
        matches!(self, MemberError::Refused { .. })
    }
}

/// What a host keeps of its membership.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolment {
    pub name: String,
    /// `worker` or `edge`.
    pub role: String,
    /// The captains' API URLs, for failover (the ones it was given first,
    /// then those the captains named).
    pub captains: Vec<String>,
    /// The credential for the captains' API.
    pub credential: String,
    /// A worker's node API key (the captains call its API with it).
    #[serde(default)]
    pub api_key: Option<String>,
    /// The meta repository a worker follows.
    #[serde(default)]
    pub meta_repo: Option<String>,
    /// The cluster CA.
    pub ca_pem: String,
    /// The host's certificate chain and key.
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds: when the certificate was received and when it expires.
    pub cert_issued_at: i64,
    pub cert_expires_at: i64,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("captains", &self.captains)
            .field("meta_repo", &self.meta_repo)
            .field("cert_expires_at", &self.cert_expires_at)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a host says about itself when it joins (a worker's node fields;
/// an edge sends its name and addresses only).
#[derive(Debug, Clone, Default)]
pub struct JoinParams {
    pub name: String,
    pub addresses: Vec<String>,
    pub api_url: String,
    pub proxy_addr: String,
    pub region: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub age_recipient: String,
}

/// The HTTP client for the captains' API.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(3))
        .build()
        .expect("a reqwest client with rustls builds")
}

/// `URL,URL,...` as a list (spaces and empty items dropped, no trailing
/// `/`).
pub fn parse_captains(list: &str) -> Vec<String> {
    list.split(',')
        .map(|s| s.trim().trim_end_matches('/'))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The error message of a captain's answer (`{"error":{"message":..}}`),
/// else the body's start.
fn message_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(300).collect())
}

/// Sends `body` to `path` of each captain in turn, starting at `start`,
/// until one answers; a 4xx answer is final. Returns the answer and the
/// index of the captain that gave it.
async fn post_any<B: Serialize, T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    captains: &[String],
    start: usize,
    path: &str,
    bearer: &str,
    body: &B,
) -> Result<(T, usize), MemberError> {
    if captains.is_empty() {
        return Err(MemberError::NoCaptain);
    }
    let mut tried = Vec::new();
    for k in 0..captains.len() {
        let i = (start + k) % captains.len();
        let url = format!("{}{path}", captains[i]);
        let resp = match http.post(&url).bearer_auth(bearer).json(body).send().await {
            Ok(r) => r,
            Err(e) => {
                tried.push(format!("{url}: {}", zw_util::ErrorChain(&e)));
                continue;
            }
        };
        let status = resp.status();
        if status.is_success() {
            let v = resp
                .json::<T>()
                .await
                .map_err(|source| MemberError::Answer { url, source })?;
            return Ok((v, i));
        }
        let text = resp.text().await.unwrap_or_default();
        if status.is_client_error() {
            return Err(MemberError::Refused {
                url,
                status: status.as_u16(),
                message: message_of(&text),
            });
        }
        tried.push(format!("{url}: {status} {}", message_of(&text)));
    }
    Err(MemberError::Unreachable { tried })
}

fn merge_captains(first: &[String], then: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in first.iter().chain(then) {
        let c = c.trim_end_matches('/').to_string();
        if !c.is_empty() && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// Join the cluster as `role` with a join token.
pub async fn join(
    http: &reqwest::Client,
    captains: &[String],
    token: &str,
    role: Role,
    p: JoinParams,
) -> Result<Enrolment, MemberError> {
    let (key_pem, csr_pem) = key_and_csr(&p.name)?;
    let req = JoinRequest {
        role: role.as_str().into(),
        name: p.name.clone(),
        csr_pem,
        addresses: p.addresses,
        api_url: p.api_url,
        proxy_addr: p.proxy_addr,
        region: p.region,
        cpus: p.cpus,
        memory_bytes: p.memory_bytes,
        disk_bytes: p.disk_bytes,
        age_recipient: p.age_recipient,
    };
    let (j, _): (Joined, _) = post_any(http, captains, 0, "/v1/cluster/join", token, &req).await?;
    let e = Enrolment {
        name: j.name,
        role: j.role,
        captains: merge_captains(captains, &j.captains),
        credential: j.credential,
        api_key: j.api_key,
        meta_repo: j.meta_repo,
        ca_pem: j.ca_pem,
        cert_pem: j.certificate_pem,
        key_pem,
        cert_issued_at: now_secs(),
        cert_expires_at: j.cert_expires_at,
    };
    e.issued().to_rustls()?;
    Ok(e)
}

impl Enrolment {
    /// The enrolment file at `path`, if there is one.
    pub fn load(path: &Path) -> Result<Option<Enrolment>, MemberError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(MemberError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let e: Enrolment = serde_json::from_slice(&bytes).map_err(|source| MemberError::Parse {
            path: path.into(),
            source,
        })?;
        e.issued().to_rustls()?;
        Ok(Some(e))
    }

    /// Writes the enrolment file (mode 0600, atomically).
    pub fn save(&self, path: &Path) -> Result<(), MemberError> {
        let bytes = serde_json::to_vec_pretty(self).expect("an enrolment serializes");
        write_atomic(path, &bytes, 0o600)?;
        Ok(())
    }

    /// Refuses an enrolment of another role than the one this host runs.
    pub fn check_role(&self, role: Role) -> Result<(), MemberError> {
        if self.role != role.as_str() {
            return Err(MemberError::WrongRole {
                found: self.role.clone(),
                wanted: role.as_str().into(),
            });
        }
        Ok(())
    }

    /// The host's certificate and key.
    pub fn issued(&self) -> IssuedCert {
        IssuedCert {
            chain_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }

    /// When to renew: two thirds into the certificate's validity.
    pub fn renew_at(&self) -> i64 {
        let span = (self.cert_expires_at - self.cert_issued_at).max(0);
        self.cert_issued_at + span * 2 / 3
    }

    /// A new key and certificate, asked of the captains with the
    /// credential (starting with captain `start`).
    pub async fn renew(
        &self,
        http: &reqwest::Client,
        start: usize,
    ) -> Result<Enrolment, MemberError> {
        let (key_pem, csr_pem) = key_and_csr(&self.name)?;
        let (r, _): (Renewed, _) = post_any(
            http,
            &self.captains,
            start,
            "/v1/cluster/renew",
            &self.credential,
            &RenewRequest { csr_pem },
        )
        .await?;
        let e = Enrolment {
            captains: merge_captains(&self.captains, &r.captains),
            ca_pem: r.ca_pem,
            cert_pem: r.certificate_pem,
            key_pem,
            cert_issued_at: now_secs(),
            cert_expires_at: r.cert_expires_at,
            ..self.clone()
        };
        e.issued().to_rustls()?;
        Ok(e)
    }
}

/// The captains of a host with the one that answered last first: callers
/// start there and move on when it fails.
#[derive(Debug, Default)]
pub struct Captains {
    list: ArcSwap<Vec<String>>,
    current: AtomicUsize,
}

impl Captains {
    pub fn new(list: Vec<String>) -> Captains {
        Captains {
            list: ArcSwap::from_pointee(list),
            current: AtomicUsize::new(0),
        }
    }

    /// The list, in its order.
    pub fn all(&self) -> Arc<Vec<String>> {
        self.list.load_full()
    }

    /// The captain to try first, and its index.
    pub fn current(&self) -> (usize, Option<String>) {
        let list = self.list.load();
        if list.is_empty() {
            return (0, None);
        }
        let i = self.current.load(Ordering::Relaxed) % list.len();
        (i, Some(list[i].clone()))
    }

    /// The captains in the order to try them now.
    pub fn in_order(&self) -> Vec<String> {
        let list = self.list.load();
        let n = list.len();
        let start = if n == 0 {
            0
        } else {
            self.current.load(Ordering::Relaxed) % n
        };
        (0..n).map(|k| list[(start + k) % n].clone()).collect()
    }

    /// `url` answered: try it first from now on.
    pub fn answered(&self, url: &str) {
        if let Some(i) = self.list.load().iter().position(|c| c == url) {
            self.current.store(i, Ordering::Relaxed);
        }
    }

    /// The captain at `failed` did not answer: try the next one first.
    pub fn failed(&self, failed: usize) {
        let n = self.list.load().len().max(1);
        let _ = self.current.compare_exchange(
            failed % n,
            (failed + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Replaces the list (keeping the current captain first if listed).
    pub fn set(&self, list: Vec<String>) {
        let (_, cur) = self.current();
        self.list.store(Arc::new(list));
        self.current.store(0, Ordering::Relaxed);
        if let Some(c) = cur {
            self.answered(&c);
        }
    }
}

/// Renews the certificate in `current` before it expires, for as long as
/// `shutdown` is not cancelled: saves each renewal to `path`, stores it in
/// `current` and calls `on_renewed` (which swaps it into the host's TLS).
pub async fn keep_renewed(
    path: PathBuf,
    current: Arc<ArcSwap<Enrolment>>,
    captains: Arc<Captains>,
    on_renewed: impl Fn(&Enrolment) + Send + Sync + 'static,
    shutdown: CancellationToken,
) {
    let http = http_client();
    let mut failures = 0u32;
    loop {
        let e = current.load_full();
        let due = e.renew_at();
        let now = now_secs();
        let wait = if failures == 0 {
            Duration::from_secs(due.saturating_sub(now).max(0) as u64)
        } else {
            // Retry sooner the closer the expiry: a tenth of what is left,
            // between 1 and 60 s.
            let left = (e.cert_expires_at - now).max(0) as u64;
            Duration::from_secs((left / 10).clamp(1, 60))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let (start, _) = captains.current();
        match e.renew(&http, start).await {
            Ok(next) => {
                if let Err(err) = next.save(&path) {
                    tracing::error!(error = %zw_util::ErrorChain(&err), "keeping the renewed certificate");
                }
                tracing::info!(expires_at = next.cert_expires_at, "certificate renewed");
                captains.set(next.captains.clone());
                current.store(Arc::new(next.clone()));
                on_renewed(&next);
                failures = 0;
            }
            Err(err) => {
                failures += 1;
                if err.is_refusal() {
                    tracing::error!(error = %zw_util::ErrorChain(&err), "the captains refuse to renew this host's certificate (removed from the cluster?); peers refuse it once it expires");
                } else {
                    tracing::warn!(error = %zw_util::ErrorChain(&err), "certificate renewal failed; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captains_fail_over_and_remember_who_answered() {
        let c = Captains::new(parse_captains(" http://a:1/, ,http://b:2,http://c:3"));
        assert_eq!(c.in_order(), vec!["http://a:1", "http://b:2", "http://c:3"]);
        c.answered("http://c:3");
        assert_eq!(c.current(), (2, Some("http://c:3".into())));
        assert_eq!(c.in_order(), vec!["http://c:3", "http://a:1", "http://b:2"]);
        c.failed(2);
        assert_eq!(c.current(), (0, Some("http://a:1".into())));
        c.answered("http://c:3");
        c.set(vec!["http://c:3".into(), "http://d:4".into()]);
        assert_eq!(c.current(), (0, Some("http://c:3".into())));
        assert_eq!(
            merge_captains(
                &["http://a/".into()],
                &["http://a".into(), "http://b".into()]
            ),
            vec!["http://a", "http://b"]
        );
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_validity() {
        let e = Enrolment {
            name: "w1".into(),
            role: "worker".into(),
            captains: vec![],
            credential: "secret".into(),
            api_key: None,
            meta_repo: None,
            ca_pem: String::new(),
            cert_pem: String::new(),
            key_pem: "KEY".into(),
            cert_issued_at: 1000,
            cert_expires_at: 1000 + 3600,
        };
        assert_eq!(e.renew_at(), 1000 + 2400);
        // Secrets stay out of debug output.
        let dbg = format!("{e:?}");
        assert!(!dbg.contains("secret") && !dbg.contains("KEY"), "{dbg}");
    }

    #[test]
    fn a_captains_refusal_is_read_from_its_error_shape() {
        assert_eq!(
            message_of(r#"{"error":{"code":"forbidden","message":"join refused: expired"}}"#),
            "join refused: expired"
        );
        assert_eq!(message_of("plain"), "plain");
    }
}
