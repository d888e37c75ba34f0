//! An app's secrets: names and recipients out, complete sets in (see
//! [`crate::app::secrets`]). Plaintext values pass through here only on
//! their way to being encrypted; no error ever quotes one.

use api_types::secrets::{SecretsView, SetSecrets};
use axum::Extension;
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use meta_schema::sops::Secrets;
use serde::Deserialize;

use super::json;
use crate::app::access;
use crate::app::secrets::{self, SecretsInfo};
use crate::auth::Caller;
use crate::error::{ApiError, ApiPath, ApiQuery, Code};
use crate::state::AppState;

impl From<SecretsInfo> for SecretsView {
    fn from(v: SecretsInfo) -> Self {
        SecretsView {
            app_id: v.app_id,
            env: v.env,
            app: v.app,
            names: v.names,
            path: v.path,
            recipients: v.recipients,
            env_recipients: v.env_recipients,
            stale: v.stale,
            release: v.release,
            commit: v.commit,
        }
    }
}

/// The request body of `PUT /v1/apps/{id}/secrets`, parsed without ever
/// quoting a value in an error.
pub struct SecretsBody(SetSecrets);

impl<S: Send + Sync> FromRequest<S> for SecretsBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
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
            .map_err(crate::error::bytes_rejection)?;
        if bytes.is_empty() {
            return Err(ApiError::new(
                Code::InvalidJson,
                "request body is empty; expected {\"secrets\": {\"NAME\": \"value\", ...}}",
            ));
        }
        serde_json::from_slice(&bytes).map(SecretsBody).map_err(|e| {
            use serde_json::error::Category;
            let at = format!("line {} column {}", e.line(), e.column());
            match e.classify() {
                Category::Syntax | Category::Eof | Category::Io => {
                    ApiError::new(Code::InvalidJson, format!("malformed JSON at {at}"))
                }
                // Top-level keys only (`secrets` is a map): no value.
                Category::Data if e.to_string().starts_with("unknown field") => {
                    ApiError::new(Code::UnknownField, e.to_string())
                }
                Category::Data => ApiError::bad_request(format!(
                    "invalid request body at {at}: expected {{\"secrets\": {{\"NAME\": \"string value\", ...}}, \"unset\": [\"NAME\", ...]}} (values are not quoted back)"
                )),
            }
        })
    }
}

/// The query of `PUT /v1/apps/{id}/secrets/file`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    /// The meta commit whose secrets file was re-encrypted: refused (409)
    /// when the file at the head is no longer that one (a set written
    /// meanwhile must not be replaced by older values).
    #[serde(default)]
    pub base: Option<String>,
}

/// The body of `PUT /v1/apps/{id}/secrets/file`: a sops YAML file.
pub struct SopsBody(String);

impl<S: Send + Sync> FromRequest<S> for SopsBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes::Bytes::from_request(req, state)
            .await
            .map_err(crate::error::bytes_rejection)?;
        String::from_utf8(bytes.to_vec())
            .map(SopsBody)
            .map_err(|_| ApiError::bad_request("the body is not UTF-8: expected a sops YAML file"))
    }
}

/// `GET /v1/apps/{id}/secrets`: names and recipients, never values.
pub async fn get_secrets(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let a = access::app(&st, &caller, &id).await?;
    let v = secrets::get(&st, &a.id).await?;
    Ok(json(StatusCode::OK, SecretsView::from(v)))
}

/// `PUT /v1/apps/{id}/secrets`: encrypt the complete set to the env's
/// recipients; one commit replaces the file and adds a release using it.
pub async fn put_secrets(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    SecretsBody(body): SecretsBody,
) -> Result<Response, ApiError> {
    let SetSecrets {
        secrets: set,
        unset,
    } = body;
    let a = access::app(&st, &caller, &id).await?;
    let v = secrets::put(
        &st,
        &a.id,
        secrets::SetSecrets {
            secrets: Secrets::from(set),
            unset,
        },
    )
    .await?;
    Ok(json(StatusCode::OK, SecretsView::from(v)))
}

/// `PUT /v1/apps/{id}/secrets/file`: a node's re-encryption of the app's
/// secrets file (see [`crate::app::secrets::put_file`]).
pub async fn put_secrets_file(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
    SopsBody(yaml): SopsBody,
) -> Result<Response, ApiError> {
    let v = secrets::put_file(&st, &caller, &id, q.base, yaml).await?;
    Ok(json(StatusCode::OK, SecretsView::from(v)))
}
