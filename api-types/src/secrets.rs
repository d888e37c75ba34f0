//! App secrets: names and recipients only, never values in answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The complete desired set of an app's secrets.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecrets {
    /// NAME -> value, every secret the app should have (names are
    /// environment variable names). The captain cannot decrypt the current
    /// file, so this replaces it whole.
    #[schema(schema_with = crate::rules::secret_values)]
    pub secrets: BTreeMap<String, String>,
    /// Names of the current file deliberately left out of `secrets`; any
    /// other current name missing from `secrets` is refused (409).
    #[serde(default)]
    #[schema(schema_with = crate::rules::secret_names)]
    pub unset: Vec<String>,
}

/// An app's secrets, without values.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretsView {
    pub app_id: String,
    pub env: String,
    pub app: String,
    /// Names in the secrets file at the meta repo head.
    pub names: Vec<String>,
    /// Meta repo path of the secrets file.
    pub path: String,
    /// Recipients (node ids / operator names) the file is encrypted to.
    pub recipients: Vec<String>,
    /// Recipients listed in the env's env.pb.
    pub env_recipients: Vec<String>,
    /// The file is not encrypted to exactly the env's recipients (a node
    /// joined or left since it was written). A node that can decrypt it
    /// re-encrypts it shortly (`PUT /v1/apps/{id}/secrets/file`); when no
    /// remaining node can, write the set again.
    pub stale: bool,
    /// Release made by this write (PUT only; none when the app has no
    /// release yet: its next deployment uses the secrets).
    pub release: Option<String>,
    /// Commit of this write (PUT only).
    pub commit: Option<String>,
}
