//! `mirror`: follow the meta repository's origin (when there is one) and
//! index its head into the database; then activate what a new commit may
//! concern (rollouts, routes, node notification, in-process followers).

use futures::future::BoxFuture;
use serde_json::json;

use crate::state::AppState;

pub struct Mirror;

/// Follow the origin (when there is one) and index the head: what this
/// task does before it wakes the others, also run by a route stream's
/// first table (a captain an edge fails over to may be a poll behind).
pub async fn catch_up(
    st: &AppState,
) -> (
    Result<bool, crate::meta::MetaError>,
    Result<crate::meta::SyncReport, crate::meta::MetaError>,
) {
    let followed = st.meta.follow_origin().await;
    if let Err(e) = &followed {
        tracing::warn!(error = %zw_util::ErrorChain(e), "following the meta repository origin");
    }
    (followed, crate::meta::sync(&st.meta, &st.db).await)
}

impl super::Task for Mirror {
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let (followed, report) = catch_up(st).await;
            // A new commit (ours or pushed by hand, e.g. a `git revert`)
            // may need a rollout, change the routes, concern the nodes.
            st.rollout_wake.notify_one();
            st.routes_wake.notify_one();
            st.notify_wake.notify_one();
            st.commits.send_modify(|n| *n += 1);
            let report = report.map_err(|e| zw_util::error_chain(&e))?;
            Ok(json!({
                "head": report.head,
                "changed": report.changed,
                "releases": report.releases,
                "commits_indexed": report.commits_indexed,
                "origin_error": followed.err().map(|e| zw_util::error_chain(&e)),
            }))
        })
    }
}
