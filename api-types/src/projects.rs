//! Projects and their apps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub id: String,
    pub name: String,
    /// Git URL (or a local path in development).
    pub repo: String,
    pub branch: String,
    /// Dockerfile path in the source (empty: `Dockerfile`).
    #[serde(default)]
    pub dockerfile: String,
    /// Build arguments every build of the project gets.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    pub created_at: i64,
    pub apps: Vec<AppView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppView {
    pub id: String,
    pub project_id: String,
    pub env: String,
    pub name: String,
    pub created_at: i64,
    /// Custom domains routed to the app (besides `<app>.<env domain>`).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Newest release present at the meta repo head.
    pub active_release: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    #[schema(schema_with = crate::rules::dns_label)]
    pub name: String,
    #[schema(schema_with = crate::rules::repo)]
    pub repo: String,
    /// Defaults to "main".
    #[schema(schema_with = crate::rules::opt_branch)]
    pub branch: Option<String>,
    /// Dockerfile path in the source (default `Dockerfile`).
    #[schema(schema_with = crate::rules::opt_dockerfile)]
    pub dockerfile: Option<String>,
    /// Build arguments every build of the project gets.
    #[serde(default)]
    #[schema(schema_with = crate::rules::build_args)]
    pub build_args: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    #[schema(schema_with = crate::rules::dns_label)]
    pub name: String,
    /// Defaults to "production".
    #[schema(schema_with = crate::rules::opt_dns_label)]
    pub env: Option<String>,
    /// Custom domains: DNS names of at least two labels, no wildcard, not
    /// used by another app.
    #[serde(default)]
    #[schema(schema_with = crate::rules::custom_domains)]
    pub domains: Vec<String>,
}

/// A member of a project.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    pub user_id: String,
    pub login: String,
    /// `owner` (may manage members) or `member`.
    pub role: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    /// The user's id (`usr-...`; `GET /v1/users` lists them for admins, a
    /// token's answer names its user).
    pub user_id: String,
    /// `member` (default) or `owner`.
    #[schema(schema_with = crate::rules::opt_member_role)]
    pub role: Option<String>,
}
