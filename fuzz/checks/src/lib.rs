//! The checks behind zeitwork's fuzz targets.
//!
//! Each function takes the fuzzer's bytes, runs one parser of a trust
//! boundary (client and backend bytes at the edge, meta repository files, a
//! sops file, an uploaded source tarball, a GitHub webhook, the route table)
//! and panics on a *finding*: a panic of the code under test, or an answer
//! that disagrees with a reference written here from the RFC or the
//! documented contract. The fuzz targets in `fuzz/fuzz_targets/` call them
//! under libFuzzer; `tests/replay.rs` runs every committed corpus file
//! through them in the ordinary test suite, so a finding once fixed stays
//! fixed.

pub mod http1;
pub mod meta;
pub mod routes;
pub mod sops;
pub mod tar;
#[cfg(feature = "webhook")]
pub mod webhook;

pub use http1::{chunked as http1_chunked, request as http1_request, response as http1_response};
pub use meta::tree as meta_tree;
pub use routes::table as routes;
pub use sops::file as sops;
pub use tar::extract as tar_extract;
#[cfg(feature = "webhook")]
pub use webhook::push as webhook;

/// A check: panics on a finding.
pub type Check = fn(&[u8]);

/// Every target: its name (the directory of its corpus under
/// `fuzz/corpus/`) and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("http1_request", http1_request),
    ("http1_response", http1_response),
    ("http1_chunked", http1_chunked),
    ("meta_tree", meta_tree),
    ("sops", sops),
    ("tar_extract", tar_extract),
    #[cfg(feature = "webhook")]
    ("webhook", webhook),
    ("routes", routes),
];
