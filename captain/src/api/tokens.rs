//! API tokens (admin).

use api_types::tokens::{CreateToken, CreatedToken, TokenKind, TokenView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::json;
use crate::auth;
use crate::db::TokenRow;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::state::AppState;

impl From<TokenRow> for TokenView {
    fn from(t: TokenRow) -> Self {
        TokenView {
            id: t.id,
            kind: t.kind,
            name: t.name,
            node_id: t.node_id,
            created_at: t.created_at,
            revoked_at: t.revoked_at,
        }
    }
}

pub async fn list_tokens(State(st): State<AppState>) -> Result<Response, ApiError> {
    let v: Vec<TokenView> = st
        .db
        .list_tokens()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(json(StatusCode::OK, v))
}

pub async fn create_token(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<CreateToken>,
) -> Result<Response, ApiError> {
    if b.kind == TokenKind::Node {
        return Err(ApiError::bad_request(
            "node tokens are issued by POST /v1/nodes",
        ));
    }
    if b.name.trim().is_empty() || b.name.len() > 200 {
        return Err(ApiError::bad_request(
            "a token needs a name of 1-200 characters",
        ));
    }
    let (row, secret) = auth::issue(&st.db, b.kind, b.name.trim(), None).await?;
    Ok(json(
        StatusCode::CREATED,
        CreatedToken {
            token: row.into(),
            secret,
        },
    ))
}

pub async fn revoke_token(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    if st.db.revoke_token(&id, meta_schema::now_millis()).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("live token", &id))
    }
}
