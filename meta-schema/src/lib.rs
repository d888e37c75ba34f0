//! The meta repository of zeitwork: its protobuf schema, its file layout,
//! validation, the pure function [`desired::desired_state`], and access to
//! the git repository itself ([`repo`]).
//!
//! Everything here except [`repo`] and [`pushed`] is pure: no network, no clock (time comes
//! in as an explicit `now` argument), no filesystem beyond
//! [`MetaTree::from_dir`].

pub mod desired;
pub mod layout;
pub mod pushed;
pub mod repo;
pub mod sops;
pub mod text;
pub mod tree;
pub mod validate;

pub use tree::MetaTree;

/// Prost types of `proto/zeitwork/meta/v1/meta.proto` (package
/// `zeitwork.meta.v1`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/zeitwork.meta.v1.rs"));
}

/// A new id for a release, deployment or instance: a ULID, so ids sort by
/// creation time and "newest present" is "largest id".
///
/// Ids made by one process are strictly increasing even within the same
/// millisecond (a monotonic generator), so a release made after another in
/// the same process is always the newer one.
pub fn new_id() -> String {
    static GEN: std::sync::Mutex<Option<ulid::Generator>> = std::sync::Mutex::new(None);
    let mut guard = GEN.lock().unwrap_or_else(|e| e.into_inner());
    let generator = guard.get_or_insert_with(ulid::Generator::new);
    // Overflow of the 80 random bits within one millisecond is practically
    // impossible; fall back to a fresh random id rather than fail.
    generator
        .generate()
        .unwrap_or_else(|_| ulid::Ulid::new())
        .to_string()
}

/// Wall-clock time in unix milliseconds. Only callers at the edges of the
/// system use it; pure functions take `now` as an argument.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Default number of instances of a release.
pub const DEFAULT_MIN_INSTANCES: u32 = 3;
/// Default drain period of a superseded deployment.
pub const DEFAULT_DRAIN_SECONDS: u32 = 300;

impl pb::Release {
    /// Instances this release wants (the default when unset).
    pub fn instances(&self) -> u32 {
        if self.min_instances == 0 {
            DEFAULT_MIN_INSTANCES
        } else {
            self.min_instances
        }
    }

    /// Drain period after a newer deployment is promoted.
    pub fn drain_period_seconds(&self) -> u32 {
        self.drain_seconds.unwrap_or(DEFAULT_DRAIN_SECONDS)
    }
}
