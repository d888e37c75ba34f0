//! `GET /v1/admin/tasks`: what each background task did last.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::json;
use crate::state::AppState;

pub async fn list_tasks(State(st): State<AppState>) -> Response {
    json(StatusCode::OK, st.tasks.list())
}
