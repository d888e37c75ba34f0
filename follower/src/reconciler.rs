//! The instance reconciler: makes what runs on this node match the desired
//! state at the applied meta commit.
//!
//! Shaped after omicron's background tasks and sled-agent config
//! reconciler: an activation (timer, new commit, instance exit, operator
//! command, a drain deadline) takes no input; every pass re-reads the
//! desired state and the actual state and acts on the difference, so every
//! pass can be the first. There is no retry loop inside a pass: the next
//! activation is the retry.
//!
//! A pass observes (the desired state, the liveness of every recorded
//! process), asks the pure [`crate::plan::plan`] what to do, and carries the
//! actions out; then it health-checks what runs and does the same with
//! [`crate::plan::plan_health`]. All decisions are in `plan.rs`; this file
//! only observes and acts. Every side effect is behind a trait
//! ([`DesiredSource`], [`Runtime`], [`ImageSource`], [`Captain`],
//! [`HealthChecker`]). Log collection is not part of a pass: it is its own
//! task ([`crate::logs::spawn_collector`]).
//!
//! Crash safety: the [`Ledger`] records an instance *before* the runtime is
//! asked to start it, and its [`crate::runtime::RuntimeHandle`] as soon as the start
//! returns. After a `kill -9` and restart, a record with a handle whose
//! process still lives is adopted; a record without a handle is an
//! interrupted start, whose leftovers the runtime reclaims before starting
//! afresh; a record no longer desired is stopped. So no instance is ever
//! duplicated or leaked.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use meta_schema::desired::DesiredInstance;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};

use crate::captain::{Captain, InstanceReport, InstanceState};
use crate::health::Probe;
use crate::image::ImageSource;
use crate::ledger::{Ledger, LedgerError};
use crate::net::InstanceRange;
use crate::plan::{Action, Observed, Policy, Process, failed_start};
use crate::runtime::{InstanceSpec, Liveness, Runtime};
use zw_util::error_chain;

pub use crate::plan::{Desired, InstanceRecord, NodeLedger, Phase, START_RETRIES, secrets_key};

/// Port an app gets when neither the release nor the image names one.
pub const DEFAULT_PORT: u16 = 8080;

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// Nothing applied yet: the reconciler must not act (an empty desired
    /// state would stop everything).
    #[error("no meta commit applied yet")]
    NotReady,
    #[error("reading the desired state at {commit}: {reason}")]
    Read { commit: String, reason: String },
}

pub trait DesiredSource: Send + Sync + 'static {
    fn desired(&self) -> BoxFuture<'_, Result<Desired, DesiredError>>;
}

/// Runs health checks; [`NetworkChecker`] is the real one.
pub trait HealthChecker: Send + Sync + 'static {
    fn check(&self, addr: SocketAddr, probe: Probe) -> BoxFuture<'static, Result<(), String>>;
}

/// Checks over the network from the node.
#[derive(Debug, Default)]
pub struct NetworkChecker;

impl HealthChecker for NetworkChecker {
    fn check(&self, addr: SocketAddr, probe: Probe) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move { probe.check(addr).await })
    }
}

/// Outcome of one pass, for the node API, logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PassStatus {
    /// Passes run so far by this process.
    pub pass: u64,
    pub commit: Option<String>,
    pub desired: usize,
    pub running: usize,
    pub healthy: usize,
    pub failed: usize,
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub adopted: Vec<String>,
    pub errors: Vec<String>,
    pub ledger_generation: u64,
    /// False when the pass could not read the desired state.
    pub desired_read: bool,
}

/// Operator commands from the node API, applied between passes.
#[derive(Debug)]
pub enum Command {
    /// Stop the instance now; the next pass restarts it if still desired.
    Restart(String),
    /// Hold (stop and keep stopped) or release an instance.
    Hold(String, bool),
}

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub range: InstanceRange,
    /// How long a started instance may take to pass its first check before
    /// the start counts as failed.
    pub start_timeout: Duration,
    /// Backoff after a failed start; doubled per attempt.
    pub start_backoff: Duration,
    /// Backoff after a crash; doubled per crash, capped at `max_backoff`.
    pub crash_backoff: Duration,
    pub max_backoff: Duration,
}

impl ReconcilerConfig {
    pub fn new(node_id: &str, data_dir: &std::path::Path, range: InstanceRange) -> Self {
        ReconcilerConfig {
            node_id: node_id.to_string(),
            data_dir: data_dir.to_path_buf(),
            range,
            start_timeout: Duration::from_secs(30),
            start_backoff: Duration::from_millis(500),
            crash_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.data_dir.join("ledger").join("instances.json")
    }

    /// The parameters of the plan's rules.
    pub fn policy(&self) -> Policy {
        Policy {
            range: self.range,
            instances_dir: self.data_dir.join("instances"),
            start_timeout: self.start_timeout,
            start_backoff: self.start_backoff,
            crash_backoff: self.crash_backoff,
            max_backoff: self.max_backoff,
        }
    }
}

pub struct Reconciler {
    cfg: ReconcilerConfig,
    policy: Policy,
    desired: Arc<dyn DesiredSource>,
    runtime: Arc<dyn Runtime>,
    images: Arc<dyn ImageSource>,
    captain: Arc<dyn Captain>,
    checker: Arc<dyn HealthChecker>,
    ledger: Ledger<NodeLedger>,
    /// Last report the captain accepted per instance (memory only: after a
    /// restart everything is reported once more).
    reported: BTreeMap<String, InstanceReport>,
    pass: u64,
    /// A pass of this process has planned (instances found running after
    /// that are not adopted, they were started by this process).
    planned: bool,
    /// The nearest drain deadline ahead (unix ms), when one is known.
    next_deadline: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcilerError {
    #[error("loading the instance ledger")]
    Ledger(#[from] LedgerError),
}

fn now_ms() -> i64 {
    meta_schema::now_millis()
}

impl Reconciler {
    pub fn new(
        cfg: ReconcilerConfig,
        desired: Arc<dyn DesiredSource>,
        runtime: Arc<dyn Runtime>,
        images: Arc<dyn ImageSource>,
        captain: Arc<dyn Captain>,
    ) -> Result<Self, ReconcilerError> {
        let ledger = Ledger::load(&cfg.ledger_path())?;
        Ok(Reconciler {
            policy: cfg.policy(),
            cfg,
            desired,
            runtime,
            images,
            captain,
            checker: Arc::new(NetworkChecker),
            ledger,
            reported: BTreeMap::new(),
            pass: 0,
            planned: false,
            next_deadline: None,
        })
    }

    /// Replaces the health checker (tests without a network).
    pub fn with_checker(mut self, checker: Arc<dyn HealthChecker>) -> Self {
        self.checker = checker;
        self
    }

    pub fn ledger(&self) -> &NodeLedger {
        self.ledger.data()
    }

    /// How long to wait for the next pass: `period`, or less when a drain
    /// deadline falls before.
    pub fn next_wait(&self, period: Duration) -> Duration {
        match self.next_deadline {
            // One ms past the deadline: a pass then reads it as passed.
            Some(t) => period.min(Duration::from_millis((t - now_ms()).max(0) as u64 + 1)),
            None => period,
        }
    }

    fn commit(&mut self, status: &mut PassStatus) {
        if let Err(e) = self.ledger.commit() {
            tracing::error!(error = %error_chain(&e), "committing the ledger");
            status.errors.push(error_chain(&e));
        }
    }

    fn put(&mut self, rec: InstanceRecord, status: &mut PassStatus) {
        self.ledger
            .data_mut()
            .instances
            .insert(rec.instance_id.clone(), rec);
        self.commit(status);
    }

    /// Applies an operator command.
    pub async fn command(&mut self, cmd: Command) -> Result<(), String> {
        let mut status = PassStatus::default();
        let (id, hold) = match &cmd {
            Command::Restart(id) => (id.clone(), None),
            Command::Hold(id, h) => (id.clone(), Some(*h)),
        };
        let Some(rec) = self.ledger.data().instances.get(&id).cloned() else {
            return Err(format!("no instance {id} on this node"));
        };
        if let Some(h) = &rec.handle {
            self.runtime.stop(h).await.map_err(|e| e.to_string())?;
        }
        let r = self
            .ledger
            .data_mut()
            .instances
            .get_mut(&id)
            .expect("checked above");
        r.handle = None;
        r.healthy_once = false;
        // An operator's restart or release is a fresh start: a failed
        // instance gets its attempts again.
        r.attempts = 0;
        r.crashes = 0;
        r.not_before_ms = 0;
        if r.phase == Phase::Failed {
            r.reason.clear();
        }
        if let Some(h) = hold {
            r.held = h;
            r.reason = if h {
                "held by operator".into()
            } else {
                String::new()
            };
        }
        r.phase = if r.held {
            Phase::Unhealthy
        } else {
            Phase::Starting
        };
        self.commit(&mut status);
        Ok(())
    }

    /// What became of every recorded process.
    fn observe(&self) -> Observed {
        let processes = self
            .ledger
            .data()
            .instances
            .values()
            .filter_map(|r| {
                let h = r.handle.as_ref()?;
                let p = match self.runtime.liveness(h) {
                    Liveness::Running => Process::Running,
                    Liveness::Exited(code) => Process::Exited {
                        code,
                        tail: crate::logs::raw_tail(&h.work_dir.join("stdout.log"), 2),
                    },
                };
                Some((r.instance_id.clone(), p))
            })
            .collect();
        Observed {
            processes,
            first_pass: !self.planned,
        }
    }

    /// One pass. Never panics on a bad instance: its failure is recorded and
    /// the others proceed.
    pub async fn activate(&mut self) -> PassStatus {
        self.pass += 1;
        let mut status = PassStatus {
            pass: self.pass,
            ..Default::default()
        };
        let desired = match self.desired.desired().await {
            Ok(d) => d,
            Err(e) => {
                status.errors.push(e.to_string());
                self.finish(&mut status).await;
                return status;
            }
        };
        status.desired_read = true;
        status.commit = desired.commit.clone();
        status.desired = desired.instances.len();

        let observed = self.observe();
        let actions = crate::plan::plan(
            &desired,
            self.ledger.data(),
            &observed,
            now_ms(),
            &self.policy,
        );
        self.planned = true;
        let mut blocked = BTreeSet::new();
        self.execute(&desired, actions, &mut blocked, &mut status)
            .await;

        // Health checks of what runs now, concurrently.
        let want: BTreeMap<&str, &DesiredInstance> = desired
            .instances
            .iter()
            .map(|d| (d.instance_id.as_str(), d))
            .collect();
        let probes: Vec<(String, SocketAddr, Probe)> = self
            .ledger
            .data()
            .instances
            .values()
            .filter(|r| r.handle.is_some() && !blocked.contains(&r.instance_id))
            .filter_map(|r| {
                let d = want.get(r.instance_id.as_str())?;
                Some((
                    r.instance_id.clone(),
                    SocketAddr::new(r.ip.into(), r.port),
                    Probe::from_release(d.release.health_check.as_ref()),
                ))
            })
            .collect();
        status.running = probes.len();
        let health: BTreeMap<String, Result<(), String>> =
            futures::future::join_all(probes.into_iter().map(|(id, addr, p)| {
                let check = self.checker.check(addr, p);
                async move { (id, check.await) }
            }))
            .await
            .into_iter()
            .collect();
        let actions = crate::plan::plan_health(
            &self.ledger.data().instances,
            &health,
            now_ms(),
            &self.policy,
        );
        self.execute(&desired, actions, &mut blocked, &mut status)
            .await;

        self.next_deadline = crate::plan::next_deadline(&desired, now_ms());
        self.finish(&mut status).await;
        status
    }

    /// Carries out `actions` in order; retirements first and concurrently
    /// (stopping may wait out a grace period). An instance whose step
    /// failed goes into `blocked`, and its later steps are skipped.
    async fn execute(
        &mut self,
        desired: &Desired,
        actions: Vec<Action>,
        blocked: &mut BTreeSet<String>,
        status: &mut PassStatus,
    ) {
        let mut retire = Vec::new();
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::Retire { record, reason } => retire.push((record, reason)),
                a => rest.push(a),
            }
        }
        let runtime = self.runtime.clone();
        let results = futures::future::join_all(retire.iter().map(|(rec, _)| {
            let runtime = runtime.clone();
            async move {
                match &rec.handle {
                    Some(h) => runtime.stop(h).await,
                    None => runtime.reclaim(&rec.instance_id, &rec.work_dir).await,
                }
            }
        }))
        .await;
        for ((rec, reason), r) in retire.into_iter().zip(results) {
            if let Err(e) = r {
                status
                    .errors
                    .push(format!("stopping {}: {e}", rec.instance_id));
                blocked.insert(rec.instance_id);
                continue;
            }
            tracing::info!(instance = %rec.instance_id, app = %rec.app, "stopped: {reason}");
            let mut report = self.report_of(&rec);
            report.state = InstanceState::Stopped;
            report.reason = reason;
            let data = self.ledger.data_mut();
            data.instances.remove(&rec.instance_id);
            data.unreported_stops
                .insert(rec.instance_id.clone(), report);
            self.commit(status);
            if let Err(e) = crate::logs::remove_work_dir(&rec.work_dir) {
                tracing::warn!(instance = %rec.instance_id, error = %e, "removing the work dir");
            }
            status.stopped.push(rec.instance_id);
        }

        let mut dirty = false;
        for a in rest {
            let id = a.instance_id().to_string();
            if blocked.contains(&id) {
                continue;
            }
            if !self.carry_out(a, desired, &mut dirty, status).await {
                blocked.insert(id);
            }
        }
        if dirty {
            self.commit(status);
        }
    }

    /// One action; false when it failed.
    async fn carry_out(
        &mut self,
        action: Action,
        desired: &Desired,
        dirty: &mut bool,
        status: &mut PassStatus,
    ) -> bool {
        match action {
            Action::Admit(rec) => {
                self.put(rec, status);
                true
            }
            Action::Refuse {
                instance_id,
                reason,
            } => {
                status.errors.push(format!("{instance_id}: {reason}"));
                false
            }
            Action::Retire { .. } => unreachable!("retirements are carried out first"),
            Action::Adopt(id) => {
                let pid = self.ledger.data().instances[&id]
                    .handle
                    .as_ref()
                    .map_or(0, |h| h.pid);
                tracing::info!(instance = %id, pid, "adopted a running instance");
                status.adopted.push(id);
                true
            }
            Action::StopProcess { handle, next } => {
                let id = next.instance_id.clone();
                if let Err(e) = self.runtime.stop(&handle).await {
                    status.errors.push(format!("stopping {id}: {e}"));
                    return false;
                }
                log_setback(&next);
                self.put(next, status);
                true
            }
            Action::Start(rec) => self.start(rec, desired, status).await,
            Action::Record(rec) => {
                if rec.phase == Phase::Failed {
                    log_setback(&rec);
                }
                self.ledger
                    .data_mut()
                    .instances
                    .insert(rec.instance_id.clone(), rec);
                *dirty = true;
                true
            }
        }
    }

    /// Starts (again). The attempt is on disk before the runtime acts, so a
    /// crash here leaves a record without handle: reclaimed next time.
    async fn start(
        &mut self,
        mut rec: InstanceRecord,
        desired: &Desired,
        status: &mut PassStatus,
    ) -> bool {
        let id = rec.instance_id.clone();
        let Some(d) = desired.instances.iter().find(|d| d.instance_id == id) else {
            status
                .errors
                .push(format!("{id}: not desired, not started"));
            return false;
        };
        if let Err(e) = self.runtime.reclaim(&id, &rec.work_dir).await {
            status.errors.push(format!("reclaiming {id}: {e}"));
            return false;
        }
        self.put(rec.clone(), status);
        let secrets = desired.secrets.get(&secrets_key(&d.env, &d.app));
        let spec = match self.spec_for(d, &rec, secrets).await {
            Ok(s) => s,
            Err(why) => {
                let next = failed_start(&rec, why, now_ms(), &self.policy);
                log_setback(&next);
                self.put(next, status);
                return false;
            }
        };
        rec.port = spec.port;
        match self.runtime.start(&spec).await {
            Ok(h) => {
                tracing::info!(instance = %id, app = %d.app, ip = %h.ip, attempt = rec.attempts, "started");
                rec.handle = Some(h);
                rec.started_at_ms = now_ms();
                status.started.push(id);
                self.put(rec, status);
                true
            }
            Err(e) => {
                let next = failed_start(&rec, error_chain(&e), now_ms(), &self.policy);
                log_setback(&next);
                self.put(next, status);
                false
            }
        }
    }

    async fn spec_for(
        &self,
        d: &DesiredInstance,
        rec: &InstanceRecord,
        secrets: Option<&Result<meta_schema::sops::Secrets, String>>,
    ) -> Result<InstanceSpec, String> {
        let cache = self.cfg.data_dir.join("images");
        let image = self
            .images
            .fetch(&d.release.image_digest, &cache)
            .await
            .map_err(|e| error_chain(&e))?;
        let r = &d.release;
        let c = &image.config;
        let (entrypoint, cmd) = if !r.entrypoint.is_empty() {
            (r.entrypoint.clone(), r.cmd.clone())
        } else if !r.cmd.is_empty() {
            (c.entrypoint.clone(), r.cmd.clone())
        } else {
            (c.entrypoint.clone(), c.cmd.clone())
        };
        let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if argv.is_empty() {
            return Err(format!(
                "image {} has neither entrypoint nor cmd",
                r.image_digest
            ));
        }
        let port = match r.port {
            0 => c.exposed_ports.first().copied().unwrap_or(DEFAULT_PORT),
            p => u16::try_from(p).map_err(|_| format!("port {p} out of range"))?,
        };
        let mut env_vars = c.env.clone();
        env_vars.extend(r.env_vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        if !r.secret_refs.is_empty() {
            let secrets = match secrets {
                Some(Ok(s)) => s,
                Some(Err(why)) => return Err(format!("secrets of {}/{}: {why}", d.env, d.app)),
                None => return Err(format!("secrets of {}/{} were not read", d.env, d.app)),
            };
            for name in &r.secret_refs {
                let value = secrets.get(name).ok_or_else(|| {
                    format!(
                        "secret {name} is not in the secrets file of {}/{}",
                        d.env, d.app
                    )
                })?;
                env_vars.insert(name.clone(), value.expose().to_string());
            }
        }
        env_vars.insert("PORT".into(), port.to_string());
        let res = r.resources.unwrap_or_default();
        Ok(InstanceSpec {
            instance_id: rec.instance_id.clone(),
            env: d.env.clone(),
            app: d.app.clone(),
            image_dir: image.dir,
            argv,
            env_vars,
            workdir: if c.workdir.is_empty() {
                "/".into()
            } else {
                c.workdir.clone()
            },
            user: c.user.clone(),
            ip: rec.ip,
            port,
            vcpus: res.vcpus.max(1),
            memory_mb: if res.memory_mb == 0 {
                256
            } else {
                res.memory_mb
            },
            work_dir: rec.work_dir.clone(),
        })
    }

    fn report_of(&self, rec: &InstanceRecord) -> InstanceReport {
        InstanceReport {
            id: rec.instance_id.clone(),
            node_id: self.cfg.node_id.clone(),
            env: rec.env.clone(),
            app: rec.app.clone(),
            rollout_id: rec.rollout_id.clone(),
            release_id: rec.release_id.clone(),
            state: rec.phase.report_state(),
            reason: rec.reason.clone(),
            address: rec.ip.to_string(),
            port: rec.port,
            attempts: rec.attempts,
        }
    }

    /// Counts, and reports every change the captain has not accepted yet.
    async fn finish(&mut self, status: &mut PassStatus) {
        let recs: Vec<InstanceRecord> = self.ledger.data().instances.values().cloned().collect();
        status.healthy = recs.iter().filter(|r| r.phase == Phase::Healthy).count();
        status.failed = recs.iter().filter(|r| r.phase == Phase::Failed).count();
        for rec in &recs {
            let report = self.report_of(rec);
            if self.reported.get(&rec.instance_id) == Some(&report) {
                continue;
            }
            match self.captain.report_instance(&report).await {
                Ok(()) => {
                    self.reported.insert(rec.instance_id.clone(), report);
                }
                Err(e) => {
                    tracing::warn!(instance = %rec.instance_id, error = %e, "instance report not delivered");
                    break;
                }
            }
        }
        let stops: Vec<InstanceReport> = self
            .ledger
            .data()
            .unreported_stops
            .values()
            .cloned()
            .collect();
        let mut delivered = false;
        for report in stops {
            match self.captain.report_instance(&report).await {
                Ok(()) => {
                    self.reported.remove(&report.id);
                    self.ledger.data_mut().unreported_stops.remove(&report.id);
                    delivered = true;
                }
                Err(e) => {
                    tracing::warn!(instance = %report.id, error = %e, "stop report not delivered");
                    break;
                }
            }
        }
        if delivered {
            self.commit(status);
        }
        status.ledger_generation = self.ledger.generation();
    }
}

/// Handles to a running reconciler task.
#[derive(Clone)]
pub struct ReconcilerHandle {
    /// Wakes the reconciler for a pass as soon as possible.
    pub activate: Arc<Notify>,
    pub status: watch::Receiver<PassStatus>,
    /// Snapshot of the ledger after each pass and command.
    pub instances: watch::Receiver<BTreeMap<String, InstanceRecord>>,
    pub commands: mpsc::Sender<(Command, tokio::sync::oneshot::Sender<Result<(), String>>)>,
}

/// Runs passes on `activate`, on `period` (sooner when a drain deadline
/// falls before), and on commands, until
/// `shutdown` turns true. The task owns the reconciler (one writer of the
/// ledger). Cancel-safety: each `select!` arm only wakes the loop; the work
/// is done outside `select!`, so no pass is ever cut in half by another arm.
pub fn spawn(
    mut rec: Reconciler,
    period: Duration,
    activate: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> (ReconcilerHandle, tokio::task::JoinHandle<()>) {
    let (status_tx, status_rx) = watch::channel(PassStatus::default());
    let (inst_tx, inst_rx) = watch::channel(rec.ledger().instances.clone());
    let (cmd_tx, mut cmd_rx) =
        mpsc::channel::<(Command, tokio::sync::oneshot::Sender<Result<(), String>>)>(16);
    let handle = ReconcilerHandle {
        activate: activate.clone(),
        status: status_rx,
        instances: inst_rx,
        commands: cmd_tx,
    };
    let task = tokio::spawn(async move {
        loop {
            let st = rec.activate().await;
            if !st.errors.is_empty() {
                tracing::debug!(errors = ?st.errors, "pass finished with errors");
            }
            let _ = inst_tx.send(rec.ledger().instances.clone());
            let _ = status_tx.send(st);
            let wait = rec.next_wait(period);
            tokio::select! {
                // Notify::notified is cancel-safe: a permit stored while we
                // were busy is kept and fires here at once.
                _ = activate.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some((cmd, reply)) = cmd_rx.recv() => {
                    let r = rec.command(cmd).await;
                    let _ = inst_tx.send(rec.ledger().instances.clone());
                    let _ = reply.send(r);
                }
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
    });
    (handle, task)
}

/// Logs an instance that failed, will be retried, or is restarted.
fn log_setback(next: &InstanceRecord) {
    let id = &next.instance_id;
    match next.phase {
        Phase::Failed => {
            tracing::error!(instance = %id, attempts = next.attempts, "failed: {}", next.reason)
        }
        Phase::Unhealthy => {
            tracing::warn!(instance = %id, crashes = next.crashes, "{}", next.reason)
        }
        _ => {
            tracing::warn!(instance = %id, attempts = next.attempts, "start failed, will retry: {}", next.reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv6Addr;
    use std::path::Path;
    use std::sync::Mutex;

    use meta_schema::pb;

    use super::*;
    use crate::captain::{CaptainError, Heartbeat, NodeRegistration, Registered};
    use crate::image::{FetchedImage, ImageConfig, ImageError};
    use crate::runtime::{RuntimeError, RuntimeHandle};

    /// A runtime in memory. `start` checks that the ledger on disk already
    /// holds the attempt (the intent is durable before the side effect).
    #[derive(Default)]
    struct FakeRuntime {
        ledger_path: PathBuf,
        alive: Mutex<HashMap<String, Liveness>>,
        starts: Mutex<Vec<String>>,
        stops: Mutex<Vec<String>>,
        reclaims: Mutex<Vec<String>>,
        fail_start: Mutex<BTreeSet<String>>,
        next_pid: Mutex<u32>,
    }

    impl Runtime for FakeRuntime {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn start<'a>(
            &'a self,
            spec: &'a InstanceSpec,
        ) -> BoxFuture<'a, Result<RuntimeHandle, RuntimeError>> {
            Box::pin(async move {
                let on_disk: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&self.ledger_path).unwrap()).unwrap();
                let rec = &on_disk["data"]["instances"][&spec.instance_id];
                assert!(
                    rec["attempts"].as_u64().unwrap() >= 1,
                    "attempt not on disk before start: {rec}"
                );
                assert!(rec["handle"].is_null());
                self.starts.lock().unwrap().push(spec.instance_id.clone());
                if self.fail_start.lock().unwrap().contains(&spec.instance_id) {
                    return Err(RuntimeError::StartFailed {
                        instance_id: spec.instance_id.clone(),
                        reason: "boom".into(),
                    });
                }
                let mut pid = self.next_pid.lock().unwrap();
                *pid += 1;
                self.alive
                    .lock()
                    .unwrap()
                    .insert(spec.instance_id.clone(), Liveness::Running);
                Ok(RuntimeHandle {
                    instance_id: spec.instance_id.clone(),
                    driver: "fake".into(),
                    pid: *pid,
                    pid_start_ticks: 1,
                    ip: spec.ip,
                    port: spec.port,
                    work_dir: spec.work_dir.clone(),
                    extra: Default::default(),
                })
            })
        }
        fn stop<'a>(
            &'a self,
            handle: &'a RuntimeHandle,
        ) -> BoxFuture<'a, Result<(), RuntimeError>> {
            Box::pin(async move {
                self.stops.lock().unwrap().push(handle.instance_id.clone());
                self.alive.lock().unwrap().remove(&handle.instance_id);
                Ok(())
            })
        }
        fn liveness(&self, handle: &RuntimeHandle) -> Liveness {
            self.alive
                .lock()
                .unwrap()
                .get(&handle.instance_id)
                .copied()
                .unwrap_or(Liveness::Exited(None))
        }
        fn reclaim<'a>(
            &'a self,
            instance_id: &'a str,
            _work_dir: &'a Path,
        ) -> BoxFuture<'a, Result<(), RuntimeError>> {
            Box::pin(async move {
                self.reclaims.lock().unwrap().push(instance_id.to_string());
                Ok(())
            })
        }
    }

    struct FakeImages;
    impl ImageSource for FakeImages {
        fn fetch<'a>(
            &'a self,
            digest: &'a str,
            cache: &'a Path,
        ) -> BoxFuture<'a, Result<FetchedImage, ImageError>> {
            Box::pin(async move {
                if digest.ends_with('0') {
                    return Err(ImageError::NotFound {
                        digest: digest.into(),
                        path: cache.into(),
                    });
                }
                Ok(FetchedImage {
                    dir: cache.join(digest),
                    config: ImageConfig {
                        entrypoint: vec!["/app".into()],
                        exposed_ports: vec![9000],
                        ..Default::default()
                    },
                })
            })
        }
    }

    /// Desired instances, and the drain deadlines of some.
    #[derive(Default)]
    struct FakeDesired(Mutex<Vec<DesiredInstance>>, Mutex<BTreeMap<String, i64>>);
    impl DesiredSource for FakeDesired {
        fn desired(&self) -> BoxFuture<'_, Result<Desired, DesiredError>> {
            Box::pin(async move {
                Ok(Desired {
                    commit: Some("c".into()),
                    instances: self.0.lock().unwrap().clone(),
                    drain_deadlines: self.1.lock().unwrap().clone(),
                    ..Default::default()
                })
            })
        }
    }

    #[derive(Default)]
    struct FakeCaptain(Mutex<Vec<InstanceReport>>);
    impl Captain for FakeCaptain {
        fn register<'a>(
            &'a self,
            _r: &'a NodeRegistration,
        ) -> BoxFuture<'a, Result<Registered, CaptainError>> {
            unreachable!("the reconciler never registers")
        }
        fn heartbeat<'a>(
            &'a self,
            _n: &'a str,
            _h: &'a Heartbeat,
        ) -> BoxFuture<'a, Result<(), CaptainError>> {
            unreachable!("the reconciler never sends heartbeats")
        }
        fn report_instance<'a>(
            &'a self,
            r: &'a InstanceReport,
        ) -> BoxFuture<'a, Result<(), CaptainError>> {
            Box::pin(async move {
                self.0.lock().unwrap().push(r.clone());
                Ok(())
            })
        }
        fn put_secrets_file<'a>(
            &'a self,
            _app_id: &'a str,
            _base: &'a str,
            _yaml: &'a str,
        ) -> BoxFuture<'a, Result<(), CaptainError>> {
            unreachable!("the reconciler never writes secrets files")
        }
    }

    /// Healthy unless the instance's slot is listed.
    #[derive(Default)]
    struct FakeChecker(Mutex<BTreeSet<Ipv6Addr>>);
    impl HealthChecker for FakeChecker {
        fn check(&self, addr: SocketAddr, _p: Probe) -> BoxFuture<'static, Result<(), String>> {
            let sick = match addr {
                SocketAddr::V6(a) => self.0.lock().unwrap().contains(a.ip()),
                SocketAddr::V4(_) => true,
            };
            Box::pin(async move {
                if sick {
                    Err("sick".to_string())
                } else {
                    Ok(())
                }
            })
        }
    }

    fn desired(id: &str, release: &str, digest_tail: char) -> DesiredInstance {
        DesiredInstance {
            instance_id: id.into(),
            node: "n".into(),
            env: "prod".into(),
            app: "web".into(),
            rollout_id: "r".into(),
            release: pb::Release {
                id: release.into(),
                image_digest: format!("sha256:{}{digest_tail}", "a".repeat(63)),
                ..Default::default()
            },
        }
    }

    struct World {
        _dir: tempfile::TempDir,
        rt: Arc<FakeRuntime>,
        want: Arc<FakeDesired>,
        captain: Arc<FakeCaptain>,
        checker: Arc<FakeChecker>,
        cfg: ReconcilerConfig,
    }

    impl World {
        fn new() -> World {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = ReconcilerConfig::new(
                "n",
                dir.path(),
                InstanceRange::parse("fd00:7a77:0:1::/64").unwrap(),
            );
            cfg.start_backoff = Duration::ZERO;
            cfg.crash_backoff = Duration::ZERO;
            let rt = Arc::new(FakeRuntime {
                ledger_path: cfg.ledger_path(),
                ..Default::default()
            });
            World {
                _dir: dir,
                rt,
                want: Default::default(),
                captain: Default::default(),
                checker: Default::default(),
                cfg,
            }
        }
        fn reconciler(&self) -> Reconciler {
            Reconciler::new(
                self.cfg.clone(),
                self.want.clone(),
                self.rt.clone(),
                Arc::new(FakeImages),
                self.captain.clone(),
            )
            .unwrap()
            .with_checker(self.checker.clone())
        }
    }

    #[tokio::test]
    async fn converges_once_and_then_does_nothing() {
        let w = World::new();
        *w.want.0.lock().unwrap() = vec![desired("i1", "r1", 'b'), desired("i2", "r1", 'b')];
        let mut r = w.reconciler();
        let st = r.activate().await;
        assert_eq!(st.started, ["i1", "i2"]);
        assert_eq!(st.healthy, 2);
        let ips: BTreeSet<Ipv6Addr> = r.ledger().instances.values().map(|i| i.ip).collect();
        assert_eq!(ips.len(), 2, "one address each");
        assert!(
            r.ledger().instances.values().all(|i| i.port == 9000),
            "the image's exposed port"
        );
        let generation = st.ledger_generation;
        for _ in 0..3 {
            let st = r.activate().await;
            assert!(
                st.started.is_empty() && st.stopped.is_empty() && st.errors.is_empty(),
                "{st:?}"
            );
            assert_eq!(
                st.ledger_generation, generation,
                "an idle pass writes nothing"
            );
        }
        assert_eq!(w.rt.starts.lock().unwrap().len(), 2);
        // Reported once each as healthy, not once per pass.
        let reports = w.captain.0.lock().unwrap().clone();
        assert_eq!(
            reports
                .iter()
                .filter(|r| r.state == InstanceState::Healthy)
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn a_new_process_adopts_running_instances_and_replaces_changed_ones() {
        let w = World::new();
        *w.want.0.lock().unwrap() = vec![desired("i1", "r1", 'b'), desired("i2", "r1", 'b')];
        w.reconciler().activate().await;
        // A "restart": a fresh reconciler on the same ledger.
        *w.want.0.lock().unwrap() = vec![desired("i1", "r1", 'b'), desired("i2", "r2", 'b')];
        let mut r = w.reconciler();
        let st = r.activate().await;
        assert_eq!(st.adopted, ["i1"]);
        assert_eq!(st.stopped, ["i2"], "desired with another release: replaced");
        assert_eq!(st.started, ["i2"]);
        assert_eq!(w.rt.starts.lock().unwrap().len(), 3);
        // Gone from the desired state: stopped and reported stopped.
        w.want.0.lock().unwrap().clear();
        let st = r.activate().await;
        assert_eq!(st.stopped.len(), 2);
        assert!(r.ledger().instances.is_empty() && r.ledger().unreported_stops.is_empty());
        assert!(w.rt.alive.lock().unwrap().is_empty());
        let stopped = w
            .captain
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.state == InstanceState::Stopped)
            .count();
        assert_eq!(stopped, 3);
    }

    #[tokio::test]
    async fn an_interrupted_start_is_reclaimed_before_starting_again() {
        let w = World::new();
        *w.want.0.lock().unwrap() = vec![desired("i1", "r1", 'b')];
        w.rt.fail_start.lock().unwrap().insert("i1".into());
        w.reconciler().activate().await;
        w.rt.fail_start.lock().unwrap().clear();
        let before = w.rt.reclaims.lock().unwrap().len();
        let st = w.reconciler().activate().await;
        assert_eq!(st.started, ["i1"]);
        assert_eq!(w.rt.reclaims.lock().unwrap().len(), before + 1);
    }

    #[tokio::test]
    async fn failed_starts_give_up_after_the_retries_and_crashes_restart() {
        let w = World::new();
        *w.want.0.lock().unwrap() = vec![desired("bad", "r1", '0'), desired("ok", "r1", 'b')];
        let mut r = w.reconciler();
        for _ in 0..(START_RETRIES + 3) {
            r.activate().await;
        }
        let bad = &r.ledger().instances["bad"];
        assert_eq!(bad.phase, Phase::Failed);
        assert_eq!(bad.attempts, START_RETRIES + 1);
        assert!(bad.reason.contains("not in the store"), "{}", bad.reason);
        let failed: Vec<InstanceReport> = w
            .captain
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.state == InstanceState::Failed)
            .cloned()
            .collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].attempts, START_RETRIES + 1);

        // The healthy one crashes: restarted, counted as a crash, not an attempt.
        assert_eq!(r.ledger().instances["ok"].phase, Phase::Healthy);
        w.rt.alive
            .lock()
            .unwrap()
            .insert("ok".into(), Liveness::Exited(Some(1)));
        let st = r.activate().await;
        assert_eq!(st.started, ["ok"]);
        let ok = &r.ledger().instances["ok"];
        assert_eq!((ok.crashes, ok.attempts, ok.phase), (1, 2, Phase::Healthy));

        // Failing checks after being healthy: unhealthy, reported.
        w.checker.0.lock().unwrap().insert(ok.ip);
        r.activate().await;
        assert_eq!(r.ledger().instances["ok"].phase, Phase::Unhealthy);
        assert_eq!(
            w.captain.0.lock().unwrap().last().unwrap().state,
            InstanceState::Unhealthy
        );

        // Unhealthy for longer than a start may take: restarted.
        let mut cfg = w.cfg.clone();
        cfg.start_timeout = Duration::ZERO;
        let mut r = Reconciler::new(
            cfg,
            w.want.clone(),
            w.rt.clone(),
            Arc::new(FakeImages),
            w.captain.clone(),
        )
        .unwrap()
        .with_checker(w.checker.clone());
        tokio::time::sleep(Duration::from_millis(5)).await;
        r.activate().await;
        let ok = &r.ledger().instances["ok"];
        assert!(ok.handle.is_none() && ok.crashes == 2, "{ok:?}");
        w.checker.0.lock().unwrap().clear();
        let st = r.activate().await;
        assert_eq!(st.started, ["ok"]);
        assert_eq!(r.ledger().instances["ok"].phase, Phase::Healthy);
    }

    #[tokio::test]
    async fn a_drain_deadline_wakes_a_pass_that_retires_on_time() {
        let w = World::new();
        *w.want.0.lock().unwrap() = vec![desired("i1", "r1", 'b'), desired("i2", "r1", 'b')];
        let mut r = w.reconciler();
        let period = Duration::from_secs(60);
        r.activate().await;
        assert_eq!(r.next_wait(period), period, "nothing drains");
        let deadline = now_ms() + 300;
        w.want.1.lock().unwrap().insert("i1".into(), deadline);
        let st = r.activate().await;
        assert!(st.stopped.is_empty(), "before its deadline it runs");
        let wait = r.next_wait(period);
        assert!(
            wait <= Duration::from_millis(301) && wait > Duration::ZERO,
            "{wait:?}"
        );
        tokio::time::sleep(wait).await;
        let st = r.activate().await;
        assert!(now_ms() > deadline);
        assert_eq!(st.stopped, ["i1"]);
        let report = w.captain.0.lock().unwrap().last().unwrap().clone();
        assert_eq!(
            (report.id.as_str(), report.state, report.reason.as_str()),
            (
                "i1",
                InstanceState::Stopped,
                "drained: the drain deadline passed"
            )
        );
        assert_eq!(r.next_wait(period), period);
        assert_eq!(r.ledger().instances.len(), 1);
    }
}
