//! `/v1/auth/github`: sign-in with a GitHub OAuth app.

use api_types::misc::GithubLogin;
use api_types::tokens::TokenKind;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::json;
use crate::auth;
use crate::error::{ApiError, ApiQuery, Code};
use crate::state::AppState;

#[derive(Deserialize)]
pub struct OauthQuery {
    code: Option<String>,
}

pub async fn auth_github(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<OauthQuery>,
) -> Result<Response, ApiError> {
    let (Some(id), Some(secret)) = (
        st.config.github_client_id.clone(),
        st.config.github_client_secret.clone(),
    ) else {
        return Err(ApiError::new(
            Code::GithubOauthNotConfigured,
            "GitHub OAuth is not configured: start the captain with a GitHub OAuth app's client id and secret",
        ));
    };
    let base = st.config.github_url.trim_end_matches('/').to_string();
    let Some(code) = q.code else {
        let url = format!("{base}/login/oauth/authorize?client_id={id}&scope=read:user");
        return Ok(Redirect::to(&url).into_response());
    };
    let client = reqwest::Client::new();
    let unreachable = |e: reqwest::Error| {
        ApiError::new(Code::NotConfigured, format!("GitHub is unreachable: {e}"))
    };
    let tok: serde_json::Value = client
        .post(format!("{base}/login/oauth/access_token"))
        .header("Accept", "application/json")
        .form(&[
            ("client_id", id.as_str()),
            ("client_secret", secret.as_str()),
            ("code", code.as_str()),
        ])
        .send()
        .await
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)?;
    let Some(access) = tok.get("access_token").and_then(|v| v.as_str()) else {
        return Err(ApiError::new(
            Code::Unauthorized,
            format!("GitHub refused the code: {tok}"),
        ));
    };
    let user: serde_json::Value = client
        .get(format!(
            "{}/user",
            st.config.github_api_url.trim_end_matches('/')
        ))
        .bearer_auth(access)
        .header("User-Agent", "zeitwork-captain")
        .send()
        .await
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)?;
    let Some(login) = user.get("login").and_then(|v| v.as_str()) else {
        return Err(ApiError::new(
            Code::Unauthorized,
            "GitHub did not return a user",
        ));
    };
    let (_, token) = auth::issue(&st.db, TokenKind::User, &format!("github:{login}"), None).await?;
    Ok(json(
        StatusCode::OK,
        GithubLogin {
            login: login.to_string(),
            token,
        },
    ))
}
