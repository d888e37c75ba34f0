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
    pub digest: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub source_commit: String,
}
