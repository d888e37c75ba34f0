//! The node agent API (axum). Every route but `GET /v1/health` needs
//! `Authorization: Bearer <token>`: the node's own tokens (its local token,
//! the configured captain token, the node token of its current
//! registration) or the `api_key` the captain issued at that registration
//! (invariant 7: only the captain and the node itself). A new registration
//! replaces the previous one's credentials.
//!
//! Writes never touch the ledger directly: they are commands to the
//! reconciler task, the ledger's one writer.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::follow::FollowState;
use crate::reconciler::{Command, ReconcilerHandle};

/// What `GET /v1/node/info` says about the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub region: String,
    pub address: String,
    pub api_url: String,
    pub runtime: String,
    pub runtime_reason: String,
    pub instance_range: String,
    pub age_recipient: String,
    pub version: String,
}

pub struct ApiState {
    pub info: NodeInfo,
    /// Bearer tokens accepted: the captain's and the node's own, plus the
    /// node token and captain `api_key` of the current registration.
    pub tokens: ArcSwap<Vec<String>>,
    pub reconciler: ReconcilerHandle,
    pub follow: watch::Receiver<FollowState>,
    /// Wakes the meta follower for a fetch now.
    pub notify: Arc<Notify>,
    pub data_dir: std::path::PathBuf,
    /// Limits the collector works with (reads collect too).
    pub log_limits: crate::logs::LogLimits,
}

pub fn router(state: Arc<ApiState>) -> Router {
    let authed = Router::new()
        .route("/v1/node/info", get(info))
        .route("/v1/node/resources", get(resources))
        .route("/v1/notify", post(notify))
        .route("/v1/instances", get(list))
        .route("/v1/instances/{id}", get(one).delete(restart))
        .route("/v1/instances/{id}/state", put(set_state))
        .route("/v1/instances/{id}/logs", get(logs))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/v1/health", get(health))
        .merge(authed)
        .with_state(state)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

async fn auth(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare against every token without stopping early.
    let ok = st
        .tokens
        .load()
        .iter()
        .filter(|t| !t.is_empty())
        .fold(false, |acc, t| {
            let eq = t.len() == presented.len()
                && t.bytes()
                    .zip(presented.bytes())
                    .fold(0u8, |d, (a, b)| d | (a ^ b))
                    == 0;
            acc | eq
        });
    if ok {
        next.run(req).await
    } else {
        error(StatusCode::UNAUTHORIZED, "missing or unknown bearer token")
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn info(State(st): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    let follow = st.follow.borrow().clone();
    let pass = st.reconciler.status.borrow().clone();
    Json(serde_json::json!({
        "node": st.info,
        "meta": {
            "applied_commit": follow.applied,
            "refused_commit": follow.refused,
            "refused_reason": follow.refused_reason,
            "fetches": follow.fetches,
            "last_error": follow.last_error,
        },
        "reconciler": pass,
    }))
}

async fn resources(State(st): State<Arc<ApiState>>) -> Json<crate::captain::Resources> {
    let n = st
        .reconciler
        .instances
        .borrow()
        .values()
        .filter(|r| r.handle.is_some())
        .count() as u32;
    let dir = st.data_dir.clone();
    Json(
        tokio::task::spawn_blocking(move || crate::captain::node_resources(&dir, n))
            .await
            .unwrap_or_default(),
    )
}

async fn notify(State(st): State<Arc<ApiState>>) -> StatusCode {
    st.notify.notify_one();
    StatusCode::ACCEPTED
}

async fn list(State(st): State<Arc<ApiState>>) -> Response {
    let all: Vec<_> = st.reconciler.instances.borrow().values().cloned().collect();
    Json(all).into_response()
}

async fn one(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match st.reconciler.instances.borrow().get(&id) {
        Some(r) => Json(r.clone()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no instance {id} on this node"),
        ),
    }
}

async fn send(st: &ApiState, cmd: Command) -> Response {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if st.reconciler.commands.send((cmd, tx)).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the reconciler is not running",
        );
    }
    match rx.await {
        Ok(Ok(())) => {
            st.reconciler.activate.notify_one();
            StatusCode::ACCEPTED.into_response()
        }
        Ok(Err(e)) if e.starts_with("no instance") => error(StatusCode::NOT_FOUND, e),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the reconciler stopped"),
    }
}

/// Stops the instance now; the reconciler starts it again if still desired.
async fn restart(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    send(&st, Command::Restart(id)).await
}

#[derive(Deserialize)]
struct SetState {
    /// "stopped" holds the instance stopped; "running" releases the hold.
    state: String,
}

async fn set_state(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Json(body): Json<SetState>,
) -> Response {
    let hold = match body.state.as_str() {
        "stopped" => true,
        "running" => false,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("state must be stopped or running, not {other:?}"),
            );
        }
    };
    send(&st, Command::Hold(id, hold)).await
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct LogEntry {
    t: u64,
    line: String,
    /// The line goes on in the next entry (it was longer than a record).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    partial: bool,
}

async fn logs(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Some(work_dir) = st
        .reconciler
        .instances
        .borrow()
        .get(&id)
        .map(|r| r.work_dir.clone())
    else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no instance {id} on this node"),
        );
    };
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let from = q.from;
    let log_limits = st.log_limits;
    let r = tokio::task::spawn_blocking(move || {
        let mark = crate::logs::collect_with_mark(&work_dir, log_limits)?;
        Ok::<_, crate::logs::LogError>((mark, crate::logs::read(&work_dir, from, limit)?))
    })
    .await
    .expect("log reading does not panic");
    match r {
        Ok((mark, lines)) => {
            let last = lines.last().map_or(from, |l| l.t);
            let mut headers = HeaderMap::new();
            headers.insert("X-Last-Log-Nano", HeaderValue::from(last));
            // Every line this instance stamps later is stamped after this:
            // what a reader merging several instances waits for.
            headers.insert("X-Log-Collected-Nano", HeaderValue::from(mark));
            let body: Vec<LogEntry> = lines
                .into_iter()
                .map(|l| LogEntry {
                    t: l.t,
                    line: l.line,
                    partial: l.partial,
                })
                .collect();
            (headers, Json(body)).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, zw_util::error_chain(&e)),
    }
}
