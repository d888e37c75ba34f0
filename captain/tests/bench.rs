//! Benchmark: `GET /v1/deployments` over 10,000 rows, SQLite vs Postgres,
//! latency and throughput side by side, printed as one JSON line.
//!
//! `cargo test -p captain --test bench -- --ignored --nocapture`

mod common;

use std::time::{Duration, Instant};

use captain::db::DeploymentRow;
use common::{Backend, Env, digest};
use serde_json::{Value, json};

const ROWS: usize = 10_000;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn latency(env: &Env, path: &str, n: usize) -> Value {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = env
            .http
            .get(format!("{}{path}", env.base))
            .bearer_auth(&env.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let body = r.bytes().await.unwrap();
        assert!(body.len() > 2);
        v.push(t.elapsed());
    }
    v.sort();
    json!({"n": n, "p50_ms": pct(&v, 0.5), "p99_ms": pct(&v, 0.99)})
}

async fn throughput(env: &Env, path: &str, clients: usize, per_client: usize) -> f64 {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let http = env.http.clone();
        let url = format!("{}{path}", env.base);
        let token = env.token.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (clients * per_client) as f64 / t.elapsed().as_secs_f64()
}

async fn run(backend: Backend) -> Value {
    let env = Env::start(backend).await;
    let (_, app) = env.project_and_app("shop", "web").await;
    let db = &env.captain.as_ref().unwrap().state().db;
    let t = Instant::now();
    for n in 0..ROWS {
        let id = meta_schema::new_id();
        db.upsert_deployment(&DeploymentRow {
            id,
            app_id: app.clone(),
            project_id: "prj-bench".into(),
            env: "production".into(),
            app: "web".into(),
            image_digest: digest(n as u32),
            source_commit: String::new(),
            min_instances: 3,
            status: "running".into(),
            reason: String::new(),
            present: true,
            commit_id: "0".repeat(40),
            created_at: meta_schema::now_millis(),
            updated_at: meta_schema::now_millis(),
        })
        .await
        .unwrap();
    }
    let insert_s = t.elapsed().as_secs_f64();
    assert_eq!(db.count_deployments().await.unwrap(), ROWS as i64);
    let page = latency(&env, "/v1/deployments?limit=100", 200).await;
    let full = latency(&env, "/v1/deployments?limit=10000", 10).await;
    let page_rps = throughput(&env, "/v1/deployments?limit=100", 8, 50).await;
    let full_rps = throughput(&env, "/v1/deployments?limit=10000", 4, 3).await;
    env.stop().await;
    json!({
        "insert_rows_per_s": (ROWS as f64 / insert_s).round(),
        "page100": {"latency": page, "rps_8_clients": page_rps.round()},
        "full10000": {"latency": full, "rps_4_clients": (full_rps * 10.0).round() / 10.0},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_get_deployments_sqlite_vs_postgres() {
    let sqlite = run(Backend::Sqlite).await;
    let postgres = run(Backend::Postgres).await;
    println!(
        "{}",
        json!({"bench": "GET /v1/deployments", "rows": ROWS, "build": "debug (deps opt-level 1)", "sqlite": sqlite, "postgres": postgres})
    );
}
