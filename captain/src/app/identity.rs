//! Users and their tokens, GitHub sign-in and the waitlist.
//!
//! Sign-up is closed: GitHub sign-in gives a token only to a user an
//! allow-list names (`--github-allow-user`, or a member of an
//! `--github-allow-org`), to a user who signed in before, or to one an
//! admin admitted from the waitlist; everyone else is put on the waitlist.

use api_types::tokens::TokenKind;
use serde::Deserialize;

use super::{AppError, Result};
use crate::auth;
use crate::db::TokenRow;
use crate::db::tenants::UserRow;
use crate::state::AppState;

/// A new user id: `usr-` and a lower-case ULID.
fn new_user_id() -> String {
    format!("usr-{}", meta_schema::new_id().to_ascii_lowercase())
}

/// Create a token. A user token acts as `user` (an existing user id), or
/// as a new user named after the token.
pub async fn create_token(
    st: &AppState,
    kind: TokenKind,
    name: &str,
    user: Option<&str>,
) -> Result<(TokenRow, String)> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(AppError::BadRequest(
            "a token needs a name of 1-200 characters".into(),
        ));
    }
    let user_id = match (kind, user) {
        (TokenKind::Node | TokenKind::Edge, _) => {
            return Err(AppError::BadRequest(
                "node and edge credentials are issued when a host joins (POST /v1/cluster/join) or a node registers (POST /v1/nodes)".into(),
            ));
        }
        (TokenKind::Admin, Some(_)) => {
            return Err(AppError::BadRequest(
                "an admin token belongs to no user; user_id is for user tokens".into(),
            ));
        }
        (TokenKind::Admin, None) => None,
        (TokenKind::User, Some(u)) => Some(
            st.db
                .user(u)
                .await?
                .ok_or_else(|| AppError::not_found("user", u))?
                .id,
        ),
        (TokenKind::User, None) => {
            let u = UserRow {
                id: new_user_id(),
                login: name.to_string(),
                github_id: String::new(),
                created_at: meta_schema::now_millis(),
            };
            st.db.insert_user(&u).await?;
            Some(u.id)
        }
    };
    Ok(auth::issue(&st.db, kind, name, None, user_id.as_deref()).await?)
}

/// What GitHub sign-in is configured with.
#[derive(Debug, Clone)]
pub struct GithubOauth {
    pub client_id: String,
    pub client_secret: String,
    /// `https://github.com` (where users authorize).
    pub web_url: String,
    /// `https://api.github.com`.
    pub api_url: String,
    pub allow_users: Vec<String>,
    pub allow_orgs: Vec<String>,
}

impl GithubOauth {
    /// From the captain's configuration; `None` when sign-in is not set up.
    pub fn of(st: &AppState) -> Option<GithubOauth> {
        let c = &st.config;
        Some(GithubOauth {
            client_id: c.github_client_id.clone()?,
            client_secret: c.github_client_secret.clone()?,
            web_url: c.github_url.trim_end_matches('/').to_string(),
            api_url: c.github_api_url.trim_end_matches('/').to_string(),
            allow_users: c.github_allow_users.clone(),
            allow_orgs: c.github_allow_orgs.clone(),
        })
    }

    /// Where to send the browser, with `state` bound to it.
    pub fn authorize_url(&self, state: &str) -> String {
        let scope = if self.allow_orgs.is_empty() {
            "read:user user:email"
        } else {
            "read:user user:email read:org"
        };
        format!(
            "{}/login/oauth/authorize?client_id={}&scope={}&state={}",
            self.web_url,
            enc(&self.client_id),
            enc(scope),
            enc(state)
        )
    }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How a sign-in ended.
#[derive(Debug)]
pub enum SignIn {
    /// A user token.
    Token {
        login: String,
        user_id: String,
        token: String,
    },
    /// Not allowed (yet): on the waitlist until an admin admits them.
    Waitlisted { login: String },
}

#[derive(Deserialize)]
struct GithubUser {
    login: String,
    id: u64,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Deserialize)]
struct GithubOrg {
    login: String,
}

#[derive(Deserialize)]
struct AccessToken {
    access_token: Option<String>,
    error: Option<String>,
}

fn github_err(what: &str) -> impl FnOnce(reqwest::Error) -> AppError + '_ {
    move |e| AppError::internal(format!("GitHub ({what})"), e)
}

/// Finish a sign-in: exchange `code` for the user's GitHub identity and
/// decide.
pub async fn github_sign_in(st: &AppState, gh: &GithubOauth, code: &str) -> Result<SignIn> {
    let client = reqwest::Client::builder()
        .user_agent("zeitwork-captain")
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .map_err(|e| AppError::internal("HTTP client", e))?;
    let tok: AccessToken = client
        .post(format!("{}/login/oauth/access_token", gh.web_url))
        .header("Accept", "application/json")
        .form(&[
            ("client_id", gh.client_id.as_str()),
            ("client_secret", gh.client_secret.as_str()),
            ("code", code),
        ])
        .send()
        .await
        .map_err(github_err("token exchange"))?
        .json()
        .await
        .map_err(github_err("token exchange"))?;
    let Some(access) = tok.access_token else {
        return Err(AppError::Forbidden(format!(
            "GitHub refused the sign-in code: {}",
            tok.error.unwrap_or_else(|| "no access token".into())
        )));
    };
    let user: GithubUser = client
        .get(format!("{}/user", gh.api_url))
        .bearer_auth(&access)
        .header("Accept", "application/vnd.github+json")
        .send()
        .await
        .map_err(github_err("user"))?
        .error_for_status()
        .map_err(github_err("user"))?
        .json()
        .await
        .map_err(github_err("user"))?;
    let github_id = user.id.to_string();
    let known = st.db.user_by_github(&github_id).await?;
    let mut allowed = known.is_some()
        || gh
            .allow_users
            .iter()
            .any(|u| u.eq_ignore_ascii_case(&user.login))
        || st.db.admitted(&github_id).await?;
    if !allowed && !gh.allow_orgs.is_empty() {
        let orgs: Vec<GithubOrg> = client
            .get(format!("{}/user/orgs", gh.api_url))
            .bearer_auth(&access)
            .header("Accept", "application/vnd.github+json")
            .send()
            .await
            .map_err(github_err("organizations"))?
            .error_for_status()
            .map_err(github_err("organizations"))?
            .json()
            .await
            .map_err(github_err("organizations"))?;
        allowed = orgs.iter().any(|o| {
            gh.allow_orgs
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&o.login))
        });
    }
    if !allowed {
        let email = user
            .email
            .filter(|e| super::validate::is_email(e))
            .unwrap_or_else(|| format!("{}@users.noreply.github.com", user.login));
        st.db
            .waitlist_github(
                &meta_schema::new_id(),
                &email,
                &user.login,
                &github_id,
                meta_schema::now_millis(),
            )
            .await?;
        tracing::info!(login = %user.login, "GitHub sign-in not allowed: on the waitlist");
        return Ok(SignIn::Waitlisted { login: user.login });
    }
    let u = match known {
        Some(u) => u,
        None => {
            let u = UserRow {
                id: new_user_id(),
                login: user.login.clone(),
                github_id,
                created_at: meta_schema::now_millis(),
            };
            st.db.insert_user(&u).await?;
            u
        }
    };
    let (_, token) = auth::issue(
        &st.db,
        TokenKind::User,
        &format!("github:{}", user.login),
        None,
        Some(&u.id),
    )
    .await?;
    Ok(SignIn::Token {
        login: user.login,
        user_id: u.id,
        token,
    })
}

/// Admit waitlist entry `id`: their next GitHub sign-in gives a token.
pub async fn admit(st: &AppState, id: &str) -> Result<()> {
    if st.db.admit(id, meta_schema::now_millis()).await? {
        Ok(())
    } else {
        Err(AppError::not_found("waitlist entry (not yet admitted)", id))
    }
}
