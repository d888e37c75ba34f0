//! desired_state over 100 / 1,000 / 10,000 apps (10 instances each: 1,000
//! apps = 10,000 instances). Target: < 100 ms at 1,000 apps, linear growth.
//! The in-run reference is the 100-app time scaled linearly, so the ratio
//! says how far from linear the larger sizes are.
//!
//!     cargo bench -p meta-schema --bench desired_state

use std::time::Instant;

use meta_schema::desired::desired_state;
use meta_schema::layout::{deployment_path, env_path, release_path};
use meta_schema::pb::{self, DeploymentState};
use meta_schema::{MetaTree, new_id};
use prost::Message;

fn tree(apps: usize) -> MetaTree {
    let mut t = MetaTree::new();
    t.insert(
        env_path("prod"),
        pb::Env {
            name: "prod".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    for a in 0..apps {
        let app = format!("app-{a}");
        let mut last = None;
        for v in 0..3 {
            let r = pb::Release {
                id: new_id(),
                app: app.clone(),
                env: "prod".into(),
                image_digest: format!("sha256:{}", "d".repeat(64)),
                port: 8080,
                env_vars: [("VERSION".to_string(), format!("v{v}"))].into(),
                created_at: 1,
                ..Default::default()
            };
            t.insert(release_path("prod", &app, &r.id), r.encode_to_vec());
            last = Some(r);
        }
        let r = last.unwrap();
        let rollout = new_id();
        let instances: Vec<pb::Placement> = (0..10)
            .map(|i| pb::Placement {
                instance_id: new_id(),
                node: format!("node-{}", i % 10),
            })
            .collect();
        for (id, state) in [
            (rollout.clone(), DeploymentState::RollingOut),
            (new_id(), DeploymentState::Promoted),
        ] {
            let d = pb::Deployment {
                id: id.clone(),
                app: app.clone(),
                env: "prod".into(),
                rollout_id: rollout.clone(),
                state: state as i32,
                release: Some(r.clone()),
                instances: instances.clone(),
                created_at: 2,
                reason: String::new(),
            };
            t.insert(deployment_path("prod", &app, &id), d.encode_to_vec());
        }
    }
    t
}

fn time_ms(t: &MetaTree, runs: usize) -> (f64, usize) {
    let mut best = f64::MAX;
    let mut n = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let s = desired_state(t, 3).expect("valid tree");
        n = s.instances_for_node("node-3").len() + s.instances().len();
        best = best.min(start.elapsed().as_secs_f64() * 1000.0);
    }
    (best, n)
}

fn main() {
    let mut base = 0.0;
    let mut results = Vec::new();
    for (apps, runs) in [(100, 20), (1_000, 10), (10_000, 3)] {
        let t = tree(apps);
        let (ms, n) = time_ms(&t, runs);
        if apps == 100 {
            base = ms;
        }
        let linear = base * apps as f64 / 100.0;
        println!(
            "desired_state: {apps:>6} apps, {:>7} files, {n:>7} instance rows: {ms:8.2} ms (linear from 100 apps: {linear:8.2} ms)",
            t.len()
        );
        results.push((apps, ms, linear));
    }
    let (_, ms, linear) = results[1];
    println!(
        "{}",
        serde_json::json!({"bench": "desired_state_1000_apps_10000_instances_ms", "ours": ms, "reference": linear, "ratio": ms / linear, "target_ms": 100})
    );
}
