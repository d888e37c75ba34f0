//! `liveness`: nodes that missed three heartbeats are marked offline.

use futures::future::BoxFuture;
use serde_json::json;

use crate::state::AppState;

pub struct Liveness;

impl super::Task for Liveness {
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let interval = st.config.heartbeat_interval;
            let cutoff = meta_schema::now_millis()
                - 3 * i64::try_from(interval.as_millis()).unwrap_or(i64::MAX / 4);
            let ids = st
                .db
                .mark_stale_nodes_offline(cutoff)
                .await
                .map_err(|e| zw_util::error_chain(&e))?;
            for id in &ids {
                tracing::warn!(node = %id, "node missed 3 heartbeats: offline");
            }
            Ok(json!({ "marked_offline": ids }))
        })
    }
}
