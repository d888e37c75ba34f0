//! Projects, apps and envs.

use meta_schema::repo::ChangeSet;

use super::validate::{check_name, valid_branch, valid_repo};
use super::{AppError, Result};
use crate::db::{AppRow, ProjectRow};
use crate::state::AppState;

/// A project: a git source with a name.
#[derive(Debug, Clone)]
pub struct NewProject {
    pub name: String,
    pub repo: String,
    /// Default `main`.
    pub branch: Option<String>,
}

pub async fn create_project(st: &AppState, req: NewProject) -> Result<ProjectRow> {
    check_name("project name", &req.name)?;
    if !valid_repo(&req.repo) {
        return Err(AppError::BadRequest(format!(
            "{:?} is not a git URL or path",
            req.repo
        )));
    }
    let branch = req.branch.unwrap_or_else(|| "main".into());
    if !valid_branch(&branch) {
        return Err(AppError::BadRequest(format!(
            "{branch:?} is not a git branch name"
        )));
    }
    let row = ProjectRow {
        id: crate::meta::project_id(&req.repo, &branch),
        name: req.name,
        repo: req.repo,
        branch,
        created_at: meta_schema::now_millis(),
    };
    if !st.db.insert_project(&row).await? {
        return Err(AppError::Conflict(format!(
            "a project for {} (branch {}) exists already: {}",
            row.repo, row.branch, row.id
        )));
    }
    Ok(row)
}

/// An app of a project, in an env (default `production`).
#[derive(Debug, Clone)]
pub struct NewApp {
    pub name: String,
    pub env: Option<String>,
}

pub async fn create_app(st: &AppState, project_id: &str, req: NewApp) -> Result<AppRow> {
    let p = st
        .db
        .project(project_id)
        .await?
        .ok_or_else(|| AppError::not_found("project", project_id))?;
    check_name("app name", &req.name)?;
    let env = req.env.unwrap_or_else(|| "production".into());
    check_name("env name", &env)?;
    let row = AppRow {
        id: crate::meta::app_id(&env, &req.name),
        project_id: p.id,
        env: env.clone(),
        name: req.name.clone(),
        created_at: meta_schema::now_millis(),
    };
    let exists =
        || AppError::Conflict(format!("an app named {:?} exists in env {env:?}", req.name));
    if st.db.app(&row.id).await?.is_some() {
        return Err(exists());
    }
    match st.db.insert_app(&row).await {
        Ok(()) => {}
        Err(e) if e.is_unique_violation() => return Err(exists()),
        Err(e) => return Err(e.into()),
    }
    super::envs::ensure_env(st, &env).await?;
    Ok(row)
}

/// Delete an app: its release files go from the meta repository (so its
/// instances stop), its row from the database.
pub async fn delete_app(st: &AppState, id: &str) -> Result<()> {
    let a = st
        .db
        .app(id)
        .await?
        .ok_or_else(|| AppError::not_found("app", id))?;
    let _mirror = st.meta.mirror_guard().await;
    let paths = st.meta.release_paths(&a.env, &a.name).await?;
    if !paths.is_empty() {
        let mut cs = ChangeSet::new();
        for p in paths {
            cs = cs.remove(p);
        }
        st.meta
            .commit(cs, format!("Delete app {} in {}", a.name, a.env))
            .await?;
    }
    st.db.delete_app(&a.id, meta_schema::now_millis()).await?;
    st.mirror_wake.notify_one();
    Ok(())
}
