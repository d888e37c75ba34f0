//! `liveness`: nodes not heard from for the grace period
//! ([`crate::Config::node_grace`]) are marked offline (lost); the rollout
//! planner is woken to replace their instances.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;

use crate::state::AppState;

pub struct Liveness;

/// How often `liveness` checks: at least every heartbeat interval and ten
/// times per grace period, so a lost node is noticed within about 1.1
/// grace periods of its last heartbeat.
pub fn period(heartbeat_interval: Duration, node_grace: Duration) -> Duration {
    heartbeat_interval
        .min(node_grace / 10)
        .max(Duration::from_millis(50))
}

impl super::Task for Liveness {
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let grace = i64::try_from(st.config.node_grace.as_millis()).unwrap_or(i64::MAX / 4);
            let cutoff = meta_schema::now_millis() - grace;
            let ids = st
                .db
                .mark_stale_nodes_offline(cutoff)
                .await
                .map_err(|e| zw_util::error_chain(&e))?;
            for id in &ids {
                tracing::warn!(node = %id, grace_ms = grace, "no heartbeat within the grace period: offline; its instances are replaced");
            }
            if !ids.is_empty() {
                st.rollout_wake.notify_one();
                st.routes_wake.notify_one();
            }
            Ok(json!({ "marked_offline": ids }))
        })
    }
}
