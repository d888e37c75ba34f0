//! Health, sign-in and the waitlist.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub database: String,
    pub meta_head: Option<String>,
    /// How apps are reached: `{app}` and `{domain}` are replaced (e.g.
    /// `http://{app}.{domain}:8080` under `zw up`).
    pub app_url: String,
    /// Whether this captain builds (`POST /v1/builds`).
    pub builds: bool,
    /// This captain's id, and whether it leads (runs the rollout planner).
    #[serde(default)]
    pub captain: String,
    #[serde(default)]
    pub leader: bool,
    /// With a meta remote (`--meta-remote`): where following it stands.
    #[serde(default)]
    pub meta_origin: Option<MetaOrigin>,
}

/// Where a captain is in following its meta remote.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MetaOrigin {
    /// The remote's head at the last fetch.
    pub fetched: Option<String>,
    /// A head of the remote the captain refused (invalid, or not descending
    /// from the last valid head, which keeps serving).
    pub refused_head: Option<String>,
    pub refused_reason: Option<String>,
    /// Why the last fetch failed, if it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GithubLogin {
    pub login: String,
    /// The user (`usr-...`).
    pub user_id: String,
    /// A user API token for this GitHub user (shown once).
    pub token: String,
}

/// One entry of the waitlist (admins).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WaitlistEntry {
    pub id: String,
    pub email: String,
    /// Set for people who tried to sign in with GitHub.
    pub github_login: String,
    pub created_at: i64,
    /// When an admin admitted them (they can sign in from then on).
    pub admitted_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinWaitlist {
    #[schema(schema_with = crate::rules::email)]
    pub email: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WaitlistResult {
    pub email: String,
    /// False when the address was on the list already.
    pub joined: bool,
}
