//! Rollout semantics of `desired_state`, on in-memory trees.

use meta_schema::desired::desired_state;
use meta_schema::layout::{deployment_path, env_path, release_path};
use meta_schema::pb::{self, DeploymentState};
use meta_schema::{MetaTree, new_id};
use prost::Message;

const T0: i64 = 1_700_000_000_000;

struct World {
    tree: MetaTree,
}

impl World {
    fn new() -> Self {
        let mut tree = MetaTree::new();
        tree.insert(
            env_path("prod"),
            pb::Env {
                name: "prod".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        World { tree }
    }

    fn release(&mut self, app: &str, drain: Option<u32>) -> pb::Release {
        let r = pb::Release {
            id: new_id(),
            app: app.into(),
            env: "prod".into(),
            image_digest: format!("sha256:{}", "c".repeat(64)),
            created_at: T0,
            drain_seconds: drain,
            ..Default::default()
        };
        self.tree
            .insert(release_path("prod", app, &r.id), r.encode_to_vec());
        r
    }

    fn deploy(
        &mut self,
        release: &pb::Release,
        state: DeploymentState,
        rollout: Option<&pb::Deployment>,
        at: i64,
    ) -> pb::Deployment {
        let id = new_id();
        let d = pb::Deployment {
            id: id.clone(),
            app: release.app.clone(),
            env: "prod".into(),
            rollout_id: rollout
                .map(|r| r.rollout_id.clone())
                .unwrap_or_else(|| id.clone()),
            state: state as i32,
            release: Some(release.clone()),
            instances: rollout.map(|r| r.instances.clone()).unwrap_or_else(|| {
                (0..3)
                    .map(|i| pb::Placement {
                        instance_id: new_id(),
                        node: format!("n{}", i % 2),
                    })
                    .collect()
            }),
            created_at: at,
            reason: String::new(),
        };
        self.tree.insert(
            deployment_path("prod", &release.app, &id),
            d.encode_to_vec(),
        );
        d
    }
}

#[test]
fn rollout_serving_draining_and_expiry() {
    let mut w = World::new();
    let r1 = w.release("web", Some(60));
    let d1 = w.deploy(&r1, DeploymentState::RollingOut, None, T0);
    let s = desired_state(&w.tree, T0).unwrap();
    let app = s.app("prod", "web").unwrap();
    assert!(app.serving.is_none());
    assert_eq!(app.rolling_out.as_ref().unwrap().rollout_id, d1.id);
    assert_eq!(s.instances().len(), 3);
    assert!(app.release_needing_rollout().is_none());

    w.deploy(&r1, DeploymentState::Promoted, Some(&d1), T0 + 1000);
    let r2 = w.release("web", None);
    let s = desired_state(&w.tree, T0 + 2000).unwrap();
    let app = s.app("prod", "web").unwrap();
    assert_eq!(app.serving.as_ref().unwrap().release.id, r1.id);
    assert_eq!(app.release_needing_rollout().unwrap().id, r2.id);

    let d2 = w.deploy(&r2, DeploymentState::RollingOut, None, T0 + 3000);
    let s = desired_state(&w.tree, T0 + 3000).unwrap();
    // Old and new both run while the new one is checked.
    assert_eq!(s.instances().len(), 6);
    assert_eq!(s.instances_for_node("n0").len(), 4);

    w.deploy(&r2, DeploymentState::Promoted, Some(&d2), T0 + 10_000);
    let s = desired_state(&w.tree, T0 + 10_000 + 59_999).unwrap();
    let app = s.app("prod", "web").unwrap();
    assert_eq!(app.serving.as_ref().unwrap().rollout_id, d2.id);
    assert_eq!(app.draining.len(), 1, "r1 drains for its 60 s");
    assert_eq!(app.draining[0].drain_deadline, Some(T0 + 10_000 + 60_000));
    assert_eq!(s.instances().len(), 6);
    let s = desired_state(&w.tree, T0 + 10_000 + 60_000).unwrap();
    assert!(s.app("prod", "web").unwrap().draining.is_empty());
    assert_eq!(s.instances().len(), 3, "only the promoted rollout is left");
}

#[test]
fn failed_rollout_keeps_previous_serving_and_is_not_retried() {
    let mut w = World::new();
    let r1 = w.release("web", None);
    let d1 = w.deploy(&r1, DeploymentState::RollingOut, None, T0);
    w.deploy(&r1, DeploymentState::Promoted, Some(&d1), T0 + 1);
    let r2 = w.release("web", None);
    let d2 = w.deploy(&r2, DeploymentState::RollingOut, None, T0 + 2);
    w.deploy(&r2, DeploymentState::Failed, Some(&d2), T0 + 3);
    let s = desired_state(&w.tree, T0 + 4).unwrap();
    let app = s.app("prod", "web").unwrap();
    assert_eq!(app.serving.as_ref().unwrap().rollout_id, d1.id);
    assert!(app.rolling_out.is_none());
    assert_eq!(app.failed.len(), 1);
    assert!(
        app.release_needing_rollout().is_none(),
        "a failed release is not rolled out again by itself"
    );
    assert_eq!(s.instances().len(), 3);
}

#[test]
fn newer_rollout_abandons_an_unfinished_older_one() {
    let mut w = World::new();
    let r1 = w.release("web", None);
    w.deploy(&r1, DeploymentState::RollingOut, None, T0);
    let r2 = w.release("web", None);
    let d2 = w.deploy(&r2, DeploymentState::RollingOut, None, T0 + 1);
    let s = desired_state(&w.tree, T0 + 2).unwrap();
    assert_eq!(
        s.app("prod", "web")
            .unwrap()
            .rolling_out
            .as_ref()
            .unwrap()
            .rollout_id,
        d2.id
    );
    assert_eq!(s.instances().len(), 3);
}

#[test]
fn reverted_release_needs_a_new_rollout_and_removed_app_wants_nothing() {
    let mut w = World::new();
    let r1 = w.release("web", None);
    let d1 = w.deploy(&r1, DeploymentState::RollingOut, None, T0);
    w.deploy(&r1, DeploymentState::Promoted, Some(&d1), T0 + 1);
    let r2 = w.release("web", None);
    let d2 = w.deploy(&r2, DeploymentState::RollingOut, None, T0 + 2);
    w.deploy(&r2, DeploymentState::Promoted, Some(&d2), T0 + 3);
    // git revert of the commit that added r2 removes its release file.
    w.tree.remove(&release_path("prod", "web", &r2.id));
    let s = desired_state(&w.tree, T0 + 4).unwrap();
    let app = s.app("prod", "web").unwrap();
    assert_eq!(app.active_release.as_ref().unwrap().id, r1.id);
    assert_eq!(
        app.serving.as_ref().unwrap().release.id,
        r2.id,
        "r2 serves until r1 is healthy again"
    );
    assert_eq!(app.release_needing_rollout().unwrap().id, r1.id);

    // No release at all: nothing runs.
    w.tree.remove(&release_path("prod", "web", &r1.id));
    let s = desired_state(&w.tree, T0 + 5).unwrap();
    assert!(s.instances().is_empty());
}

#[test]
fn duplicate_domains_and_missing_env_are_named() {
    let mut w = World::new();
    let mut a = w.release("a", None);
    a.domains = vec!["shop.example.com".into()];
    w.tree
        .insert(release_path("prod", "a", &a.id), a.encode_to_vec());
    let mut b = w.release("b", None);
    b.domains = vec!["shop.example.com".into()];
    w.tree
        .insert(release_path("prod", "b", &b.id), b.encode_to_vec());
    let err = desired_state(&w.tree, T0).unwrap_err();
    let text = format!(
        "{err}: {}",
        match &err {
            meta_schema::desired::MetaError::Invalid(v) => v.to_string(),
        }
    );
    assert!(
        text.contains("shop.example.com") && text.contains("belongs to one app"),
        "{text}"
    );

    let mut w = World::new();
    w.tree.remove(&env_path("prod"));
    w.release("web", None);
    let err = meta_schema::validate::validate_tree(&w.tree)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no envs/prod/env.pb"), "{err}");
}
