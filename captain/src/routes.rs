//! The edge's route table: computed from the desired state at the meta
//! repo's head (which rollout of each app serves) and the instances
//! followers report healthy (recomputed by the `routes` background task),
//! and streamed to edges as server-sent events in the format of
//! [`edge::routes`] (`crate::api::routes_stream`).
//!
//! A domain routes to the healthy instances of its app's *serving* rollout
//! only: a rollout still being checked gets no traffic, and a draining one
//! gets none either (requests already in flight finish on it).

use std::collections::BTreeSet;
use std::sync::Arc;

use edge::routes::{Backend, Route, RouteKind, RouteTable, Transport};
use meta_schema::desired::DesiredState;
use meta_schema::now_millis;
use tokio::sync::watch;

use crate::db::{InstanceRow, NodeRow};

/// The routes of a desired state, given what followers report. Pure.
pub fn compute(state: &DesiredState, instances: &[InstanceRow], nodes: &[NodeRow]) -> Vec<Route> {
    let mut routes = Vec::new();
    let mut taken = BTreeSet::new();
    for env in state.envs.values() {
        for app in env.apps.values() {
            let Some(active) = &app.active_release else {
                continue;
            };
            let mut domains: Vec<String> = env
                .env
                .domains
                .iter()
                .map(|d| format!("{}.{d}", app.name))
                .collect();
            let release = app.serving.as_ref().map(|s| &s.release).unwrap_or(active);
            domains.extend(app.domains.iter().map(|d| d.to_ascii_lowercase()));
            domains.extend(release.domains.iter().map(|d| d.to_ascii_lowercase()));
            let backends: Vec<Backend> = app
                .serving
                .iter()
                .flat_map(|s| s.latest.instances.iter().map(move |p| (s, p)))
                .filter_map(|(s, p)| {
                    let seen = instances
                        .iter()
                        .find(|i| i.id == p.instance_id && i.rollout_id == s.rollout_id)?;
                    if seen.state != "healthy" {
                        return None;
                    }
                    let node = nodes.iter().find(|n| n.id == p.node)?;
                    if node.proxy_addr.is_empty() || node.state == "offline" {
                        return None;
                    }
                    Some(Backend {
                        instance_id: p.instance_id.clone(),
                        node_id: node.id.clone(),
                        node_proxy: node.proxy_addr.clone(),
                        transport: Transport::Mtls,
                    })
                })
                .collect();
            for domain in domains {
                if !taken.insert(domain.clone()) {
                    tracing::warn!(%domain, env = %app.env, app = %app.name, "domain already routed to another app; skipped");
                    continue;
                }
                routes.push(Route {
                    domain,
                    env: app.env.clone(),
                    app: app.name.clone(),
                    kind: RouteKind::Http,
                    backends: backends.clone(),
                });
            }
        }
    }
    routes.sort_by(|a, b| a.domain.cmp(&b.domain));
    routes
}

/// The current table; every change bumps `version`.
pub struct RouteFeed {
    tx: watch::Sender<Arc<RouteTable>>,
}

impl Default for RouteFeed {
    fn default() -> Self {
        RouteFeed {
            tx: watch::channel(Arc::new(RouteTable::default())).0,
        }
    }
}

impl RouteFeed {
    pub fn current(&self) -> Arc<RouteTable> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.tx.subscribe()
    }

    /// Publish `routes` if they differ from the current table. The version
    /// is at least the wall clock in ms, so it keeps increasing across
    /// captain restarts.
    pub fn publish(&self, routes: Vec<Route>) -> bool {
        self.tx.send_if_modified(|cur| {
            if cur.routes == routes && cur.version != 0 {
                return false;
            }
            let version = (cur.version + 1).max(now_millis() as u64);
            *cur = Arc::new(RouteTable { version, routes });
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meta_schema::MetaTree;
    use meta_schema::desired::desired_state;
    use meta_schema::layout::{deployment_path, env_path, release_path};
    use meta_schema::pb::{self, DeploymentState};
    use prost::Message;

    #[test]
    fn routes_go_to_healthy_instances_of_the_serving_rollout_only() {
        let mut t = MetaTree::new();
        t.insert(
            env_path("prod"),
            pb::Env {
                name: "prod".into(),
                domains: vec!["localhost".into()],
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let rel = |v: &str| pb::Release {
            id: meta_schema::new_id(),
            app: "web".into(),
            env: "prod".into(),
            image_digest: format!("sha256:{}", "a".repeat(64)),
            domains: vec!["www.example.com".into()],
            env_vars: [("V".to_string(), v.to_string())].into(),
            created_at: 1,
            ..Default::default()
        };
        let r1 = rel("1");
        t.insert(release_path("prod", "web", &r1.id), r1.encode_to_vec());
        let placement = |n: &str| pb::Placement {
            instance_id: meta_schema::new_id(),
            node: n.into(),
        };
        let mut dep =
            |r: &pb::Release, state: DeploymentState, rollout: Option<&pb::Deployment>| {
                let id = meta_schema::new_id();
                let d = pb::Deployment {
                    id: id.clone(),
                    app: "web".into(),
                    env: "prod".into(),
                    rollout_id: rollout.map(|x| x.rollout_id.clone()).unwrap_or(id.clone()),
                    state: state as i32,
                    release: Some(r.clone()),
                    instances: rollout
                        .map(|x| x.instances.clone())
                        .unwrap_or_else(|| vec![placement("a"), placement("b")]),
                    created_at: 1,
                    reason: String::new(),
                };
                t.insert(deployment_path("prod", "web", &id), d.encode_to_vec());
                d
            };
        let d1 = dep(&r1, DeploymentState::RollingOut, None);
        dep(&r1, DeploymentState::Promoted, Some(&d1));
        let r2 = rel("2");
        let d2 = dep(&r2, DeploymentState::RollingOut, None);
        t.insert(release_path("prod", "web", &r2.id), r2.encode_to_vec());

        let inst = |p: &pb::Placement, rollout: &str, state: &str| InstanceRow {
            id: p.instance_id.clone(),
            node_id: p.node.clone(),
            env: "prod".into(),
            app: "web".into(),
            rollout_id: rollout.into(),
            release_id: String::new(),
            state: state.into(),
            reason: String::new(),
            address: String::new(),
            port: 0,
            attempts: 1,
            created_at: 0,
            updated_at: 0,
        };
        let instances = vec![
            inst(&d1.instances[0], &d1.id, "healthy"),
            inst(&d1.instances[1], &d1.id, "unhealthy"),
            inst(&d2.instances[0], &d2.id, "healthy"),
            inst(&d2.instances[1], &d2.id, "healthy"),
        ];
        let node = |id: &str| NodeRow {
            id: id.into(),
            address: String::new(),
            region: String::new(),
            cpus: 1,
            memory_bytes: 1,
            disk_bytes: 1,
            age_recipient: String::new(),
            api_url: String::new(),
            proxy_addr: format!("127.0.0.1:{}", if id == "a" { 9001 } else { 9002 }),
            state: "online".into(),
            memory_used_bytes: 0,
            instances: 0,
            last_seen: 0,
            registered_at: 0,
            applied_commit: String::new(),
            refused_commit: String::new(),
            refused_reason: String::new(),
            drain: false,
        };
        let state = desired_state(&t, 2).unwrap();
        let routes = compute(&state, &instances, &[node("a"), node("b")]);
        let domains: Vec<&str> = routes.iter().map(|r| r.domain.as_str()).collect();
        assert_eq!(domains, ["web.localhost", "www.example.com"]);
        for r in &routes {
            assert_eq!(
                r.backends.len(),
                1,
                "only the healthy instance of the serving rollout"
            );
            assert_eq!(r.backends[0].instance_id, d1.instances[0].instance_id);
            assert_eq!(r.backends[0].node_proxy, "127.0.0.1:9001");
        }
        let feed = RouteFeed::default();
        assert!(feed.publish(routes.clone()));
        let v = feed.current().version;
        assert!(
            !feed.publish(routes),
            "an unchanged table is not republished"
        );
        assert_eq!(feed.current().version, v);
    }
}
