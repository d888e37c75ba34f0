//! `GET /v1/apps/{id}/logs`: see [`crate::app::logs`].

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::app::{access, logs};
use crate::auth::Caller;
use crate::error::{ApiError, ApiPath, ApiQuery};
use crate::state::AppState;

#[derive(Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    pub from: u64,
    pub limit: Option<usize>,
    /// Only this instance of the app.
    pub instance: Option<String>,
}

pub async fn app_logs(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    let a = access::app(&st, &caller, &id).await?;
    let page = logs::read(&st, &a.id, q.from, q.limit, q.instance.as_deref()).await?;
    let mut headers = HeaderMap::new();
    headers.insert("x-last-log-nano", HeaderValue::from(page.last));
    if !page.unreachable.is_empty() {
        let list = page.unreachable.into_iter().collect::<Vec<_>>().join(",");
        // Node ids are DNS labels: always a valid header value.
        if let Ok(v) = HeaderValue::from_str(&list) {
            headers.insert("x-log-unreachable", v);
        }
    }
    Ok((StatusCode::OK, headers, axum::Json(page.lines)).into_response())
}
