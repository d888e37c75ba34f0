//! `zw releases`, `zw rollback`, `zw env set|unset`, `zw scale`: each change
//! is a new release copying the active one (or, for rollback, an earlier
//! one), pushed to the meta repository.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use meta_schema::pb;

use super::api::Api;
use super::creds::{self, ConnArgs};
use super::deploy::{FollowArgs, follow};
use super::metarepo::{self, MetaClone};
use super::{AppArg, AppView, DeploymentView, app_name, deployments, fmt_millis, resolve_app};

#[derive(Debug, clap::Args)]
pub struct ReleasesArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// How many to show.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The release to copy (default: the newest running release before the active one).
    #[arg(long, value_name = "RELEASE")]
    pub to: Option<String>,
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum EnvCommand {
    /// Set variables: KEY=VALUE...
    Set(EnvSetArgs),
    /// Remove variables: KEY...
    Unset(EnvUnsetArgs),
    /// Show the active release's variables.
    List(EnvListArgs),
}

#[derive(Debug, clap::Args)]
pub struct EnvSetArgs {
    #[arg(required = true, value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct EnvUnsetArgs {
    #[arg(required = true, value_name = "KEY")]
    pub keys: Vec<String>,
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct EnvListArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// Instances to run (at least 1).
    pub instances: u32,
    #[command(flatten)]
    pub app: AppArg,
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub fn list(a: ReleasesArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let ds = deployments(&client, &app.id, a.limit.clamp(1, 10_000))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ds)?);
        return Ok(());
    }
    if ds.is_empty() {
        println!(
            "no releases of {} yet (deploy with `zw deploy --app {}`)",
            app.name, app.id
        );
        return Ok(());
    }
    println!(
        "   {:26}  {:8}  {:9}  {:19}  {:19}  REASON",
        "RELEASE", "STATUS", "INSTANCES", "IMAGE", "CREATED"
    );
    for d in &ds {
        let mark = if app.active_release.as_deref() == Some(d.id.as_str()) {
            "*"
        } else if !d.present {
            "r"
        } else {
            " "
        };
        let image: String = d
            .image_digest
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect();
        println!(
            "{mark}  {:26}  {:8}  {:9}  {:19}  {:19}  {}",
            d.id,
            d.status,
            d.min_instances,
            if image.is_empty() {
                "-".into()
            } else {
                format!("sha256:{image}")
            },
            fmt_millis(d.created_at),
            d.reason
        );
    }
    println!("(* active, r reverted)");
    Ok(())
}

/// The active release, or a clear error when the app has none.
fn active_release(
    client: &Api,
    m: &MetaClone,
    app: &AppView,
) -> anyhow::Result<(DeploymentView, pb::Release)> {
    let Some(d) = metarepo::active(client, app)? else {
        bail!(
            "{} has no release yet; deploy it first with `zw deploy --app {}`",
            app.name,
            app.id
        );
    };
    let r = m.release(&d)?;
    Ok((d, r))
}

fn push_and_follow(
    client: &Api,
    m: &MetaClone,
    app: &AppView,
    release: pb::Release,
    message: &str,
    f: &FollowArgs,
) -> anyhow::Result<()> {
    let id = m.push_release(&release, message)?;
    eprintln!("released {id} of {}: {message}", app.name);
    follow(client, &id, f)?;
    if let Some(u) = metarepo::url_of(client, m, app)? {
        println!("{u}");
    }
    Ok(())
}

pub fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let target: DeploymentView = match &a.to {
        Some(id) => {
            let d: DeploymentView =
                client.get(&format!("/v1/deployments/{}", super::api::enc(id)))?;
            if d.app_id != app.id {
                bail!("release {id} belongs to {}, not {}", d.app_id, app.id);
            }
            d
        }
        None => {
            let ds = deployments(&client, &app.id, 1000)?;
            let active = app
                .active_release
                .clone()
                .with_context(|| format!("{} has no active release to roll back from", app.name))?;
            let pos = ds.iter().position(|d| d.id == active).unwrap_or(0);
            ds.into_iter()
                .skip(pos + 1)
                .find(|d| d.status == "running")
                .with_context(|| {
                    format!(
                        "{} has no earlier running release; name one with --to (see `zw releases`)",
                        app.name
                    )
                })?
        }
    };
    let m = MetaClone::open(&client)?;
    let base = m.release(&target)?;
    let mut r = metarepo::copy_release(&base);
    r.rollback_of = target.id.clone();
    let msg = format!("Roll back {} in {} to {}", app.name, app.env, target.id);
    push_and_follow(&client, &m, &app, r, &msg, &a.follow)
}

fn parse_var(s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty()
        || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        || k.starts_with(|c: char| c.is_ascii_digit())
    {
        bail!("{k:?} is not an environment variable name (letters, digits, _)");
    }
    Ok((k.to_string(), v.to_string()))
}

pub fn env(c: EnvCommand) -> anyhow::Result<()> {
    match c {
        EnvCommand::Set(a) => {
            let vars = a
                .vars
                .iter()
                .map(|s| parse_var(s))
                .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
            let client = creds::connect(&a.conn)?;
            let app = resolve_app(&client, &app_name(&a.app)?)?;
            let m = MetaClone::open(&client)?;
            let (_, base) = active_release(&client, &m, &app)?;
            let mut r = metarepo::copy_release(&base);
            let keys: Vec<String> = vars.keys().cloned().collect();
            r.env_vars.extend(vars);
            let msg = format!("Set {} of {} in {}", keys.join(", "), app.name, app.env);
            push_and_follow(&client, &m, &app, r, &msg, &a.follow)
        }
        EnvCommand::Unset(a) => {
            let client = creds::connect(&a.conn)?;
            let app = resolve_app(&client, &app_name(&a.app)?)?;
            let m = MetaClone::open(&client)?;
            let (_, base) = active_release(&client, &m, &app)?;
            let mut r = metarepo::copy_release(&base);
            let missing: Vec<&str> = a
                .keys
                .iter()
                .filter(|k| !r.env_vars.contains_key(*k))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                bail!("{} has no variable {}", app.name, missing.join(", "));
            }
            for k in &a.keys {
                r.env_vars.remove(k);
            }
            let msg = format!("Unset {} of {} in {}", a.keys.join(", "), app.name, app.env);
            push_and_follow(&client, &m, &app, r, &msg, &a.follow)
        }
        EnvCommand::List(a) => {
            let client = creds::connect(&a.conn)?;
            let app = resolve_app(&client, &app_name(&a.app)?)?;
            let m = MetaClone::open(&client)?;
            let (_, r) = active_release(&client, &m, &app)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r.env_vars)?);
            } else {
                for (k, v) in &r.env_vars {
                    println!("{k}={v}");
                }
            }
            Ok(())
        }
    }
}

pub fn scale(a: ScaleArgs) -> anyhow::Result<()> {
    if a.instances == 0 {
        bail!("scale needs at least 1 instance (delete the app to stop it)");
    }
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let m = MetaClone::open(&client)?;
    let (d, base) = active_release(&client, &m, &app)?;
    let mut r = metarepo::copy_release(&base);
    r.min_instances = a.instances;
    let msg = format!(
        "Scale {} in {} from {} to {} instances",
        app.name, app.env, d.min_instances, a.instances
    );
    push_and_follow(&client, &m, &app, r, &msg, &a.follow)
}
