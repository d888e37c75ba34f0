//! The captain's background tasks, as `GET /v1/admin/tasks` shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Why a task ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The first activation, at start.
    Start,
    /// Its period passed.
    Timer,
    /// Something asked for it (a commit, a report, a queued build).
    Wake,
}

/// One background task as the admin route shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskStatus {
    pub name: String,
    pub description: String,
    /// Activated at least this often (and when woken).
    pub period_ms: u64,
    pub activations: u64,
    /// An activation is running now.
    pub running: bool,
    pub last_activation: Option<Activation>,
    /// Unix milliseconds.
    pub last_started_at: Option<i64>,
    pub last_finished_at: Option<i64>,
    pub last_duration_ms: Option<u64>,
    /// What the last activation that succeeded did (task-specific).
    #[schema(value_type = Object)]
    pub last_result: serde_json::Value,
    /// Why the last activation failed; none when it succeeded.
    pub last_error: Option<String>,
    /// When the timer activates it next (unix milliseconds); a wake may
    /// come first.
    pub next_activation_at: Option<i64>,
}
