//! Projects and apps.

use api_types::projects::{AppView, CreateApp, CreateProject, ProjectView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::json;
use crate::app::projects::{self, NewApp, NewProject};
use crate::db::{AppRow, ProjectRow};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::state::AppState;

async fn app_view(st: &AppState, a: AppRow) -> Result<AppView, ApiError> {
    let active = st.db.active_release(&a.id).await?;
    Ok(AppView {
        id: a.id,
        project_id: a.project_id,
        env: a.env,
        name: a.name,
        created_at: a.created_at,
        active_release: active,
    })
}

async fn project_view(st: &AppState, p: ProjectRow) -> Result<ProjectView, ApiError> {
    let mut apps = Vec::new();
    for a in st.db.apps_of_project(&p.id).await? {
        apps.push(app_view(st, a).await?);
    }
    Ok(ProjectView {
        id: p.id,
        name: p.name,
        repo: p.repo,
        branch: p.branch,
        created_at: p.created_at,
        apps,
    })
}

async fn project(st: &AppState, id: &str) -> Result<ProjectRow, ApiError> {
    st.db
        .project(id)
        .await?
        .ok_or_else(|| ApiError::not_found("project", id))
}

pub async fn list_projects(State(st): State<AppState>) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for p in st.db.projects().await? {
        out.push(project_view(&st, p).await?);
    }
    Ok(json(StatusCode::OK, out))
}

pub async fn create_project(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<CreateProject>,
) -> Result<Response, ApiError> {
    let row = projects::create_project(
        &st,
        NewProject {
            name: b.name,
            repo: b.repo,
            branch: b.branch,
        },
    )
    .await?;
    Ok(json(StatusCode::CREATED, project_view(&st, row).await?))
}

pub async fn get_project(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let p = project(&st, &id).await?;
    Ok(json(StatusCode::OK, project_view(&st, p).await?))
}

pub async fn list_apps(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let p = project(&st, &id).await?;
    Ok(json(StatusCode::OK, project_view(&st, p).await?.apps))
}

pub async fn create_app(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<CreateApp>,
) -> Result<Response, ApiError> {
    let row = projects::create_app(
        &st,
        &id,
        NewApp {
            name: b.name,
            env: b.env,
        },
    )
    .await?;
    Ok(json(StatusCode::CREATED, app_view(&st, row).await?))
}

pub async fn get_app(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let a = st
        .db
        .app(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("app", &id))?;
    Ok(json(StatusCode::OK, app_view(&st, a).await?))
}

pub async fn delete_app(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    projects::delete_app(&st, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
