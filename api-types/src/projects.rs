//! Projects and their apps.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub id: String,
    pub name: String,
    /// Git URL (or a local path in development).
    pub repo: String,
    pub branch: String,
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
    /// Newest release present at the meta repo head.
    pub active_release: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    pub repo: String,
    /// Defaults to "main".
    pub branch: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: String,
    /// Defaults to "production".
    pub env: Option<String>,
}
