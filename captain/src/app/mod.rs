//! The captain's operations, apart from HTTP (after omicron's
//! `nexus/src/app`): each takes its own request type and returns
//! [`AppError`]. The HTTP handlers (`crate::api`), the webhook and the
//! background tasks call them; nothing here knows about axum, status codes
//! or JSON bodies. `crate::error` maps [`AppError`] to the API's error
//! answers in one place.

pub mod access;
pub mod builds;
pub mod cluster;
pub mod deploy;
pub mod envs;
pub mod identity;
pub mod images;
pub mod logs;
pub mod nodes;
pub mod projects;
pub mod seal;
pub mod secrets;
pub mod validate;

use crate::db::DbError;
use crate::meta::MetaError;

/// Why an operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{what} {id:?} does not exist")]
    NotFound { what: &'static str, id: String },
    /// Not found, said another way.
    #[error("{0}")]
    NoSuch(String),
    /// The request is malformed or out of range.
    #[error("{0}")]
    BadRequest(String),
    /// A name that is not a DNS label (or a secret name that is not an
    /// environment variable name).
    #[error("{0}")]
    InvalidName(String),
    /// What would be committed breaks a rule of the meta repository.
    #[error("{0}")]
    InvalidRelease(String),
    /// It exists already, or the current state does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// A status may not move that way.
    #[error("{0}")]
    IllegalTransition(String),
    #[error("{0}")]
    Forbidden(String),
    /// The captain was not started with what this needs.
    #[error("{0}")]
    NotConfigured(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Db(#[from] DbError),
    /// Anything else that failed inside the captain.
    #[error("{context}")]
    Internal {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl AppError {
    pub fn not_found(what: &'static str, id: impl Into<String>) -> AppError {
        AppError::NotFound {
            what,
            id: id.into(),
        }
    }

    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> AppError {
        AppError::Internal {
            context: context.into(),
            source: source.into(),
        }
    }
}

pub type Result<T, E = AppError> = std::result::Result<T, E>;
