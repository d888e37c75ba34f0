//! The captain's background tasks and the one driver that runs them (after
//! omicron's `nexus/src/app/background`).
//!
//! A task is activated by its timer or by a wake (a commit, an instance
//! report, a queued build), takes no input, re-reads what it needs, acts,
//! and returns what it did: the driver keeps that, with the time and
//! outcome of every activation, for `GET /v1/admin/tasks`. A task has no
//! retry loop of its own: its next activation is the retry.
//!
//! | task | period | woken by | does |
//! |---|---|---|---|
//! | `lease` | 0.7 s | | takes or renews the leader's lease ([`crate::leader`]) |
//! | `mirror` | `poll_interval` | a commit written or pushed | follows the origin, indexes the meta repo into the database |
//! | `liveness` | min(`heartbeat_interval`, `node_grace`/10) | | marks nodes not heard from within `node_grace` offline |
//! | `rollout` | `rollout_interval` | reports, commits, drains, lost nodes | plans and writes deployment files ([`crate::rollout`]) |
//! | `routes` | 1 s | reports, rollouts | recomputes the edges' route table |
//! | `notify-nodes` | 30 s | a new meta head | tells online nodes to fetch now |
//! | `build-worker-N` | 2 s | a queued build | claims and runs builds |

pub mod builds;
pub mod lease;
pub mod liveness;
pub mod mirror;
pub mod notify;
pub mod rollout;
pub mod routes;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::state::AppState;
use status::Activation;

/// A background task.
pub trait Task: Send + 'static {
    /// One activation: re-read the world, act, say what was done (shown on
    /// the admin route) or why it failed.
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>>;
}

/// How a task is driven.
pub struct Schedule {
    pub name: String,
    pub description: &'static str,
    /// Activated at least this often.
    pub period: Duration,
    /// Activated at once when this is notified.
    pub wake: Option<Arc<Notify>>,
    /// A stop may cancel an activation half way (a build: it is queued
    /// again at the next start); else the driver lets it finish.
    pub cancel_on_stop: bool,
    /// Runs only on the captain that leads ([`crate::leader`]); elsewhere
    /// an activation is a no-op that says so.
    pub leader_only: bool,
}

/// Run `task` on `schedule` until `stop`: first at once, then whenever its
/// period passes or it is woken.
pub fn spawn(
    st: AppState,
    schedule: Schedule,
    mut task: impl Task,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let period_ms = u64::try_from(schedule.period.as_millis()).unwrap_or(u64::MAX);
    st.tasks
        .register(&schedule.name, schedule.description, period_ms);
    tokio::spawn(async move {
        let name = schedule.name.as_str();
        let wake = schedule.wake.clone().unwrap_or_default();
        let mut why = Activation::Start;
        loop {
            if *stop.borrow() {
                return;
            }
            st.tasks.started(name, why, meta_schema::now_millis());
            let outcome = if schedule.leader_only && !st.leader.is_leader() {
                Ok(serde_json::json!({ "standby": "another captain leads" }))
            } else if schedule.cancel_on_stop {
                tokio::select! {
                    // Cancel-safe by the task's own contract (see Schedule).
                    _ = stop.changed() => {
                        tracing::info!(task = name, "stopping during an activation");
                        return;
                    }
                    r = task.activate(&st) => r,
                }
            } else {
                task.activate(&st).await
            };
            if let Err(e) = &outcome {
                tracing::warn!(task = name, error = %e, "background task failed; it runs again at its next activation");
            }
            let now = meta_schema::now_millis();
            let next = now + i64::try_from(period_ms).unwrap_or(i64::MAX / 2);
            st.tasks.finished(name, outcome, now, next);
            // Each arm only waits; cancelling a wait loses nothing (a
            // notification sent meanwhile is kept as a permit).
            why = tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(schedule.period) => Activation::Timer,
                _ = wake.notified() => Activation::Wake,
            };
        }
    })
}
