//! What a captain is started with ([`Config`]): embedded defaults, set from
//! `zw captain`'s flags or by an embedding program (`zw up`, tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Default largest uploaded source (gzip'd tar), in bytes.
pub const DEFAULT_MAX_SOURCE_BYTES: u64 = 1 << 30;

/// Default [`Config::node_grace`].
pub const DEFAULT_NODE_GRACE: Duration = Duration::from_secs(10);

/// The cluster key's file name under the data directory, unless
/// [`Config::cluster_key_file`] names another.
pub const LINK_SECRET_FILE: &str = "node-link.secret";

/// Everything the captain is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds the SQLite database, the meta repository and `admin.token`.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The URL other hosts reach this captain's API at (edges route
    /// `api.<domain>` to it); none = `http://` and the address it listens on.
    pub advertise_url: Option<String>,
    /// The cluster key every captain of a cluster shares (32 bytes, hex):
    /// it derives the node link keys and seals the cluster CA's key in the
    /// database. None = `<data_dir>/node-link.secret`, created on first use.
    pub cluster_key_file: Option<PathBuf>,
    /// How long a certificate of a worker or an edge is valid; renewed at
    /// half of it. A removed host is refused by everyone within this.
    pub member_cert_validity: Duration,
    /// `sqlite:...` or `postgres://...`; none = SQLite file in `data_dir`.
    pub database_url: Option<String>,
    /// A path (bare repository) or a URL to follow as origin; none =
    /// `data_dir/meta.git`.
    pub meta_repo: Option<String>,
    /// A git remote (smart HTTP, ssh, `git://`, `file://`) that is the meta
    /// repository of several captains: each keeps a clone, commits there
    /// and pushes without force, and follows what others push.
    pub meta_remote: Option<String>,
    /// How often the mirror re-reads the repository (and fetches origin).
    pub poll_interval: Duration,
    /// Expected node heartbeat interval (the `liveness` task checks at
    /// least this often).
    pub heartbeat_interval: Duration,
    /// A node not heard from for this long is offline (lost): the leader
    /// replaces its instances on other nodes.
    pub node_grace: Duration,
    /// Domains written into a new env's `env.pb`.
    pub platform_domains: Vec<String>,
    pub github_webhook_secret: Option<String>,
    pub github_client_id: Option<String>,
    pub github_client_secret: Option<String>,
    pub github_url: String,
    pub github_api_url: String,
    /// GitHub logins that may sign in (sign-up is closed otherwise).
    pub github_allow_users: Vec<String>,
    /// GitHub organizations whose members may sign in.
    pub github_allow_orgs: Vec<String>,
    /// Command the pre-receive hook runs (see [`hooks`]); none = this
    /// executable with `captain-pre-receive`.
    pub hook_command: Option<Vec<String>>,
    pub max_db_connections: u32,
    /// How often the rollout reconciler runs without being woken.
    pub rollout_interval: Duration,
    /// How long a rollout may take to become healthy before it fails.
    pub rollout_timeout: Duration,
    /// Runs the builds of `POST /v1/builds`; none = this captain does not
    /// build.
    pub builder: Option<Arc<builder::Builder>>,
    /// Where `GET /v1/images/{id}/download` reads images; none = the
    /// builder's store.
    pub store: Option<ImageStore>,
    /// Builds run at once (workers claiming the queue).
    pub build_workers: usize,
    /// Attempts of a build whose infrastructure keeps failing.
    pub build_max_attempts: u32,
    /// Delay before the second attempt; doubles for each further one.
    pub build_retry_backoff: Duration,
    /// Largest source tarball `POST /v1/sources` accepts.
    pub max_source_bytes: u64,
    /// How apps are reached, for clients to print: `{app}` and `{domain}`
    /// are replaced.
    pub app_url_template: String,
}

impl Config {
    /// Defaults for a data directory: loopback, embedded SQLite and repo.
    pub fn new(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_url: None,
            cluster_key_file: None,
            member_cert_validity: Duration::from_secs(3600),
            database_url: None,
            meta_repo: None,
            meta_remote: None,
            poll_interval: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            node_grace: DEFAULT_NODE_GRACE,
            platform_domains: vec!["localhost".into()],
            github_webhook_secret: None,
            github_client_id: None,
            github_client_secret: None,
            github_url: "https://github.com".into(),
            github_api_url: "https://api.github.com".into(),
            github_allow_users: Vec::new(),
            github_allow_orgs: Vec::new(),
            hook_command: None,
            max_db_connections: 8,
            rollout_interval: Duration::from_secs(2),
            rollout_timeout: crate::rollout::DEFAULT_ROLLOUT_TIMEOUT,
            builder: None,
            store: None,
            build_workers: 1,
            build_max_attempts: 3,
            build_retry_backoff: Duration::from_secs(10),
            max_source_bytes: DEFAULT_MAX_SOURCE_BYTES,
            app_url_template: "https://{app}.{domain}".into(),
        }
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("captain.db").display()
            )
        })
    }

    pub fn hook_command(&self) -> Vec<String> {
        self.hook_command.clone().unwrap_or_else(|| {
            let exe = std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "zw".into());
            vec![exe, "captain-pre-receive".into()]
        })
    }

    /// The cluster key's file ([`Config::cluster_key_file`]).
    pub fn cluster_key_path(&self) -> PathBuf {
        self.cluster_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(LINK_SECRET_FILE))
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }
}

/// The object store images are served from.
#[derive(Clone)]
pub struct ImageStore(pub Arc<dyn builder::ObjectStore>);

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.describe())
    }
}

impl Config {
    /// The store images are downloaded from, if any.
    pub fn image_store(&self) -> Option<Arc<dyn builder::ObjectStore>> {
        self.store
            .as_ref()
            .map(|s| s.0.clone())
            .or_else(|| self.builder.as_ref().map(|b| b.store().clone()))
    }
}
