//! Node loss and drain through the leader's rollout planner: an in-process
//! captain on SQLite and on Postgres, a real meta repository, and nodes
//! simulated with the node API protocol a follower speaks (registration,
//! heartbeats, instance reports with the node's own token). Each simulated
//! node converges to what the meta repository places on it, as a follower
//! does: it reports a newly placed instance `starting`, then `healthy`
//! after a start-up delay, and `stopped` once it is no longer placed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, Env, commit_count, digest};
use meta_schema::desired::desired_state;
use meta_schema::now_millis;
use meta_schema::pb::{self, DeploymentState};
use meta_schema::repo::MetaRepo;
use serde_json::json;

/// Entry point of the pre-receive hook in tests (see
/// `common::test_hook_command`): only acts when the hook runs it.
#[test]
#[ignore = "run by the meta repository's pre-receive hook, not by the test runner"]
fn pre_receive_hook_entry() {
    if std::env::var_os(common::HOOK_MODE_ENV).is_some() {
        std::process::exit(captain::hooks::main_entry());
    }
}

/// How long a simulated instance takes from placed to healthy.
const START_UP: Duration = Duration::from_millis(300);
/// How often a simulated node heartbeats and looks at the meta repository.
const TICK: Duration = Duration::from_millis(100);

/// One simulated node; its loop ends when the node is dropped.
struct SimNode {
    id: String,
    token: String,
    /// A dead node neither heartbeats nor changes its instances (its
    /// follower and its instances are gone until it comes back).
    alive: Arc<AtomicBool>,
    /// Instance id -> when this node sent the report that it is healthy
    /// (unix ms).
    healthy_at: Arc<Mutex<BTreeMap<String, i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SimNode {
    async fn start(env: &Env, id: &str) -> SimNode {
        let (s, n) = env
            .post(
                "/v1/nodes",
                json!({"id": id, "address": "127.0.0.1", "region": "eu", "cpus": 4, "memory_bytes": 8u64 << 30, "disk_bytes": 100u64 << 30, "api_url": "http://127.0.0.1:1", "proxy_addr": format!("127.0.0.1:{}", 7000 + id.len())}),
            )
            .await;
        assert!(s == 201 || s == 200, "{n}");
        let token = n["token"].as_str().unwrap().to_string();
        let alive = Arc::new(AtomicBool::new(true));
        let healthy_at = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn(sim_loop(
            env.base.clone(),
            env.meta_dir(),
            id.to_string(),
            token.clone(),
            alive.clone(),
            healthy_at.clone(),
        ));
        SimNode {
            id: id.to_string(),
            token,
            alive,
            healthy_at,
            task,
        }
    }

    fn healthy_at(&self, instance: &str) -> Option<i64> {
        self.healthy_at.lock().unwrap().get(instance).copied()
    }
}

async fn sim_loop(
    base: String,
    meta: PathBuf,
    id: String,
    token: String,
    alive: Arc<AtomicBool>,
    healthy_at: Arc<Mutex<BTreeMap<String, i64>>>,
) {
    let http = reqwest::Client::new();
    // Instance id -> (placement seen at, the report it was last sent).
    let mut mine: BTreeMap<String, (Instant, &'static str, pb::Release, String)> = BTreeMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        if !alive.load(Ordering::SeqCst) {
            continue;
        }
        let _ = http
            .put(format!("{base}/v1/nodes/{id}/state"))
            .bearer_auth(&token)
            .json(&json!({"state": "online"}))
            .send()
            .await;
        let Ok(repo) = MetaRepo::open(&meta) else {
            continue;
        };
        let Ok(Some(head)) = repo.head("main") else {
            continue;
        };
        let Ok(tree) = repo.tree_at(&head) else {
            continue;
        };
        let Ok(state) = desired_state(&tree, now_millis()) else {
            continue;
        };
        let wanted = state.instances_for_node(&id);
        let mut reports = Vec::new();
        for w in &wanted {
            let e = mine.entry(w.instance_id.clone()).or_insert((
                Instant::now(),
                "",
                w.release.clone(),
                w.rollout_id.clone(),
            ));
            let next = if e.0.elapsed() >= START_UP {
                "healthy"
            } else {
                "starting"
            };
            if e.1 != next {
                e.1 = next;
                reports.push((w.instance_id.clone(), next));
            }
        }
        let gone: Vec<String> = mine
            .keys()
            .filter(|k| !wanted.iter().any(|w| &w.instance_id == *k))
            .cloned()
            .collect();
        for g in &gone {
            reports.push((g.clone(), "stopped"));
        }
        for (inst, st) in reports {
            let (_, _, rel, rollout) = &mine[&inst];
            // The captain cannot know of the report before it is sent.
            let sent = now_millis();
            let r = http
                .post(format!("{base}/v1/instances"))
                .bearer_auth(&token)
                .json(&json!({"id": inst, "node_id": id, "env": rel.env, "app": rel.app, "rollout_id": rollout, "release_id": rel.id, "state": st, "reason": "", "address": "10.0.0.2", "port": 8080, "attempts": 1}))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) && st == "healthy" {
                healthy_at.lock().unwrap().insert(inst.clone(), sent);
            }
        }
        for g in gone {
            mine.remove(&g);
        }
    }
}

/// Every deployment file of `env`/`app` at the head, oldest first.
fn deployment_files(env: &Env) -> Vec<pb::Deployment> {
    let repo = MetaRepo::open(&env.meta_dir()).unwrap();
    let head = repo.head("main").unwrap().unwrap();
    let tree = repo.tree_at(&head).unwrap();
    let mut out: Vec<pb::Deployment> = tree
        .iter()
        .filter(|(p, _)| p.starts_with("envs/production/apps/web/deployments/"))
        .map(|(_, b)| <pb::Deployment as prost::Message>::decode(b).unwrap())
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The serving rollout's newest file.
fn serving(env: &Env) -> Option<pb::Deployment> {
    let repo = MetaRepo::open(&env.meta_dir()).unwrap();
    let head = repo.head("main").unwrap()?;
    let tree = repo.tree_at(&head).unwrap();
    let s = desired_state(&tree, now_millis()).unwrap();
    Some(s.app("production", "web")?.serving.as_ref()?.latest.clone())
}

fn nodes_of(d: &pb::Deployment) -> BTreeSet<String> {
    d.instances.iter().map(|p| p.node.clone()).collect()
}

fn ids(d: &pb::Deployment) -> BTreeSet<String> {
    d.instances.iter().map(|p| p.instance_id.clone()).collect()
}

async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    wait_async(what, limit, move || std::future::ready(f())).await
}

async fn wait_async<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until instance `id` is reported stopped by its node.
async fn wait_stopped(env: &Env, id: &str) {
    let path = format!("/v1/instances/{id}");
    let path = path.as_str();
    wait_async(
        "the instance stopped",
        Duration::from_secs(10),
        move || async move { (env.get(path).await.1["state"] == "stopped").then_some(()) },
    )
    .await;
}

/// Wait until the route table has `n` backends for the app.
async fn wait_backends(env: &Env, n: usize) {
    let st = env.captain.as_ref().unwrap().state();
    wait_for(
        "the app's backends in the route table",
        Duration::from_secs(10),
        || {
            let t = st.routes.current();
            t.routes
                .iter()
                .find(|r| r.app == "web")
                .filter(|r| r.backends.len() == n)
                .map(|_| ())
        },
    )
    .await;
}

/// A project, an app and three nodes; the app's first release serving on
/// all three (one instance each).
async fn serving_on_three(env: &Env) -> (Vec<SimNode>, String, pb::Deployment) {
    let (_, app) = env.project_and_app("shop", "web").await;
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(SimNode::start(env, id).await);
    }
    let (s, d) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": digest(1), "port": 8080}),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    let first = wait_for(
        "the first rollout to serve",
        Duration::from_secs(20),
        || serving(env),
    )
    .await;
    assert_eq!(
        nodes_of(&first),
        BTreeSet::from(["n1".into(), "n2".into(), "n3".into()]),
        "spread over the three nodes"
    );
    (nodes, app, first)
}

/// Check the two phases in the files written after `before` files: one
/// file adds replacements keeping every id, the next drops exactly the
/// instances on `left` once every instance it keeps was reported healthy.
fn check_two_phases(
    files: &[pb::Deployment],
    before: usize,
    first: &pb::Deployment,
    left: &str,
    nodes: &[SimNode],
) -> pb::Deployment {
    let new = &files[before..];
    assert_eq!(new.len(), 2, "one replacement file and one drop: {new:#?}");
    let (grow, shrink) = (&new[0], &new[1]);
    for f in new {
        assert_eq!(f.rollout_id, first.rollout_id, "same rollout");
        assert_eq!(f.state, DeploymentState::Promoted as i32);
    }
    assert!(ids(grow).is_superset(&ids(first)), "phase 1 keeps every id");
    let added: Vec<&pb::Placement> = grow
        .instances
        .iter()
        .filter(|p| !ids(first).contains(&p.instance_id))
        .collect();
    let moved = first.instances.iter().filter(|p| p.node == left).count();
    assert_eq!(added.len(), moved, "one replacement per moved instance");
    assert!(
        added.iter().all(|p| p.node != left),
        "a replacement on {left}"
    );
    assert_eq!(shrink.instances.len(), first.instances.len());
    assert!(shrink.instances.iter().all(|p| p.node != left));
    let stayed: BTreeSet<String> = first
        .instances
        .iter()
        .filter(|p| p.node != left)
        .map(|p| p.instance_id.clone())
        .collect();
    assert!(
        ids(shrink).is_superset(&stayed),
        "the healthy ones keep their ids"
    );
    for p in &shrink.instances {
        let node = nodes.iter().find(|n| n.id == p.node).unwrap();
        let at = node
            .healthy_at(&p.instance_id)
            .unwrap_or_else(|| panic!("{} dropped before {} was healthy", left, p.instance_id));
        assert!(
            at <= shrink.created_at,
            "{} was dropped before {} was healthy",
            left,
            p.instance_id
        );
    }
    assert!(nodes_of(shrink).len() >= 2, "spread: {shrink:?}");
    shrink.clone()
}

async fn node_loss_then_back(backend: Backend) {
    let env = Env::start(backend).await;
    let (nodes, _, first) = serving_on_three(&env).await;
    let before = deployment_files(&env).len();

    // n1 dies: no heartbeats, its instance gone with it.
    let lost_at = Instant::now();
    nodes[0].alive.store(false, Ordering::SeqCst);
    let replaced = wait_for("n1's instance replaced", Duration::from_secs(20), || {
        serving(&env).filter(|d| d.instances.iter().all(|p| p.node != "n1"))
    })
    .await;
    eprintln!(
        "node lost to its instance replaced and dropped: {:?} (grace 600 ms)",
        lost_at.elapsed()
    );
    assert_eq!(env.get("/v1/nodes/n1").await.1["state"], "offline");
    let files = deployment_files(&env);
    let shrink = check_two_phases(&files, before, &first, "n1", &nodes);
    assert_eq!(shrink, replaced);

    // n1 comes back: nothing is placed on it again and nothing runs twice.
    let commits = commit_count(&env.meta_dir());
    nodes[0].alive.store(true, Ordering::SeqCst);
    let e = &env;
    wait_async(
        "n1 online again",
        Duration::from_secs(10),
        move || async move { (e.get("/v1/nodes/n1").await.1["state"] == "online").then_some(()) },
    )
    .await;
    // Its old instance is reported stopped (the node converged).
    let old: Vec<String> = first
        .instances
        .iter()
        .filter(|p| p.node == "n1")
        .map(|p| p.instance_id.clone())
        .collect();
    for i in &old {
        wait_stopped(&env, i).await;
    }
    // Another activation of the planner after the node is back.
    env.captain
        .as_ref()
        .unwrap()
        .state()
        .rollout_wake
        .notify_one();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(commit_count(&env.meta_dir()), commits, "nothing written");
    let now = serving(&env).unwrap();
    assert_eq!(now, replaced, "the placement is unchanged");
    let placed: Vec<String> = now
        .instances
        .iter()
        .map(|p| p.instance_id.clone())
        .collect();
    let unique: BTreeSet<&String> = placed.iter().collect();
    assert_eq!(unique.len(), placed.len());
    assert_eq!(placed.len(), 3, "no duplicate instance");
    drop(nodes);
    env.stop().await;
}
both!(
    a_lost_node_is_replaced_in_two_phases_and_back_runs_nothing_twice,
    node_loss_then_back
);

async fn drain_two_phases(backend: Backend) {
    let env = Env::start(backend).await;
    let (nodes, app, first) = serving_on_three(&env).await;
    let before = deployment_files(&env).len();
    wait_backends(&env, 3).await;

    // Sample the edges' route table all along: never fewer than three
    // healthy backends for the app (no request can fail for want of one).
    let st = env.captain.as_ref().unwrap().state().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut fewest = usize::MAX;
            let mut samples = 0;
            while !stop.load(Ordering::SeqCst) {
                let t = st.routes.current();
                if let Some(r) = t.routes.iter().find(|r| r.app == "web") {
                    fewest = fewest.min(r.backends.len());
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (fewest, samples)
        })
    };

    let (s, n) = env.put("/v1/nodes/n1/drain", json!({"drain": true})).await;
    assert_eq!((s, n["drain"].as_bool()), (200, Some(true)), "{n}");
    // A node may not undo it: not with its token on the admin route, not
    // with a heartbeat saying it is online, not by registering again.
    let r = env
        .http
        .put(format!("{}/v1/nodes/n1/drain", env.base))
        .bearer_auth(&nodes[0].token)
        .json(&json!({"drain": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = env
        .http
        .put(format!("{}/v1/nodes/n1/state", env.base))
        .bearer_auth(&nodes[0].token)
        .json(&json!({"state": "online", "drain": false}))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_client_error(),
        "a heartbeat with a drain field"
    );
    let t0 = Instant::now();
    let drained = wait_for("n1 drained", Duration::from_secs(20), || {
        serving(&env).filter(|d| d.instances.iter().all(|p| p.node != "n1"))
    })
    .await;
    eprintln!("drain to n1 out of the placement: {:?}", t0.elapsed());
    let (_, n) = env.get("/v1/nodes/n1").await;
    assert_eq!(n["drain"], true, "drain overwritten by heartbeats: {n}");
    assert_eq!(n["state"], "online");
    assert!(
        now_millis() - n["last_seen"].as_i64().unwrap() < 1000,
        "{n}"
    );
    let files = deployment_files(&env);
    assert_eq!(
        check_two_phases(&files, before, &first, "n1", &nodes),
        drained
    );
    // n1 is empty: its instance was stopped once no longer placed.
    for p in first.instances.iter().filter(|p| p.node == "n1") {
        wait_stopped(&env, &p.instance_id).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (fewest, samples) = sampler.await.unwrap();
    assert!(samples > 10, "{samples} samples");
    assert!(
        fewest >= 3,
        "the route table had {fewest} backends during the drain"
    );

    // Registering again (a follower restart) keeps the drain.
    let (s, again) = env
        .post(
            "/v1/nodes",
            json!({"id": "n1", "address": "127.0.0.1", "region": "eu", "cpus": 4, "memory_bytes": 8u64 << 30, "disk_bytes": 100u64 << 30, "api_url": "http://127.0.0.1:1", "proxy_addr": "127.0.0.1:7002"}),
        )
        .await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["node"]["drain"], true, "{again}");

    // A new release while drained: nothing placed on n1.
    let (s, _) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": digest(2), "port": 8080}),
        )
        .await;
    assert_eq!(s, 201);
    let second = wait_for(
        "the second release serving",
        Duration::from_secs(20),
        || serving(&env).filter(|d| d.rollout_id != first.rollout_id),
    )
    .await;
    assert!(!nodes_of(&second).contains("n1"), "{second:?}");
    assert!(nodes_of(&second).len() >= 2);

    // Undrain: eligible again, nothing moves back by itself.
    let commits = commit_count(&env.meta_dir());
    let (s, n) = env.put("/v1/nodes/n1/drain", json!({"drain": false})).await;
    assert_eq!((s, n["drain"].as_bool()), (200, Some(false)), "{n}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        commit_count(&env.meta_dir()),
        commits,
        "something moved back"
    );
    assert_eq!(serving(&env).unwrap(), second);
    drop(nodes);
    env.stop().await;
}
both!(
    a_drain_moves_everything_off_in_two_phases_and_survives_heartbeats,
    drain_two_phases
);

/// A captain that does not lead, because another one (`ghost`, renewing
/// the lease on the same database as a captain does) holds the lease.
async fn standby_captain(backend: Backend) -> (Env, Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let database_url = common::fresh_database(backend, dir.path()).await;
    let db = captain::db::Db::connect(&database_url, 2).await.unwrap();
    let ghost = captain::leader::Leadership::new("ghost");
    assert!(ghost.renew(&db).await.unwrap().is_some(), "the ghost leads");
    let stop = Arc::new(AtomicBool::new(false));
    let holder = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = ghost.renew(&db).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            ghost.release(&db).await;
        })
    };
    let captain = captain::Captain::start(common::config(dir.path(), &database_url))
        .await
        .unwrap();
    let token = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let base = format!("http://{}", captain.local_addr());
    let env = Env {
        backend,
        dir,
        database_url,
        captain: Some(captain),
        base,
        token,
        http: reqwest::Client::new(),
        builder: None,
        store: None,
    };
    (env, stop, holder)
}

async fn non_leader_writes_nothing(backend: Backend) {
    let (env, stop, holder) = standby_captain(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let nodes = [
        SimNode::start(&env, "n1").await,
        SimNode::start(&env, "n2").await,
        SimNode::start(&env, "n3").await,
    ];
    let (s, d) = env
        .post(
            "/v1/deployments",
            json!({"app_id": app, "image_digest": digest(1), "port": 8080}),
        )
        .await;
    assert_eq!(s, 201, "{d}");
    // n1 dies, n2 is drained: a leader would mark n1 offline and place the
    // rollout on n3. This captain does not lead: it writes nothing.
    nodes[0].alive.store(false, Ordering::SeqCst);
    let (s, _) = env.put("/v1/nodes/n2/drain", json!({"drain": true})).await;
    assert_eq!(s, 200);
    let commits = commit_count(&env.meta_dir());
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        commit_count(&env.meta_dir()),
        commits,
        "a standby captain wrote"
    );
    assert!(deployment_files(&env).is_empty());
    assert_eq!(
        env.get("/v1/nodes/n1").await.1["state"],
        "online",
        "liveness ran on a standby"
    );
    let (_, tasks) = env.get("/v1/admin/tasks").await;
    let rollout = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "rollout")
        .unwrap();
    assert!(
        rollout.to_string().contains("another captain leads"),
        "{rollout}"
    );

    // The other captain goes: this one leads, marks n1 lost and rolls out
    // on the only usable node.
    let released = now_millis();
    stop.store(true, Ordering::SeqCst);
    holder.await.unwrap();
    let first = wait_for(
        "a rollout by the new leader",
        Duration::from_secs(10),
        || deployment_files(&env).into_iter().next(),
    )
    .await;
    assert!(first.created_at >= released);
    // n1 is not heard from (its heartbeats are stale even before the new
    // leader's liveness pass marks it), n2 is drained.
    assert_eq!(nodes_of(&first), BTreeSet::from(["n3".to_string()]));
    drop(nodes);
    env.stop().await;
}
both!(
    a_captain_that_does_not_lead_writes_nothing,
    non_leader_writes_nothing
);
