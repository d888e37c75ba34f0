//! Projects, their apps and members. A user sees only the projects they
//! are a member of (`crate::app::access`).

use api_types::projects::{AddMember, AppView, CreateApp, CreateProject, MemberView, ProjectView};
use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::json;
use crate::app::access;
use crate::app::projects::{self, NewApp, NewProject};
use crate::auth::Caller;
use crate::db::tenants::MemberRow;
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
        domains: serde_json::from_str(&a.domains).unwrap_or_default(),
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
        dockerfile: p.dockerfile,
        build_args: serde_json::from_str(&p.build_args).unwrap_or_default(),
        created_at: p.created_at,
        apps,
    })
}

impl From<MemberRow> for MemberView {
    fn from(m: MemberRow) -> Self {
        MemberView {
            user_id: m.user_id,
            login: m.login,
            role: m.role,
            created_at: m.created_at,
        }
    }
}

pub async fn list_projects(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let mut out = Vec::new();
    for p in access::projects(&st, &caller).await? {
        out.push(project_view(&st, p).await?);
    }
    Ok(json(StatusCode::OK, out))
}

pub async fn create_project(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(b): ApiJson<CreateProject>,
) -> Result<Response, ApiError> {
    let row = projects::create_project(
        &st,
        &caller,
        NewProject {
            name: b.name,
            repo: b.repo,
            branch: b.branch,
            dockerfile: b.dockerfile,
            build_args: b.build_args,
        },
    )
    .await?;
    Ok(json(StatusCode::CREATED, project_view(&st, row).await?))
}

pub async fn get_project(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let p = access::project(&st, &caller, &id).await?;
    Ok(json(StatusCode::OK, project_view(&st, p).await?))
}

pub async fn list_apps(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let p = access::project(&st, &caller, &id).await?;
    Ok(json(StatusCode::OK, project_view(&st, p).await?.apps))
}

pub async fn create_app(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<CreateApp>,
) -> Result<Response, ApiError> {
    let p = access::project(&st, &caller, &id).await?;
    let row = projects::create_app(
        &st,
        &p.id,
        NewApp {
            name: b.name,
            env: b.env,
            domains: b.domains,
        },
    )
    .await?;
    Ok(json(StatusCode::CREATED, app_view(&st, row).await?))
}

pub async fn get_app(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let a = access::app(&st, &caller, &id).await?;
    Ok(json(StatusCode::OK, app_view(&st, a).await?))
}

pub async fn delete_app(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let a = access::app(&st, &caller, &id).await?;
    projects::delete_app(&st, &a.id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn list_members(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let v: Vec<MemberView> = projects::members(&st, &caller, &id)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(json(StatusCode::OK, v))
}

pub async fn add_member(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<AddMember>,
) -> Result<Response, ApiError> {
    let m = projects::add_member(&st, &caller, &id, &b.user_id, b.role.as_deref()).await?;
    Ok(json(StatusCode::CREATED, MemberView::from(m)))
}

pub async fn remove_member(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, user)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    projects::remove_member(&st, &caller, &id, &user).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
