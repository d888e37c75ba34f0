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
        }),
    )
        .into_response())
}
