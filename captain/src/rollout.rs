//! Rollout orchestration: the captain's reconciler for deployments.
//!
//! [`plan`] is pure: from the desired state at the meta repo's head, the
//! instances followers reported and the nodes, it proposes the deployment
//! files to write next:
//!
//! - an app whose active release has no rollout yet (a new release, a
//!   `git revert`, a rollback) gets a ROLLING_OUT deployment placing
//!   `release.instances()` instances over the online nodes, least loaded
//!   first, spread round robin;
//! - a rollout whose instances all report healthy is PROMOTED (the edge
//!   moves traffic to it; the previous one drains);
//! - a rollout with an instance the follower gave up on (3 failed starts),
//!   or not healthy within the timeout, is FAILED; the serving rollout is
//!   untouched;
//! - instances on a node that must be left (offline for the grace period,
//!   drained by an admin, or removed) move: the serving rollout first gets
//!   replacements on placeable nodes (online, not drained), spread, in a
//!   new PROMOTED file that keeps every existing id; once the instances
//!   that stay number the release's count and all report healthy, the next
//!   file drops the rest ([`Action::Replace`], [`Action::Shrink`]). A
//!   rollout still under way with an instance on such a node is started
//!   again on placeable nodes ([`Action::Restart`]): it serves nothing yet.
//!
//! The `rollout` background task ([`crate::background::rollout`]) runs it:
//! activated by a timer and by every instance report or commit, it re-reads
//! everything and acts (no input is trusted, every pass can be the first, so
//! a captain killed mid-rollout continues where the repo and the reports say
//! it is). Only that task writes deployment files.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meta_schema::desired::{AppState, DesiredState, RolloutView};
use meta_schema::new_id;
use meta_schema::pb::{self, DeploymentState};

use crate::db::{InstanceRow, NodeRow};

/// How long a rollout may take to become healthy before it is failed.
pub const DEFAULT_ROLLOUT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a rollout of a release: a new ROLLING_OUT deployment.
    Start(pb::Deployment),
    /// Every instance of the rollout is healthy.
    Promote(pb::Deployment),
    /// The rollout cannot succeed.
    Fail(pb::Deployment),
    /// Start the rolling-out release again (a new rollout): an instance of
    /// the one under way is on a node that was lost or is drained. It gets
    /// no traffic yet, so nothing needs to wait.
    Restart(pb::Deployment),
    /// Phase 1 of moving instances off lost or drained nodes: the serving
    /// rollout's placement plus replacements on usable nodes (a new
    /// PROMOTED file of the same rollout; every existing id is kept).
    Replace(pb::Deployment),
    /// Phase 2: the serving rollout's placement without the moved
    /// instances (and without any beyond the release's count), once the
    /// instances it keeps are all healthy.
    Shrink(pb::Deployment),
}

impl Action {
    pub fn deployment(&self) -> &pb::Deployment {
        match self {
            Action::Start(d)
            | Action::Promote(d)
            | Action::Fail(d)
            | Action::Restart(d)
            | Action::Replace(d)
            | Action::Shrink(d) => d,
        }
    }

    pub fn commit_message(&self) -> String {
        let d = self.deployment();
        let rel = d.release.as_ref().map(|r| r.id.as_str()).unwrap_or("?");
        match self {
            Action::Start(_) => format!(
                "Roll out {}/{} release {rel} ({} instances)",
                d.env,
                d.app,
                d.instances.len()
            ),
            Action::Promote(_) => format!("Promote {}/{} release {rel}", d.env, d.app),
            Action::Fail(_) => format!(
                "Fail rollout of {}/{} release {rel}: {}",
                d.env, d.app, d.reason
            ),
            Action::Restart(_) => format!(
                "Roll out {}/{} release {rel} again ({} instances): a node of the previous rollout is lost or drained",
                d.env,
                d.app,
                d.instances.len()
            ),
            Action::Replace(_) => format!(
                "Place replacements for {}/{} (now {} instances): instances on lost or drained nodes",
                d.env,
                d.app,
                d.instances.len()
            ),
            Action::Shrink(_) => format!(
                "Drop instances of {}/{} that were replaced (now {} instances, all healthy)",
                d.env,
                d.app,
                d.instances.len()
            ),
        }
    }
}

/// What bounds the planner's patience.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// How long a rollout may take to become healthy.
    pub timeout: Duration,
    /// A node not heard from for this long takes no new instances, even
    /// before the `liveness` task marks it offline (a captain that has just
    /// become leader may plan before its first liveness pass).
    pub node_grace: Duration,
}

/// Nodes that can take new instances: online, heard from within the grace
/// period, and not drained.
fn placeable<'a>(
    nodes: &'a [NodeRow],
    regions: &[String],
    now: i64,
    grace_ms: i64,
) -> Vec<&'a NodeRow> {
    nodes
        .iter()
        .filter(|n| n.state == "online" && !n.drain && now - n.last_seen <= grace_ms)
        .filter(|n| regions.is_empty() || regions.contains(&n.region))
        .collect()
}

/// A node whose instances must move: lost (offline), drained, or no longer
/// registered.
fn must_leave(node: &str, nodes: &[NodeRow]) -> bool {
    nodes
        .iter()
        .find(|n| n.id == node)
        .is_none_or(|n| n.state == "offline" || n.drain)
}

/// Spread `count` new instances over `nodes`: first the nodes with the
/// fewest of this app's instances (`app_load`: node -> count), then the
/// least loaded overall, so an app spreads over as many nodes as it can.
fn place(
    count: usize,
    nodes: &[&NodeRow],
    instances: &[InstanceRow],
    app_load: &BTreeMap<&str, usize>,
) -> Vec<pb::Placement> {
    let mut load: BTreeMap<&str, (usize, usize)> = nodes
        .iter()
        .map(|n| {
            let id = n.id.as_str();
            (id, (app_load.get(id).copied().unwrap_or(0), 0))
        })
        .collect();
    for i in instances
        .iter()
        .filter(|i| i.state != "stopped" && i.state != "failed")
    {
        if let Some((_, l)) = load.get_mut(i.node_id.as_str()) {
            *l += 1;
        }
    }
    (0..count)
        .map(|_| {
            let (node, (a, l)) = load
                .iter_mut()
                .min_by_key(|(id, l)| (**l, *id))
                .expect("at least one node");
            *a += 1;
            *l += 1;
            pb::Placement {
                instance_id: new_id(),
                node: node.to_string(),
            }
        })
        .collect()
}

fn next_file(r: &RolloutView, state: DeploymentState, reason: String, now: i64) -> pb::Deployment {
    pb::Deployment {
        id: new_id(),
        app: r.latest.app.clone(),
        env: r.latest.env.clone(),
        rollout_id: r.rollout_id.clone(),
        state: state as i32,
        release: Some(r.release.clone()),
        instances: r.latest.instances.clone(),
        created_at: now,
        reason,
    }
}

fn new_rollout(
    app: &AppState,
    rel: &pb::Release,
    instances: Vec<pb::Placement>,
    now: i64,
) -> pb::Deployment {
    let id = new_id();
    pb::Deployment {
        id: id.clone(),
        app: app.name.clone(),
        env: app.env.clone(),
        rollout_id: id,
        state: DeploymentState::RollingOut as i32,
        release: Some(rel.clone()),
        instances,
        created_at: now,
        reason: String::new(),
    }
}

/// Whether `p` of rollout `rollout` reports healthy.
fn healthy(p: &pb::Placement, rollout: &str, instances: &[InstanceRow]) -> bool {
    instances
        .iter()
        .any(|i| i.id == p.instance_id && i.rollout_id == rollout && i.state == "healthy")
}

fn check_rollout(
    r: &RolloutView,
    instances: &[InstanceRow],
    now: i64,
    timeout_ms: i64,
) -> Option<Action> {
    let placed: BTreeSet<&str> = r
        .latest
        .instances
        .iter()
        .map(|p| p.instance_id.as_str())
        .collect();
    let seen: Vec<&InstanceRow> = instances
        .iter()
        .filter(|i| placed.contains(i.id.as_str()) && i.rollout_id == r.rollout_id)
        .collect();
    let healthy = seen.iter().filter(|i| i.state == "healthy").count();
    if !placed.is_empty() && healthy == placed.len() {
        return Some(Action::Promote(next_file(
            r,
            DeploymentState::Promoted,
            String::new(),
            now,
        )));
    }
    if let Some(f) = seen.iter().find(|i| i.state == "failed") {
        let reason = format!(
            "instance {} on node {} failed after {} start attempts: {}",
            f.id, f.node_id, f.attempts, f.reason
        );
        return Some(Action::Fail(next_file(
            r,
            DeploymentState::Failed,
            reason,
            now,
        )));
    }
    if now - r.latest.created_at > timeout_ms {
        let reason = format!(
            "not healthy within {} s ({healthy} of {} instances healthy)",
            timeout_ms / 1000,
            placed.len()
        );
        return Some(Action::Fail(next_file(
            r,
            DeploymentState::Failed,
            reason,
            now,
        )));
    }
    None
}

/// Move the serving rollout off lost and drained nodes, in two phases,
/// each a new PROMOTED file of the same rollout:
///
/// 1. fewer than the release's count of instances on nodes that may stay:
///    add replacements on placeable nodes (spread), keep everything else;
/// 2. enough: once that many of them report healthy, keep exactly those
///    (spread over nodes, oldest first) and drop the rest: the instances on
///    lost or drained nodes, and any surplus (a lost node that came back
///    between the phases), so nothing runs twice.
///
/// The edge routes only to healthy instances, so no request is sent to an
/// instance before it is healthy, and every instance dropped in phase 2
/// has a healthy successor serving.
fn repair_serving(
    s: &RolloutView,
    regions: &[String],
    instances: &[InstanceRow],
    nodes: &[NodeRow],
    now: i64,
    grace_ms: i64,
) -> Option<Action> {
    let want = s.release.instances() as usize;
    let placed = &s.latest.instances;
    let staying: Vec<&pb::Placement> = placed
        .iter()
        .filter(|p| !must_leave(&p.node, nodes))
        .collect();
    if staying.len() < want {
        let candidates = placeable(nodes, regions, now, grace_ms);
        if candidates.is_empty() {
            tracing::debug!(env = %s.latest.env, app = %s.latest.app, "instances to replace but no node to place them on");
            return None;
        }
        let mut app_load: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &staying {
            *app_load.entry(p.node.as_str()).or_default() += 1;
        }
        let mut d = next_file(s, DeploymentState::Promoted, String::new(), now);
        d.instances.extend(place(
            want - staying.len(),
            &candidates,
            instances,
            &app_load,
        ));
        return Some(Action::Replace(d));
    }
    if placed.len() <= want {
        return None;
    }
    // Keep `want` healthy instances on nodes that stay, spread: each pick
    // is on the node with the fewest picked so far, oldest first.
    let mut pool: Vec<&pb::Placement> = staying
        .into_iter()
        .filter(|p| healthy(p, &s.rollout_id, instances))
        .collect();
    if pool.len() < want {
        return None; // phase 1 done, replacements not healthy yet
    }
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    while keep.len() < want {
        let (at, _) = pool
            .iter()
            .enumerate()
            .min_by_key(|(i, p)| (per_node.get(p.node.as_str()).copied().unwrap_or(0), *i))
            .expect("pool holds at least `want`");
        let p = pool.remove(at);
        *per_node.entry(p.node.as_str()).or_default() += 1;
        keep.insert(p.instance_id.as_str());
    }
    let mut d = next_file(s, DeploymentState::Promoted, String::new(), now);
    d.instances
        .retain(|p| keep.contains(p.instance_id.as_str()));
    Some(Action::Shrink(d))
}

fn plan_app(
    app: &AppState,
    regions: &[String],
    instances: &[InstanceRow],
    nodes: &[NodeRow],
    now: i64,
    timeout_ms: i64,
    grace_ms: i64,
) -> Vec<Action> {
    let mut out = Vec::new();
    if let Some(rel) = app.release_needing_rollout() {
        let candidates = placeable(nodes, regions, now, grace_ms);
        if candidates.is_empty() {
            tracing::debug!(env = %app.env, app = %app.name, "no online node to place a rollout on");
        } else {
            let count = rel.instances() as usize;
            let placed = place(count, &candidates, instances, &BTreeMap::new());
            out.push(Action::Start(new_rollout(app, rel, placed, now)));
        }
    } else if let Some(r) = &app.rolling_out {
        let stranded = r
            .latest
            .instances
            .iter()
            .any(|p| must_leave(&p.node, nodes));
        let candidates = placeable(nodes, regions, now, grace_ms);
        if stranded && !candidates.is_empty() {
            let count = r.release.instances() as usize;
            let placed = place(count, &candidates, instances, &BTreeMap::new());
            out.push(Action::Restart(new_rollout(app, &r.release, placed, now)));
        } else if let Some(a) = check_rollout(r, instances, now, timeout_ms) {
            out.push(a);
        }
    }
    // A promotion makes the serving rollout drain: nothing to repair there.
    let promoting = out.iter().any(|a| matches!(a, Action::Promote(_)));
    if let Some(s) = app.serving.as_ref().filter(|_| !promoting)
        && let Some(a) = repair_serving(s, regions, instances, nodes, now, grace_ms)
    {
        out.push(a);
    }
    out
}

/// The deployment files to write next. Pure.
pub fn plan(
    state: &DesiredState,
    instances: &[InstanceRow],
    nodes: &[NodeRow],
    now: i64,
    limits: &Limits,
) -> Vec<Action> {
    let timeout_ms = i64::try_from(limits.timeout.as_millis()).unwrap_or(i64::MAX / 2);
    let grace_ms = i64::try_from(limits.node_grace.as_millis()).unwrap_or(i64::MAX / 2);
    state
        .envs
        .values()
        .flat_map(|env| {
            env.apps.values().flat_map(|app| {
                plan_app(
                    app,
                    &env.env.regions,
                    instances,
                    nodes,
                    now,
                    timeout_ms,
                    grace_ms,
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meta_schema::MetaTree;
    use meta_schema::desired::desired_state;
    use meta_schema::layout::{deployment_path, env_path, release_path};
    use prost::Message;

    fn node(id: &str, state: &str) -> NodeRow {
        NodeRow {
            id: id.into(),
            address: "::1".into(),
            region: "r1".into(),
            cpus: 2,
            memory_bytes: 1,
            disk_bytes: 1,
            age_recipient: String::new(),
            api_url: String::new(),
            proxy_addr: String::new(),
            state: state.into(),
            memory_used_bytes: 0,
            instances: 0,
            last_seen: 0,
            registered_at: 0,
            applied_commit: String::new(),
            refused_commit: String::new(),
            refused_reason: String::new(),
            drain: false,
        }
    }

    fn report(p: &pb::Placement, rollout: &str, state: &str) -> InstanceRow {
        InstanceRow {
            id: p.instance_id.clone(),
            node_id: p.node.clone(),
            env: "prod".into(),
            app: "web".into(),
            rollout_id: rollout.into(),
            release_id: String::new(),
            state: state.into(),
            reason: "exit 1".into(),
            address: String::new(),
            port: 0,
            attempts: 3,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn tree_with_release() -> (MetaTree, pb::Release) {
        let mut t = MetaTree::new();
        t.insert(
            env_path("prod"),
            pb::Env {
                name: "prod".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let r = pb::Release {
            id: new_id(),
            app: "web".into(),
            env: "prod".into(),
            image_digest: format!("sha256:{}", "a".repeat(64)),
            created_at: 1,
            ..Default::default()
        };
        t.insert(release_path("prod", "web", &r.id), r.encode_to_vec());
        (t, r)
    }

    fn apply(t: &mut MetaTree, a: &Action) {
        let d = a.deployment();
        t.insert(deployment_path(&d.env, &d.app, &d.id), d.encode_to_vec());
    }

    const T: &Limits = &Limits {
        timeout: Duration::from_secs(600),
        node_grace: Duration::from_secs(3600),
    };

    #[test]
    fn start_spreads_then_promotes_when_all_healthy() {
        let (mut t, r) = tree_with_release();
        let nodes = vec![
            node("a", "online"),
            node("b", "online"),
            node("c", "offline"),
        ];
        let s = desired_state(&t, 10).unwrap();
        let acts = plan(&s, &[], &nodes, 10, T);
        let [Action::Start(d)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(d.release.as_ref().unwrap().id, r.id);
        let on: Vec<&str> = d.instances.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(on.len(), 3);
        assert!(!on.contains(&"c"), "offline node used: {on:?}");
        assert!(on.contains(&"a") && on.contains(&"b"));
        apply(&mut t, &acts[0]);

        // Nothing to do while instances come up; planning twice is stable.
        let s = desired_state(&t, 20).unwrap();
        let mut reports: Vec<InstanceRow> = d
            .instances
            .iter()
            .map(|p| report(p, &d.id, "starting"))
            .collect();
        assert!(plan(&s, &reports, &nodes, 20, T).is_empty());
        reports[0].state = "healthy".into();
        reports[1].state = "healthy".into();
        assert!(plan(&s, &reports, &nodes, 20, T).is_empty());
        reports[2].state = "healthy".into();
        let acts = plan(&s, &reports, &nodes, 30, T);
        let [Action::Promote(p)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(p.rollout_id, d.id);
        assert_eq!(p.instances, d.instances);
        apply(&mut t, &acts[0]);
        let s = desired_state(&t, 40).unwrap();
        assert_eq!(
            s.app("prod", "web")
                .unwrap()
                .serving
                .as_ref()
                .unwrap()
                .rollout_id,
            d.id
        );
        assert!(plan(&s, &reports, &nodes, 40, T).is_empty(), "converged");
    }

    #[test]
    fn failed_instance_or_timeout_fails_the_rollout() {
        let (mut t, _) = tree_with_release();
        let nodes = vec![node("a", "online")];
        let s = desired_state(&t, 1000).unwrap();
        let acts = plan(&s, &[], &nodes, 1000, T);
        apply(&mut t, &acts[0]);
        let d = acts[0].deployment().clone();
        let s = desired_state(&t, 1001).unwrap();
        let mut reports: Vec<InstanceRow> = d
            .instances
            .iter()
            .map(|p| report(p, &d.id, "healthy"))
            .collect();
        reports[1].state = "failed".into();
        let acts = plan(&s, &reports, &nodes, 1001, T);
        let [Action::Fail(f)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert!(
            f.reason.contains("failed after 3 start attempts: exit 1"),
            "{}",
            f.reason
        );
        // After the failure file, nothing more happens for this release.
        apply(&mut t, &acts[0]);
        let s = desired_state(&t, 1002).unwrap();
        assert!(plan(&s, &reports, &nodes, 1002, T).is_empty());

        let (mut t, _) = tree_with_release();
        let s = desired_state(&t, 1000).unwrap();
        let acts = plan(&s, &[], &nodes, 1000, T);
        apply(&mut t, &acts[0]);
        let s = desired_state(&t, 1000).unwrap();
        let later = 1000 + T.timeout.as_millis() as i64 + 1;
        let acts = plan(&s, &[], &nodes, later, T);
        let [Action::Fail(f)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert!(
            f.reason.contains("not healthy within 600 s (0 of 3"),
            "{}",
            f.reason
        );
    }

    #[test]
    fn no_online_node_means_no_rollout_yet() {
        let (t, _) = tree_with_release();
        let s = desired_state(&t, 0).unwrap();
        assert!(plan(&s, &[], &[node("a", "offline")], 0, T).is_empty());
        // Online but not heard from within the grace period (not marked
        // offline yet): no new instance goes there.
        let late = T.node_grace.as_millis() as i64 + 1;
        let s = desired_state(&t, late).unwrap();
        assert!(plan(&s, &[], &[node("a", "online")], late, T).is_empty());
        let mut fresh = node("b", "online");
        fresh.last_seen = late;
        let acts = plan(&s, &[], &[node("a", "online"), fresh], late, T);
        let [Action::Start(d)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert!(d.instances.iter().all(|p| p.node == "b"), "{d:?}");
    }

    /// A tree whose serving rollout places one instance per entry of `on`
    /// (node ids), all promoted at time 5.
    fn serving_on(on: &[&str]) -> (MetaTree, pb::Deployment) {
        let (mut t, r) = tree_with_release();
        let id = new_id();
        let d = pb::Deployment {
            id: id.clone(),
            app: "web".into(),
            env: "prod".into(),
            rollout_id: id,
            state: DeploymentState::Promoted as i32,
            release: Some(r),
            instances: on
                .iter()
                .map(|n| pb::Placement {
                    instance_id: new_id(),
                    node: n.to_string(),
                })
                .collect(),
            created_at: 5,
            reason: String::new(),
        };
        t.insert(deployment_path("prod", "web", &d.id), d.encode_to_vec());
        (t, d)
    }

    fn drained(id: &str) -> NodeRow {
        let mut n = node(id, "online");
        n.drain = true;
        n
    }

    fn healthy_reports(d: &pb::Deployment) -> Vec<InstanceRow> {
        d.instances
            .iter()
            .map(|p| report(p, &d.rollout_id, "healthy"))
            .collect()
    }

    fn ids(d: &pb::Deployment) -> BTreeSet<String> {
        d.instances.iter().map(|p| p.instance_id.clone()).collect()
    }

    fn nodes_of<'a>(ps: impl IntoIterator<Item = &'a pb::Placement>) -> BTreeSet<String> {
        ps.into_iter().map(|p| p.node.clone()).collect()
    }

    /// The two phases of moving instances off a node that must be left, as
    /// a table: where the serving rollout is, the nodes, and what must
    /// hold of the replacements.
    #[test]
    fn instances_move_off_lost_drained_and_removed_nodes_in_two_phases() {
        struct Case {
            name: &'static str,
            on: &'static [&'static str],
            nodes: Vec<NodeRow>,
            /// Nodes that must not get a replacement.
            never: &'static [&'static str],
            /// Instances that must move.
            moving: usize,
        }
        let cases = vec![
            Case {
                name: "one of three nodes lost",
                on: &["a", "b", "c"],
                nodes: vec![
                    node("a", "offline"),
                    node("b", "online"),
                    node("c", "online"),
                    drained("d"),
                ],
                never: &["a", "d"],
                moving: 1,
            },
            Case {
                name: "every instance on a drained node",
                on: &["a", "a", "a"],
                nodes: vec![drained("a"), node("b", "online"), node("c", "online")],
                never: &["a"],
                moving: 3,
            },
            Case {
                name: "a removed node (no row)",
                on: &["gone", "b", "gone"],
                nodes: vec![
                    node("b", "online"),
                    node("c", "online"),
                    node("x", "offline"),
                ],
                never: &["gone", "x"],
                moving: 2,
            },
        ];
        for c in cases {
            let (mut t, d) = serving_on(c.on);
            let s = desired_state(&t, 10).unwrap();
            let mut reports = healthy_reports(&d);

            // Phase 1: replacements added, every existing id kept.
            let acts = plan(&s, &reports, &c.nodes, 10, T);
            let [Action::Replace(r)] = acts.as_slice() else {
                panic!("{}: {acts:?}", c.name)
            };
            assert_eq!(r.rollout_id, d.rollout_id, "{}", c.name);
            assert_eq!(r.state, DeploymentState::Promoted as i32, "{}", c.name);
            assert!(
                ids(r).is_superset(&ids(&d)),
                "{}: an id was dropped",
                c.name
            );
            let added: Vec<&pb::Placement> = r
                .instances
                .iter()
                .filter(|p| !ids(&d).contains(&p.instance_id))
                .collect();
            assert_eq!(added.len(), c.moving, "{}", c.name);
            for p in &added {
                assert!(
                    !c.never.contains(&p.node.as_str()),
                    "{}: placed on {}",
                    c.name,
                    p.node
                );
            }
            apply(&mut t, &acts[0]);

            // Replacements still starting: nothing moves yet, stable.
            let s = desired_state(&t, 20).unwrap();
            reports.extend(added.iter().map(|p| report(p, &d.rollout_id, "starting")));
            assert!(plan(&s, &reports, &c.nodes, 20, T).is_empty(), "{}", c.name);

            // Phase 2: all healthy; the moved ones are dropped.
            for x in reports.iter_mut() {
                x.state = "healthy".into();
            }
            let acts = plan(&s, &reports, &c.nodes, 30, T);
            let [Action::Shrink(k)] = acts.as_slice() else {
                panic!("{}: {acts:?}", c.name)
            };
            assert_eq!(k.instances.len(), 3, "{}", c.name);
            for p in &k.instances {
                assert!(
                    !c.never.contains(&p.node.as_str()),
                    "{}: {} kept",
                    c.name,
                    p.node
                );
            }
            // The healthy instances on nodes that stay keep their ids.
            for p in d
                .instances
                .iter()
                .filter(|p| !must_leave(&p.node, &c.nodes))
            {
                assert!(
                    ids(k).contains(&p.instance_id),
                    "{}: {} not kept",
                    c.name,
                    p.instance_id
                );
            }
            assert!(
                nodes_of(&k.instances).len() >= 2,
                "{}: not spread: {:?}",
                c.name,
                k.instances
            );
            apply(&mut t, &acts[0]);
            let s = desired_state(&t, 40).unwrap();
            assert!(
                plan(&s, &reports, &c.nodes, 40, T).is_empty(),
                "{}: not converged",
                c.name
            );
            // What runs is exactly the kept placement (followers converge).
            let running: BTreeSet<String> =
                s.instances().into_iter().map(|i| i.instance_id).collect();
            assert_eq!(running, ids(k), "{}", c.name);
        }
    }

    #[test]
    fn a_lost_node_back_between_the_phases_leaves_no_duplicate() {
        let (mut t, d) = serving_on(&["a", "b", "c"]);
        let mut nodes = vec![
            node("a", "offline"),
            node("b", "online"),
            node("c", "online"),
        ];
        let s = desired_state(&t, 10).unwrap();
        let mut reports = healthy_reports(&d);
        let acts = plan(&s, &reports, &nodes, 10, T);
        let [Action::Replace(r)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        let added = r
            .instances
            .iter()
            .find(|p| !ids(&d).contains(&p.instance_id))
            .unwrap()
            .clone();
        apply(&mut t, &acts[0]);
        let s = desired_state(&t, 20).unwrap();
        // Node a is back and its instance still healthy; the replacement is
        // still starting: the surplus (the replacement) goes, a's stays.
        nodes[0].state = "online".into();
        reports.push(report(&added, &d.rollout_id, "starting"));
        let acts = plan(&s, &reports, &nodes, 20, T);
        let [Action::Shrink(k)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(
            ids(k),
            ids(&d),
            "the original placement is kept, the surplus dropped"
        );
        apply(&mut t, &acts[0]);
        let s = desired_state(&t, 30).unwrap();
        assert!(plan(&s, &reports, &nodes, 30, T).is_empty());
        assert_eq!(s.instances().len(), 3);
    }

    #[test]
    fn nothing_moves_without_a_node_to_move_to_and_undrain_moves_nothing_back() {
        // The only node is drained: its instances stay (and keep serving).
        let (t, d) = serving_on(&["a", "a", "a"]);
        let s = desired_state(&t, 10).unwrap();
        let reports = healthy_reports(&d);
        assert!(plan(&s, &reports, &[drained("a"), node("b", "offline")], 10, T).is_empty());

        // Undrained after the move: the new placement stays where it is.
        let (mut t, d) = serving_on(&["a", "a", "a"]);
        let mut nodes = vec![drained("a"), node("b", "online")];
        let s = desired_state(&t, 10).unwrap();
        let mut reports = healthy_reports(&d);
        let acts = plan(&s, &reports, &nodes, 10, T);
        apply(&mut t, &acts[0]);
        let r = acts[0].deployment().clone();
        assert_eq!(
            nodes_of(r.instances.iter().skip(3)),
            BTreeSet::from(["b".to_string()])
        );
        reports = healthy_reports(&r);
        let s = desired_state(&t, 20).unwrap();
        let acts = plan(&s, &reports, &nodes, 20, T);
        apply(&mut t, &acts[0]);
        nodes[0].drain = false;
        let s = desired_state(&t, 30).unwrap();
        assert!(plan(&s, &reports, &nodes, 30, T).is_empty());
        assert!(s.instances().iter().all(|i| i.node == "b"));
    }

    #[test]
    fn a_drained_node_gets_no_new_rollout_and_a_stranded_rollout_restarts() {
        let (mut t, r) = tree_with_release();
        let nodes = vec![drained("a"), node("b", "online"), node("c", "online")];
        let s = desired_state(&t, 10).unwrap();
        let acts = plan(&s, &[], &nodes, 10, T);
        let [Action::Start(d)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(
            nodes_of(&d.instances),
            BTreeSet::from(["b".into(), "c".into()])
        );
        apply(&mut t, &acts[0]);

        // Node b is lost while the rollout is under way: it starts again on
        // what is left, the old one is abandoned (its instances stop).
        let nodes = vec![drained("a"), node("b", "offline"), node("c", "online")];
        let s = desired_state(&t, 20).unwrap();
        let reports: Vec<InstanceRow> = d
            .instances
            .iter()
            .map(|p| report(p, &d.id, "starting"))
            .collect();
        let acts = plan(&s, &reports, &nodes, 20, T);
        let [Action::Restart(n)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_ne!(n.rollout_id, d.rollout_id);
        assert_eq!(n.release.as_ref().unwrap().id, r.id);
        assert_eq!(nodes_of(&n.instances), BTreeSet::from(["c".into()]));
        apply(&mut t, &acts[0]);
        let s = desired_state(&t, 30).unwrap();
        assert_eq!(
            s.app("prod", "web")
                .unwrap()
                .rolling_out
                .as_ref()
                .unwrap()
                .rollout_id,
            n.id
        );
        assert!(s.instances().iter().all(|i| i.rollout_id == n.id));
    }
}
