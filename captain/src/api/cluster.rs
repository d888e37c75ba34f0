//! Joining the cluster ([`crate::app::cluster`]).

use api_types::cluster::{CreateJoinToken, JoinRequest, RenewRequest};
use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::json;
use crate::app::cluster;
use crate::auth::{self, Caller};
use crate::error::{ApiError, ApiJson, ApiPath, Code};
use crate::state::AppState;

pub async fn create_join_token(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<CreateJoinToken>,
) -> Result<Response, ApiError> {
    Ok(json(
        StatusCode::CREATED,
        cluster::create_join_token(&st, b).await?,
    ))
}

/// `POST /v1/cluster/join`: the join token is the bearer.
pub async fn join(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<JoinRequest>,
) -> Result<Response, ApiError> {
    let Some(token) = auth::presented_secret(&headers) else {
        return Err(ApiError::new(
            Code::Unauthorized,
            "send the join token: Authorization: Bearer zwj_...",
        ));
    };
    Ok(json(
        StatusCode::CREATED,
        cluster::join(&st, &token, b).await?,
    ))
}

pub async fn renew(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(b): ApiJson<RenewRequest>,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, cluster::renew(&st, &caller, b).await?))
}

/// `GET /v1/cluster/members`: the hosts that joined.
pub async fn list_members(State(st): State<AppState>) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, cluster::members(&st).await?))
}

/// `DELETE /v1/cluster/members/{name}`: a host leaves (an edge; a worker
/// is removed with its node, `DELETE /v1/nodes/{id}`).
pub async fn remove_member(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    cluster::remove_member(&st, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
