//! The build queue, uploaded sources and build logs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a build's source comes from: exactly one of `git` and `upload`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildSource {
    pub git: Option<GitSource>,
    /// The id `POST /v1/sources` answered (`sha256:<hex>`).
    pub upload: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    #[schema(schema_with = crate::rules::repo)]
    pub url: String,
    /// Branch to build (default: the remote's default branch).
    #[schema(schema_with = crate::rules::opt_branch)]
    pub branch: Option<String>,
    /// Commit to build (wins over `branch`).
    #[schema(schema_with = crate::rules::opt_commit_or_empty)]
    pub commit: Option<String>,
}

/// What to deploy once the image is built (the fields of a deployment).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    pub port: Option<u32>,
    #[schema(schema_with = crate::rules::opt_env_vars)]
    pub env_vars: Option<BTreeMap<String, String>>,
    pub min_instances: Option<u32>,
    #[schema(schema_with = crate::rules::opt_http_path)]
    pub health_check_path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBuild {
    pub app_id: String,
    pub source: BuildSource,
    /// The commit the uploaded source is (recorded in the release).
    #[schema(schema_with = crate::rules::opt_commit_or_empty)]
    pub source_commit: Option<String>,
    /// Dockerfile path inside the source (default `Dockerfile`).
    #[schema(schema_with = crate::rules::opt_dockerfile)]
    pub dockerfile: Option<String>,
    #[serde(default)]
    #[schema(schema_with = crate::rules::build_args)]
    pub build_args: BTreeMap<String, String>,
    /// Deploy the image when the build succeeds.
    pub deploy: Option<DeploySpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildView {
    pub id: String,
    pub app_id: String,
    /// queued | building | succeeded | failed
    pub status: String,
    pub attempts: i64,
    pub source_kind: String,
    pub source_url: String,
    pub source_branch: String,
    pub source_commit: String,
    pub dockerfile: String,
    /// Why it failed (with the last log lines), or the last retried fault.
    pub error: String,
    pub image_digest: String,
    /// The deployment made from the image, when one was asked for.
    pub deployment_id: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SourceView {
    /// `sha256:<hex>` of the uploaded tarball: give it as `source.upload`.
    pub id: String,
    pub size_bytes: u64,
}

/// One stored line of a build log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuildLogLine {
    /// 1-based number of the line in its build's log.
    pub seq: i64,
    /// Unix nanoseconds when the captain received it.
    pub t: i64,
    /// `stdout`, `stderr` or `builder` (the builder's own messages).
    pub stream: String,
    pub line: String,
}
