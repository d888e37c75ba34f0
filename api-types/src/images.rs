//! Built images (content-addressed by digest).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageView {
    pub id: String,
    pub digest: String,
    pub size_bytes: i64,
    pub source_commit: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    #[schema(schema_with = crate::rules::digest)]
    pub digest: String,
    pub size_bytes: u64,
    #[serde(default)]
    #[schema(schema_with = crate::rules::commit_or_empty)]
    pub source_commit: String,
}
