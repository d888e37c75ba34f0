//! App log lines.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One line of an app's logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AppLogLine {
    /// Unix nanoseconds, stamped by the instance's node.
    pub t: u64,
    pub line: String,
    /// The instance that wrote it.
    pub instance: String,
}
