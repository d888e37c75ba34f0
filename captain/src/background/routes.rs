//! `routes`: recompute the edges' route table from the desired state and
//! the instances' reports; publish it when it changed.

use futures::future::BoxFuture;
use serde_json::json;

use crate::state::AppState;

pub struct Routes;

impl super::Task for Routes {
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        Box::pin(refresh(st))
    }
}

/// Recompute the table from the desired state and the reports; publish it
/// when it changed.
pub async fn refresh(st: &AppState) -> Result<serde_json::Value, String> {
    let Some(o) = super::rollout::Observed::read(st, meta_schema::now_millis())
        .await
        .map_err(|e| {
            format!(
                "{}; the edges keep the last table",
                zw_util::error_chain(&e)
            )
        })?
    else {
        return Ok(json!({ "routes": 0 }));
    };
    let routes = crate::routes::compute(&o.state, &o.instances, &o.nodes);
    let n = routes.len();
    let changed = st.routes.publish(routes);
    Ok(json!({
        "routes": n,
        "changed": changed,
        "version": st.routes.current().version,
    }))
}
