//! Joining the cluster: join tokens, enrolment of workers and edges,
//! certificate renewal.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A join token to make (admins).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// `worker` or `edge`.
    #[schema(schema_with = crate::rules::join_role)]
    pub role: String,
    /// How long the token may be used (default 3600, at most 7 days).
    pub ttl_seconds: Option<u64>,
}

/// A join token: single use, expiring, for one role.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    /// The secret (shown once): `zwj_...`.
    pub token: String,
    pub role: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

/// What a joining host sends (with its join token as the bearer).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// `worker` or `edge`: must be the join token's.
    #[schema(schema_with = crate::rules::join_role)]
    pub role: String,
    /// The host's name: its node id (a worker) or edge name. A DNS label.
    #[schema(schema_with = crate::rules::dns_label)]
    pub name: String,
    /// A PKCS#10 certificate request (PEM) for the key the host made; the
    /// key never leaves it.
    pub csr_pem: String,
    /// The addresses (IPs or DNS names) the host is reached at: a worker's
    /// node-proxy certificate names them.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// A worker's node API (`http://addr:port`).
    #[serde(default)]
    pub api_url: String,
    /// A worker's node-proxy (`addr:port`), which edges dial over mTLS.
    #[serde(default)]
    pub proxy_addr: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub disk_bytes: u64,
    /// A worker's age recipient (it decrypts the secrets of its instances).
    #[serde(default)]
    pub age_recipient: String,
}

/// What a host that joined gets.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Joined {
    pub name: String,
    pub role: String,
    /// Its certificate (followed by the cluster CA's).
    pub certificate_pem: String,
    /// The cluster CA, to trust the other side of mTLS.
    pub ca_pem: String,
    /// Unix seconds; renew (`POST /v1/cluster/renew`) before it.
    pub cert_expires_at: i64,
    /// Its credential for the captains' API (shown once): a worker's may
    /// report its own node and instances, fetch the meta repository and
    /// download images; an edge's may read the route stream.
    pub credential: String,
    /// A worker's key for its node API, which the captains call with it.
    pub api_key: Option<String>,
    /// The captains' API URLs, for failover.
    pub captains: Vec<String>,
    /// The meta repository a worker follows (a captain's `/meta.git`).
    pub meta_repo: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A certificate request for a new key (or the same one).
    pub csr_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Renewed {
    pub certificate_pem: String,
    pub ca_pem: String,
    pub cert_expires_at: i64,
    pub captains: Vec<String>,
}

/// A host that joined the cluster (admins).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterMemberView {
    /// Its name: a worker's node id or an edge's name.
    pub id: String,
    /// `worker` or `edge`.
    pub role: String,
    /// Unix milliseconds.
    pub joined_at: i64,
    /// Unix seconds: its current certificate's end.
    pub cert_expires_at: i64,
    /// Unix milliseconds, once it was removed (it renews nothing since).
    pub removed_at: Option<i64>,
}
