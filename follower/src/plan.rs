//! What the reconciler should do, worked out without doing any of it.
//!
//! [`plan`] takes the desired instances of this node (at the applied meta
//! commit), the [`NodeLedger`] of what the node knows about its instances,
//! what was [`Observed`] of their processes, and the clock, and returns the
//! [`Action`]s that bring what runs to what is desired. [`plan_health`] does
//! the same with the outcomes of health checks. Neither touches a process,
//! a file or the network (the captain's `rollout::plan` has the same shape):
//! `reconciler.rs` observes, calls them and carries the actions out in
//! order, so every rule of an instance's life is here and tested as a table
//! of (desired, ledger, observed) -> actions:
//!
//! - a desired instance the ledger does not know is admitted (an address
//!   allocated) and started; one the ledger knows and that is not desired
//!   any more, desired with another release, or past its drain deadline is
//!   retired (stopped, forgotten, reported stopped);
//! - a recorded process that still runs is kept (adopted, on the first pass
//!   of a new follower process); one that exited is cleaned up and started
//!   again: before it was ever healthy that is a failed start attempt (with
//!   a doubling backoff, and after [`START_RETRIES`] retries the instance is
//!   failed until no longer desired), after it was healthy a crash (a
//!   doubling backoff, never failed);
//! - a record without a process (an interrupted start, a backoff that ran
//!   out) is started, with its attempt counted before the runtime acts;
//! - a health check that passes makes an instance healthy; one that fails is
//!   a failed start after the start timeout, and a restart when a once
//!   healthy instance keeps failing for as long;
//! - a release that names no image yet cannot start: its instance fails at
//!   once (a later release with a built image replaces it);
//! - failed and operator-held instances are left alone; an unchanged
//!   steady state plans nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::time::Duration;

use meta_schema::desired::DesiredInstance;
use serde::{Deserialize, Serialize};

use crate::captain::{InstanceReport, InstanceState};
use crate::net::InstanceRange;
use crate::runtime::RuntimeHandle;

/// A failed start is retried this many times, then the instance is failed.
pub const START_RETRIES: u32 = 3;

/// The desired instances of this node at the applied commit.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// The meta commit this was read at.
    pub commit: Option<String>,
    pub instances: Vec<DesiredInstance>,
    /// When the instances of a draining rollout stop (unix ms), by instance
    /// id; instances not listed do not drain.
    pub drain_deadlines: BTreeMap<String, i64>,
    /// Decrypted secrets of the apps whose releases name some, by
    /// `<env>/<app>`, or why they could not be read. Memory only: never
    /// written to the ledger, logs or API (`Secrets`' Debug shows names).
    pub secrets: BTreeMap<String, Result<meta_schema::sops::Secrets, String>>,
}

/// Key of [`Desired::secrets`].
pub fn secrets_key(env: &str, app: &str) -> String {
    format!("{env}/{app}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// To be started, or started and not yet healthy.
    Starting,
    Healthy,
    /// Was healthy: failing checks, or crashed and waiting to restart.
    Unhealthy,
    /// Out of start attempts; stays failed until no longer desired.
    Failed,
}

impl Phase {
    pub fn report_state(self) -> InstanceState {
        match self {
            Phase::Starting => InstanceState::Starting,
            Phase::Healthy => InstanceState::Healthy,
            Phase::Unhealthy => InstanceState::Unhealthy,
            Phase::Failed => InstanceState::Failed,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Healthy => "healthy",
            Phase::Unhealthy => "unhealthy",
            Phase::Failed => "failed",
        }
    }
}

/// What the node knows about one instance; the unit of the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub env: String,
    pub app: String,
    pub rollout_id: String,
    pub release_id: String,
    pub image_digest: String,
    pub ip: Ipv6Addr,
    pub port: u16,
    pub work_dir: PathBuf,
    pub phase: Phase,
    pub reason: String,
    /// The running instance, once a start returned.
    pub handle: Option<RuntimeHandle>,
    /// Starts asked for so far (the first and its retries).
    pub attempts: u32,
    /// Exits after having been healthy (drives the restart backoff).
    pub crashes: u32,
    /// The current handle has passed a health check.
    pub healthy_once: bool,
    /// Unix ms of the current start.
    pub started_at_ms: i64,
    /// No start before this (unix ms): the backoff.
    pub not_before_ms: i64,
    /// Operator hold: stopped and not restarted until released.
    #[serde(default)]
    pub held: bool,
    /// Unix ms since the checks of a once-healthy instance fail; 0 = not
    /// failing.
    #[serde(default)]
    pub unhealthy_since_ms: i64,
}

/// Everything the reconciler keeps on disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeLedger {
    pub instances: BTreeMap<String, InstanceRecord>,
    /// Instances stopped whose "stopped" report has not reached the captain.
    #[serde(default)]
    pub unreported_stops: BTreeMap<String, InstanceReport>,
}

/// The rules' parameters (from `ReconcilerConfig`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Addresses of this node's instances.
    pub range: InstanceRange,
    /// An instance's work dir is `<instances_dir>/<id>`.
    pub instances_dir: PathBuf,
    /// How long a started instance may take to pass its first check, and a
    /// once healthy one may fail its checks, before it is stopped.
    pub start_timeout: Duration,
    /// Backoff after a failed start; doubled per attempt.
    pub start_backoff: Duration,
    /// Backoff after a crash; doubled per crash.
    pub crash_backoff: Duration,
    /// Cap of both backoffs.
    pub max_backoff: Duration,
}

/// What became of a recorded instance's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Process {
    Running,
    /// Exited with `code` when known; `tail` is the end of its output.
    Exited {
        code: Option<i32>,
        tail: String,
    },
}

/// What the reconciler saw before planning.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The process of each record that has a handle, by instance id. A
    /// record with a handle and no entry here is left alone.
    pub processes: BTreeMap<String, Process>,
    /// The first pass of this follower process: instances found running
    /// are adopted (said once).
    pub first_pass: bool,
}

/// One step; carried out by the reconciler in the order planned. When a step
/// fails, the later steps of the same instance are skipped until the next
/// pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Record a desired instance new to this node, its address allocated.
    Admit(InstanceRecord),
    /// A desired instance that cannot be admitted (no free address).
    Refuse { instance_id: String, reason: String },
    /// Stop the instance (or reclaim what an interrupted start left), forget
    /// it, delete its work dir and report it stopped.
    Retire {
        record: InstanceRecord,
        reason: String,
    },
    /// A running instance found by a new follower process: kept as it is.
    Adopt(String),
    /// Stop the process of `handle` (after an exit: release what it held),
    /// then persist `next` (without a handle).
    StopProcess {
        handle: RuntimeHandle,
        next: InstanceRecord,
    },
    /// Start the instance: reclaim what an earlier attempt left, persist
    /// `record` (the attempt counted) *before* the runtime acts, fetch the
    /// image and start. A start that fails is recorded with [`failed_start`].
    Start(InstanceRecord),
    /// Persist the record as given.
    Record(InstanceRecord),
}

impl Action {
    pub fn instance_id(&self) -> &str {
        match self {
            Action::Admit(r) | Action::Start(r) | Action::Record(r) => &r.instance_id,
            Action::Retire { record, .. } => &record.instance_id,
            Action::StopProcess { next, .. } => &next.instance_id,
            Action::Refuse { instance_id, .. } | Action::Adopt(instance_id) => instance_id,
        }
    }
}

/// One line per action, for logs and the tests' tables.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Admit(r) => write!(f, "admit {} at {}", r.instance_id, r.ip),
            Action::Refuse {
                instance_id,
                reason,
            } => write!(f, "refuse {instance_id}: {reason}"),
            Action::Retire { record, reason } => {
                write!(f, "retire {}: {reason}", record.instance_id)
            }
            Action::Adopt(id) => write!(f, "adopt {id}"),
            Action::StopProcess { next, .. } => write!(
                f,
                "stop {} ({}): {}",
                next.instance_id,
                next.phase.word(),
                next.reason
            ),
            Action::Start(r) => write!(f, "start {} #{}", r.instance_id, r.attempts),
            Action::Record(r) if r.reason.is_empty() => {
                write!(f, "record {} {}", r.instance_id, r.phase.word())
            }
            Action::Record(r) => write!(
                f,
                "record {} {}: {}",
                r.instance_id,
                r.phase.word(),
                r.reason
            ),
        }
    }
}

/// `base` doubled per step after the first, capped at `max`, in ms.
pub fn backoff(base: Duration, n: u32, max: Duration) -> i64 {
    let d = base.saturating_mul(1u32 << n.saturating_sub(1).min(16));
    d.min(max).as_millis() as i64
}

/// `rec` after its current start attempt failed for `why` at `now`: retried
/// after a backoff, or failed once the retries are used up.
pub fn failed_start(rec: &InstanceRecord, why: String, now: i64, p: &Policy) -> InstanceRecord {
    let mut next = rec.clone();
    if rec.attempts > START_RETRIES {
        next.phase = Phase::Failed;
    } else {
        next.phase = Phase::Starting;
        next.not_before_ms = now + backoff(p.start_backoff, rec.attempts, p.max_backoff);
    }
    next.handle = None;
    next.reason = why;
    next.healthy_once = false;
    next
}

/// `rec` after a process that had been healthy went away for `why`: started
/// again after the crash backoff.
fn crashed(rec: &InstanceRecord, why: String, now: i64, p: &Policy) -> InstanceRecord {
    let mut next = rec.clone();
    next.handle = None;
    next.crashes += 1;
    next.phase = Phase::Unhealthy;
    next.reason = why;
    next.healthy_once = false;
    next.unhealthy_since_ms = 0;
    next.not_before_ms = now + backoff(p.crash_backoff, next.crashes, p.max_backoff);
    next
}

fn exit_reason(code: Option<i32>, tail: &str) -> String {
    format!(
        "exited with {}{}",
        code.map_or("a signal".to_string(), |c| format!("status {c}")),
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    )
}

fn admitted(d: &DesiredInstance, slot: u16, p: &Policy) -> InstanceRecord {
    InstanceRecord {
        instance_id: d.instance_id.clone(),
        env: d.env.clone(),
        app: d.app.clone(),
        rollout_id: d.rollout_id.clone(),
        release_id: d.release.id.clone(),
        image_digest: d.release.image_digest.clone(),
        ip: p.range.instance_addr(slot),
        port: 0,
        work_dir: p.instances_dir.join(&d.instance_id),
        phase: Phase::Starting,
        reason: String::new(),
        handle: None,
        attempts: 0,
        crashes: 0,
        healthy_once: false,
        started_at_ms: 0,
        not_before_ms: 0,
        held: false,
        unhealthy_since_ms: 0,
    }
}

/// The actions that bring this node's instances to `desired`. Pure.
pub fn plan(
    desired: &Desired,
    ledger: &NodeLedger,
    observed: &Observed,
    now: i64,
    p: &Policy,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let drained = |id: &str| desired.drain_deadlines.get(id).is_some_and(|&t| t <= now);
    let want: BTreeMap<&str, &DesiredInstance> = desired
        .instances
        .iter()
        .filter(|d| !drained(&d.instance_id))
        .map(|d| (d.instance_id.as_str(), d))
        .collect();

    // Retire first: what goes is stopped before anything new starts.
    let mut retired = BTreeSet::new();
    for rec in ledger.instances.values() {
        let id = rec.instance_id.as_str();
        let reason = match want.get(id) {
            None if drained(id) => "drained: the drain deadline passed".to_string(),
            None => "no longer desired".to_string(),
            Some(d) if d.release.id != rec.release_id => {
                format!("replaced by release {}", d.release.id)
            }
            Some(_) => continue,
        };
        retired.insert(id);
        actions.push(Action::Retire {
            record: rec.clone(),
            reason,
        });
    }

    // Addresses stay taken until their record is gone, retired ones too (a
    // stop can fail and leave the record).
    let mut used: BTreeSet<u16> = ledger
        .instances
        .values()
        .filter_map(|r| p.range.slot_of(r.ip))
        .collect();
    for d in desired
        .instances
        .iter()
        .filter(|d| !drained(&d.instance_id))
    {
        let id = d.instance_id.as_str();
        let rec = match ledger.instances.get(id).filter(|_| !retired.contains(id)) {
            Some(r) => r.clone(),
            None => match p.range.free_slot(used.iter().copied()) {
                Ok(slot) => {
                    used.insert(slot);
                    let r = admitted(d, slot, p);
                    actions.push(Action::Admit(r.clone()));
                    r
                }
                Err(e) => {
                    actions.push(Action::Refuse {
                        instance_id: id.to_string(),
                        reason: e.to_string(),
                    });
                    continue;
                }
            },
        };
        plan_instance(d, rec, observed, now, p, &mut actions);
    }
    actions
}

fn plan_instance(
    d: &DesiredInstance,
    mut rec: InstanceRecord,
    observed: &Observed,
    now: i64,
    p: &Policy,
    actions: &mut Vec<Action>,
) {
    if rec.phase == Phase::Failed || rec.held {
        return;
    }
    if let Some(handle) = &rec.handle {
        match observed.processes.get(&rec.instance_id) {
            None => return,
            Some(Process::Running) => {
                if observed.first_pass {
                    actions.push(Action::Adopt(rec.instance_id.clone()));
                }
                return;
            }
            Some(Process::Exited { code, tail }) => {
                let why = exit_reason(*code, tail);
                let next = if rec.healthy_once {
                    crashed(&rec, format!("crashed, restarting: {why}"), now, p)
                } else {
                    failed_start(&rec, why, now, p)
                };
                actions.push(Action::StopProcess {
                    handle: handle.clone(),
                    next: next.clone(),
                });
                rec = next;
            }
        }
    }
    if rec.phase == Phase::Failed || now < rec.not_before_ms {
        return;
    }
    if d.release.image_digest.is_empty() {
        let mut next = rec;
        next.phase = Phase::Failed;
        next.reason = format!(
            "release {} names no image yet: nothing to start until a release with a built image replaces it",
            d.release.id
        );
        actions.push(Action::Record(next));
        return;
    }
    let mut next = rec;
    next.attempts += 1;
    next.handle = None;
    next.healthy_once = false;
    if next.phase != Phase::Unhealthy {
        next.phase = Phase::Starting;
    }
    actions.push(Action::Start(next));
}

/// The actions that follow from health checks (`health`, by instance id)
/// of running instances. Pure.
pub fn plan_health(
    instances: &BTreeMap<String, InstanceRecord>,
    health: &BTreeMap<String, Result<(), String>>,
    now: i64,
    p: &Policy,
) -> Vec<Action> {
    let timeout = p.start_timeout.as_millis() as i64;
    let mut actions = Vec::new();
    for (id, result) in health {
        let Some(rec) = instances.get(id) else {
            continue;
        };
        let Some(handle) = &rec.handle else {
            continue;
        };
        let mut next = rec.clone();
        match result {
            Ok(()) => {
                next.phase = Phase::Healthy;
                next.healthy_once = true;
                next.unhealthy_since_ms = 0;
                next.reason.clear();
            }
            Err(why)
                if rec.healthy_once
                    && rec.unhealthy_since_ms > 0
                    && now - rec.unhealthy_since_ms > timeout =>
            {
                // Failing for longer than a start may take: restarted, as
                // after a crash.
                let mut next = crashed(
                    rec,
                    format!("unhealthy for too long, restarting: {why}"),
                    now,
                    p,
                );
                next.phase = rec.phase;
                actions.push(Action::StopProcess {
                    handle: handle.clone(),
                    next,
                });
                continue;
            }
            Err(why) if rec.healthy_once => {
                next.phase = Phase::Unhealthy;
                if rec.unhealthy_since_ms == 0 {
                    next.unhealthy_since_ms = now;
                }
                next.reason = why.clone();
            }
            Err(why) if now - rec.started_at_ms > timeout => {
                // Never became healthy: a failed start.
                actions.push(Action::StopProcess {
                    handle: handle.clone(),
                    next: failed_start(
                        rec,
                        format!("not healthy within {:?}: {why}", p.start_timeout),
                        now,
                        p,
                    ),
                });
                continue;
            }
            Err(why) => next.reason = why.clone(),
        }
        if next != *rec {
            actions.push(Action::Record(next));
        }
    }
    actions
}

/// When the next drain deadline after `now` falls (unix ms), if any: a pass
/// then stops the drained instances on time.
pub fn next_deadline(desired: &Desired, now: i64) -> Option<i64> {
    desired
        .drain_deadlines
        .values()
        .copied()
        .filter(|&t| t > now)
        .min()
}

#[cfg(test)]
mod tests {
    use meta_schema::pb;

    use super::*;

    const NOW: i64 = 1_000_000;

    fn policy() -> Policy {
        Policy {
            range: InstanceRange::parse("fd00:7a77:0:1::/64").unwrap(),
            instances_dir: PathBuf::from("/data/instances"),
            start_timeout: Duration::from_secs(30),
            start_backoff: Duration::from_millis(500),
            crash_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }

    fn want(id: &str, release: &str) -> DesiredInstance {
        DesiredInstance {
            instance_id: id.into(),
            node: "n".into(),
            env: "prod".into(),
            app: "web".into(),
            rollout_id: "ro".into(),
            release: pb::Release {
                id: release.into(),
                image_digest: format!("sha256:{}", "a".repeat(64)),
                ..Default::default()
            },
        }
    }

    fn handle(id: &str) -> RuntimeHandle {
        RuntimeHandle {
            instance_id: id.into(),
            driver: "process".into(),
            pid: 4242,
            pid_start_ticks: 1,
            ip: Ipv6Addr::LOCALHOST,
            port: 8080,
            work_dir: PathBuf::from("/data/instances").join(id),
            extra: Default::default(),
        }
    }

    /// A record of release `release` at `slot`, in `phase`, with a process
    /// when `running`, after `attempts` starts.
    fn rec(id: &str, release: &str, slot: u16, phase: Phase, attempts: u32) -> InstanceRecord {
        let p = policy();
        let mut r = admitted(&want(id, release), slot, &p);
        r.phase = phase;
        r.attempts = attempts;
        if phase == Phase::Healthy {
            r.handle = Some(handle(id));
            r.healthy_once = true;
            r.started_at_ms = NOW - 60_000;
        }
        r
    }

    fn with_handle(mut r: InstanceRecord, started_ago_ms: i64) -> InstanceRecord {
        r.handle = Some(handle(&r.instance_id));
        r.started_at_ms = NOW - started_ago_ms;
        r
    }

    fn ledger(recs: Vec<InstanceRecord>) -> NodeLedger {
        NodeLedger {
            instances: recs
                .into_iter()
                .map(|r| (r.instance_id.clone(), r))
                .collect(),
            unreported_stops: BTreeMap::new(),
        }
    }

    fn exited(code: i32, tail: &str) -> Process {
        Process::Exited {
            code: Some(code),
            tail: tail.into(),
        }
    }

    struct Case {
        name: &'static str,
        desired: Vec<DesiredInstance>,
        drain: Vec<(&'static str, i64)>,
        ledger: Vec<InstanceRecord>,
        processes: Vec<(&'static str, Process)>,
        first_pass: bool,
        now: i64,
        expect: Vec<&'static str>,
    }

    impl Default for Case {
        fn default() -> Self {
            Case {
                name: "",
                desired: vec![],
                drain: vec![],
                ledger: vec![],
                processes: vec![],
                first_pass: false,
                now: NOW,
                expect: vec![],
            }
        }
    }

    fn run(c: &Case) -> Vec<Action> {
        let desired = Desired {
            commit: Some("c".into()),
            instances: c.desired.clone(),
            drain_deadlines: c.drain.iter().map(|(i, t)| (i.to_string(), *t)).collect(),
            secrets: BTreeMap::new(),
        };
        let observed = Observed {
            processes: c
                .processes
                .iter()
                .map(|(i, p)| (i.to_string(), p.clone()))
                .collect(),
            first_pass: c.first_pass,
        };
        plan(
            &desired,
            &ledger(c.ledger.clone()),
            &observed,
            c.now,
            &policy(),
        )
    }

    #[test]
    fn plan_table() {
        let running = || Process::Running;
        let cases = vec![
            Case {
                name: "fresh start: admitted at the lowest free addresses, started",
                desired: vec![want("i1", "r1"), want("i2", "r1")],
                expect: vec![
                    "admit i1 at fd00:7a77:0:1::1:2",
                    "start i1 #1",
                    "admit i2 at fd00:7a77:0:1::2:2",
                    "start i2 #1",
                ],
                ..Default::default()
            },
            Case {
                name: "unchanged steady state: nothing",
                desired: vec![want("i1", "r1")],
                ledger: vec![rec("i1", "r1", 1, Phase::Healthy, 1)],
                processes: vec![("i1", running())],
                ..Default::default()
            },
            Case {
                name: "adopt after a restart of the follower",
                desired: vec![want("i1", "r1")],
                ledger: vec![rec("i1", "r1", 1, Phase::Healthy, 1)],
                processes: vec![("i1", running())],
                first_pass: true,
                expect: vec!["adopt i1"],
                ..Default::default()
            },
            Case {
                name: "a process not observed is left alone",
                desired: vec![want("i1", "r1")],
                ledger: vec![rec("i1", "r1", 1, Phase::Healthy, 1)],
                ..Default::default()
            },
            Case {
                name: "an interrupted start (recorded, no process) is started again",
                desired: vec![want("i1", "r1")],
                ledger: vec![rec("i1", "r1", 1, Phase::Starting, 1)],
                expect: vec!["start i1 #2"],
                ..Default::default()
            },
            Case {
                name: "stop what is no longer desired; its address stays taken",
                desired: vec![want("i2", "r1")],
                ledger: vec![rec("i1", "r1", 1, Phase::Healthy, 1)],
                processes: vec![("i1", running())],
                expect: vec![
                    "retire i1: no longer desired",
                    "admit i2 at fd00:7a77:0:1::2:2",
                    "start i2 #1",
                ],
                ..Default::default()
            },
            Case {
                name: "desired with another release: replaced, at a new address",
                desired: vec![want("i1", "r2")],
                ledger: vec![rec("i1", "r1", 1, Phase::Healthy, 1)],
                processes: vec![("i1", running())],
                expect: vec![
                    "retire i1: replaced by release r2",
                    "admit i1 at fd00:7a77:0:1::2:2",
                    "start i1 #1",
                ],
                ..Default::default()
            },
            Case {
                name: "draining, deadline ahead: keeps running",
                desired: vec![want("i1", "r1")],
                drain: vec![("i1", NOW + 1)],
                ledger: vec![rec("i1", "r1", 1, Phase::Healthy, 1)],
                processes: vec![("i1", running())],
                ..Default::default()
            },
            Case {
                name: "draining, deadline reached: retired",
                desired: vec![want("i1", "r1"), want("i2", "r2")],
                drain: vec![("i1", NOW)],
                ledger: vec![
                    rec("i1", "r1", 1, Phase::Healthy, 1),
                    rec("i2", "r2", 2, Phase::Healthy, 1),
                ],
                processes: vec![("i1", running()), ("i2", running())],
                expect: vec!["retire i1: drained: the drain deadline passed"],
                ..Default::default()
            },
            Case {
                name: "a drained instance not yet known is not started",
                desired: vec![want("i1", "r1")],
                drain: vec![("i1", NOW - 5)],
                ..Default::default()
            },
            Case {
                name: "exited before healthy: a failed attempt, retried after the backoff",
                desired: vec![want("i1", "r1")],
                ledger: vec![with_handle(rec("i1", "r1", 1, Phase::Starting, 1), 100)],
                processes: vec![("i1", exited(1, "boom"))],
                expect: vec!["stop i1 (starting): exited with status 1: boom"],
                ..Default::default()
            },
            Case {
                name: "the backoff not over: waits",
                desired: vec![want("i1", "r1")],
                ledger: vec![{
                    let mut r = rec("i1", "r1", 1, Phase::Starting, 2);
                    r.not_before_ms = NOW + 1;
                    r
                }],
                ..Default::default()
            },
            Case {
                name: "the backoff over: the next attempt",
                desired: vec![want("i1", "r1")],
                ledger: vec![{
                    let mut r = rec("i1", "r1", 1, Phase::Starting, 2);
                    r.not_before_ms = NOW;
                    r
                }],
                expect: vec!["start i1 #3"],
                ..Default::default()
            },
            Case {
                name: "exited on the last retry: failed",
                desired: vec![want("i1", "r1")],
                ledger: vec![with_handle(
                    rec("i1", "r1", 1, Phase::Starting, START_RETRIES + 1),
                    100,
                )],
                processes: vec![("i1", exited(7, ""))],
                expect: vec!["stop i1 (failed): exited with status 7"],
                ..Default::default()
            },
            Case {
                name: "failed stays failed while desired",
                desired: vec![want("i1", "r1")],
                ledger: vec![rec("i1", "r1", 1, Phase::Failed, START_RETRIES + 1)],
                ..Default::default()
            },
            Case {
                name: "failed and no longer desired: retired",
                ledger: vec![rec("i1", "r1", 1, Phase::Failed, START_RETRIES + 1)],
                expect: vec!["retire i1: no longer desired"],
                ..Default::default()
            },
            Case {
                name: "a crash after healthy: restarted after the crash backoff, not failed",
                desired: vec![want("i1", "r1")],
                ledger: vec![rec("i1", "r1", 1, Phase::Healthy, START_RETRIES + 1)],
                processes: vec![(
                    "i1",
                    Process::Exited {
                        code: None,
                        tail: "oom".into(),
                    },
                )],
                expect: vec!["stop i1 (unhealthy): crashed, restarting: exited with a signal: oom"],
                ..Default::default()
            },
            Case {
                name: "held by the operator: left alone",
                desired: vec![want("i1", "r1")],
                ledger: vec![{
                    let mut r = rec("i1", "r1", 1, Phase::Unhealthy, 1);
                    r.held = true;
                    r
                }],
                ..Default::default()
            },
            Case {
                name: "image not yet present: the release names none, failed at once",
                desired: vec![{
                    let mut d = want("i1", "r1");
                    d.release.image_digest.clear();
                    d
                }],
                expect: vec![
                    "admit i1 at fd00:7a77:0:1::1:2",
                    "record i1 failed: release r1 names no image yet: nothing to start until a release with a built image replaces it",
                ],
                ..Default::default()
            },
        ];
        for c in &cases {
            let got: Vec<String> = run(c).iter().map(ToString::to_string).collect();
            assert_eq!(got, c.expect, "{}", c.name);
        }
    }

    #[test]
    fn attempts_are_counted_before_the_start_and_back_off_then_fail() {
        let p = policy();
        let d = want("i1", "r1");
        let desired = Desired {
            instances: vec![d],
            ..Default::default()
        };
        let mut l = NodeLedger::default();
        let mut now = NOW;
        let mut backoffs = Vec::new();
        // Each start exits at once: the first try and START_RETRIES retries.
        loop {
            let actions = plan(&desired, &l, &Observed::default(), now, &p);
            let Some(Action::Start(r)) = actions.last().cloned() else {
                break;
            };
            assert!(r.handle.is_none(), "the attempt is recorded without handle");
            for a in actions {
                if let Action::Admit(r) = a {
                    l.instances.insert(r.instance_id.clone(), r);
                }
            }
            l.instances.insert("i1".into(), with_handle(r, 0));
            let observed = Observed {
                processes: [("i1".to_string(), exited(1, ""))].into(),
                first_pass: false,
            };
            let actions = plan(&desired, &l, &observed, now, &p);
            let [Action::StopProcess { next, .. }] = actions.as_slice() else {
                panic!("{actions:?}");
            };
            backoffs.push(next.not_before_ms - now);
            l.instances.insert("i1".into(), next.clone());
            now = next.not_before_ms.max(now);
        }
        let r = &l.instances["i1"];
        assert_eq!((r.phase, r.attempts), (Phase::Failed, START_RETRIES + 1));
        // 500 ms doubled per attempt; the last one failed: no backoff.
        assert_eq!(backoffs, [500, 1000, 2000, 0]);
        assert!(plan(&desired, &l, &Observed::default(), now + 3_600_000, &p).is_empty());
    }

    #[test]
    fn failed_start_retries_then_fails() {
        let p = policy();
        let table = [
            (1, Phase::Starting, NOW + 500),
            (2, Phase::Starting, NOW + 1000),
            (START_RETRIES, Phase::Starting, NOW + 2000),
            (START_RETRIES + 1, Phase::Failed, 0),
        ];
        for (attempts, phase, not_before) in table {
            let r = rec("i1", "r1", 1, Phase::Starting, attempts);
            let next = failed_start(&r, "image not in the store".into(), NOW, &p);
            assert_eq!(
                (next.phase, next.not_before_ms, next.reason.as_str()),
                (phase, not_before, "image not in the store"),
                "after attempt {attempts}"
            );
        }
    }

    #[test]
    fn admitted_addresses_skip_every_recorded_one() {
        let p = policy();
        let desired = Desired {
            instances: vec![want("a", "r1"), want("b", "r1")],
            ..Default::default()
        };
        let l = ledger(vec![
            rec("x", "r1", 1, Phase::Starting, 1),
            rec("y", "r1", 3, Phase::Starting, 1),
        ]);
        let slots: Vec<u16> = plan(&desired, &l, &Observed::default(), NOW, &p)
            .iter()
            .filter_map(|a| match a {
                Action::Admit(r) => p.range.slot_of(r.ip),
                _ => None,
            })
            .collect();
        assert_eq!(slots, [2, 4]);
    }

    /// (what, record, check outcome, actions).
    type HealthCase = (
        &'static str,
        InstanceRecord,
        Result<(), String>,
        Vec<&'static str>,
    );

    #[test]
    fn health_table() {
        let p = policy();
        let timeout = p.start_timeout.as_millis() as i64;
        let starting = |ago| with_handle(rec("i1", "r1", 1, Phase::Starting, 1), ago);
        let failing_since = |since| {
            let mut r = rec("i1", "r1", 1, Phase::Unhealthy, 1);
            r.handle = Some(handle("i1"));
            r.healthy_once = true;
            r.unhealthy_since_ms = since;
            r.reason = "refused".into();
            r
        };
        let bad = || Err::<(), _>("refused".to_string());
        let table: Vec<HealthCase> = vec![
            (
                "a passing check makes it healthy",
                starting(100),
                Ok(()),
                vec!["record i1 healthy"],
            ),
            (
                "healthy and passing: nothing",
                rec("i1", "r1", 1, Phase::Healthy, 1),
                Ok(()),
                vec![],
            ),
            (
                "not healthy yet, within the start timeout: the reason noted",
                starting(100),
                bad(),
                vec!["record i1 starting: refused"],
            ),
            (
                "not healthy within the start timeout: a failed attempt",
                starting(timeout + 1),
                bad(),
                vec!["stop i1 (starting): not healthy within 30s: refused"],
            ),
            (
                "healthy, then failing: unhealthy since now",
                rec("i1", "r1", 1, Phase::Healthy, 1),
                bad(),
                vec!["record i1 unhealthy: refused"],
            ),
            (
                "failing for less than the timeout: unchanged",
                failing_since(NOW - timeout),
                bad(),
                vec![],
            ),
            (
                "failing for longer than the timeout: restarted as after a crash",
                failing_since(NOW - timeout - 1),
                bad(),
                vec!["stop i1 (unhealthy): unhealthy for too long, restarting: refused"],
            ),
            (
                "failing, then passing again: healthy",
                failing_since(NOW - 5),
                Ok(()),
                vec!["record i1 healthy"],
            ),
        ];
        for (name, r, result, expect) in table {
            let instances = [("i1".to_string(), r.clone())].into();
            let health = [("i1".to_string(), result)].into();
            let got: Vec<String> = plan_health(&instances, &health, NOW, &p)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got, expect, "{name}");
        }
        // Unhealthy since the first failing check, not reset by later ones.
        let instances = [("i1".to_string(), rec("i1", "r1", 1, Phase::Healthy, 1))].into();
        let actions = plan_health(&instances, &[("i1".into(), bad())].into(), NOW, &p);
        let [Action::Record(r)] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(r.unhealthy_since_ms, NOW);
        // The restart backs off and counts a crash.
        let instances = [("i1".to_string(), failing_since(1))].into();
        let actions = plan_health(&instances, &[("i1".into(), bad())].into(), NOW, &p);
        let [Action::StopProcess { next, .. }] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!(
            (next.crashes, next.not_before_ms, next.handle.is_none()),
            (1, NOW + 1000, true)
        );
    }

    #[test]
    fn the_next_drain_deadline_is_the_nearest_ahead() {
        let desired = Desired {
            drain_deadlines: [
                ("a".into(), NOW - 1),
                ("b".into(), NOW + 7),
                ("c".into(), NOW + 3),
            ]
            .into(),
            ..Default::default()
        };
        assert_eq!(next_deadline(&desired, NOW), Some(NOW + 3));
        assert_eq!(next_deadline(&desired, NOW + 7), None);
    }
}
