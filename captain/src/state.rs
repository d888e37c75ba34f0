//! [`AppState`]: what every handler, operation and background task of a
//! running captain shares.

use std::ops::Deref;
use std::sync::Arc;

use tokio::sync::{Notify, watch};

use crate::background::status::Registry;
use crate::config::Config;
use crate::db::Db;
use crate::leader::Leadership;
use crate::meta::MetaStore;
use crate::ratelimit::RateLimit;
use crate::routes::RouteFeed;

/// Shared state of a running captain (cheap to clone).
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

pub struct Inner {
    pub db: Db,
    pub meta: Arc<MetaStore>,
    pub config: Config,
    /// Activates the mirror (after a commit).
    pub mirror_wake: Arc<Notify>,
    /// Activates the rollout planner (instance reports, commits).
    pub rollout_wake: Arc<Notify>,
    /// Activates the route table refresh.
    pub routes_wake: Arc<Notify>,
    /// Activates the node notification (a new meta head was indexed).
    pub notify_wake: Arc<Notify>,
    /// Activates the build workers (a build was queued).
    pub builds_wake: Arc<Notify>,
    /// The route table edges stream.
    pub routes: RouteFeed,
    /// Bumped after every mirror pass, i.e. after every commit the captain
    /// wrote or saw pushed: in-process followers (`zw up`) fetch at once.
    pub commits: watch::Sender<u64>,
    /// Bumped when build log lines are stored or a build changes status:
    /// log streams look again.
    pub build_events: watch::Sender<u64>,
    /// What each background task did last.
    pub tasks: Registry,
    /// Waitlist sign-ups per client address.
    pub waitlist_limit: RateLimit,
    /// Whether this captain leads (runs the leader-only tasks).
    pub leader: Leadership,
    /// Where this captain's API listens (`http://addr:port`).
    pub api_url: String,
    /// Unix ms.
    pub started_at: i64,
    /// The cluster CA, loaded (or made) when first needed.
    pub cluster_ca: tokio::sync::OnceCell<edge::pki::Ca>,
}

impl AppState {
    pub fn new(db: Db, meta: Arc<MetaStore>, config: Config, api_url: String) -> AppState {
        AppState(Arc::new(Inner {
            db,
            meta,
            config,
            mirror_wake: Arc::default(),
            rollout_wake: Arc::default(),
            routes_wake: Arc::default(),
            notify_wake: Arc::default(),
            builds_wake: Arc::default(),
            routes: RouteFeed::default(),
            commits: watch::channel(0).0,
            build_events: watch::channel(0).0,
            tasks: Registry::default(),
            waitlist_limit: RateLimit::new(10, std::time::Duration::from_secs(60)),
            leader: Leadership::new(format!(
                "cpt-{}",
                meta_schema::new_id().to_ascii_lowercase()
            )),
            api_url,
            started_at: meta_schema::now_millis(),
            cluster_ca: tokio::sync::OnceCell::new(),
        }))
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
