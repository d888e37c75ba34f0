//! Deployments: in the API a "deployment" is a Release of the meta
//! repository with the status machine of seed 004.

use api_types::Status;
use api_types::deployments::{CreateDeployment, DeploymentView, SetStatus};
use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use meta_schema::layout::release_path;
use serde::Deserialize;

use super::json;
use crate::app::access;
use crate::app::deploy::{self, NewRelease};
use crate::auth::Caller;
use crate::db::DeploymentRow;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;

impl From<DeploymentRow> for DeploymentView {
    fn from(d: DeploymentRow) -> Self {
        let legal = Status::parse(&d.status)
            .map(|s| s.legal_next().to_vec())
            .unwrap_or_default();
        DeploymentView {
            path: release_path(&d.env, &d.app, &d.id),
            id: d.id,
            app_id: d.app_id,
            project_id: d.project_id,
            env: d.env,
            app: d.app,
            image_digest: d.image_digest,
            source_commit: d.source_commit,
            min_instances: d.min_instances,
            status: d.status,
            reason: d.reason,
            present: d.present,
            commit: d.commit_id,
            legal_next: legal,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

#[derive(Deserialize)]
pub struct DeploymentQuery {
    app_id: Option<String>,
    before: Option<String>,
    limit: Option<i64>,
}

pub async fn list_deployments(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<DeploymentQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1-10000"));
    }
    let rows = match (&q.app_id, &caller.user_id) {
        (Some(app), _) => {
            let a = access::app(&st, &caller, app).await?;
            st.db
                .deployments(Some(&a.id), q.before.as_deref(), limit)
                .await?
        }
        (None, Some(user)) if !caller.is_admin() => {
            st.db
                .deployments_of_user(user, q.before.as_deref(), limit)
                .await?
        }
        (None, _) if caller.is_admin() => {
            st.db.deployments(None, q.before.as_deref(), limit).await?
        }
        (None, _) => Vec::new(),
    };
    let v: Vec<DeploymentView> = rows.into_iter().map(Into::into).collect();
    Ok(json(StatusCode::OK, v))
}

impl From<CreateDeployment> for NewRelease {
    fn from(b: CreateDeployment) -> Self {
        NewRelease {
            image_digest: b.image_digest,
            commit: b.commit,
            port: b.port,
            env_vars: b.env_vars,
            min_instances: b.min_instances,
            health_check_path: b.health_check_path,
        }
    }
}

pub async fn create_deployment(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(b): ApiJson<CreateDeployment>,
) -> Result<Response, ApiError> {
    let app = access::app(&st, &caller, &b.app_id).await?;
    if let Some(d) = &b.image_digest
        && !access::may_use_image(&st, &caller, d).await?
    {
        // Another tenant's image: as if it did not exist.
        return Err(crate::app::AppError::not_found("image", d).into());
    }
    let d = deploy::create_release(&st, &app, b.into()).await?;
    Ok(json(StatusCode::CREATED, DeploymentView::from(d)))
}

pub async fn get_deployment(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let d = access::deployment(&st, &caller, &id).await?;
    Ok(json(StatusCode::OK, DeploymentView::from(d)))
}

pub async fn set_deployment_status(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<SetStatus>,
) -> Result<Response, ApiError> {
    let d = access::deployment(&st, &caller, &id).await?;
    let d = deploy::set_status(&st, &d.id, b.status, b.reason).await?;
    Ok(json(StatusCode::OK, DeploymentView::from(d)))
}
