//! `/v1/auth/github`: sign-in with a GitHub OAuth app
//! ([`crate::app::identity`]).
//!
//! Without `code`, a random `state` is set in a cookie bound to the browser
//! (HttpOnly, SameSite=Lax, 10 minutes) and the browser is sent to GitHub
//! with it; GitHub's callback must bring the same `state` back in the same
//! browser, so a sign-in started elsewhere (a forged link) is refused.

use api_types::misc::GithubLogin;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use rand::RngCore;
use serde::Deserialize;

use super::json;
use crate::app::identity::{self, GithubOauth, SignIn};
use crate::error::{ApiError, ApiQuery, Code};
use crate::state::AppState;

const STATE_COOKIE: &str = "zw_oauth_state";

#[derive(Deserialize)]
pub struct OauthQuery {
    code: Option<String>,
    state: Option<String>,
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

pub async fn auth_github(
    State(st): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<OauthQuery>,
) -> Result<Response, ApiError> {
    let Some(gh) = GithubOauth::of(&st) else {
        return Err(ApiError::new(
            Code::GithubOauthNotConfigured,
            "GitHub sign-in is not configured: start the captain with a GitHub OAuth app's client id and secret",
        ));
    };
    let Some(code) = q.code else {
        let mut b = [0u8; 24];
        rand::rng().fill_bytes(&mut b);
        let state = hex::encode(b);
        let mut r = Redirect::to(&gh.authorize_url(&state)).into_response();
        let c = format!(
            "{STATE_COOKIE}={state}; Path=/v1/auth/github; Max-Age=600; HttpOnly; SameSite=Lax"
        );
        r.headers_mut().insert(
            header::SET_COOKIE,
            HeaderValue::from_str(&c).expect("hex and ASCII"),
        );
        return Ok(r);
    };
    match (q.state.as_deref(), cookie(&headers, STATE_COOKIE)) {
        (Some(s), Some(c)) if !s.is_empty() && same(s, c) => {}
        _ => {
            return Err(ApiError::new(
                Code::BadRequest,
                "the sign-in state does not match this browser's: start again at /v1/auth/github",
            ));
        }
    }
    let clear = HeaderValue::from_static(
        "zw_oauth_state=; Path=/v1/auth/github; Max-Age=0; HttpOnly; SameSite=Lax",
    );
    let mut r = match identity::github_sign_in(&st, &gh, &code).await? {
        SignIn::Token {
            login,
            user_id,
            token,
        } => json(
            StatusCode::OK,
            GithubLogin {
                login,
                user_id,
                token,
            },
        ),
        SignIn::Waitlisted { login } => ApiError::new(
            Code::Waitlisted,
            format!(
                "{login} may not sign in yet: you are on the waitlist until an admin admits you"
            ),
        )
        .into_response(),
    };
    r.headers_mut().insert(header::SET_COOKIE, clear);
    Ok(r)
}
