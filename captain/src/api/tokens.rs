//! API tokens and users (admin).

use api_types::tokens::{CreateToken, CreatedToken, TokenView, UserView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::json;
use crate::app::identity;
use crate::db::TokenRow;
use crate::db::tenants::UserRow;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::state::AppState;

impl From<TokenRow> for TokenView {
    fn from(t: TokenRow) -> Self {
        TokenView {
            id: t.id,
            kind: t.kind,
            name: t.name,
            node_id: t.node_id,
            user_id: t.user_id,
            created_at: t.created_at,
            revoked_at: t.revoked_at,
        }
    }
}

impl From<UserRow> for UserView {
    fn from(u: UserRow) -> Self {
        UserView {
            id: u.id,
            login: u.login,
            github_id: u.github_id,
            created_at: u.created_at,
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
    let (row, secret) = identity::create_token(&st, b.kind, &b.name, b.user_id.as_deref()).await?;
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

pub async fn list_users(State(st): State<AppState>) -> Result<Response, ApiError> {
    let v: Vec<UserView> = st.db.users().await?.into_iter().map(Into::into).collect();
    Ok(json(StatusCode::OK, v))
}
