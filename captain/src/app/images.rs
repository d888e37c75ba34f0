//! Built images: their rows, and their files in the object store.

use api_types::images::CreateImage;
use builder::store::ObjectStream;

use super::validate::{check_commit, check_digest, to_i64};
use super::{AppError, Result};
use crate::db::ImageRow;
use crate::state::AppState;

/// Record an image's metadata.
pub async fn create(st: &AppState, b: CreateImage) -> Result<ImageRow> {
    check_digest("digest", &b.digest)?;
    check_commit("source_commit", &b.source_commit)?;
    let row = ImageRow {
        id: meta_schema::new_id(),
        digest: b.digest,
        size_bytes: to_i64("size_bytes", b.size_bytes)?,
        source_commit: b.source_commit,
        created_at: meta_schema::now_millis(),
    };
    match st.db.insert_image(&row).await {
        Ok(()) => Ok(row),
        Err(e) if e.is_unique_violation() => Err(AppError::Conflict(format!(
            "image {} is recorded already",
            row.digest
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Which file of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The ext4 root filesystem.
    Rootfs,
    /// Its `config.json`.
    Config,
}

impl Part {
    pub fn parse(s: Option<&str>) -> Result<Part> {
        match s.unwrap_or("rootfs") {
            "rootfs" => Ok(Part::Rootfs),
            "config" => Ok(Part::Config),
            other => Err(AppError::BadRequest(format!(
                "part {other:?} is not rootfs or config"
            ))),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Part::Rootfs => "application/octet-stream",
            Part::Config => "application/json",
        }
    }
}

/// A file of image `id` (its id or digest) streamed from the object store.
pub async fn open(st: &AppState, id: &str, part: Part) -> Result<(ImageRow, ObjectStream)> {
    let store = st.config.image_store().ok_or_else(|| {
        AppError::NotConfigured("this captain has no object store to serve images from".into())
    })?;
    let img = st
        .db
        .image(id)
        .await?
        .ok_or_else(|| AppError::not_found("image", id))?;
    let hex = check_digest("image digest", &img.digest)?.hex();
    let key = match part {
        Part::Rootfs => builder::image::rootfs_key(&hex),
        Part::Config => builder::image::config_key(&hex),
    };
    match store.get_stream(&key).await {
        Ok(s) => Ok((img, s)),
        Err(e) if e.is_not_found() => Err(AppError::not_found(
            "image file",
            format!(
                "{key} (image {} is recorded but not in {})",
                img.digest,
                store.describe()
            ),
        )),
        Err(e) => Err(AppError::internal(
            format!("reading {key} from {}", store.describe()),
            e,
        )),
    }
}
