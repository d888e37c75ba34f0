//! Error types of the builder.
//!
//! The central distinction is *whose fault* a failure is: the user's code and
//! input ([`BuildError::User`], [`BuildError::Input`]) fail a build at once,
//! a fault of the build infrastructure ([`BuildError::Infrastructure`]) may be
//! retried (see [`crate::retry::RetryPolicy`]).

use std::fmt;
use std::path::PathBuf;

use crate::store::StoreError;

/// Boxed error used as a `source` where the concrete type does not matter to callers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Who is to blame for a failed build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The user's source, Dockerfile or build input: retrying cannot help.
    User,
    /// The build machine, the backend or the object store: retrying may help.
    Infrastructure,
}

/// The stage of a build, used in progress reports and error context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Source,
    Build,
    Export,
    Filesystem,
    Upload,
    Fetch,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Source => "source",
            Stage::Build => "build",
            Stage::Export => "export",
            Stage::Filesystem => "filesystem",
            Stage::Upload => "upload",
            Stage::Fetch => "fetch",
        })
    }
}

/// Problems with what the user asked to build; never retried.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("source directory {0} does not exist or is not a directory")]
    SourceNotFound(PathBuf),
    #[error("no Dockerfile: {path} does not exist in the build context")]
    NoDockerfile { path: PathBuf },
    #[error("Dockerfile path {path:?} escapes the build context {context}")]
    DockerfileEscapesContext { path: PathBuf, context: PathBuf },
    #[error(
        "build context is too large: more than {limit} bytes (counted {counted} so far); raise the context limit or add a smaller context"
    )]
    ContextTooLarge { limit: u64, counted: u64 },
    #[error("git repository {url} is unreachable or could not be fetched: {message}")]
    GitUnreachable { url: String, message: String },
    #[error("git repository {url}: revision {rev} not found: {message}")]
    GitRevisionNotFound {
        url: String,
        rev: String,
        message: String,
    },
    #[error("invalid git URL {url:?}: {message}")]
    InvalidGitUrl { url: String, message: String },
    #[error("GitHub repository {owner}/{repo} at {reference}: {message}")]
    GitHub {
        owner: String,
        repo: String,
        reference: String,
        message: String,
    },
    #[error("invalid build argument {0:?}: expected KEY=VALUE")]
    InvalidBuildArg(String),
    #[error("unsafe path {path:?} in {what}")]
    UnsafePath { what: String, path: String },
    #[error(
        "link {entry:?} in {what} points to {target:?}, outside the build context (or at no file extracted before it); the archive is refused"
    )]
    UnsafeLink {
        what: String,
        entry: String,
        target: String,
    },
}

/// A failed build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Bad input (no Dockerfile, unreachable git URL, too large a context, ...).
    #[error("bad build input: {0}")]
    Input(InputError),
    /// The user's Dockerfile or code failed (parse error, a RUN step exited non-zero).
    #[error("build failed in the user's code: {message}{}", fmt_tail(log_tail))]
    User {
        message: String,
        log_tail: Vec<String>,
    },
    /// The build infrastructure failed (backend crashed, store unreachable, disk full).
    ///
    /// The cause is part of the message (not a `source()`), so that error
    /// chains do not print it twice; [`BuildError::cause`] gives access to it.
    #[error(
        "build infrastructure fault during {stage}: {message}{}{}",
        fmt_source(cause),
        fmt_tail(log_tail)
    )]
    Infrastructure {
        stage: Stage,
        message: String,
        /// Whether trying again may succeed.
        transient: bool,
        log_tail: Vec<String>,
        cause: Option<BoxError>,
    },
}

impl From<InputError> for BuildError {
    fn from(e: InputError) -> Self {
        BuildError::Input(e)
    }
}

fn fmt_tail(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(
            "\n--- last {} log lines ---\n{}",
            tail.len(),
            tail.join("\n")
        )
    }
}

/// `: <cause>: <its source>: ...` for the whole chain of `cause`.
fn fmt_source(cause: &Option<BoxError>) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = match cause {
        Some(e) => Some(e.as_ref()),
        None => None,
    };
    // Bounded: error chains are short; stop at 16 links regardless.
    for _ in 0..16 {
        let Some(e) = cur else { break };
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

impl BuildError {
    /// Whose fault the failure is.
    pub fn fault(&self) -> FaultKind {
        match self {
            BuildError::Input(_) | BuildError::User { .. } => FaultKind::User,
            BuildError::Infrastructure { .. } => FaultKind::Infrastructure,
        }
    }

    /// Whether a retry may succeed: only transient infrastructure faults.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BuildError::Infrastructure {
                transient: true,
                ..
            }
        )
    }

    /// The underlying error of an infrastructure fault (e.g. a [`StoreError`]).
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            BuildError::Infrastructure { cause, .. } => cause.as_deref(),
            _ => None,
        }
    }

    /// The last lines of the build log, if the failure carries them.
    pub fn log_tail(&self) -> &[String] {
        match self {
            BuildError::User { log_tail, .. } | BuildError::Infrastructure { log_tail, .. } => {
                log_tail
            }
            BuildError::Input(_) => &[],
        }
    }

    /// An infrastructure fault that may go away (retryable).
    pub fn infra(stage: Stage, message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        BuildError::Infrastructure {
            stage,
            message: message.into(),
            transient: true,
            log_tail: Vec::new(),
            cause: Some(source.into()),
        }
    }

    /// An infrastructure fault that retrying cannot fix (a missing tool, a bad configuration).
    pub fn infra_permanent(stage: Stage, message: impl Into<String>) -> Self {
        BuildError::Infrastructure {
            stage,
            message: message.into(),
            transient: false,
            log_tail: Vec::new(),
            cause: None,
        }
    }

    /// A store failure at `stage`; transient store faults are retryable.
    pub fn store(stage: Stage, err: StoreError) -> Self {
        let transient = err.is_transient();
        BuildError::Infrastructure {
            stage,
            message: "object store operation failed".into(),
            transient,
            log_tail: Vec::new(),
            cause: Some(Box::new(err)),
        }
    }
}
