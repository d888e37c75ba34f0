//! Prometheus metrics of the captain, served at `GET /metrics`: requests
//! and latency per route, meta commits written, mirror lag.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    method: String,
    route: String,
}

struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    commits: Counter,
    mirror_lag: Gauge<i64, std::sync::atomic::AtomicI64>,
    mirror_syncs: Counter<u64, AtomicU64>,
    origin_refused: Gauge<i64, std::sync::atomic::AtomicI64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("zw_captain");
    let requests = Family::<RouteLabels, Counter>::default();
    let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.0005, 2.0, 16))
    });
    let commits = Counter::default();
    let mirror_lag = Gauge::default();
    let mirror_syncs = Counter::default();
    let origin_refused = Gauge::default();
    registry.register(
        "meta_origin_refused",
        "1 while the meta remote's head is refused (invalid, or not descending from the last valid head)",
        origin_refused.clone(),
    );
    registry.register(
        "http_requests",
        "HTTP requests by route and status",
        requests.clone(),
    );
    registry.register(
        "http_request_duration_seconds",
        "HTTP request latency by route",
        latency.clone(),
    );
    registry.register(
        "meta_commits_written",
        "Commits the captain wrote to the meta repository",
        commits.clone(),
    );
    registry.register(
        "mirror_lag_seconds",
        "Seconds between the meta repository head commit and its indexing, at the last sync",
        mirror_lag.clone(),
    );
    registry.register(
        "mirror_syncs",
        "Syncs of the mirror that indexed a new head",
        mirror_syncs.clone(),
    );
    Metrics {
        registry,
        requests,
        latency,
        commits,
        mirror_lag,
        mirror_syncs,
        origin_refused,
    }
});

pub fn commit_written() {
    METRICS.commits.inc();
}

pub fn origin_refused(refused: bool) {
    METRICS.origin_refused.set(i64::from(refused));
}

pub fn mirror_synced(lag_seconds: i64) {
    METRICS.mirror_lag.set(lag_seconds.max(0));
    METRICS.mirror_syncs.inc();
}

/// Middleware recording count and latency per matched route.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let res = next.run(req).await;
    METRICS
        .latency
        .get_or_create(&LatencyLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    METRICS
        .requests
        .get_or_create(&RouteLabels {
            method,
            route,
            status: res.status().as_u16().to_string(),
        })
        .inc();
    res
}

/// Every metric in the OpenMetrics text format (`GET /metrics`).
pub fn encode() -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &METRICS.registry)?;
    Ok(out)
}
