//! The zeitwork edge: TLS-terminating L7 proxy that routes by domain to the
//! healthy instances of each app, through mTLS node-proxies.
//!
//! - [`routes`]: route-table wire types and the captain's stream format.
//! - [`table`]: the compiled table, swapped atomically, with load-balancing
//!   and passive-health state.
//! - [`proxy`]: the HTTP proxy service; [`server`]: listeners and limits.
//! - [`h1`]: the edge's own HTTP/1.1 path (most requests), handing the
//!   rest to hyper; [`park`]: idle plain connections held outside the
//!   runtime.
//! - [`tls`]: SNI certificate resolver; [`pki`]: the cluster CA.
//! - [`node_proxy`]: the mTLS server the follower runs on every node.
//! - [`passthrough`]: TLS passthrough by SNI.
//! - [`feed`]: the route stream client with its on-disk cache.
//! - [`acme`]: ACME certificates (HTTP-01, TLS-ALPN-01) with renewal.
//! - [`cli`]: `zw edge`.

pub mod acme;
pub mod cli;
pub mod feed;
pub mod forward;
pub mod h1;
pub mod member;
pub mod node_proxy;
pub mod park;
pub mod passthrough;
pub mod pki;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod table;
pub mod tls;
pub mod upstream;
