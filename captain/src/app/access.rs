//! Who may see and change what. A user acts only inside the projects they
//! are a member of; admins see all. Something of another tenant is not
//! found (404), never forbidden, so its name does not leak. Node tokens
//! never reach these (their routes are the node protocol).

use std::collections::BTreeSet;

use super::{AppError, Result};
use crate::auth::Caller;
use crate::db::{AppRow, BuildRow, DeploymentRow, ImageRow, InstanceRow, ProjectRow};
use crate::state::AppState;

/// A member's role that may manage the project's members.
pub const OWNER: &str = "owner";
pub const MEMBER: &str = "member";

/// The caller's role in `project` (`owner` for admins), if any.
pub async fn role(st: &AppState, caller: &Caller, project: &str) -> Result<Option<String>> {
    if caller.is_admin() {
        return Ok(Some(OWNER.into()));
    }
    match &caller.user_id {
        Some(u) => Ok(st.db.member_role(project, u).await?),
        None => Ok(None),
    }
}

/// Project `id`, if the caller may see it.
pub async fn project(st: &AppState, caller: &Caller, id: &str) -> Result<ProjectRow> {
    let missing = || AppError::not_found("project", id);
    let p = st.db.project(id).await?.ok_or_else(missing)?;
    if role(st, caller, &p.id).await?.is_none() {
        return Err(missing());
    }
    Ok(p)
}

/// Project `id`, if the caller owns it (or is an admin).
pub async fn owned_project(st: &AppState, caller: &Caller, id: &str) -> Result<ProjectRow> {
    let p = project(st, caller, id).await?;
    if role(st, caller, &p.id).await?.as_deref() != Some(OWNER) {
        return Err(AppError::Forbidden(format!(
            "only an owner of project {id} may change its members"
        )));
    }
    Ok(p)
}

/// The projects the caller may see.
pub async fn projects(st: &AppState, caller: &Caller) -> Result<Vec<ProjectRow>> {
    if caller.is_admin() {
        return Ok(st.db.projects().await?);
    }
    match &caller.user_id {
        Some(u) => Ok(st.db.member_projects(u).await?),
        None => Ok(Vec::new()),
    }
}

/// App `id`, if the caller may see its project.
pub async fn app(st: &AppState, caller: &Caller, id: &str) -> Result<AppRow> {
    let missing = || AppError::not_found("app", id);
    let a = st.db.app(id).await?.ok_or_else(missing)?;
    if role(st, caller, &a.project_id).await?.is_none() {
        return Err(missing());
    }
    Ok(a)
}

/// Ids of the apps the caller may see; `None` for all (admins).
pub async fn app_ids(st: &AppState, caller: &Caller) -> Result<Option<BTreeSet<String>>> {
    if caller.is_admin() {
        return Ok(None);
    }
    let mut out = BTreeSet::new();
    for p in projects(st, caller).await? {
        for a in st.db.apps_of_project(&p.id).await? {
            out.insert(a.id);
        }
    }
    Ok(Some(out))
}

/// The project a release belongs to: its app's now, else the one recorded
/// with it (its app was deleted).
async fn project_of_app(st: &AppState, app_id: &str, recorded: &str) -> Result<String> {
    Ok(st
        .db
        .app(app_id)
        .await?
        .map_or_else(|| recorded.to_string(), |a| a.project_id))
}

/// Deployment (release) `id`, if the caller may see its app.
pub async fn deployment(st: &AppState, caller: &Caller, id: &str) -> Result<DeploymentRow> {
    let missing = || AppError::not_found("deployment", id);
    let d = st.db.deployment(id).await?.ok_or_else(missing)?;
    let p = project_of_app(st, &d.app_id, &d.project_id).await?;
    if role(st, caller, &p).await?.is_none() {
        return Err(missing());
    }
    Ok(d)
}

/// Build `id`, if the caller may see its app.
pub async fn build(st: &AppState, caller: &Caller, id: &str) -> Result<BuildRow> {
    let missing = || AppError::not_found("build", id);
    let b = st.db.build(id).await?.ok_or_else(missing)?;
    if caller.is_admin() {
        return Ok(b);
    }
    match st.db.app(&b.app_id).await? {
        Some(a) if role(st, caller, &a.project_id).await?.is_some() => Ok(b),
        _ => Err(missing()),
    }
}

/// May the caller use image `digest` (one of its projects built it)?
/// A digest no project built is anyone's: it names nothing to take.
pub async fn may_use_image(st: &AppState, caller: &Caller, digest: &str) -> Result<bool> {
    if caller.is_admin() || st.db.image(digest).await?.is_none() {
        return Ok(true);
    }
    for p in st.db.image_projects(digest).await? {
        if role(st, caller, &p).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Image `id` (id or digest), if the caller may see it: admins, nodes
/// (they download what is placed on them), users of a project that built it.
pub async fn image(st: &AppState, caller: &Caller, id: &str) -> Result<ImageRow> {
    let missing = || AppError::not_found("image", id);
    let img = st.db.image(id).await?.ok_or_else(missing)?;
    if caller.node_id.is_some() || may_use_image(st, caller, &img.digest).await? {
        Ok(img)
    } else {
        Err(missing())
    }
}

/// Instance `id`, if the caller may see it: its node, admins, users of its
/// app's project.
pub async fn instance(st: &AppState, caller: &Caller, id: &str) -> Result<InstanceRow> {
    let missing = || AppError::not_found("instance", id);
    let x = st.db.instance(id).await?.ok_or_else(missing)?;
    if caller.is_admin() || caller.node_id.as_deref() == Some(x.node_id.as_str()) {
        return Ok(x);
    }
    if caller.node_id.is_none()
        && let Some(a) = st.db.app(&crate::meta::app_id(&x.env, &x.app)).await?
        && role(st, caller, &a.project_id).await?.is_some()
    {
        return Ok(x);
    }
    Err(missing())
}
