//! Deployments: in the API a "deployment" is a Release of the meta repository with the status machine of seed 004 ([`crate::Status`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Status;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeploymentView {
    /// Equals the id of the Release file in the meta repo.
    pub id: String,
    pub app_id: String,
    pub project_id: String,
    pub env: String,
    pub app: String,
    pub image_digest: String,
    pub source_commit: String,
    pub min_instances: i64,
    pub status: String,
    pub reason: String,
    /// The release file is present at the meta repo head (not reverted).
    pub present: bool,
    /// Meta repo path of the release.
    pub path: String,
    /// Commit that added the release (or the head at which the mirror saw it).
    pub commit: String,
    /// Statuses this deployment may move to.
    pub legal_next: Vec<Status>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    pub app_id: String,
    /// "sha256:<hex>" of a built image; or give `commit` to build.
    #[schema(schema_with = crate::rules::opt_digest_or_empty)]
    pub image_digest: Option<String>,
    /// Source commit to build (when no image digest).
    #[schema(schema_with = crate::rules::opt_commit_or_empty)]
    pub commit: Option<String>,
    pub port: Option<u32>,
    #[schema(schema_with = crate::rules::opt_env_vars)]
    pub env_vars: Option<BTreeMap<String, String>>,
    pub min_instances: Option<u32>,
    #[schema(schema_with = crate::rules::opt_http_path)]
    pub health_check_path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStatus {
    pub status: Status,
    /// Required when the status is `failed`.
    pub reason: Option<String>,
}
