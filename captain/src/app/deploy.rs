//! Releases: what `POST /v1/deployments` (a "deployment" of the API is a
//! Release file of the meta repository, with the status machine of seed
//! 004), a build that deploys its image, and the GitHub webhook create;
//! and the moves of a release's status.

use std::collections::BTreeMap;

use meta_schema::layout::release_path;
use meta_schema::pb;
use meta_schema::repo::ChangeSet;
use prost::Message;

use super::validate::{check_commit, check_digest};
use super::{AppError, Result};
use crate::db::{AppRow, DeploymentRow};
use crate::state::AppState;
use api_types::Status;

/// A new release of an app: an image, or a source commit to build, and the
/// settings that differ from the defaults.
#[derive(Debug, Clone, Default)]
pub struct NewRelease {
    /// `sha256:<hex>` of a built image.
    pub image_digest: Option<String>,
    /// The source commit (the image's, or one still to build).
    pub commit: Option<String>,
    pub port: Option<u32>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub min_instances: Option<u32>,
    pub health_check_path: Option<String>,
}

/// Commit a new release of `app` to the meta repository and record it.
pub async fn create_release(st: &AppState, app: &AppRow, req: NewRelease) -> Result<DeploymentRow> {
    let project = st
        .db
        .project(&app.project_id)
        .await?
        .ok_or_else(|| AppError::not_found("project", &app.project_id))?;
    let digest = req.image_digest.unwrap_or_default();
    let commit = req.commit.unwrap_or_default();
    if digest.is_empty() && commit.is_empty() {
        return Err(AppError::BadRequest(
            "a deployment needs an image_digest or a source commit".into(),
        ));
    }
    if !digest.is_empty() {
        check_digest("image_digest", &digest)?;
    }
    check_commit("commit", &commit)?;
    let (secret_refs, secrets_blob) = super::secrets::current_refs(st, &app.env, &app.name).await?;
    let release = pb::Release {
        id: meta_schema::new_id(),
        secret_refs,
        secrets_blob,
        app: app.name.clone(),
        env: app.env.clone(),
        image_digest: digest.clone(),
        port: req.port.unwrap_or(0),
        env_vars: req.env_vars.unwrap_or_default(),
        min_instances: req.min_instances.unwrap_or(0),
        health_check: req.health_check_path.map(|p| pb::HealthCheck {
            kind: Some(pb::health_check::Kind::HttpPath(p)),
            interval_ms: 0,
            timeout_ms: 0,
        }),
        source: Some(pb::Source {
            repo: project.repo.clone(),
            branch: project.branch.clone(),
            commit: commit.clone(),
        }),
        created_at: meta_schema::now_millis(),
        ..Default::default()
    };
    // Field rules first, so a bad release is refused before any write.
    let mut check = meta_schema::MetaTree::new();
    check.insert(
        meta_schema::layout::env_path(&app.env),
        pb::Env {
            name: app.env.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let path = release_path(&app.env, &app.name, &release.id);
    check.insert(path.clone(), release.encode_to_vec());
    if let Err(e) = meta_schema::validate::validate_tree(&check) {
        return Err(AppError::InvalidRelease(e.to_string()));
    }
    super::envs::ensure_env(st, &app.env).await?;
    let commit_id = st
        .meta
        .commit(
            ChangeSet::new().add(path, release.encode_to_vec()),
            format!("Release {} of {} in {}", release.id, app.name, app.env),
        )
        .await?;
    let (status, reason) = crate::meta::initial_status(&st.db, &release, &[]).await?;
    let now = meta_schema::now_millis();
    let row = DeploymentRow {
        id: release.id.clone(),
        app_id: app.id.clone(),
        project_id: project.id.clone(),
        env: app.env.clone(),
        app: app.name.clone(),
        image_digest: digest,
        source_commit: commit,
        min_instances: i64::from(release.instances()),
        status: status.as_str().into(),
        reason,
        present: true,
        commit_id,
        created_at: release.created_at,
        updated_at: now,
    };
    st.db.upsert_deployment(&row).await?;
    st.mirror_wake.notify_one();
    Ok(st.db.deployment(&row.id).await?.unwrap_or(row))
}

#[derive(Debug, thiserror::Error)]
#[error("unknown deployment status {0:?} in the database")]
struct UnknownStatus(String);

/// Move release `id` to `to` along the status machine (`reason` required
/// for `failed`).
pub async fn set_status(
    st: &AppState,
    id: &str,
    to: Status,
    reason: Option<String>,
) -> Result<DeploymentRow> {
    let d = st
        .db
        .deployment(id)
        .await?
        .ok_or_else(|| AppError::not_found("deployment", id))?;
    let reason = reason.unwrap_or_default();
    if to == Status::Failed && reason.trim().is_empty() {
        return Err(AppError::BadRequest(
            "a failed deployment needs a reason".into(),
        ));
    }
    let from = Status::parse(&d.status)
        .ok_or_else(|| AppError::internal("deployment status", UnknownStatus(d.status.clone())))?;
    let illegal = |from: Status| {
        let legal: Vec<&str> = from.legal_next().iter().map(|s| s.as_str()).collect();
        AppError::IllegalTransition(format!(
            "deployment {id} cannot go from {from} to {to}; legal from {from}: [{}]",
            legal.join(", ")
        ))
    };
    if !from.can_become(to) {
        return Err(illegal(from));
    }
    if !st
        .db
        .set_deployment_status(
            id,
            from.as_str(),
            to.as_str(),
            reason.trim(),
            meta_schema::now_millis(),
        )
        .await?
    {
        let now = st
            .db
            .deployment(id)
            .await?
            .and_then(|d| Status::parse(&d.status))
            .unwrap_or(from);
        return Err(illegal(now));
    }
    st.db
        .deployment(id)
        .await?
        .ok_or_else(|| AppError::not_found("deployment", id))
}

/// After an instance report: a release whose deployment is `starting`
/// becomes `running` once enough of its instances are healthy.
pub async fn check_running(st: &AppState, release_id: &str) -> Result<()> {
    let Some(d) = st.db.deployment(release_id).await? else {
        return Ok(());
    };
    if d.status != Status::Starting.as_str() {
        return Ok(());
    }
    let healthy = st.db.healthy_instances_of_release(release_id).await?;
    if healthy >= d.min_instances.max(1)
        && st
            .db
            .set_deployment_status(&d.id, "starting", "running", "", meta_schema::now_millis())
            .await?
    {
        tracing::info!(deployment = %d.id, healthy, "deployment is running");
    }
    Ok(())
}
