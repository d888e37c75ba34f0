//! `GET /metrics`: Prometheus (OpenMetrics) text format.

use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

pub async fn render() -> Response {
    match crate::metrics::encode() {
        Ok(out) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => ApiError::internal("encoding metrics", &e).into_response(),
    }
}
