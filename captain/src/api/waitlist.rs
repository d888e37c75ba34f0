//! The waitlist: anyone may join (`POST`, rate limited per client
//! address); admins list it and admit people.

use std::net::SocketAddr;

use api_types::misc::{JoinWaitlist, WaitlistEntry, WaitlistResult};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::json;
use crate::app::identity;
use crate::app::validate::is_email;
use crate::error::{ApiError, ApiJson, ApiPath, Code};
use crate::state::AppState;

pub async fn join_waitlist(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(b): ApiJson<JoinWaitlist>,
) -> Result<Response, ApiError> {
    if let Err(wait) = st
        .waitlist_limit
        .check(peer.ip(), std::time::Instant::now())
    {
        let mut r = ApiError::new(
            Code::RateLimited,
            "too many waitlist sign-ups from this address; try again later",
        )
        .into_response();
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return Ok(r);
    }
    let email = b.email.trim().to_string();
    if !is_email(&email) {
        return Err(ApiError::bad_request(format!(
            "{email:?} is not an email address"
        )));
    }
    let joined = st
        .db
        .join_waitlist(&meta_schema::new_id(), &email, meta_schema::now_millis())
        .await?;
    let status = if joined {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, WaitlistResult { email, joined }))
}

pub async fn list_waitlist(State(st): State<AppState>) -> Result<Response, ApiError> {
    let v: Vec<WaitlistEntry> = st
        .db
        .waitlist()
        .await?
        .into_iter()
        .map(|w| WaitlistEntry {
            id: w.id,
            email: w.email,
            github_login: w.github_login,
            created_at: w.created_at,
            admitted_at: w.admitted_at,
        })
        .collect();
    Ok(json(StatusCode::OK, v))
}

pub async fn admit(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    identity::admit(&st, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
