//! `POST /v1/webhook/github`: a GitHub push, verified by its HMAC
//! (`X-Hub-Signature-256`), queues a build of the pushed commit that deploys
//! its image, for every app of every project whose repo and branch match.
//! A captain without a builder instead records a deployment (a Release with
//! the pushed source commit, status pending until an image is given).

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use api_types::builds::{BuildView, DeploySpec};
use api_types::deployments::DeploymentView;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::deploy::NewRelease;
use crate::error::{ApiError, Code, bytes_rejection, parse_json};
use crate::state::AppState;

/// The fields of a GitHub push event the captain reads.
#[derive(Deserialize, ToSchema)]
pub struct GithubPush {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub after: String,
    pub repository: GithubRepository,
}

#[derive(Deserialize, ToSchema)]
pub struct GithubRepository {
    pub clone_url: Option<String>,
    pub html_url: Option<String>,
    pub ssh_url: Option<String>,
    pub git_url: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookResult {
    pub event: String,
    /// Deployments recorded (a captain without a builder).
    pub deployments: Vec<DeploymentView>,
    /// Builds queued, each deploying its image.
    pub builds: Vec<BuildView>,
    /// The push was to the meta repository itself: the captain follows it
    /// now (when valid).
    #[serde(default)]
    pub meta: bool,
}

/// Do two git URLs name the same repository (ignoring a trailing `.git` or
/// slash, the scheme's case and credentials)?
fn same_repo(a: &str, b: &str) -> bool {
    let norm = |u: &str| {
        let u = u.to_ascii_lowercase();
        let u = u.split_once("://").map_or(u.as_str(), |(_, rest)| rest);
        let u = u.rsplit_once('@').map_or(u, |(_, host)| host);
        // git@host:owner/repo (scp-like) names host/owner/repo.
        let u = u.replacen(
            ':',
            "/",
            usize::from(!u.contains('/') || u.find(':') < u.find('/')),
        );
        u.trim_end_matches('/').trim_end_matches(".git").to_string()
    };
    !a.is_empty() && norm(a) == norm(b)
}

/// Does `signature` ("sha256=<hex>") sign `body` with `secret`?
pub fn verify_signature(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// The signature GitHub sends for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub async fn github(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(bytes_rejection)?;
    let Some(secret) = st.config.github_webhook_secret.clone() else {
        return Err(ApiError::new(
            Code::NotConfigured,
            "GitHub webhooks are not configured: start the captain with a webhook secret",
        ));
    };
    let sig = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(Code::InvalidSignature, "missing X-Hub-Signature-256 header")
        })?;
    if !verify_signature(secret.as_bytes(), &body, sig) {
        return Err(ApiError::new(
            Code::InvalidSignature,
            "X-Hub-Signature-256 does not match the body and the configured secret",
        ));
    }
    let event = headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if event != "push" {
        return Ok((
            StatusCode::ACCEPTED,
            axum::Json(WebhookResult {
                event,
                deployments: vec![],
                builds: vec![],
                meta: false,
            }),
        )
            .into_response());
    }
    let push: GithubPush = parse_json(&body)?;
    let Some(branch) = push.git_ref.strip_prefix("refs/heads/") else {
        return Ok((
            StatusCode::ACCEPTED,
            axum::Json(WebhookResult {
                event,
                deployments: vec![],
                builds: vec![],
                meta: false,
            }),
        )
            .into_response());
    };
    if push.after.bytes().all(|b| b == b'0') {
        // A deleted branch: nothing to build.
        return Ok((
            StatusCode::ACCEPTED,
            axum::Json(WebhookResult {
                event,
                deployments: vec![],
                builds: vec![],
                meta: false,
            }),
        )
            .into_response());
    }
    let r = &push.repository;
    let mut urls: Vec<&str> = [&r.clone_url, &r.html_url, &r.ssh_url, &r.git_url]
        .into_iter()
        .filter_map(|u| u.as_deref())
        .collect();
    urls.sort();
    urls.dedup();
    // A push to the meta repository itself (a user's `git revert`, an edit
    // on GitHub): follow it now rather than at the next poll.
    if let Some(remote) = &st.config.meta_remote
        && urls.iter().any(|u| same_repo(u, remote))
    {
        st.mirror_wake.notify_one();
        tracing::info!(commit = %push.after, "push to the meta repository: following it now");
        return Ok((
            StatusCode::ACCEPTED,
            axum::Json(WebhookResult {
                event,
                deployments: vec![],
                builds: vec![],
                meta: true,
            }),
        )
            .into_response());
    }
    let mut deployments = Vec::new();
    let mut builds = Vec::new();
    for url in urls {
        for project in st.db.projects_by_repo(url, branch).await? {
            for app in st.db.apps_of_project(&project.id).await? {
                if st.config.builder.is_some() {
                    let b = crate::app::builds::queue_git_build(
                        &st,
                        &app,
                        &project,
                        &push.after,
                        Some(DeploySpec::default()),
                    )
                    .await?;
                    builds.push(b.into());
                    continue;
                }
                let d = crate::app::deploy::create_release(
                    &st,
                    &app,
                    NewRelease {
                        commit: Some(push.after.clone()),
                        ..Default::default()
                    },
                )
                .await?;
                deployments.push(d.into());
            }
        }
    }
    tracing::info!(branch, commit = %push.after, deployments = deployments.len(), builds = builds.len(), "GitHub push");
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(WebhookResult {
            event,
            deployments,
            builds,
            meta: false,
        }),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls_compare_by_what_they_name() {
        let gh = "https://github.com/acme/meta.git";
        for same in [
            "https://github.com/acme/meta",
            "https://GitHub.com/acme/meta/",
            "git@github.com:acme/meta.git",
            "ssh://git@github.com/acme/meta.git",
            "https://x-access-token:abc@github.com/acme/meta.git",
        ] {
            assert!(same_repo(same, gh), "{same}");
        }
        for other in [
            "https://github.com/acme/meta2",
            "https://gitlab.com/acme/meta",
            "",
        ] {
            assert!(!same_repo(other, gh), "{other}");
        }
    }
}
