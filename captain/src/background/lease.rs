//! `lease`: take or renew the leader's lease ([`crate::leader`]), and say
//! this captain is alive (the `captains` table: what `api.<domain>` routes
//! to).

use futures::future::BoxFuture;
use serde_json::json;

use crate::state::AppState;

pub struct Lease;

impl super::Task for Lease {
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let epoch = st.leader.renew(&st.db).await.map_err(|e| {
                format!(
                    "{} (leading until the last renewal runs out)",
                    zw_util::ErrorChain(&e)
                )
            })?;
            st.db
                .captain_seen(
                    &st.leader.id,
                    st.config.advertise_url.as_deref().unwrap_or(&st.api_url),
                    st.started_at,
                )
                .await
                .map_err(|e| zw_util::error_chain(&e))?;
            Ok(json!({ "captain": st.leader.id, "leader": epoch.is_some(), "epoch": epoch }))
        })
    }
}
