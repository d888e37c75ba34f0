//! Harnesses for zeitwork's tests, used as a dev-dependency.
//!
//! - [`cluster`]: a cluster of hosts on one machine (network namespaces
//!   joined by a bridge, with Postgres, S3, a git server and an "internet"
//!   host), driven through `scripts/cluster.sh`.

pub mod cluster;
