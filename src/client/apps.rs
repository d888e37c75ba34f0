//! `zw apps create|list|delete`.

use serde_json::json;

use super::api::enc;
use super::creds::{self, ConnArgs};
use super::{AppView, ProjectView, fmt_millis, resolve_app};

#[derive(Debug, clap::Subcommand)]
pub enum AppsCommand {
    /// Create an app in a project.
    Create(CreateArgs),
    /// List all apps.
    List(ListArgs),
    /// Delete an app (its releases leave the meta repo).
    Delete(DeleteArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// App name (a DNS label).
    pub name: String,
    /// Project id or name; default: the only project, or a new one named
    /// after the app when there is none.
    #[arg(long)]
    pub project: Option<String>,
    /// Env (default: production).
    #[arg(long)]
    pub env: Option<String>,
    /// Git URL of the source, for a new project (default: the current directory).
    #[arg(long)]
    pub repo: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// App name or `<name>.<env>`.
    pub name: String,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub fn run(cmd: AppsCommand) -> anyhow::Result<()> {
    match cmd {
        AppsCommand::Create(a) => create(a),
        AppsCommand::List(a) => list(a),
        AppsCommand::Delete(a) => delete(a),
    }
}

fn create(a: CreateArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let projects: Vec<ProjectView> = client.get("/v1/projects")?;
    let project_id = match &a.project {
        Some(p) => {
            let hits: Vec<&ProjectView> = projects
                .iter()
                .filter(|x| &x.id == p || &x.name == p)
                .collect();
            match hits.as_slice() {
                [one] => one.id.clone(),
                [] => anyhow::bail!("no project {p:?} (projects: {})", names(&projects)),
                _ => anyhow::bail!(
                    "several projects are named {p:?}; give one of their ids: {}",
                    hits.iter()
                        .map(|x| x.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        None => match projects.as_slice() {
            [one] => one.id.clone(),
            [] => {
                let repo = match &a.repo {
                    Some(r) => r.clone(),
                    None => std::env::current_dir()?.display().to_string(),
                };
                let p: ProjectView =
                    client.post("/v1/projects", &json!({"name": a.name, "repo": repo}))?;
                eprintln!("created project {} ({}) for {}", p.name, p.id, p.repo);
                p.id
            }
            _ => anyhow::bail!(
                "several projects exist; give --project, one of: {}",
                names(&projects)
            ),
        },
    };
    let mut body = json!({"name": a.name});
    if let Some(e) = &a.env {
        body["env"] = json!(e);
    }
    let app: AppView = client.post(&format!("/v1/projects/{}/apps", enc(&project_id)), &body)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&app)?);
    } else {
        println!(
            "created app {} in env {} (id {}, project {})",
            app.name, app.env, app.id, app.project_id
        );
    }
    Ok(())
}

fn names(ps: &[ProjectView]) -> String {
    if ps.is_empty() {
        return "none".into();
    }
    ps.iter()
        .map(|p| format!("{} ({})", p.name, p.id))
        .collect::<Vec<_>>()
        .join(", ")
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let projects: Vec<ProjectView> = client.get("/v1/projects")?;
    let mut rows: Vec<(AppView, String)> = projects
        .into_iter()
        .flat_map(|p| {
            let name = p.name.clone();
            p.apps.into_iter().map(move |a| (a, name.clone()))
        })
        .collect();
    rows.sort_by(|x, y| (&x.0.name, &x.0.env).cmp(&(&y.0.name, &y.0.env)));
    if a.json {
        let apps: Vec<&AppView> = rows.iter().map(|r| &r.0).collect();
        println!("{}", serde_json::to_string_pretty(&apps)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no apps (create one with `zw apps create NAME`)");
        return Ok(());
    }
    let w = rows
        .iter()
        .map(|r| r.0.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let we = rows.iter().map(|r| r.0.env.len()).max().unwrap_or(3).max(3);
    let wp = rows.iter().map(|r| r.1.len()).max().unwrap_or(7).max(7);
    println!(
        "{:w$}  {:we$}  {:wp$}  {:26}  CREATED",
        "NAME", "ENV", "PROJECT", "ACTIVE RELEASE"
    );
    for (app, project) in &rows {
        println!(
            "{:w$}  {:we$}  {:wp$}  {:26}  {}",
            app.name,
            app.env,
            project,
            app.active_release.as_deref().unwrap_or("-"),
            fmt_millis(app.created_at)
        );
    }
    Ok(())
}

fn delete(a: DeleteArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &a.name)?;
    client.delete(&format!("/v1/apps/{}", enc(&app.id)))?;
    println!("deleted app {} in env {}", app.name, app.env);
    Ok(())
}
