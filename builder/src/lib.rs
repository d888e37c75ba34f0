//! builder: from source and Dockerfile to a microVM image in the object store.
//!
//! Source ([`Source`]: local directory, git URL, GitHub tarball) ->
//! Dockerfile build through a [`backend::BuildBackend`] (buildah or docker)
//! -> OCI layout -> layers applied with whiteouts ([`oci`]) -> ext4 image
//! ([`ext4`]) -> object store ([`store`]) under `images/<hex>/rootfs.ext4`
//! and `images/<hex>/config.json`, keyed by the digest described in [`image`].
//! [`fetch_image`] downloads and verifies an image on the other side.

pub mod backend;
pub mod build;
pub mod cli;
pub mod error;
pub mod ext4;
pub mod fetch;
pub mod image;
pub mod log;
pub mod oci;
pub mod retry;
pub mod source;
pub mod store;
mod tools;

pub use backend::{BackendKind, BuildBackend, BuildahBackend, DockerBackend};
pub use build::{BuildOptions, Builder, BuilderConfig, DEFAULT_MAX_CONTEXT_BYTES, parse_build_arg};
pub use error::{BuildError, FaultKind, InputError, Stage};
pub use fetch::{FetchError, fetch_image};
pub use image::{Artifact, ImageConfig};
pub use log::{ChannelLog, LogEvent, LogLine, LogSink, LogStream, MemoryLog, NullLog};
pub use retry::RetryPolicy;
pub use source::{GitHubSource, GitRev, Source};
pub use store::{
    CaptainStore, LocalStore, ObjectStore, S3Config, S3Store, StoreError, TokenSource,
};
