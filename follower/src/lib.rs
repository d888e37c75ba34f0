//! zeitwork's node agent: follows the meta repository, reconciles the
//! instances of this node through a [`runtime::Runtime`], health-checks
//! them, reports to the captain and serves the node API.
//!
//! Entry points: [`cli::run`] for `zw follower`, [`Follower::start`] for
//! tests and `zw up`. Code map:
//! - [`follow`]: fetch the meta repo (gix), never move backwards.
//! - [`reconciler`]: the level-triggered loop and its ledger of instances.
//! - [`runtime`]: drivers (`process` here; qemu/firecracker beside it) and
//!   the `auto` choice.
//! - [`net`]: per-instance netns, IPv6 addresses, nftables isolation
//!   (`scripts/instance-net.sh`).
//! - [`rekey`]: re-encrypt secrets files to their env's recipients.
//! - [`plan`]: the reconciler's decisions, a pure function of desired
//!   state, ledger, observations and the clock.
//! - [`logs`]: instance logs, collected by a task of their own, capped.
//! - [`image`], [`health`], [`captain`], [`api`], [`ledger`].
//!
//! **Architecture invariant.** The follower is the only component that
//! talks to a VMM or starts instances, and it only ever acts on the desired
//! state of the meta commit it has applied, which never moves backwards.
//! Every side effect of the reconcile loop is behind a trait
//! ([`reconciler::DesiredSource`], [`runtime::Runtime`],
//! [`image::ImageSource`], [`captain::Captain`],
//! [`reconciler::HealthChecker`]); every start is on disk (ledger) before
//! it happens. Secrets exist in plaintext only in memory, on their way into
//! an instance's environment or into a fresh data key ([`rekey`]).
//!
//! **API boundary.** Inbound: the node API ([`api`], bearer tokens of the
//! node and the `api_key` the captain issued at its current registration).
//! Outbound: the captain's REST API ([`captain::HttpCaptain`]) and a git
//! fetch of the meta repository. State on disk under the data dir:
//! `ledger/` (instances, follow state), `meta.git`, `instances/<id>/`
//! (driver state, `stdout.log`, `log.jsonl` and its segments), `node-id`, `node-token`,
//! `age-identity`, `captain-node-token`, `images/<hex>/` (images fetched
//! from the captain, verified).

pub mod api;
pub mod captain;
pub mod cli;
pub mod follow;
pub mod health;
pub mod image;
pub mod ledger;
pub mod logs;
pub mod net;
pub mod plan;
pub mod reconciler;
pub mod rekey;
pub mod runtime;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use crate::captain::{Captain, HttpCaptain, NoCaptain, NodeRegistration};
use crate::follow::{FollowState, MetaDesiredSource, MetaFollower};
use crate::image::{ImageSource, LocalDirImageSource};
use crate::net::InstanceRange;
use crate::reconciler::{Reconciler, ReconcilerConfig, ReconcilerHandle};
use crate::runtime::{Runtime, RuntimeChoice};

/// Everything a follower needs; [`FollowerConfig::new`] fills defaults.
#[derive(Clone)]
pub struct FollowerConfig {
    pub data_dir: PathBuf,
    /// Default: generated once and kept in `<data_dir>/node-id`.
    pub node_id: Option<String>,
    pub region: String,
    /// Address the captain and edge reach this node at. Default: the API's
    /// listen IP.
    pub address: Option<String>,
    pub api_listen: SocketAddr,
    /// Captain base URL, or several comma-separated (failover); `None`
    /// runs standalone (no reports).
    pub captain_url: Option<String>,
    /// Join the cluster with this token when the data dir holds no
    /// enrolment yet (see [`edge::member`]): the node's credential, its
    /// certificate and the meta repository come from the join.
    pub join_token: Option<String>,
    /// Serve the mTLS node-proxy here with the node's enrolled certificate
    /// (renewed in place); its address is registered with the captains.
    pub proxy_listen: Option<SocketAddr>,
    /// Token for the captain's API; also accepted on the node API.
    pub token: String,
    /// Meta repository URL or path, and its branch.
    pub meta_repo: String,
    pub branch: String,
    pub runtime: RuntimeChoice,
    /// Guests of the VM drivers; without them `auto` falls back to process.
    pub vm: runtime::VmOptions,
    /// Default: derived from the node id.
    pub instance_range: Option<InstanceRange>,
    /// Default: with a captain, its image API (`GET
    /// /v1/images/{digest}/download`, cached in `<data_dir>/images`);
    /// standalone, the object-store layout under `<data_dir>/store`.
    pub images: Option<Arc<dyn ImageSource>>,
    pub poll_interval: Duration,
    pub reconcile_interval: Duration,
    pub heartbeat_interval: Duration,
    pub start_timeout: Duration,
    /// `host:port` of this node's mTLS node-proxy, as registered with the
    /// captain (the edge reaches instances through it).
    pub proxy_addr: Option<String>,
    /// How often instance logs are collected (stamped, capped, the raw
    /// output freed), besides every read of the node API.
    pub log_interval: Duration,
    pub log_limits: logs::LogLimits,
}

impl FollowerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, meta_repo: impl Into<String>) -> Self {
        FollowerConfig {
            data_dir: data_dir.into(),
            node_id: None,
            region: "local".into(),
            address: None,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            captain_url: None,
            join_token: None,
            proxy_listen: None,
            token: String::new(),
            meta_repo: meta_repo.into(),
            branch: "main".into(),
            runtime: RuntimeChoice::Auto,
            vm: runtime::VmOptions::default(),
            instance_range: None,
            images: None,
            poll_interval: Duration::from_secs(5),
            reconcile_interval: Duration::from_secs(2),
            heartbeat_interval: Duration::from_secs(10),
            start_timeout: Duration::from_secs(30),
            proxy_addr: None,
            log_interval: Duration::from_secs(1),
            log_limits: logs::LogLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    #[error("preparing {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("choosing the runtime")]
    Runtime(#[from] runtime::RuntimeError),
    #[error("following the meta repository")]
    Follow(#[from] follow::FollowError),
    #[error("starting the reconciler")]
    Reconciler(#[from] reconciler::ReconcilerError),
    #[error("the node's membership of the cluster")]
    Member(#[from] edge::member::MemberError),
    #[error("{0}")]
    Config(String),
    #[error("the node-proxy's TLS")]
    ProxyTls(#[from] edge::tls::TlsError),
    #[error("binding the node API on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running follower.
pub struct Follower {
    pub node_id: String,
    /// Where the node API listens.
    pub api_addr: SocketAddr,
    /// The node's own API token.
    pub node_token: String,
    pub runtime_reason: String,
    /// age recipient of the node's identity (`age1...`).
    pub age_recipient: String,
    pub reconciler: ReconcilerHandle,
    pub follow: watch::Receiver<FollowState>,
    /// Wakes the meta follower (what `POST /v1/notify` does).
    pub notify: Arc<Notify>,
    /// Where the node-proxy listens (with `proxy_listen`).
    pub proxy_addr: Option<SocketAddr>,
    runtime: Arc<dyn Runtime>,
    shutdown: watch::Sender<bool>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Reads `<data_dir>/<name>`, or writes `make()` there (mode 0600) first.
fn persistent_value(
    data_dir: &std::path::Path,
    name: &str,
    make: impl FnOnce() -> String,
) -> Result<String, FollowerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(name);
    let err = |source| FollowerError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let v = make();
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(v.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(v)
}

impl Follower {
    /// Starts following, reconciling, reporting and serving. Instances the
    /// ledger in `data_dir` knows and that still run are adopted.
    pub async fn start(cfg: FollowerConfig) -> Result<Follower, FollowerError> {
        let data = cfg.data_dir.clone();
        std::fs::create_dir_all(&data).map_err(|source| FollowerError::DataDir {
            path: data.clone(),
            source,
        })?;
        // A node that joined keeps its name, credential and certificate in
        // the enrolment file.
        let enrol_path = data.join(edge::member::ENROLMENT_FILE);
        let mut enrolment = edge::member::Enrolment::load(&enrol_path)?;
        if let Some(e) = &enrolment {
            e.check_role(edge::pki::Role::Worker)?;
            if let Some(id) = cfg.node_id.as_ref().filter(|id| **id != e.name) {
                return Err(FollowerError::Config(format!(
                    "--node-id {id} differs from the name {} this node joined the cluster with ({})",
                    e.name,
                    enrol_path.display()
                )));
            }
        }
        let node_id = match (&enrolment, &cfg.node_id) {
            (Some(e), _) => e.name.clone(),
            (None, Some(id)) => id.clone(),
            // Node ids are DNS labels (they name certificates and hosts).
            (None, None) => persistent_value(&data, "node-id", || {
                ulid::Ulid::new().to_string().to_lowercase()
            })?,
        };
        let node_token = persistent_value(&data, "node-token", || {
            format!("zwn_{}{}", ulid::Ulid::new(), ulid::Ulid::new())
        })?;
        let range = cfg
            .instance_range
            .unwrap_or_else(|| InstanceRange::for_node(&node_id));
        // The node's age identity: secrets of its apps are encrypted to its
        // recipient, sent at registration.
        let identity: age::x25519::Identity = persistent_value(&data, "age-identity", || {
            use age::secrecy::ExposeSecret;
            age::x25519::Identity::generate()
                .to_string()
                .expose_secret()
                .to_string()
        })?
        .parse()
        .map_err(|e: &str| FollowerError::DataDir {
            path: data.join("age-identity"),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })?;
        let age_recipient = identity.to_public().to_string();

        // Bind first: a taken port fails the start before any task runs.
        let listener = tokio::net::TcpListener::bind(cfg.api_listen)
            .await
            .map_err(|source| FollowerError::Bind {
                addr: cfg.api_listen,
                source,
            })?;
        let proxy_listener = match cfg.proxy_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| FollowerError::Bind { addr, source })?,
            ),
            None => None,
        };
        let api_addr = listener
            .local_addr()
            .map_err(|source| FollowerError::Bind {
                addr: cfg.api_listen,
                source,
            })?;
        let proxy_addr = match &proxy_listener {
            Some(l) => Some(l.local_addr().map_err(|source| FollowerError::Bind {
                addr: cfg.api_listen,
                source,
            })?),
            None => None,
        };
        let address = cfg
            .address
            .clone()
            .unwrap_or_else(|| api_addr.ip().to_string());
        let api_url = format!("http://{}", host_port(&address, api_addr.port()));
        // The node-proxy is registered at the advertised address.
        let registered_proxy = cfg
            .proxy_addr
            .clone()
            .or_else(|| proxy_addr.map(|a| host_port(&address, a.port())));

        let given_captains =
            edge::member::parse_captains(cfg.captain_url.as_deref().unwrap_or_default());
        if enrolment.is_none()
            && let Some(token) = &cfg.join_token
        {
            let e = join_cluster(
                &given_captains,
                token,
                edge::member::JoinParams {
                    name: node_id.clone(),
                    addresses: vec![address.clone()],
                    api_url: api_url.clone(),
                    proxy_addr: registered_proxy.clone().unwrap_or_default(),
                    region: cfg.region.clone(),
                    age_recipient: age_recipient.clone(),
                    ..Default::default()
                },
                &data,
            )
            .await?;
            e.save(&enrol_path)?;
            tracing::info!(node = %node_id, "joined the cluster as a worker");
            enrolment = Some(e);
        }
        if proxy_listener.is_some() && enrolment.is_none() {
            return Err(FollowerError::Config(
                "--proxy-listen serves the node's certificate from the cluster: join with --join-token first".into(),
            ));
        }
        let captains = Arc::new(edge::member::Captains::new(match &enrolment {
            Some(e) => merge_lists(&given_captains, &e.captains),
            None => given_captains.clone(),
        }));
        let meta_repo = if !cfg.meta_repo.is_empty() {
            cfg.meta_repo.clone()
        } else if let Some(m) = enrolment.as_ref().and_then(|e| e.meta_repo.clone()) {
            m
        } else {
            return Err(FollowerError::Config(
                "no meta repository: give --meta-repo, or join the cluster with --join-token"
                    .into(),
            ));
        };
        // The meta repository of every captain, the one from the join
        // first, fetched with the node's credential.
        let remotes = match &enrolment {
            Some(e) => {
                let mut urls = vec![meta_repo.clone()];
                for c in captains.all().iter() {
                    let u = format!("{c}/meta.git");
                    if !urls.contains(&u) {
                        urls.push(u);
                    }
                }
                urls.iter()
                    .map(|u| meta_schema::repo::Remote::with_bearer(u.clone(), &e.credential))
                    .collect()
            }
            None => vec![meta_schema::repo::Remote::new(meta_repo.clone())],
        };

        let activate = Arc::new(Notify::new());
        let notify = Arc::new(Notify::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let stop = tokio_util::sync::CancellationToken::new();

        // Instances get the node's own nftables table and egress unless the
        // caller chose a policy, and never reach the captain.
        let mut vm = cfg.vm.clone();
        if vm.net == net::NetPolicy::default() {
            vm.net = net::NetPolicy::for_node(&node_id);
        }
        for url in captains.all().iter() {
            vm.net = vm.net.block(net::url_addresses(url));
        }
        let (runtime, runtime_reason) =
            runtime::choose(cfg.runtime, &data.join("scripts"), &vm, activate.clone())?;
        tracing::info!(node = %node_id, runtime = runtime.name(), "{runtime_reason}");

        let follower = MetaFollower::open_remotes(
            &data.join("meta.git"),
            &data.join("ledger").join("follow.json"),
            remotes,
            &cfg.branch,
        )?;
        let follow = follower.subscribe();
        let desired = Arc::new(MetaDesiredSource {
            repo: follower.repo().clone(),
            node_id: node_id.clone(),
            follow: follow.clone(),
            identity: Some(identity.clone()),
        });

        let http_captain = match &enrolment {
            Some(e) => Some(Arc::new(HttpCaptain::enrolled(
                captains.clone(),
                &e.credential,
                e.api_key.as_deref().unwrap_or_default(),
            ))),
            None if !captains.all().is_empty() => Some(Arc::new(HttpCaptain::with_captains(
                captains.clone(),
                &cfg.token,
            ))),
            None => None,
        };
        let captain: Arc<dyn Captain> = match &http_captain {
            Some(c) => c.clone(),
            None => Arc::new(NoCaptain),
        };
        // Images: the source given, else the captain's image API (into the
        // cache `<data>/images`), else a local store directory.
        let images: Arc<dyn ImageSource> = match (&cfg.images, &http_captain) {
            (Some(images), _) => images.clone(),
            (None, Some(c)) => {
                let source = image::CaptainsImageSource::new(captains.clone(), c.token_source());
                tracing::info!(store = %source.describe(), "images come from the captains");
                Arc::new(source)
            }
            (None, None) => Arc::new(LocalDirImageSource::new(data.join("store"))),
        };

        let mut rcfg = ReconcilerConfig::new(&node_id, &data, range);
        rcfg.start_timeout = cfg.start_timeout;
        let rec = Reconciler::new(rcfg, desired, runtime.clone(), images, captain.clone())?;
        let (reconciler, rec_task) = reconciler::spawn(
            rec,
            cfg.reconcile_interval,
            activate.clone(),
            shutdown_rx.clone(),
        );
        // Secrets files this node can read are re-encrypted when the env's
        // recipients changed (a node joined or left).
        let rekey_task = rekey::spawn(
            rekey::Rekeyer {
                repo: follower.repo().clone(),
                identity,
                captain: captain.clone(),
            },
            follow.clone(),
            cfg.poll_interval,
            shutdown_rx.clone(),
        );
        // Logs are collected by a task of their own, of every instance the
        // ledger knows (an exited one's last lines too).
        let log_task = logs::spawn_collector(
            {
                let instances = reconciler.instances.clone();
                move || {
                    instances
                        .borrow()
                        .values()
                        .map(|r| r.work_dir.clone())
                        .collect()
                }
            },
            cfg.log_limits,
            cfg.log_interval,
            shutdown_rx.clone(),
        );
        let follow_task = follow::spawn(
            follower,
            cfg.poll_interval,
            notify.clone(),
            activate.clone(),
            shutdown_rx.clone(),
        );

        let state = Arc::new(api::ApiState {
            info: api::NodeInfo {
                id: node_id.clone(),
                region: cfg.region.clone(),
                address: address.clone(),
                api_url: api_url.clone(),
                runtime: runtime.name().to_string(),
                runtime_reason: runtime_reason.clone(),
                instance_range: range.to_string(),
                age_recipient: age_recipient.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            tokens: ArcSwap::from_pointee(
                [
                    cfg.token.clone(),
                    node_token.clone(),
                    enrolment
                        .as_ref()
                        .and_then(|e| e.api_key.clone())
                        .unwrap_or_default(),
                ]
                .into_iter()
                .filter(|t| !t.is_empty())
                .collect(),
            ),
            reconciler: reconciler.clone(),
            follow: follow.clone(),
            notify: notify.clone(),
            data_dir: data.clone(),
            log_limits: cfg.log_limits,
        });
        let mut api_shutdown = shutdown_rx.clone();
        let api_task = tokio::spawn({
            let state = state.clone();
            async move {
                let r = axum::serve(listener, api::router(state))
                    .with_graceful_shutdown(async move {
                        let _ = api_shutdown.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "node API stopped");
                }
            }
        });

        let reg = NodeRegistration {
            id: node_id.clone(),
            address,
            region: cfg.region.clone(),
            cpus: 0,
            memory_bytes: 0,
            disk_bytes: 0,
            age_recipient: age_recipient.clone(),
            api_url,
            proxy_addr: registered_proxy.unwrap_or_default(),
        };
        let hb_task = tokio::spawn(heartbeats(
            captain,
            reg,
            data.clone(),
            cfg.heartbeat_interval,
            state,
            reconciler.instances.clone(),
            follow.clone(),
            shutdown_rx,
        ));

        let mut tasks = vec![
            rec_task,
            log_task,
            follow_task,
            rekey_task,
            api_task,
            hb_task,
        ];
        if let (Some(listener), Some(e)) = (proxy_listener, enrolment) {
            // The node-proxy resolves an instance id through the ledger.
            let instances = reconciler.instances.clone();
            let resolver = move |id: &str| -> Option<SocketAddr> {
                let map = instances.borrow();
                let rec = map.get(id)?;
                Some(SocketAddr::from((rec.ip, rec.port)))
            };
            let proxy = edge::node_proxy::NodeProxy::new(
                &e.ca_pem,
                &e.issued(),
                Arc::new(resolver),
                edge::node_proxy::NodeProxyConfig::default(),
            )?;
            tracing::info!(addr = ?proxy_addr, "node-proxy listening (mTLS)");
            tasks.push(tokio::spawn(proxy.clone().serve(listener, stop.clone())));
            tasks.push(tokio::spawn(edge::member::keep_renewed(
                enrol_path,
                Arc::new(ArcSwap::from_pointee(e)),
                captains.clone(),
                move |e| {
                    if let Err(err) = proxy.set_certificate(&e.issued()) {
                        tracing::error!(error = %zw_util::ErrorChain(&err), "using the renewed certificate");
                    }
                },
                stop.clone(),
            )));
        }

        Ok(Follower {
            node_id,
            api_addr,
            proxy_addr,
            node_token,
            runtime_reason,
            age_recipient,
            reconciler,
            follow,
            notify,
            runtime,
            shutdown,
            stop,
            tasks,
        })
    }

    /// Stops the follower's own tasks. Instances keep running (a follower
    /// restart or upgrade must not take apps down); the next follower on the
    /// same data dir adopts them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Stops the follower and every instance its ledger knows: decommission
    /// of a node, and cleanup in tests.
    pub async fn shutdown_and_stop_instances(self) {
        let runtime = self.runtime.clone();
        self.shutdown.send_replace(true);
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        // After the reconciler task ended: its last pass is in the snapshot.
        let records: Vec<_> = self
            .reconciler
            .instances
            .borrow()
            .values()
            .cloned()
            .collect();
        // All at once: each stop waits for its instance to exit (a grace
        // period), and a node with drained rollouts holds many.
        let stops = records.iter().map(|r| {
            let runtime = runtime.clone();
            async move {
                let result = match &r.handle {
                    Some(h) => runtime.stop(h).await,
                    None => runtime.reclaim(&r.instance_id, &r.work_dir).await,
                };
                if let Err(e) = result {
                    tracing::error!(instance = %r.instance_id, error = %e, "stopping at shutdown");
                }
            }
        });
        futures::future::join_all(stops).await;
    }
}

/// Registers with the captain (retrying with backoff until it answers),
/// then sends a heartbeat with resources and meta status on `interval`.
#[allow(clippy::too_many_arguments)]
async fn heartbeats(
    captain: Arc<dyn Captain>,
    mut reg: NodeRegistration,
    data_dir: PathBuf,
    interval: Duration,
    api: Arc<api::ApiState>,
    instances: watch::Receiver<std::collections::BTreeMap<String, reconciler::InstanceRecord>>,
    follow: watch::Receiver<FollowState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let res = {
        let d = data_dir.clone();
        tokio::task::spawn_blocking(move || captain::node_resources(&d, 0))
            .await
            .unwrap_or_default()
    };
    reg.cpus = res.cpus;
    reg.memory_bytes = res.memory_bytes;
    reg.disk_bytes = res.disk_bytes;
    // Register at every start: the node API and node-proxy addresses may
    // have changed, and the captain updates a known node and rotates its
    // token (the previous one stops working). The token is kept on disk for
    // operators; the follower never reuses it across starts.
    let token_path = data_dir.join("captain-node-token");
    // The API accepts the node's own tokens it started with, plus the
    // credentials of the current registration only: the node token and
    // the captain's `api_key` of a previous one stop working here too.
    let own = (**api.tokens.load()).clone();
    let accept = |r: &captain::Registered| {
        let mut t = own.clone();
        for c in [&r.token, &r.api_key] {
            if !c.is_empty() && !t.contains(c) {
                t.push(c.clone());
            }
        }
        api.tokens.store(Arc::new(t));
    };
    let mut registered = false;
    let mut delay = Duration::from_millis(500);
    loop {
        if !registered {
            match captain.register(&reg).await {
                Ok(r) => {
                    if !r.token.is_empty()
                        && let Err(e) = write_secret(&token_path, &r.token)
                    {
                        tracing::error!(error = %e, path = %token_path.display(), "keeping the node token");
                    }
                    accept(&r);
                    tracing::info!(node = %reg.id, "registered with the captain");
                    registered = true;
                    delay = Duration::from_millis(500);
                }
                Err(e) => {
                    tracing::warn!(error = %zw_util::error_chain(&e), "registration failed; retrying in {delay:?}")
                }
            }
        }
        if registered {
            let n = instances
                .borrow()
                .values()
                .filter(|r| r.handle.is_some())
                .count() as u32;
            let d = data_dir.clone();
            let resources = tokio::task::spawn_blocking(move || captain::node_resources(&d, n))
                .await
                .unwrap_or_default();
            let f = follow.borrow().clone();
            let hb = captain::Heartbeat {
                state: captain::NodeState::Online,
                resources: Some(resources),
                meta: Some(captain::MetaStatus {
                    applied_commit: f.applied,
                    refused_commit: f.refused,
                    refused_reason: f.refused_reason,
                }),
                endpoints: None,
            };
            match captain.heartbeat(&reg.id, &hb).await {
                Ok(()) => {}
                Err(e) if e.is_unauthorized() => {
                    // The node token was revoked (node deleted): register anew.
                    tracing::warn!(error = %zw_util::error_chain(&e), "node token refused; registering again");
                    let _ = std::fs::remove_file(&token_path);
                    captain.set_node_token(None);
                    registered = false;
                    continue;
                }
                Err(e) => tracing::warn!(error = %zw_util::error_chain(&e), "heartbeat failed"),
            }
        }
        let wait = if registered { interval } else { delay };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if !registered {
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
}

/// Writes a credential atomically, mode 0600.
fn write_secret(path: &std::path::Path, value: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(value.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `host:port`, with brackets around an IPv6 host.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn merge_lists(first: &[String], then: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in first.iter().chain(then) {
        if !out.contains(c) {
            out.push(c.clone());
        }
    }
    out
}

/// Joins the cluster, retrying while no captain answers; a refusal (used,
/// expired or wrong-role token) ends the start with the captain's reason.
async fn join_cluster(
    captains: &[String],
    token: &str,
    mut params: edge::member::JoinParams,
    data: &std::path::Path,
) -> Result<edge::member::Enrolment, FollowerError> {
    if captains.is_empty() {
        return Err(FollowerError::Config(
            "--captain is required to join the cluster".into(),
        ));
    }
    let res = {
        let d = data.to_path_buf();
        tokio::task::spawn_blocking(move || captain::node_resources(&d, 0))
            .await
            .unwrap_or_default()
    };
    params.cpus = res.cpus;
    params.memory_bytes = res.memory_bytes;
    params.disk_bytes = res.disk_bytes;
    let http = edge::member::http_client();
    let mut delay = Duration::from_millis(500);
    loop {
        match edge::member::join(
            &http,
            captains,
            token,
            edge::pki::Role::Worker,
            params.clone(),
        )
        .await
        {
            Ok(e) => return Ok(e),
            Err(err @ edge::member::MemberError::Unreachable { .. }) => {
                tracing::warn!(error = %zw_util::ErrorChain(&err), "joining: no captain answered; retrying in {delay:?}");
            }
            Err(err) => return Err(err.into()),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
