//! `GET /v1/routes/stream`: the edges' route table as server-sent events.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use edge::routes::STREAM_EVENT;
use futures::Stream;

use crate::state::AppState;

/// `GET /v1/routes/stream`: the whole table now, then on every change.
///
/// "Now" is as of the meta remote's head: an edge that fails over here
/// from another captain already serves that captain's table, and this
/// captain's mirror may be a poll behind it (a promotion it has not seen
/// yet would take every backend of a new rollout off the edge).
pub async fn stream(
    State(captain): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    if captain.meta.origin().is_some() {
        let (_, synced) = crate::background::mirror::catch_up(&captain).await;
        if let Err(e) = synced {
            tracing::warn!(error = %zw_util::ErrorChain(&e), "indexing the meta repository for a route stream");
        }
        if let Err(e) = crate::background::routes::refresh(&captain).await {
            tracing::warn!(error = %e, "route table for a new stream");
        }
    }
    let rx = captain.routes.subscribe();
    let s = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let table = rx.borrow_and_update().clone();
        let data = serde_json::to_string(&*table).unwrap_or_else(|_| "{}".into());
        let ev = Event::default()
            .event(STREAM_EVENT)
            .id(table.version.to_string())
            .data(data);
        Some((Ok(ev), (rx, false)))
    });
    Sse::new(s).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keepalive"),
    )
}
