//! `notify-nodes`: after a new meta head, tell every online node with an
//! API URL to fetch now (`POST /v1/notify`). Fire and forget: a failure is
//! logged at debug, the node's own poll is the fallback.

use futures::future::BoxFuture;
use serde_json::json;

use crate::db::NodeRow;
use crate::nodelink::NodeLink;
use crate::state::AppState;

/// Remembers the head it last notified, so a wake without a new head costs
/// one read.
#[derive(Default)]
pub struct NotifyNodes {
    notified: Option<String>,
}

impl super::Task for NotifyNodes {
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let err = |e: &dyn std::error::Error| zw_util::error_chain(e);
            let head = st.meta.head().await.map_err(|e| err(&e))?;
            if head.is_none() || head == self.notified {
                return Ok(json!({ "head": head, "notified": 0 }));
            }
            let online: Vec<NodeRow> = st
                .db
                .nodes()
                .await
                .map_err(|e| err(&e))?
                .into_iter()
                .filter(|n| n.state == "online" && !n.api_url.is_empty())
                .collect();
            let links = NodeLink::to_nodes(st, online).await.map_err(|e| err(&e))?;
            self.notified = head.clone();
            let mut sent = 0;
            for (node, link) in links {
                match link {
                    Ok(link) => {
                        sent += 1;
                        tokio::spawn(async move {
                            if let Err(e) = link.notify().await {
                                tracing::debug!(node = %link.node_id, error = %zw_util::ErrorChain(&e), "node notify failed");
                            }
                        });
                    }
                    Err(e) => tracing::debug!(%node, error = %e, "node notify: no link"),
                }
            }
            Ok(json!({ "head": head, "notified": sent }))
        })
    }
}
