//! `POST /v1/waitlist`.

use api_types::misc::{JoinWaitlist, WaitlistResult};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::json;
use crate::app::validate::is_email;
use crate::error::{ApiError, ApiJson};
use crate::state::AppState;

pub async fn join_waitlist(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<JoinWaitlist>,
) -> Result<Response, ApiError> {
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
