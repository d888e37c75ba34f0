//! The captain: zeitwork's control plane. A REST API (axum) over a mirror
//! database (SQLite or Postgres through one set of queries), with desired
//! state written as commits to the meta repository, which it also serves
//! over git smart HTTP at `/meta.git`.
//!
//! Layers, each using only those below it (`tests/architecture.rs` checks
//! that no module cycle exists):
//! - `api` (HTTP handlers and the route table), `webhook`, `githttp`,
//!   `background` (the tasks and their driver);
//! - `app`: the operations, with their own errors;
//! - `state`, `auth`, `meta` (the repository and its mirror), `db`,
//!   `nodelink`, and the pure `rollout`, `routes`, `hooks`.
//!
//! Embed it with [`Captain::start`]; the `zw captain` command is
//! [`cli::run`].

pub mod api;
pub mod app;
pub mod auth;
pub mod background;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod githttp;
pub mod hooks;
pub mod leader;
pub mod meta;
pub mod metrics;
pub mod nodelink;
pub mod ratelimit;
pub mod rollout;
pub mod routes;
pub mod state;
pub mod webhook;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::config::{Config, ImageStore};
use crate::db::Db;
use crate::meta::{MetaLocation, MetaStore};
pub use crate::state::AppState;

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    zw_util::atomic_write(path, format!("{secret}\n").as_bytes(), 0o600)
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
    #[error("writing the documents of projects and apps declared before")]
    Adopt(#[from] app::AppError),
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
            let (_, secret) = auth::issue(
                &db,
                auth::TokenKind::Admin,
                "admin (first start)",
                None,
                None,
            )
            .await?;
            let path = config.admin_token_path();
            write_secret(&path, &secret).map_err(|source| StartError::AdminToken {
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "created the admin API token");
            admin_token = Some(secret);
        }
        let location = MetaLocation::of(
            config.meta_remote.as_deref(),
            config.meta_repo.as_deref(),
            &config.data_dir,
        );
        let store = tokio::task::spawn_blocking(move || MetaStore::open(&location))
            .await
            .map_err(meta::MetaError::from)??;
        hooks::install(&store.git_dir())?;
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
        let store = Arc::new(store);
        let state = AppState::new(db, store, config.clone(), format!("http://{addr}"));
        app::projects::adopt_rows(&state).await?;
        meta::sync(&state.meta, &state.db).await?;

        let (shutdown, rx) = watch::channel(false);
        let tasks = background_tasks(&state, &rx);
        let app = api::router(state.clone());
        let mut srx = rx;
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
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
        // Hand over at once what this captain held: the leader's lease, and
        // the builds it was running (cut short, they run again elsewhere).
        self.state.leader.release(&self.state.db).await;
        if let Err(e) = self
            .state
            .db
            .release_build_claims(&self.state.leader.id)
            .await
        {
            tracing::warn!(error = %e, "releasing build claims");
        }
        self.state.db.close().await;
    }
}

/// Every background task of a captain, on its schedule
/// ([`background`]).
fn background_tasks(state: &AppState, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    use background::{Schedule, spawn};
    let c = &state.config;
    let mut tasks = vec![
        spawn(
            state.clone(),
            Schedule {
                name: "lease".into(),
                description: "take or renew the leader's lease; say this captain is alive",
                period: leader::RENEW,
                wake: None,
                cancel_on_stop: false,
                leader_only: false,
            },
            background::lease::Lease,
            stop.clone(),
        ),
        spawn(
            state.clone(),
            Schedule {
                name: "mirror".into(),
                description: "follow the meta repository's origin and index its head",
                period: c.poll_interval,
                wake: Some(state.mirror_wake.clone()),
                cancel_on_stop: false,
                leader_only: false,
            },
            background::mirror::Mirror,
            stop.clone(),
        ),
        spawn(
            state.clone(),
            Schedule {
                name: "liveness".into(),
                description: "mark nodes not heard from within the grace period offline",
                period: background::liveness::period(c.heartbeat_interval, c.node_grace),
                wake: None,
                cancel_on_stop: false,
                leader_only: true,
            },
            background::liveness::Liveness,
            stop.clone(),
        ),
        spawn(
            state.clone(),
            Schedule {
                name: "rollout".into(),
                description: "plan and write deployment files (start, promote, fail rollouts)",
                period: c.rollout_interval,
                wake: Some(state.rollout_wake.clone()),
                cancel_on_stop: false,
                leader_only: true,
            },
            background::rollout::Rollout,
            stop.clone(),
        ),
        spawn(
            state.clone(),
            Schedule {
                name: "routes".into(),
                description: "recompute the edges' route table",
                period: Duration::from_secs(1),
                wake: Some(state.routes_wake.clone()),
                cancel_on_stop: false,
                leader_only: false,
            },
            background::routes::Routes,
            stop.clone(),
        ),
        spawn(
            state.clone(),
            Schedule {
                name: "notify-nodes".into(),
                description: "tell online nodes to fetch a new meta head now",
                period: Duration::from_secs(30),
                wake: Some(state.notify_wake.clone()),
                cancel_on_stop: false,
                leader_only: true,
            },
            background::notify::NotifyNodes::default(),
            stop.clone(),
        ),
    ];
    if let Some(b) = &c.builder {
        for i in 0..c.build_workers {
            tasks.push(spawn(
                state.clone(),
                Schedule {
                    name: format!("build-worker-{i}"),
                    description: "claim and run queued builds",
                    period: Duration::from_secs(2),
                    wake: Some(state.builds_wake.clone()),
                    cancel_on_stop: true,
                    leader_only: false,
                },
                background::builds::BuildWorker { builder: b.clone() },
                stop.clone(),
            ));
        }
    }
    tasks
}
