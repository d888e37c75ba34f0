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
//!   untouched.
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
}

impl Action {
    pub fn deployment(&self) -> &pb::Deployment {
        match self {
            Action::Start(d) | Action::Promote(d) | Action::Fail(d) => d,
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
        }
    }
}

/// Nodes that can take new instances.
fn placeable<'a>(nodes: &'a [NodeRow], regions: &[String]) -> Vec<&'a NodeRow> {
    nodes
        .iter()
        .filter(|n| n.state == "online")
        .filter(|n| regions.is_empty() || regions.contains(&n.region))
        .collect()
}

/// Spread `count` new instances over `nodes`, least loaded first.
fn place(count: u32, nodes: &[&NodeRow], instances: &[InstanceRow]) -> Vec<pb::Placement> {
    let mut load: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.id.as_str(), 0)).collect();
    for i in instances
        .iter()
        .filter(|i| i.state != "stopped" && i.state != "failed")
    {
        if let Some(l) = load.get_mut(i.node_id.as_str()) {
            *l += 1;
        }
    }
    (0..count)
        .map(|_| {
            let (node, l) = load
                .iter_mut()
                .min_by_key(|(id, l)| (**l, *id))
                .expect("at least one node");
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

fn plan_app(
    app: &AppState,
    regions: &[String],
    instances: &[InstanceRow],
    nodes: &[NodeRow],
    now: i64,
    timeout_ms: i64,
) -> Option<Action> {
    if let Some(rel) = app.release_needing_rollout() {
        let candidates = placeable(nodes, regions);
        if candidates.is_empty() {
            tracing::debug!(env = %app.env, app = %app.name, "no online node to place a rollout on");
            return None;
        }
        let id = new_id();
        return Some(Action::Start(pb::Deployment {
            id: id.clone(),
            app: app.name.clone(),
            env: app.env.clone(),
            rollout_id: id,
            state: DeploymentState::RollingOut as i32,
            release: Some(rel.clone()),
            instances: place(rel.instances(), &candidates, instances),
            created_at: now,
            reason: String::new(),
        }));
    }
    app.rolling_out
        .as_ref()
        .and_then(|r| check_rollout(r, instances, now, timeout_ms))
}

/// The deployment files to write next. Pure.
pub fn plan(
    state: &DesiredState,
    instances: &[InstanceRow],
    nodes: &[NodeRow],
    now: i64,
    timeout: Duration,
) -> Vec<Action> {
    let timeout_ms = timeout.as_millis() as i64;
    state
        .envs
        .values()
        .flat_map(|env| {
            env.apps.values().filter_map(|app| {
                plan_app(app, &env.env.regions, instances, nodes, now, timeout_ms)
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

    const T: Duration = Duration::from_secs(600);

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
        let later = 1000 + T.as_millis() as i64 + 1;
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
    }
}
