//! The wire types of the captain's REST API: every request and answer
//! body, in one place, used by the captain (which also builds its OpenAPI
//! document from them), by the follower (the node protocol) and by the CLI.
//! Nothing here does I/O; conversions from the captain's database rows live
//! in the captain.

pub mod builds;
pub mod cluster;
pub mod deployments;
pub mod error;
pub mod images;
pub mod logs;
pub mod misc;
pub mod nodes;
pub mod projects;
pub mod rules;
pub mod secrets;
pub mod status;
pub mod tasks;
pub mod tokens;

pub use status::Status;
