//! `desired_state`: what should run, as a pure function of one commit's
//! tree and the clock.
//!
//! Per env and app:
//! - the **active release** is the newest release file present (largest
//!   ULID). `git revert` of the commit that added it makes the previous one
//!   active again.
//! - deployment files form **rollouts** (files sharing `rollout_id`); the
//!   newest file of a rollout is its current state.
//! - **serving**: the rollout promoted most recently.
//! - **rolling out**: the newest rollout still ROLLING_OUT that is newer
//!   than the serving one. Older unfinished rollouts are abandoned.
//! - **draining**: earlier promoted rollouts, until the promotion that
//!   superseded them is `drain_seconds` old.
//! - an app with no release file wants nothing running at all (an app
//!   declared by its `app.pb` alone is listed, with nothing to run).
//!
//! Any invalid file makes the whole result an error: a follower never acts
//! on a silently partial state.

use std::collections::BTreeMap;

use crate::MetaTree;
use crate::pb::{self, DeploymentState};
use crate::validate::{self, ValidationErrors};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("the meta tree is invalid")]
    Invalid(#[from] ValidationErrors),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredState {
    pub envs: BTreeMap<String, EnvState>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnvState {
    pub env: pb::Env,
    pub apps: BTreeMap<String, AppState>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AppState {
    pub name: String,
    pub env: String,
    /// Newest release present.
    pub active_release: Option<pb::Release>,
    /// Ids of every release present, oldest first.
    pub release_ids: Vec<String>,
    pub serving: Option<RolloutView>,
    pub rolling_out: Option<RolloutView>,
    pub draining: Vec<RolloutView>,
    pub failed: Vec<RolloutView>,
    pub secrets_present: bool,
    /// The project the app is built from (its `app.pb`); none for an app
    /// declared only by its releases.
    pub project: Option<String>,
    /// Custom domains of its `app.pb` (a release may add its own).
    pub domains: Vec<String>,
}

/// One rollout, seen through its newest deployment file.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutView {
    pub rollout_id: String,
    /// The newest deployment file of the rollout.
    pub latest: pb::Deployment,
    pub release: pb::Release,
    /// When the rollout was promoted (unix ms), if it was.
    pub promoted_at: Option<i64>,
    /// For a draining rollout: when its instances stop (unix ms).
    pub drain_deadline: Option<i64>,
}

impl RolloutView {
    pub fn state(&self) -> DeploymentState {
        DeploymentState::try_from(self.latest.state).unwrap_or(DeploymentState::Unspecified)
    }
}

/// One instance that should run on a node.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredInstance {
    pub instance_id: String,
    pub node: String,
    pub env: String,
    pub app: String,
    pub rollout_id: String,
    pub release: pb::Release,
}

impl AppState {
    /// Rollouts whose instances should be running now.
    pub fn running_rollouts(&self) -> impl Iterator<Item = &RolloutView> {
        self.serving
            .iter()
            .chain(self.rolling_out.iter())
            .chain(self.draining.iter())
    }

    /// The active release, when no rollout exists for it yet (newer than
    /// what serves) and none failed: the captain should start one.
    pub fn release_needing_rollout(&self) -> Option<&pb::Release> {
        let active = self.active_release.as_ref()?;
        let serving_id = self
            .serving
            .as_ref()
            .map(|s| s.rollout_id.as_str())
            .unwrap_or("");
        let covered = self
            .serving
            .iter()
            .chain(self.rolling_out.iter())
            .any(|r| r.release.id == active.id)
            || self
                .failed
                .iter()
                .any(|r| r.release.id == active.id && r.rollout_id.as_str() > serving_id);
        (!covered).then_some(active)
    }
}

impl DesiredState {
    pub fn app(&self, env: &str, app: &str) -> Option<&AppState> {
        self.envs.get(env)?.apps.get(app)
    }

    pub fn apps(&self) -> impl Iterator<Item = &AppState> {
        self.envs.values().flat_map(|e| e.apps.values())
    }

    /// Every instance that should run, on any node.
    pub fn instances(&self) -> Vec<DesiredInstance> {
        self.collect_instances(|_| true)
    }

    /// The instances that should run on `node`.
    pub fn instances_for_node(&self, node: &str) -> Vec<DesiredInstance> {
        self.collect_instances(|p| p.node == node)
    }

    fn collect_instances(&self, keep: impl Fn(&pb::Placement) -> bool) -> Vec<DesiredInstance> {
        let mut out = Vec::new();
        for app in self.apps() {
            for r in app.running_rollouts() {
                for p in r.latest.instances.iter().filter(|p| keep(p)) {
                    out.push(DesiredInstance {
                        instance_id: p.instance_id.clone(),
                        node: p.node.clone(),
                        env: app.env.clone(),
                        app: app.name.clone(),
                        rollout_id: r.rollout_id.clone(),
                        release: r.release.clone(),
                    });
                }
            }
        }
        out
    }
}

/// What should run, per env and app, at the commit whose files are `tree`,
/// at time `now_millis`.
pub fn desired_state(tree: &MetaTree, now_millis: i64) -> Result<DesiredState, MetaError> {
    let loaded = validate::load(tree)?;
    let mut state = DesiredState::default();
    for (name, env) in &loaded.envs {
        state.envs.insert(
            name.clone(),
            EnvState {
                env: env.clone(),
                apps: BTreeMap::new(),
            },
        );
    }
    let empty_r = BTreeMap::new();
    let empty_d = BTreeMap::new();
    let mut keys: Vec<&(String, String)> = loaded
        .releases
        .keys()
        .chain(loaded.deployments.keys())
        .chain(loaded.apps.keys())
        .collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let (env, app) = key;
        let releases = loaded.releases.get(key).unwrap_or(&empty_r);
        let deployments = loaded.deployments.get(key).unwrap_or(&empty_d);
        let mut app_state = plan_app(
            env,
            app,
            releases,
            deployments,
            loaded.secrets.contains_key(key),
            now_millis,
        );
        if let Some(doc) = loaded.apps.get(key) {
            app_state.project = Some(doc.project.clone());
            app_state.domains = doc.domains.clone();
        }
        // `load` guarantees the env exists.
        if let Some(e) = state.envs.get_mut(env) {
            e.apps.insert(app.clone(), app_state);
        }
    }
    Ok(state)
}

fn plan_app(
    env: &str,
    app: &str,
    releases: &BTreeMap<String, pb::Release>,
    deployments: &BTreeMap<String, pb::Deployment>,
    secrets_present: bool,
    now: i64,
) -> AppState {
    let mut st = AppState {
        name: app.to_string(),
        env: env.to_string(),
        active_release: releases.last_key_value().map(|(_, r)| r.clone()),
        release_ids: releases.keys().cloned().collect(),
        serving: None,
        rolling_out: None,
        draining: Vec::new(),
        failed: Vec::new(),
        secrets_present,
        project: None,
        domains: Vec::new(),
    };

    // Group files into rollouts; files iterate in id (time) order.
    let mut rollouts: BTreeMap<&str, Vec<&pb::Deployment>> = BTreeMap::new();
    for d in deployments.values() {
        rollouts.entry(d.rollout_id.as_str()).or_default().push(d);
    }
    let mut views: Vec<(RolloutView, Option<&str>)> = Vec::new(); // (view, id of promoting file)
    for (rid, files) in &rollouts {
        let latest = *files.last().expect("group is non-empty");
        let promoting = files
            .iter()
            .find(|d| d.state == DeploymentState::Promoted as i32);
        let Some(release) = latest
            .release
            .clone()
            .or_else(|| files.iter().find_map(|d| d.release.clone()))
        else {
            continue; // validation guarantees an embedded release
        };
        views.push((
            RolloutView {
                rollout_id: rid.to_string(),
                latest: latest.clone(),
                release,
                promoted_at: promoting.map(|d| d.created_at),
                drain_deadline: None,
            },
            promoting.map(|d| d.id.as_str()),
        ));
    }

    if st.active_release.is_none() {
        // No release present: nothing should run. Failures stay visible.
        st.failed = views
            .into_iter()
            .filter(|(v, _)| v.state() == DeploymentState::Failed)
            .map(|(v, _)| v)
            .collect();
        return st;
    }

    // Promoted rollouts in promotion order.
    let mut promoted: Vec<(RolloutView, &str)> = views
        .iter()
        .filter(|(v, _)| v.state() == DeploymentState::Promoted)
        .filter_map(|(v, p)| p.map(|p| (v.clone(), p)))
        .collect();
    promoted.sort_by(|a, b| a.1.cmp(b.1));
    if let Some((serving, _)) = promoted.pop() {
        // Each earlier promoted rollout drains from the promotion that
        // superseded it.
        for (i, (view, _)) in promoted.iter().enumerate() {
            let superseded_at = promoted
                .get(i + 1)
                .map(|(v, _)| v.promoted_at)
                .unwrap_or(serving.promoted_at)
                .unwrap_or(0);
            let deadline = superseded_at + i64::from(view.release.drain_period_seconds()) * 1000;
            if deadline > now {
                let mut v = view.clone();
                v.drain_deadline = Some(deadline);
                st.draining.push(v);
            }
        }
        st.serving = Some(serving);
    }

    let serving_id = st
        .serving
        .as_ref()
        .map(|s| s.rollout_id.clone())
        .unwrap_or_default();
    st.rolling_out = views
        .iter()
        .filter(|(v, _)| v.state() == DeploymentState::RollingOut && v.rollout_id > serving_id)
        .map(|(v, _)| v.clone())
        .next_back();
    st.failed = views
        .into_iter()
        .filter(|(v, _)| v.state() == DeploymentState::Failed)
        .map(|(v, _)| v)
        .collect();
    st
}
