//! `zw captain`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::{Captain, Config};

/// Run the control plane: REST API, mirror database, meta repository.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Directory of the embedded database, the meta repository and admin.token.
    #[arg(long, env = "ZW_DATA_DIR")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// postgres://... to use Postgres; default: SQLite file in the data dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Bare meta repository path, or a git URL to follow as origin.
    #[arg(long)]
    pub meta_repo: Option<String>,
    /// A git remote that is the meta repository of several captains (the
    /// source of truth): each captain keeps a clone, commits there and
    /// pushes without force; `/meta.git` serves its clone.
    #[arg(long, conflicts_with = "meta_repo")]
    pub meta_remote: Option<String>,
    /// The URL other hosts reach this captain's API at (default: http:// and
    /// the listen address).
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Domains of a new env's apps (<app>.<domain>).
    #[arg(long = "platform-domain", default_value = "localhost")]
    pub platform_domains: Vec<String>,
    /// Seconds between re-reads of the meta repository (and origin fetches).
    #[arg(long, default_value_t = 10)]
    pub poll_interval_secs: u64,
    /// Expected node heartbeat interval in seconds.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_interval_secs: u64,
    /// Seconds without a heartbeat after which a node is offline (lost) and
    /// its instances are replaced on other nodes.
    #[arg(long, visible_alias = "node-grace-secs", default_value_t = 10)]
    pub node_grace_seconds: u64,
    /// The cluster key shared by every captain of a cluster (32 bytes as
    /// 64 hex digits); default: `<data-dir>/node-link.secret`, made on
    /// first start (one captain only).
    #[arg(long)]
    pub cluster_key_file: Option<PathBuf>,
    /// Seconds a worker's or an edge's certificate is valid (renewed at
    /// two thirds); a removed host is refused everywhere within this.
    #[arg(long, default_value_t = 3600)]
    pub member_cert_validity_secs: u64,
    #[arg(long, env = "ZW_GITHUB_WEBHOOK_SECRET", hide_env_values = true)]
    pub github_webhook_secret: Option<String>,
    #[arg(long, env = "ZW_GITHUB_CLIENT_ID")]
    pub github_client_id: Option<String>,
    #[arg(long, env = "ZW_GITHUB_CLIENT_SECRET", hide_env_values = true)]
    pub github_client_secret: Option<String>,
    /// A GitHub login that may sign in (repeatable); sign-up is closed to
    /// everyone else, who lands on the waitlist.
    #[arg(long = "github-allow-user")]
    pub github_allow_users: Vec<String>,
    /// A GitHub organization whose members may sign in (repeatable).
    #[arg(long = "github-allow-org")]
    pub github_allow_orgs: Vec<String>,
    /// Where built images are stored (and downloaded from by followers).
    #[command(flatten)]
    pub store: builder::cli::StoreArgs,
    /// Builds run at once; 0 = this captain does not build.
    #[arg(long, default_value_t = 1)]
    pub build_workers: usize,
    /// Build backend.
    #[arg(long, value_enum, default_value_t = builder::BackendKind::Auto)]
    pub build_backend: builder::BackendKind,
    /// How apps are reached ({app} and {domain} are replaced), for clients.
    #[arg(long, default_value = "https://{app}.{domain}")]
    pub app_url_template: String,
}

impl Args {
    pub fn config(&self) -> Config {
        let mut c = Config::new(&self.data_dir);
        c.listen = self.listen;
        c.database_url = self.database_url.clone();
        c.meta_repo = self.meta_repo.clone();
        c.meta_remote = self.meta_remote.clone();
        c.advertise_url = self.advertise_url.clone();
        c.platform_domains = self.platform_domains.clone();
        c.poll_interval = Duration::from_secs(self.poll_interval_secs.max(1));
        c.heartbeat_interval = Duration::from_secs(self.heartbeat_interval_secs.max(1));
        c.node_grace = Duration::from_secs(self.node_grace_seconds.max(1));
        c.cluster_key_file = self.cluster_key_file.clone();
        c.member_cert_validity = Duration::from_secs(self.member_cert_validity_secs.max(1));
        c.github_webhook_secret = self.github_webhook_secret.clone();
        c.github_client_id = self.github_client_id.clone();
        c.github_client_secret = self.github_client_secret.clone();
        c.github_allow_users = self.github_allow_users.clone();
        c.github_allow_orgs = self.github_allow_orgs.clone();
        c.app_url_template = self.app_url_template.clone();
        c
    }
}

/// The builder of a captain (none when `--build-workers 0`, or when no build
/// backend works here: the captain then says why and serves without one).
pub async fn builder(args: &Args) -> anyhow::Result<Option<std::sync::Arc<builder::Builder>>> {
    if args.build_workers == 0 {
        return Ok(None);
    }
    let store = args.store.open(&args.data_dir)?;

    let mut bc = builder::BuilderConfig::new(args.data_dir.join("builder"));
    bc.backend = args.build_backend;
    match builder::Builder::new(store, bc).await {
        Ok(b) => Ok(Some(std::sync::Arc::new(b))),
        Err(e) => {
            tracing::warn!(error = %e, "no build backend: this captain will not build (install buildah)");
            Ok(None)
        }
    }
}

/// Run the captain until Ctrl-C / SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = args.config();
    config.store = Some(crate::ImageStore(args.store.open(&args.data_dir)?));
    config.builder = builder(&args).await?;
    config.build_workers = args.build_workers;
    let token_path = config.admin_token_path();
    let captain = Captain::start(config)
        .await
        .context("starting the captain")?;
    if captain.admin_token().is_some() {
        println!("admin API token written to {}", token_path.display());
    }
    println!("captain listening on http://{}", captain.local_addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    captain.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_map_onto_the_config() {
        let cli = Cli::try_parse_from([
            "zw",
            "--data-dir",
            "/var/lib/zw",
            "--listen",
            "0.0.0.0:9000",
            "--database-url",
            "postgres://db/zw",
            "--meta-repo",
            "https://git.example.com/meta.git",
            "--platform-domain",
            "zeitwork.app",
            "--platform-domain",
            "localhost",
            "--heartbeat-interval-secs",
            "2",
            "--node-grace-seconds",
            "7",
        ])
        .unwrap();
        let c = cli.args.config();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/zw"));
        assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.database_url(), "postgres://db/zw");
        assert_eq!(
            c.meta_repo.as_deref(),
            Some("https://git.example.com/meta.git")
        );
        assert_eq!(c.platform_domains, vec!["zeitwork.app", "localhost"]);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.node_grace, Duration::from_secs(7));
        assert_eq!(
            c.admin_token_path(),
            PathBuf::from("/var/lib/zw/admin.token")
        );
        assert!(Cli::try_parse_from(["zw", "--listen", "x"]).is_err());
    }

    #[test]
    fn embedded_defaults() {
        let c = Config::new("/d");
        assert_eq!(c.node_grace, Duration::from_secs(10));
        assert_eq!(c.database_url(), "sqlite:///d/captain.db?mode=rwc");
        assert!(c.github_webhook_secret.is_none() && c.github_client_id.is_none());
        assert_eq!(
            c.hook_command().last().map(String::as_str),
            Some("captain-pre-receive")
        );
    }
}
