//! Projects and apps: documents of the meta repository
//! (`projects/<id>.pb`, `envs/<env>/apps/<app>/app.pb`), mirrored into the
//! database like releases, so wiping the database loses none of them.

use std::collections::BTreeMap;

use meta_schema::layout::{app_path, project_path, secrets_path};
use meta_schema::pb;
use meta_schema::repo::ChangeSet;
use prost::Message;

use super::access;
use super::validate::{check_name, valid_branch, valid_repo};
use super::{AppError, Result};
use crate::auth::Caller;
use crate::db::tenants::MemberRow;
use crate::db::{AppRow, ProjectRow};
use crate::meta::{app_id, new_project_id, project_row};
use crate::state::AppState;

/// A project: a git source with a name, and how to build it.
#[derive(Debug, Clone, Default)]
pub struct NewProject {
    pub name: String,
    pub repo: String,
    /// Default `main`.
    pub branch: Option<String>,
    /// Dockerfile path in the source (default `Dockerfile`).
    pub dockerfile: Option<String>,
    pub build_args: BTreeMap<String, String>,
}

fn check_build(dockerfile: &str, args: &BTreeMap<String, String>) -> Result<()> {
    if dockerfile.starts_with('/') || dockerfile.split('/').any(|c| c == "..") {
        return Err(AppError::BadRequest(format!(
            "dockerfile {dockerfile:?} must be a path inside the source"
        )));
    }
    if let Some(k) = args.keys().find(|k| k.is_empty() || k.contains('=')) {
        return Err(AppError::BadRequest(format!(
            "build argument name {k:?} is empty or contains '='"
        )));
    }
    Ok(())
}

/// Create a project; a user who creates one is its owner.
pub async fn create_project(st: &AppState, caller: &Caller, req: NewProject) -> Result<ProjectRow> {
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
    let dockerfile = req.dockerfile.unwrap_or_default();
    check_build(&dockerfile, &req.build_args)?;
    let doc = pb::Project {
        id: new_project_id(),
        name: req.name,
        source: Some(pb::Source {
            repo: req.repo,
            branch,
            commit: String::new(),
        }),
        build: Some(pb::BuildSettings {
            dockerfile,
            build_args: req.build_args.into_iter().collect(),
        }),
        created_at: meta_schema::now_millis(),
    };
    let _mirror = st.meta.mirror_guard().await;
    st.meta
        .commit(
            ChangeSet::new().add(project_path(&doc.id), doc.encode_to_vec()),
            format!("Create project {} ({})", doc.name, doc.id),
        )
        .await?;
    let row = project_row(&doc);
    st.db.upsert_project(&row).await?;
    if let Some(u) = &caller.user_id {
        st.db
            .set_member(&row.id, u, access::OWNER, meta_schema::now_millis())
            .await?;
    }
    Ok(row)
}

/// An app of a project, in an env (default `production`).
#[derive(Debug, Clone, Default)]
pub struct NewApp {
    pub name: String,
    pub env: Option<String>,
    /// Custom domains routed to the app.
    pub domains: Vec<String>,
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
    let exists =
        || AppError::Conflict(format!("an app named {:?} exists in env {env:?}", req.name));
    let id = app_id(&env, &req.name);
    if st.db.app(&id).await?.is_some() {
        return Err(exists());
    }
    super::envs::ensure_env(st, &env).await?;
    let doc = pb::App {
        name: req.name.clone(),
        env: env.clone(),
        project: p.id.clone(),
        domains: req.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        created_at: meta_schema::now_millis(),
    };
    let _mirror = st.meta.mirror_guard().await;
    match st
        .meta
        .commit(
            ChangeSet::new().add(app_path(&env, &req.name), doc.encode_to_vec()),
            format!("Create app {} in {env} (project {})", req.name, p.id),
        )
        .await
    {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.repo_error(),
                Some(meta_schema::repo::RepoError::AlreadyExists { .. })
            ) =>
        {
            return Err(exists());
        }
        Err(e) => return Err(e.into()),
    }
    let row = AppRow {
        id,
        project_id: p.id,
        env,
        name: req.name,
        created_at: doc.created_at,
        domains: serde_json::to_string(&doc.domains).expect("a list serializes"),
    };
    st.db.upsert_app(&row).await?;
    Ok(row)
}

/// Delete an app: its `app.pb`, release files and secrets file go from the
/// meta repository (so its instances stop), its row from the database.
pub async fn delete_app(st: &AppState, id: &str) -> Result<()> {
    let a = st
        .db
        .app(id)
        .await?
        .ok_or_else(|| AppError::not_found("app", id))?;
    let _mirror = st.meta.mirror_guard().await;
    let mut paths = st.meta.release_paths(&a.env, &a.name).await?;
    let head = match st.meta.head().await? {
        Some(h) => st.meta.tree(h).await?,
        None => meta_schema::MetaTree::new(),
    };
    for p in [app_path(&a.env, &a.name), secrets_path(&a.env, &a.name)] {
        if head.contains(&p) {
            paths.push(p);
        }
    }
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

/// Projects and apps declared before they were documents live only in the
/// database: write their documents once, so the repository holds every
/// declaration and a mirror rebuilt from it keeps them. Runs at start,
/// before the first sync; a no-op when nothing is missing.
pub async fn adopt_rows(st: &AppState) -> Result<usize> {
    let _mirror = st.meta.mirror_guard().await;
    let tree = match st.meta.head().await? {
        Some(h) => st.meta.tree(h).await?,
        None => return Ok(0),
    };
    let mut cs = ChangeSet::new();
    let mut n = 0;
    let projects = st.db.projects().await?;
    let mut declared: Vec<String> = Vec::new();
    for p in &projects {
        let path = project_path(&p.id);
        if tree.contains(&path) || !meta_schema::layout::is_project_id(&p.id) {
            declared.push(p.id.clone());
            continue;
        }
        let doc = pb::Project {
            id: p.id.clone(),
            name: p.name.clone(),
            source: Some(pb::Source {
                repo: p.repo.clone(),
                branch: p.branch.clone(),
                commit: String::new(),
            }),
            build: Some(pb::BuildSettings {
                dockerfile: p.dockerfile.clone(),
                build_args: serde_json::from_str(&p.build_args).unwrap_or_default(),
            }),
            created_at: p.created_at,
        };
        cs = cs.add(path, doc.encode_to_vec());
        declared.push(p.id.clone());
        n += 1;
    }
    for a in st.db.apps().await? {
        let path = app_path(&a.env, &a.name);
        if tree.contains(&path)
            || !declared.contains(&a.project_id)
            || !tree.contains(&meta_schema::layout::env_path(&a.env))
        {
            continue;
        }
        let doc = pb::App {
            name: a.name.clone(),
            env: a.env.clone(),
            project: a.project_id.clone(),
            domains: serde_json::from_str(&a.domains).unwrap_or_default(),
            created_at: a.created_at,
        };
        cs = cs.add(path, doc.encode_to_vec());
        n += 1;
    }
    if n > 0 {
        st.meta
            .commit(
                cs,
                "Adopt projects and apps declared before they were documents".into(),
            )
            .await?;
        tracing::info!(
            documents = n,
            "projects and apps adopted into the meta repository"
        );
    }
    Ok(n)
}

/// The members of a project the caller may see.
pub async fn members(st: &AppState, caller: &Caller, project: &str) -> Result<Vec<MemberRow>> {
    let p = access::project(st, caller, project).await?;
    Ok(st.db.members(&p.id).await?)
}

/// Add `user` to a project the caller owns, as `role` (`owner` or
/// `member`, default `member`).
pub async fn add_member(
    st: &AppState,
    caller: &Caller,
    project: &str,
    user: &str,
    role: Option<&str>,
) -> Result<MemberRow> {
    let p = access::owned_project(st, caller, project).await?;
    let role = role.unwrap_or(access::MEMBER);
    if role != access::OWNER && role != access::MEMBER {
        return Err(AppError::BadRequest(format!(
            "role {role:?} is not owner or member"
        )));
    }
    let u = st
        .db
        .user(user)
        .await?
        .ok_or_else(|| AppError::not_found("user", user))?;
    st.db
        .set_member(&p.id, &u.id, role, meta_schema::now_millis())
        .await?;
    st.db
        .members(&p.id)
        .await?
        .into_iter()
        .find(|m| m.user_id == u.id)
        .ok_or_else(|| AppError::not_found("member", &u.id))
}

/// Remove `user` from a project the caller owns; its last owner stays.
pub async fn remove_member(
    st: &AppState,
    caller: &Caller,
    project: &str,
    user: &str,
) -> Result<()> {
    let p = access::owned_project(st, caller, project).await?;
    let members = st.db.members(&p.id).await?;
    let Some(m) = members.iter().find(|m| m.user_id == user) else {
        return Err(AppError::not_found("member", user));
    };
    if m.role == access::OWNER && members.iter().filter(|m| m.role == access::OWNER).count() == 1 {
        return Err(AppError::Conflict(format!(
            "{user} is the last owner of project {}: add another owner first",
            p.id
        )));
    }
    st.db.remove_member(&p.id, user).await?;
    Ok(())
}
