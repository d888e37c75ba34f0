//! Images: metadata, and the files followers download.

use api_types::images::{CreateImage, ImageView};
use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::json;
use crate::app::access;
use crate::app::images::{self, Part};
use crate::auth::Caller;
use crate::db::ImageRow;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;

impl From<ImageRow> for ImageView {
    fn from(x: ImageRow) -> Self {
        ImageView {
            id: x.id,
            digest: x.digest,
            size_bytes: x.size_bytes,
            source_commit: x.source_commit,
            created_at: x.created_at,
        }
    }
}

pub async fn list_images(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let rows = match &caller.user_id {
        _ if caller.is_admin() => st.db.images().await?,
        Some(u) => st.db.images_of_user(u).await?,
        None => Vec::new(),
    };
    let v: Vec<ImageView> = rows.into_iter().map(Into::into).collect();
    Ok(json(StatusCode::OK, v))
}

pub async fn create_image(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<CreateImage>,
) -> Result<Response, ApiError> {
    let row = images::create(&st, b).await?;
    Ok(json(StatusCode::CREATED, ImageView::from(row)))
}

pub async fn get_image(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let x = access::image(&st, &caller, &id).await?;
    Ok(json(StatusCode::OK, ImageView::from(x)))
}

pub async fn delete_image(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    if st.db.delete_image(&id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found("image", &id))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadQuery {
    /// `rootfs` (default: the ext4 image) or `config` (config.json).
    part: Option<String>,
}

/// `GET /v1/images/{id}/download`: streams the image's ext4 root
/// filesystem (or `?part=config`, its config.json) from the object store.
pub async fn download_image(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<DownloadQuery>,
) -> Result<Response, ApiError> {
    let part = Part::parse(q.part.as_deref())?;
    let img = access::image(&st, &caller, &id).await?;
    let (img, stream) = images::open(&st, &img.digest, part).await?;
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(part.content_type()),
    );
    if let Ok(v) = HeaderValue::from_str(&img.digest) {
        h.insert("X-Image-Digest", v);
    }
    Ok((h, Body::from_stream(stream)).into_response())
}
