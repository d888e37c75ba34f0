//! The user-facing commands of `zw`: login, apps, deploy, status, logs,
//! releases, rollback, env, scale, and the operators' cluster and nodes. They talk to the captain's REST API
//! ([`api`]) found by [`creds`]; the commands that make a new release from
//! an existing one (rollback, env, scale, and a redeploy) write it to the
//! meta repository over the captain's git endpoint ([`metarepo`]), so that
//! every field of the release is kept.

pub mod api;
pub mod apps;
pub mod cluster;
pub mod creds;
pub mod deploy;
pub mod logs;
pub mod metarepo;
pub mod releases;

use api_types::deployments::DeploymentView;
use api_types::nodes::InstanceView;
use api_types::projects::{AppView, ProjectView};
use serde::Deserialize;

use creds::ConnArgs;

/// The user commands, flattened into `zw`'s own.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check an API URL and token and save them for the other commands.
    Login(LoginArgs),
    /// Create, list and delete apps.
    #[command(subcommand)]
    Apps(apps::AppsCommand),
    /// Build a directory (or git URL), roll it out and print its URL.
    Deploy(deploy::DeployArgs),
    /// An app's active release, newest deployment and URL.
    Status(StatusArgs),
    /// An app's logs (-f to follow).
    Logs(logs::LogsArgs),
    /// An app's releases, newest first.
    Releases(releases::ReleasesArgs),
    /// Roll back: a new release copying an earlier one.
    Rollback(releases::RollbackArgs),
    /// Set or unset environment variables (a new release).
    #[command(subcommand)]
    Env(releases::EnvCommand),
    /// Set the number of instances (a new release).
    Scale(releases::ScaleArgs),
    /// The cluster (admins): join tokens for workers and edges.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// The cluster's workers and edges (admins): list, drain, remove.
    #[command(subcommand)]
    Nodes(cluster::NodesCommand),
}

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `--app` and `--json`, shared by the commands about one app.
#[derive(Debug, Clone, clap::Args)]
pub struct AppArg {
    /// App name, or `<name>.<env>` (default: `app` in ./.zeitwork.toml or ./zeitwork.json).
    #[arg(long, short = 'a')]
    pub app: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub app: AppArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run a user command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Login(a) => login(a),
        Command::Apps(c) => apps::run(c),
        Command::Deploy(a) => deploy::run(a),
        Command::Status(a) => status(a),
        Command::Logs(a) => logs::run(a),
        Command::Releases(a) => releases::list(a),
        Command::Rollback(a) => releases::rollback(a),
        Command::Env(c) => releases::env(c),
        Command::Scale(a) => releases::scale(a),
        Command::Cluster(c) => cluster::run_cluster(c),
        Command::Nodes(c) => cluster::run_nodes(c),
    }
}

fn login(a: LoginArgs) -> anyhow::Result<()> {
    let api_url = a
        .conn
        .api
        .clone()
        .ok_or_else(|| anyhow::anyhow!("zw login needs --api URL"))?;
    let (token, token_origin) = a.conn.given_token()?.ok_or_else(|| {
        anyhow::anyhow!("zw login needs a token: --token-file PATH or $ZW_TOKEN (or --token T)")
    })?;
    let client = api::Api::new(&api_url, api::Origin::Flag, token.clone(), token_origin)?;
    // Any authenticated read proves the URL and the token.
    let projects: Vec<serde_json::Value> = client.get("/v1/projects")?;
    let path = creds::save_credentials(&creds::Credentials {
        api: client.base.clone(),
        token,
    })?;
    println!(
        "logged in to {} ({} project{}); credentials saved to {}",
        client.base,
        projects.len(),
        if projects.len() == 1 { "" } else { "s" },
        path.display()
    );
    Ok(())
}

/// The app named by `--app`, else by the project file in the current dir.
pub fn app_name(a: &AppArg) -> anyhow::Result<String> {
    if let Some(n) = &a.app {
        return Ok(n.clone());
    }
    let cwd = std::env::current_dir()?;
    if let Some(n) = project_file_app(&cwd)? {
        return Ok(n);
    }
    anyhow::bail!(
        "which app? give --app NAME (or put `app = \"NAME\"` in {}/.zeitwork.toml)",
        cwd.display()
    )
}

/// `app` from `.zeitwork.toml` (a line `app = "name"`) or `zeitwork.json`
/// (`{"app": "name"}`) in `dir`.
pub fn project_file_app(dir: &std::path::Path) -> anyhow::Result<Option<String>> {
    let toml = dir.join(".zeitwork.toml");
    if let Ok(text) = std::fs::read_to_string(&toml) {
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if let Some((k, v)) = line.split_once('=')
                && k.trim() == "app"
            {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                    .ok_or_else(|| {
                        anyhow::anyhow!("{}: app must be a quoted string", toml.display())
                    })?;
                return Ok(Some(v.to_string()));
            }
        }
    }
    let json = dir.join("zeitwork.json");
    if let Ok(b) = std::fs::read(&json) {
        #[derive(Deserialize)]
        struct F {
            app: Option<String>,
        }
        let f: F =
            serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", json.display()))?;
        return Ok(f.app);
    }
    Ok(None)
}

/// Find an app by `name` or `name.env`.
pub fn resolve_app(client: &api::Api, name: &str) -> anyhow::Result<AppView> {
    if name.contains('.') {
        return client.get(&format!("/v1/apps/{}", api::enc(name)));
    }
    let projects: Vec<ProjectView> = client.get("/v1/projects")?;
    let found: Vec<AppView> = projects
        .into_iter()
        .flat_map(|p| p.apps)
        .filter(|a| a.name == name)
        .collect();
    match found.len() {
        0 => anyhow::bail!("no app named {name:?} (see `zw apps list`)"),
        1 => Ok(found.into_iter().next().expect("one app")),
        _ => {
            let envs: Vec<String> = found.iter().map(|a| a.id.clone()).collect();
            anyhow::bail!(
                "app {name:?} exists in several envs; give --app as one of: {}",
                envs.join(", ")
            )
        }
    }
}

/// Deployments of an app, newest first.
pub fn deployments(
    client: &api::Api,
    app_id: &str,
    limit: u32,
) -> anyhow::Result<Vec<DeploymentView>> {
    client.get(&format!(
        "/v1/deployments?app_id={}&limit={limit}",
        api::enc(app_id)
    ))
}

/// Unix milliseconds as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn fmt_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn status(a: StatusArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let latest = deployments(&client, &app.id, 1)?.into_iter().next();
    let active = match &app.active_release {
        Some(id) => {
            Some(client.get::<DeploymentView>(&format!("/v1/deployments/{}", api::enc(id)))?)
        }
        None => None,
    };
    let url = metarepo::app_url(&client, &app).ok().flatten();
    let instances: Vec<InstanceView> = client
        .get::<Vec<InstanceView>>("/v1/instances")?
        .into_iter()
        .filter(|i| i.env == app.env && i.app == app.name)
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "app": app,
                "active": active,
                "latest": latest,
                "url": url,
                "instances": instances,
            }))?
        );
        return Ok(());
    }
    println!(
        "app:      {} (env {}, project {})",
        app.name, app.env, app.project_id
    );
    match &active {
        Some(d) => println!(
            "active:   {} {} image {} ({} instances)",
            d.id, d.status, d.image_digest, d.min_instances
        ),
        None => println!("active:   none (deploy with `zw deploy --app {}`)", app.id),
    }
    if let Some(d) = latest
        .as_ref()
        .filter(|d| Some(&d.id) != app.active_release.as_ref())
    {
        println!(
            "latest:   {} {}{}",
            d.id,
            d.status,
            reason_suffix(&d.reason)
        );
    }
    if let Some(u) = url {
        println!("url:      {u}");
    }
    if instances.is_empty() {
        println!("instances: none reported");
    } else {
        println!("instances:");
        for i in &instances {
            println!(
                "  {:26}  {:10}  node {}  release {}{}",
                i.id,
                i.state,
                i.node_id,
                i.release_id,
                reason_suffix(&i.reason)
            );
        }
    }
    Ok(())
}

pub fn reason_suffix(r: &str) -> String {
    if r.is_empty() {
        String::new()
    } else {
        format!(" ({r})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_format_as_utc() {
        assert_eq!(fmt_millis(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_millis(1_795_469_789_279), "2026-11-23 21:36:29");
        assert_eq!(fmt_millis(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(fmt_millis(-1000), "1969-12-31 23:59:59");
    }

    #[test]
    fn the_app_comes_from_the_project_file() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(project_file_app(d.path()).unwrap(), None);
        std::fs::write(d.path().join("zeitwork.json"), r#"{"app": "from-json"}"#).unwrap();
        assert_eq!(
            project_file_app(d.path()).unwrap().as_deref(),
            Some("from-json")
        );
        // .zeitwork.toml wins over zeitwork.json.
        std::fs::write(
            d.path().join(".zeitwork.toml"),
            "# x\nname = \"n\"\napp = 'web' # comment\n",
        )
        .unwrap();
        assert_eq!(project_file_app(d.path()).unwrap().as_deref(), Some("web"));
        std::fs::write(d.path().join(".zeitwork.toml"), "app = web\n").unwrap();
        assert!(
            project_file_app(d.path())
                .unwrap_err()
                .to_string()
                .contains("quoted string")
        );
    }
}
