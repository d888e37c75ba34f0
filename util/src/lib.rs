//! Small helpers every zeitwork crate uses, written once:
//!
//! - [`Sha256Digest`]: the one spelling of a content digest
//!   (`sha256:<64 lowercase hex>`), parsed with [`std::str::FromStr`].
//! - [`atomic_write`]: state on disk is written to a temporary file,
//!   fsynced, renamed over the old one and the directory fsynced, so a crash
//!   leaves either the old or the new content, never a mix.
//! - [`ErrorChain`]: an error with all its causes on one line, for logs and
//!   messages (a `Display` of ours never repeats its `#[source]`, so the
//!   chain is where the causes are printed).
//! - [`SecretFlags`]: a secret (a token) taken from `--x`, `--x-file` or
//!   the environment, with the warning for one given on the command line.

mod digest;
mod error;
mod fs;
mod secret;

pub use digest::{DigestError, Sha256Digest};
pub use error::{ErrorChain, error_chain};
pub use fs::atomic_write;
pub use secret::{SecretError, SecretFlags, SecretOrigin};
