//! Uploaded sources, the build queue and build logs.

use std::convert::Infallible;
use std::time::Duration;

use api_types::builds::{BuildView, CreateBuild, SourceView};
use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde::Deserialize;

use super::json;
use crate::app::access;
use crate::app::builds::{self, NewBuild, NewSource};
use crate::auth::Caller;
use crate::db::BuildRow;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;

impl From<BuildRow> for BuildView {
    fn from(b: BuildRow) -> Self {
        BuildView {
            id: b.id,
            app_id: b.app_id,
            status: b.status,
            attempts: b.attempts,
            source_kind: b.source_kind,
            // Credentials in a git URL are the user's secret: never shown.
            source_url: meta_schema::repo::redact_url(&b.source_url),
            source_branch: b.source_branch,
            source_commit: b.source_commit,
            dockerfile: b.dockerfile,
            error: b.error,
            image_digest: b.image_digest,
            deployment_id: b.deployment_id,
            created_at: b.created_at,
            started_at: b.started_at,
            finished_at: b.finished_at,
            updated_at: b.updated_at,
        }
    }
}

/// `POST /v1/sources`: a gzip'd tarball of a build context, every entry
/// under one top-level directory (`tar czf - -C dir --transform 's,^,src/,' .`).
pub async fn upload_source(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let s = builds::store_source(&st, &ct, body.into_data_stream()).await?;
    Ok(json(
        StatusCode::CREATED,
        SourceView {
            id: s.id,
            size_bytes: s.size_bytes,
        },
    ))
}

/// `POST /v1/builds`.
pub async fn create_build(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(b): ApiJson<CreateBuild>,
) -> Result<Response, ApiError> {
    let source = match (b.source.git, b.source.upload) {
        (Some(g), None) => NewSource::Git {
            url: g.url,
            branch: g.branch,
            commit: g.commit,
        },
        (None, Some(id)) => NewSource::Upload {
            id,
            commit: b.source_commit,
        },
        _ => {
            return Err(ApiError::bad_request(
                "source needs exactly one of git and upload",
            ));
        }
    };
    let row = builds::queue(
        &st,
        &caller,
        &b.app_id,
        NewBuild {
            source,
            dockerfile: b.dockerfile,
            build_args: b.build_args,
            deploy: b.deploy,
        },
    )
    .await?;
    Ok(json(StatusCode::CREATED, BuildView::from(row)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildsQuery {
    app_id: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/builds`.
pub async fn list_builds(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<BuildsQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1-1000"));
    }
    let rows = match (&q.app_id, &caller.user_id) {
        (Some(app), _) => {
            let a = access::app(&st, &caller, app).await?;
            st.db.builds(Some(&a.id), limit).await?
        }
        (None, _) if caller.is_admin() => st.db.builds(None, limit).await?,
        (None, Some(user)) => st.db.builds_of_user(user, limit).await?,
        (None, None) => Vec::new(),
    };
    let v: Vec<BuildView> = rows.into_iter().map(Into::into).collect();
    Ok(axum::Json(v).into_response())
}

/// `GET /v1/builds/{id}`.
pub async fn get_build(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let b = access::build(&st, &caller, &id).await?;
    Ok(axum::Json(BuildView::from(b)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Lines after this seq (default 0: from the first).
    from: Option<i64>,
    limit: Option<i64>,
}

/// `GET /v1/builds/{id}/logs`: JSON lines after `?from=`, with
/// `X-Last-Log-Seq`; or, with `Accept: text/event-stream`, every line
/// (`event: line`, `id: <seq>`) as it is stored, then `event: end` with the
/// build once it has finished. `Last-Event-ID` resumes a stream.
pub async fn build_logs(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = access::build(&st, &caller, &id).await?.id;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let from = resume.or(q.from).unwrap_or(0).max(0);
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if !wants_sse {
        let limit = q.limit.unwrap_or(1000);
        if !(1..=10_000).contains(&limit) {
            return Err(ApiError::bad_request("limit must be 1-10000"));
        }
        let lines = st.db.build_logs(&id, from, limit).await?;
        let last = lines.last().map_or(from, |l| l.seq);
        let mut h = HeaderMap::new();
        h.insert("X-Last-Log-Seq", HeaderValue::from(last));
        return Ok((h, axum::Json(lines)).into_response());
    }
    let events = st.build_events.subscribe();
    let s = futures::stream::unfold(Some((st, id, from, events)), |state| async move {
        let (st, id, mut after, mut events) = state?;
        loop {
            // Status first, then lines: a build ends only after all its
            // lines are stored, so "ended and nothing after" is final.
            let b = match st.db.build(&id).await {
                Ok(Some(b)) => b,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, build = %id, "streaming build logs");
                    return None;
                }
            };
            let lines = match st.db.build_logs(&id, after, 500).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, build = %id, "streaming build logs");
                    return None;
                }
            };
            if let Some(last) = lines.last() {
                after = last.seq;
                let evs: Vec<Result<Event, Infallible>> = lines
                    .iter()
                    .map(|l| {
                        Ok(Event::default()
                            .event("line")
                            .id(l.seq.to_string())
                            .data(serde_json::to_string(l).expect("a line serializes")))
                    })
                    .collect();
                return Some((futures::stream::iter(evs), Some((st, id, after, events))));
            }
            if b.is_terminal() {
                let end = Event::default()
                    .event("end")
                    .data(serde_json::to_string(&BuildView::from(b)).expect("a build serializes"));
                return Some((futures::stream::iter(vec![Ok(end)]), None));
            }
            // Wait for new lines or a status change (or re-check).
            let _ = tokio::time::timeout(Duration::from_secs(2), events.changed()).await;
        }
    })
    .flatten();
    Ok(Sse::new(s)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keepalive"),
        )
        .into_response())
}
