//! The captain's link to its nodes' APIs (invariant 7: a follower's API
//! answers only the captain and its own node).
//!
//! At every registration (`POST /v1/nodes`) the captain hands the node an
//! `api_key` that the follower accepts on its API, next to its own tokens:
//! `hex(HMAC-SHA256(link_secret, "<node id>:<registration token id>"))`.
//! `link_secret` is the cluster key: 32 random bytes in
//! `<data_dir>/node-link.secret` (hex, mode 0600, created on first use like
//! `admin.token`), or the file `--cluster-key-file` names, which every
//! captain of a cluster is given (so any captain can call any node); the registration
//! token id is the id of the node token issued by that registration, which
//! the `tokens` table keeps anyway (only its hash is secret). So the
//! database holds no key, and a key changes whenever its node registers
//! again (the previous node token is revoked, a new one issued) or the
//! node is removed (its tokens are revoked: no live registration, no key).
//!
//! Calls go to the node's registered `api_url` with short timeouts (connect
//! 2 s, whole request 5 s): a node that does not answer costs a caller at
//! most that, never a hang. The `notify-nodes` background task
//! ([`crate::background::notify`]) tells every online node at once when the
//! meta head moves, so remote followers converge without waiting for their
//! poll.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::db::{DbError, NodeRow};
use crate::state::AppState;

/// File of the link secret in the captain's data dir.
pub use crate::config::LINK_SECRET_FILE;
/// Connecting to a node's API.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole call to a node's API.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("reading or creating the node link secret {path}")]
    Secret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the node link secret {path} is not 32 bytes of hex")]
    BadSecret { path: PathBuf },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("node {node} has no live registration (no node token)")]
    NotRegistered { node: String },
    #[error("node {node} registered no API URL")]
    NoApiUrl { node: String },
    #[error("calling {url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
}

impl LinkError {
    /// The node answered 404 (e.g. an instance it no longer has).
    pub fn is_not_found(&self) -> bool {
        matches!(self, LinkError::Status { status: 404, .. })
    }
}

/// The link secret of the captain with this data dir, created (32 random
/// bytes, hex, mode 0600) on first use. Concurrent first uses agree: the
/// file appears whole (hard link of a complete temp file) or not at all.
pub fn link_secret(path: &Path) -> Result<[u8; 32], LinkError> {
    let path = path.to_path_buf();
    let data_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let io = |source| LinkError::Secret {
        path: path.clone(),
        source,
    };
    let parse = |text: &str| -> Result<[u8; 32], LinkError> {
        hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| LinkError::BadSecret { path: path.clone() })
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => return parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let tmp = data_dir.join(format!(
        ".{LINK_SECRET_FILE}.{}.tmp",
        ulid::Ulid::new().to_string().to_lowercase()
    ));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(format!("{}\n", hex::encode(secret)).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io)?;
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created the node link secret");
            Ok(secret)
        }
        // Another registration created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            parse(&std::fs::read_to_string(&path).map_err(io)?)
        }
        Err(e) => Err(io(e)),
    }
}

/// The key of one registration of a node.
pub fn derive_key(secret: &[u8; 32], node_id: &str, registration: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(node_id.as_bytes());
    mac.update(b":");
    mac.update(registration.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The key for the registration that issued node token `token_id` (what
/// `POST /v1/nodes` returns as `api_key`).
pub fn issue_key(key_file: &Path, node_id: &str, token_id: &str) -> Result<String, LinkError> {
    Ok(derive_key(&link_secret(key_file)?, node_id, token_id))
}

fn http() -> &'static reqwest::Client {
    static HTTP: OnceLock<reqwest::Client> = OnceLock::new();
    HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // Node APIs are inside the cluster: never through a proxy.
            .no_proxy()
            .build()
            .expect("a reqwest client with rustls builds")
    })
}

/// A node's API as the captain calls it.
#[derive(Debug, Clone)]
pub struct NodeLink {
    pub node_id: String,
    pub api_url: String,
    key: String,
}

/// One page of an instance's log lines, as a follower answers it.
#[derive(Debug, Clone, Default)]
pub struct LogPage {
    pub lines: Vec<LogLine>,
    /// `X-Log-Collected-Nano`: the instance stamps every later line after
    /// this (none: an older follower that does not say).
    pub collected: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct LogLine {
    pub t: u64,
    pub line: String,
}

impl NodeLink {
    /// Links to the given nodes, with their keys; nodes without an API URL
    /// or a live registration are left out.
    pub async fn to_nodes(
        st: &AppState,
        nodes: impl IntoIterator<Item = NodeRow>,
    ) -> Result<BTreeMap<String, Result<NodeLink, LinkError>>, LinkError> {
        let regs = st.db.node_registrations().await?;
        let secret = link_secret(&st.config.cluster_key_path())?;
        Ok(nodes
            .into_iter()
            .map(|n| {
                let link = if n.api_url.is_empty() {
                    Err(LinkError::NoApiUrl { node: n.id.clone() })
                } else if let Some(reg) = regs.get(&n.id) {
                    Ok(NodeLink {
                        key: derive_key(&secret, &n.id, reg),
                        node_id: n.id.clone(),
                        api_url: n.api_url.trim_end_matches('/').to_string(),
                    })
                } else {
                    Err(LinkError::NotRegistered { node: n.id.clone() })
                };
                (n.id, link)
            })
            .collect())
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, LinkError> {
        let resp = req
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|source| LinkError::Http {
                url: url.to_string(),
                source,
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        Err(LinkError::Status {
            url: url.to_string(),
            status,
            body: body.chars().take(300).collect(),
        })
    }

    /// `GET /v1/instances/{id}/logs?from=&limit=` on the node.
    pub async fn instance_logs(
        &self,
        instance: &str,
        from: u64,
        limit: usize,
    ) -> Result<LogPage, LinkError> {
        // Instance ids are the follower's own (ULID-based, URL-safe); encode
        // anyway, the id comes from a report.
        let url = format!(
            "{}/v1/instances/{}/logs",
            self.api_url,
            url_segment(instance)
        );
        let resp = self
            .send(
                http()
                    .get(&url)
                    .query(&[("from", from.to_string()), ("limit", limit.to_string())]),
                &url,
            )
            .await?;
        let collected = resp
            .headers()
            .get("x-log-collected-nano")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let lines = resp
            .json()
            .await
            .map_err(|source| LinkError::Http { url, source })?;
        Ok(LogPage { lines, collected })
    }

    /// `POST /v1/notify`: the node fetches the meta repo now.
    pub async fn notify(&self) -> Result<(), LinkError> {
        let url = format!("{}/v1/notify", self.api_url);
        self.send(http().post(&url), &url).await.map(drop)
    }
}

/// Percent-encodes everything but unreserved characters.
fn url_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_created_once_0600_and_keys_follow_registrations() {
        let dir = tempfile::tempdir().unwrap();
        let a = link_secret(&dir.path().join(LINK_SECRET_FILE)).unwrap();
        let b = link_secret(&dir.path().join(LINK_SECRET_FILE)).unwrap();
        assert_eq!(a, b);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(LINK_SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k1 = derive_key(&a, "n1", "tok1");
        assert_eq!(k1.len(), 64);
        assert_eq!(k1, derive_key(&a, "n1", "tok1"));
        assert_ne!(k1, derive_key(&a, "n1", "tok2"));
        assert_ne!(k1, derive_key(&a, "n2", "tok1"));
        // "<node>:<token id>" is unambiguous: node ids are DNS labels, token
        // ids ULIDs, neither holds ':'.
        std::fs::write(dir.path().join(LINK_SECRET_FILE), "short\n").unwrap();
        assert!(matches!(
            link_secret(&dir.path().join(LINK_SECRET_FILE)),
            Err(LinkError::BadSecret { .. })
        ));
    }
}
