//! One JSON shape for every error the API returns:
//! `{"error": {"code": "...", "message": "..."}}`, with stable codes, and
//! the extractors that turn every client mistake into a 4xx of that shape.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use api_types::error::{ErrorBody, ErrorDetail};

use crate::app::AppError;
use crate::db::DbError;
use crate::meta::MetaError;

/// Stable error codes of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    BadRequest,
    InvalidJson,
    UnknownField,
    InvalidName,
    UnsupportedMediaType,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    IllegalTransition,
    InvalidRelease,
    InvalidSignature,
    NotConfigured,
    GithubOauthNotConfigured,
    Waitlisted,
    RateLimited,
    Internal,
}

impl Code {
    /// Every code, in declaration order.
    pub const ALL: [Code; 19] = [
        Code::BadRequest,
        Code::InvalidJson,
        Code::UnknownField,
        Code::InvalidName,
        Code::UnsupportedMediaType,
        Code::Unauthorized,
        Code::Forbidden,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::Conflict,
        Code::PayloadTooLarge,
        Code::IllegalTransition,
        Code::InvalidRelease,
        Code::InvalidSignature,
        Code::NotConfigured,
        Code::GithubOauthNotConfigured,
        Code::Waitlisted,
        Code::RateLimited,
        Code::Internal,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            Code::BadRequest | Code::InvalidJson | Code::UnknownField | Code::InvalidName => {
                StatusCode::BAD_REQUEST
            }
            Code::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::Unauthorized | Code::InvalidSignature => StatusCode::UNAUTHORIZED,
            Code::Forbidden | Code::Waitlisted => StatusCode::FORBIDDEN,
            Code::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::Conflict | Code::IllegalTransition => StatusCode::CONFLICT,
            Code::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::InvalidRelease => StatusCode::UNPROCESSABLE_ENTITY,
            // A feature this captain was not started with is absent, not
            // unavailable: retrying will not help (not a 503), and nothing in the
            // request could make it work (not a 400 or 409). See ARCHITECTURE.md.
            Code::NotConfigured | Code::GithubOauthNotConfigured => StatusCode::NOT_FOUND,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::InvalidJson => "invalid_json",
            Code::UnknownField => "unknown_field",
            Code::InvalidName => "invalid_name",
            Code::UnsupportedMediaType => "unsupported_media_type",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::Conflict => "conflict",
            Code::PayloadTooLarge => "payload_too_large",
            Code::IllegalTransition => "illegal_transition",
            Code::InvalidRelease => "invalid_release",
            Code::InvalidSignature => "invalid_signature",
            Code::NotConfigured => "not_configured",
            Code::GithubOauthNotConfigured => "github_oauth_not_configured",
            Code::Waitlisted => "waitlisted",
            Code::RateLimited => "rate_limited",
            Code::Internal => "internal",
        }
    }
}

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: Code,
    pub message: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(Code::NotFound, format!("{what} {id:?} does not exist"))
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Code::BadRequest, message)
    }
    pub fn internal(context: &str, err: &dyn std::error::Error) -> Self {
        let msg = format!("{context}: {}", zw_util::ErrorChain(err));
        tracing::error!(error = %msg, "internal error");
        Self::new(Code::Internal, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_string(),
                message: self.message,
            },
        };
        (self.code.status(), axum::Json(body)).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        ApiError::internal("database", &e)
    }
}

/// The one mapping of the meta repository's errors: a change that would
/// make the repository invalid is the caller's (422), one that exists
/// already a conflict, the rest the captain's.
impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        use meta_schema::repo::RepoError;
        match e.repo_error() {
            Some(RepoError::Invalid(v)) => ApiError::new(Code::InvalidRelease, v.to_string()),
            Some(RepoError::AlreadyExists { path }) => ApiError::new(
                Code::Conflict,
                format!("{path} exists in the meta repository"),
            ),
            _ => ApiError::internal("meta repository", &e),
        }
    }
}

/// The one mapping of the operations' errors to the API's.
impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        let code = match &e {
            AppError::NotFound { .. } | AppError::NoSuch(_) => Code::NotFound,
            AppError::BadRequest(_) => Code::BadRequest,
            AppError::InvalidName(_) => Code::InvalidName,
            AppError::InvalidRelease(_) => Code::InvalidRelease,
            AppError::Conflict(_) => Code::Conflict,
            AppError::IllegalTransition(_) => Code::IllegalTransition,
            AppError::Forbidden(_) => Code::Forbidden,
            AppError::NotConfigured(_) => Code::NotConfigured,
            AppError::TooLarge(_) => Code::PayloadTooLarge,
            AppError::UnsupportedMediaType(_) => Code::UnsupportedMediaType,
            AppError::Meta(_) => {
                let AppError::Meta(m) = e else { unreachable!() };
                return m.into();
            }
            AppError::Db(_) | AppError::Internal { .. } => {
                let msg = zw_util::error_chain(&e);
                tracing::error!(error = %msg, "internal error");
                return ApiError::new(Code::Internal, msg);
            }
        };
        ApiError::new(code, e.to_string())
    }
}

/// A JSON request body: 413 payload_too_large over the body limit, 415 for
/// a non-JSON content type, 400 invalid_json / unknown_field / bad_request
/// for bodies that do not parse into `T`. Never a 500.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if mime != "application/json" && !mime.ends_with("+json") {
                return Err(ApiError::new(
                    Code::UnsupportedMediaType,
                    format!("expected Content-Type: application/json, got {ct:?}"),
                ));
            }
        }
        let bytes = bytes::Bytes::from_request(req, state)
            .await
            .map_err(bytes_rejection)?;
        parse_json(&bytes).map(ApiJson)
    }
}

pub fn bytes_rejection(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            Code::PayloadTooLarge,
            "request body is larger than the limit of 1 MiB",
        )
    } else {
        ApiError::bad_request(format!("could not read the request body: {r}"))
    }
}

/// Parse a JSON body into `T`, classifying serde's errors.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::new(
            Code::InvalidJson,
            "request body is empty; expected a JSON object",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let msg = e.to_string();
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::new(Code::InvalidJson, format!("malformed JSON: {msg}"))
            }
            Category::Data if msg.starts_with("unknown field") => {
                ApiError::new(Code::UnknownField, msg)
            }
            Category::Data => ApiError::bad_request(format!("invalid request body: {msg}")),
        }
    })
}

/// Query string parameters, 400 bad_request when they do not parse.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::bad_request(format!("invalid query string: {}", e.body_text()))
            })
    }
}

/// A path parameter, 400 bad_request when it does not parse.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| {
                ApiError::bad_request(format!("invalid path: {}", e.body_text()))
            })
    }
}

/// Fallback for unknown routes.
pub async fn not_found_fallback(uri: axum::http::Uri) -> ApiError {
    ApiError::new(Code::NotFound, format!("no route for {}", uri.path()))
}

/// Fallback for a known route called with the wrong method.
pub async fn method_not_allowed_fallback(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    ApiError::new(
        Code::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
