//! `GET /v1/health`.

use api_types::misc::{Health, MetaOrigin};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::json;
use crate::error::ApiError;
use crate::state::AppState;

pub async fn health(State(st): State<AppState>) -> Result<Response, ApiError> {
    let head = st.meta.head().await?;
    Ok(json(
        StatusCode::OK,
        Health {
            status: "ok".into(),
            database: st.db.backend().to_string(),
            meta_head: head,
            app_url: st.config.app_url_template.clone(),
            builds: st.config.builder.is_some(),
            captain: st.leader.id.clone(),
            leader: st.leader.is_leader(),
            meta_origin: st.meta.origin().map(|_| {
                let o = st.meta.origin_state();
                let (refused_head, refused_reason) = o.refused.unzip();
                MetaOrigin {
                    fetched: o.fetched,
                    refused_head,
                    refused_reason,
                    error: o.error,
                }
            }),
        },
    ))
}
