//! The compiled route table the proxy reads on every request, and the
//! per-backend state (outstanding requests, passive health) that survives
//! table swaps.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::routes::{Backend, Route, RouteKind, RouteTable, Transport};

/// One backend plus the live counters the load balancer uses.
#[derive(Debug)]
pub struct BackendState {
    /// The wire description.
    pub backend: Backend,
    /// [`Backend::instance_id`] ready to be sent as a header.
    pub instance_header: HeaderValue,
    /// [`Backend::node_proxy`] split once (validated by the table), and as
    /// the key the connection pool shares between instances of one node.
    addr: Option<(Arc<str>, Box<str>, u16)>,
    /// Requests sent and not yet finished.
    outstanding: AtomicUsize,
    /// Until when (ms since `epoch`) the backend is skipped after a failed
    /// connect; 0 when healthy.
    down_until_ms: AtomicU64,
    epoch: Instant,
}

impl BackendState {
    fn new(backend: Backend, epoch: Instant) -> Self {
        let instance_header =
            HeaderValue::from_str(&backend.instance_id).expect("validated by RouteTable::validate");
        let addr = crate::routes::split_host_port(&backend.node_proxy).map(|(host, port)| {
            (
                Arc::from(backend.node_proxy.as_str()),
                Box::from(host),
                port,
            )
        });
        Self {
            backend,
            instance_header,
            addr,
            outstanding: AtomicUsize::new(0),
            down_until_ms: AtomicU64::new(0),
            epoch,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the backend may be picked now.
    pub fn is_healthy(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || self.now_ms() >= until
    }

    /// Skips the backend for `for_` after a failed connect.
    pub fn mark_failed(&self, for_: Duration) {
        let until = self.now_ms() + for_.as_millis() as u64;
        self.down_until_ms.store(until.max(1), Ordering::Relaxed);
    }

    /// Clears a failure mark after a successful exchange.
    pub fn mark_ok(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Requests in flight.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InflightGuard {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    /// The key connections are pooled by: the node-proxy (or plain address).
    pub fn transport(&self) -> Transport {
        self.backend.transport
    }

    /// `(node_proxy, host, port)`; `None` for an address that does not parse
    /// (which [`RouteTable::validate`] refuses).
    pub fn address(&self) -> Option<(&Arc<str>, &str, u16)> {
        self.addr
            .as_ref()
            .map(|(key, host, port)| (key, &**host, *port))
    }
}

/// Decrements a backend's outstanding count when dropped.
#[derive(Debug)]
pub struct InflightGuard(Arc<BackendState>);

impl InflightGuard {
    /// The backend this request went to.
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A route with its backends' live state.
#[derive(Debug)]
pub struct RouteEntry {
    /// The wire description (backends are in `backends`).
    pub route: Route,
    /// The route's backends.
    pub backends: Vec<Arc<BackendState>>,
    rr: AtomicUsize,
}

impl RouteEntry {
    /// Picks the healthy backend with the fewest outstanding requests,
    /// starting the scan at a round-robin offset so ties spread evenly.
    /// Backends in `exclude` are skipped. When every backend is marked down,
    /// one is tried anyway (a mark may be stale); `None` only when there is
    /// no backend left at all.
    pub fn pick(&self, exclude: &[&Arc<BackendState>]) -> Option<Arc<BackendState>> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<&Arc<BackendState>> = None;
        let mut fallback: Option<&Arc<BackendState>> = None;
        for i in 0..n {
            let b = &self.backends[(start + i) % n];
            if exclude.iter().any(|e| Arc::ptr_eq(e, b)) {
                continue;
            }
            if !b.is_healthy() {
                fallback.get_or_insert(b);
                continue;
            }
            if best.is_none_or(|cur| b.outstanding() < cur.outstanding()) {
                best = Some(b);
            }
        }
        best.or(fallback).cloned()
    }
}

/// Host -> route lookup built from one [`RouteTable`].
#[derive(Debug, Default)]
pub struct Router {
    /// The table version this router was built from.
    pub version: u64,
    exact: HashMap<String, Arc<RouteEntry>>,
    wildcard: HashMap<String, Arc<RouteEntry>>,
    has_passthrough: bool,
}

impl Router {
    /// Builds a router. Backend state (counters, health marks) is carried
    /// over from `previous` for backends that are still present.
    pub fn build(table: &RouteTable, previous: Option<&Router>, epoch: Instant) -> Router {
        let mut old: HashMap<(&str, &str), &Arc<BackendState>> = HashMap::new();
        if let Some(prev) = previous {
            for entry in prev.exact.values().chain(prev.wildcard.values()) {
                for b in &entry.backends {
                    old.insert((&b.backend.instance_id, &b.backend.node_proxy), b);
                }
            }
        }
        let mut router = Router {
            version: table.version,
            ..Router::default()
        };
        for route in &table.routes {
            let backends = route
                .backends
                .iter()
                .map(
                    |b| match old.get(&(b.instance_id.as_str(), b.node_proxy.as_str())) {
                        Some(prev) if prev.backend == *b => Arc::clone(prev),
                        _ => Arc::new(BackendState::new(b.clone(), epoch)),
                    },
                )
                .collect();
            let entry = Arc::new(RouteEntry {
                route: Route {
                    backends: Vec::new(),
                    ..route.clone()
                },
                backends,
                rr: AtomicUsize::new(0),
            });
            router.has_passthrough |= route.kind == RouteKind::Passthrough;
            match route.domain.strip_prefix("*.") {
                Some(suffix) => router.wildcard.insert(suffix.to_owned(), entry),
                None => router.exact.insert(route.domain.clone(), entry),
            };
        }
        router
    }

    /// Finds the route for a host (lower case, no port).
    pub fn lookup(&self, host: &str) -> Option<&Arc<RouteEntry>> {
        if let Some(e) = self.exact.get(host) {
            return Some(e);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// Whether any route is a passthrough route (the TLS listener only peeks
    /// at the ClientHello when one is).
    pub fn has_passthrough(&self) -> bool {
        self.has_passthrough
    }

    /// Every domain in the table with its route kind.
    pub fn domains(&self) -> impl Iterator<Item = (&str, RouteKind)> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .map(|e| (e.route.domain.as_str(), e.route.kind))
    }

    /// Whether the router knows this host.
    pub fn knows(&self, host: &str) -> bool {
        self.lookup(host).is_some()
    }
}

/// The live router, swapped whole on every table change.
#[derive(Debug)]
pub struct Routes {
    current: ArcSwap<Router>,
    epoch: Instant,
    swap_lock: std::sync::Mutex<()>,
}

impl Default for Routes {
    fn default() -> Self {
        Self::new()
    }
}

impl Routes {
    /// An empty table (every host answers 404).
    pub fn new() -> Self {
        Self {
            current: ArcSwap::from_pointee(Router::default()),
            epoch: Instant::now(),
            swap_lock: std::sync::Mutex::new(()),
        }
    }

    /// The current router. Requests hold the `Arc` they got; a swap never
    /// disturbs them.
    pub fn load(&self) -> Arc<Router> {
        self.current.load_full()
    }

    /// Replaces the table atomically.
    pub fn replace(&self, table: &RouteTable) {
        let _guard = self.swap_lock.lock().unwrap_or_else(|e| e.into_inner());
        let prev = self.current.load_full();
        let next = Router::build(table, Some(&prev), self.epoch);
        self.current.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(version: u64, domains: &[(&str, &[&str])]) -> RouteTable {
        RouteTable {
            version,
            routes: domains
                .iter()
                .map(|(d, ids)| Route {
                    domain: d.to_string(),
                    env: "e".into(),
                    app: d.to_string(),
                    kind: RouteKind::Http,
                    backends: ids
                        .iter()
                        .map(|id| Backend {
                            instance_id: id.to_string(),
                            node_id: "n".into(),
                            node_proxy: "127.0.0.1:1".into(),
                            transport: Transport::Plain,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn lookup_exact_then_wildcard() {
        let r = Router::build(
            &table(
                1,
                &[("a.com", &["1"]), ("*.b.com", &["2"]), ("x.b.com", &["3"])],
            ),
            None,
            Instant::now(),
        );
        assert_eq!(r.lookup("a.com").unwrap().route.app, "a.com");
        assert_eq!(r.lookup("y.b.com").unwrap().route.app, "*.b.com");
        assert_eq!(r.lookup("x.b.com").unwrap().route.app, "x.b.com");
        assert!(r.lookup("b.com").is_none());
        assert!(r.lookup("z.y.b.com").is_none());
        assert!(r.lookup("c.com").is_none());
    }

    #[test]
    fn least_outstanding_and_health() {
        let r = Router::build(
            &table(1, &[("a.com", &["1", "2", "3"])]),
            None,
            Instant::now(),
        );
        let e = r.lookup("a.com").unwrap();
        let g1 = e.pick(&[]).unwrap().start();
        let g2 = e.pick(&[]).unwrap().start();
        let third = e.pick(&[]).unwrap();
        // The two busy backends are avoided.
        assert!(!Arc::ptr_eq(&third, g1.backend()) && !Arc::ptr_eq(&third, g2.backend()));
        third.mark_failed(Duration::from_secs(60));
        for _ in 0..10 {
            let p = e.pick(&[]).unwrap();
            assert!(!Arc::ptr_eq(&p, &third));
        }
        // Excluding the healthy ones falls back to the marked one.
        let p = e.pick(&[g1.backend(), g2.backend()]).unwrap();
        assert!(Arc::ptr_eq(&p, &third));
        let all = [g1.backend(), g2.backend(), &third];
        assert!(e.pick(&all).is_none());
        drop(g1);
        assert_eq!(e.backends.iter().map(|b| b.outstanding()).sum::<usize>(), 1);
    }

    #[test]
    fn state_survives_swap() {
        let routes = Routes::new();
        routes.replace(&table(1, &[("a.com", &["1", "2"])]));
        let r1 = routes.load();
        let b1 = r1.lookup("a.com").unwrap().backends[0].clone();
        b1.mark_failed(Duration::from_secs(60));
        let guard = b1.start();
        routes.replace(&table(2, &[("a.com", &["1", "3"]), ("c.com", &["1"])]));
        let r2 = routes.load();
        assert_eq!(r2.version, 2);
        let b1_again = &r2.lookup("a.com").unwrap().backends[0];
        assert!(Arc::ptr_eq(&b1, b1_again));
        assert!(!b1_again.is_healthy());
        assert_eq!(b1_again.outstanding(), 1);
        drop(guard);
        assert_eq!(b1_again.outstanding(), 0);
    }
}
