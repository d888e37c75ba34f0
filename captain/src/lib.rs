//! The captain: zeitwork's control plane. A REST API (axum) over a mirror
//! database (SQLite or Postgres through one set of queries), with desired
//! state written as commits to the meta repository, which it also serves
//! over git smart HTTP at `/meta.git`.
//!
//! Embed it with [`Captain::start`]; the `zw captain` command is
//! [`cli::run`].

pub mod api;
pub mod auth;
pub mod builds;
pub mod cli;
pub mod db;
pub mod error;
pub mod githttp;
pub mod hooks;
pub mod logs;
pub mod meta;
pub mod metrics;
pub mod nodelink;
pub mod rollout;
pub mod routes;
pub mod secrets;
pub mod status;
pub mod webhook;

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::db::Db;
use crate::meta::{MetaLocation, MetaStore};

/// Everything the captain is started with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Holds the SQLite database, the meta repository and `admin.token`.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `sqlite:...` or `postgres://...`; none = SQLite file in `data_dir`.
    pub database_url: Option<String>,
    /// A path (bare repository) or a URL to follow as origin; none =
    /// `data_dir/meta.git`.
    pub meta_repo: Option<String>,
    /// How often the mirror re-reads the repository (and fetches origin).
    pub poll_interval: Duration,
    /// Expected node heartbeat interval; 3 missed = offline.
    pub heartbeat_interval: Duration,
    /// Domains written into a new env's `env.pb`.
    pub platform_domains: Vec<String>,
    pub github_webhook_secret: Option<String>,
    pub github_client_id: Option<String>,
    pub github_client_secret: Option<String>,
    pub github_url: String,
    pub github_api_url: String,
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
            database_url: None,
            meta_repo: None,
            poll_interval: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            platform_domains: vec!["localhost".into()],
            github_webhook_secret: None,
            github_client_id: None,
            github_client_secret: None,
            github_url: "https://github.com".into(),
            github_api_url: "https://api.github.com".into(),
            hook_command: None,
            max_db_connections: 8,
            rollout_interval: Duration::from_secs(2),
            rollout_timeout: rollout::DEFAULT_ROLLOUT_TIMEOUT,
            builder: None,
            store: None,
            build_workers: 1,
            build_max_attempts: 3,
            build_retry_backoff: Duration::from_secs(10),
            max_source_bytes: builds::DEFAULT_MAX_SOURCE_BYTES,
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

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub db: Db,
    pub meta: Arc<MetaStore>,
    pub config: Config,
    /// Wakes the mirror after a commit.
    pub mirror_wake: Notify,
    /// Wakes the rollout reconciler (instance reports, commits).
    pub rollout_wake: Notify,
    /// Wakes the route table refresh.
    pub routes_wake: Notify,
    /// The route table edges stream.
    pub routes: routes::RouteFeed,
    /// Bumped after every mirror pass, i.e. after every commit the captain
    /// wrote or saw pushed: in-process followers (`zw up`) fetch at once.
    pub commits: watch::Sender<u64>,
    /// Wakes a build worker (a build was queued).
    pub builds_wake: Notify,
    /// Bumped when build log lines are stored or a build changes status:
    /// log streams look again.
    pub build_events: watch::Sender<u64>,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("creating the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Meta(#[from] meta::MetaError),
    #[error(transparent)]
    Hook(#[from] hooks::HookError),
    #[error("writing the admin token to {path}")]
    AdminToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running captain.
pub struct Captain {
    addr: SocketAddr,
    state: AppState,
    admin_token: Option<String>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

impl Captain {
    /// Open the database (running migrations) and the meta repository,
    /// index it, create the admin token on first start, and serve.
    pub async fn start(config: Config) -> Result<Captain, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let db = Db::connect(&config.database_url(), config.max_db_connections).await?;
        let mut admin_token = None;
        if db.count_tokens("admin").await? == 0 {
            let (_, secret) =
                auth::issue(&db, auth::TokenKind::Admin, "admin (first start)", None).await?;
            let path = config.admin_token_path();
            write_secret(&path, &secret).map_err(|source| StartError::AdminToken {
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "created the admin API token");
            admin_token = Some(secret);
        }
        let location = MetaLocation::from_arg(config.meta_repo.as_deref(), &config.data_dir);
        let store = tokio::task::spawn_blocking(move || MetaStore::open(&location))
            .await
            .map_err(meta::MetaError::from)??;
        hooks::install(&store.git_dir())?;
        let store = Arc::new(store);
        meta::sync(&store, &db).await?;

        let state = AppState(Arc::new(Inner {
            db,
            meta: store,
            config: config.clone(),
            mirror_wake: Notify::new(),
            rollout_wake: Notify::new(),
            routes_wake: Notify::new(),
            routes: routes::RouteFeed::default(),
            commits: watch::channel(0).0,
            builds_wake: Notify::new(),
            build_events: watch::channel(0).0,
        }));
        let (requeued, failed) = state
            .db
            .recover_interrupted_builds(
                meta_schema::now_millis(),
                i64::from(config.build_max_attempts.max(1)),
            )
            .await?;
        if requeued + failed > 0 {
            tracing::warn!(
                requeued,
                failed,
                "builds were running when the captain last stopped"
            );
        }
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = vec![
            tokio::spawn(mirror_loop(state.clone(), rx.clone())),
            tokio::spawn(liveness_loop(state.clone(), rx.clone())),
            tokio::spawn(rollout::run(
                state.clone(),
                config.rollout_interval,
                config.rollout_timeout,
                rx.clone(),
            )),
            tokio::spawn(routes::run(
                state.clone(),
                Duration::from_secs(1),
                rx.clone(),
            )),
            tokio::spawn(nodelink::notify_loop(state.clone(), rx.clone())),
        ];
        if let Some(b) = &config.builder {
            for _ in 0..config.build_workers {
                tasks.push(tokio::spawn(builds::run_worker(
                    state.clone(),
                    b.clone(),
                    rx.clone(),
                )));
            }
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let app = api::router(state.clone());
        let mut srx = rx;
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = srx.changed().await;
                })
                .await
        });
        tracing::info!(%addr, database = %state.db.backend(), "captain listening");
        Ok(Captain {
            addr,
            state,
            admin_token,
            shutdown,
            server,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin token, when this start created it.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stop serving, stop the background tasks, close the database.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.server.await {
            tracing::warn!(error = %e, "captain server task");
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.state.db.close().await;
    }
}

async fn mirror_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(state.config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                if let Err(e) = state.meta.follow_origin().await {
                    tracing::warn!(error = %e, "following the meta repository origin");
                }
            }
            _ = state.mirror_wake.notified() => {}
        }
        if let Err(e) = meta::sync(&state.meta, &state.db).await {
            tracing::error!(error = %e, "indexing the meta repository");
        }
        // A new commit (ours or pushed by hand, e.g. a `git revert`) may
        // need a rollout and may change the routes.
        state.rollout_wake.notify_one();
        state.routes_wake.notify_one();
        state.commits.send_modify(|n| *n += 1);
    }
}

async fn liveness_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let interval = state.config.heartbeat_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let cutoff = meta_schema::now_millis()
            - 3 * i64::try_from(interval.as_millis()).unwrap_or(i64::MAX / 4);
        match state.db.mark_stale_nodes_offline(cutoff).await {
            Ok(ids) => {
                for id in ids {
                    tracing::warn!(node = %id, "node missed 3 heartbeats: offline");
                }
            }
            Err(e) => tracing::error!(error = %e, "checking node heartbeats"),
        }
    }
}
