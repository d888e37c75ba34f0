//! Downloading and verifying an image (used by the follower).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::image::{ImageConfig, StoredConfig, config_key, digest_hex, rootfs_key};
use crate::store::{ObjectStore, StoreError};

/// Marker written once an image directory has been verified.
const VERIFIED_MARKER: &str = ".verified";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("malformed image digest {0:?}: expected sha256:<64 lowercase hex>")]
    InvalidDigest(String),
    #[error("fetching image {digest}")]
    Store {
        digest: String,
        #[source]
        source: StoreError,
    },
    #[error("image {digest} failed verification: {what}: expected {expected}, got {actual}")]
    Corrupt {
        digest: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("image {digest}: config.json is not valid: {message}")]
    BadConfig { digest: String, message: String },
    #[error("image cache {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FetchError {
    /// Whether a retry may help (store unreachable, a corrupt transfer, local I/O).
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Store { source, .. } => source.is_transient(),
            FetchError::Corrupt { .. } | FetchError::Io { .. } => true,
            FetchError::InvalidDigest(_) | FetchError::BadConfig { .. } => false,
        }
    }
}

/// Fetch image `digest` from `store` into `dest_dir/<hex>/` (`rootfs.ext4`
/// and `config.json`), verifying config.json against the digest and
/// rootfs.ext4 against the sha256 and size in config.json. A directory
/// verified before is reused without downloading. Returns that directory and
/// the image config.
pub async fn fetch_image(
    store: &dyn ObjectStore,
    digest: &str,
    dest_dir: &Path,
) -> Result<(PathBuf, ImageConfig), FetchError> {
    let hex = digest_hex(digest).ok_or_else(|| FetchError::InvalidDigest(digest.to_string()))?;
    let final_dir = dest_dir.join(hex);
    if let Some(config) = cached(&final_dir, digest).await {
        return Ok((final_dir, config));
    }
    let ioe = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    tokio::fs::create_dir_all(dest_dir)
        .await
        .map_err(ioe(dest_dir))?;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dest_dir.join(format!(
        ".{hex}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = download(store, digest, hex, &tmp).await;
    let stored = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(e);
        }
    };
    match tokio::fs::rename(&tmp, &final_dir).await {
        Ok(()) => {}
        Err(_) if cached(&final_dir, digest).await.is_some() => {
            // Another fetch of the same image finished first.
            let _ = tokio::fs::remove_dir_all(&tmp).await;
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(FetchError::Io {
                path: final_dir,
                source: e,
            });
        }
    }
    Ok((final_dir, stored.config))
}

async fn cached(dir: &Path, digest: &str) -> Option<ImageConfig> {
    tokio::fs::metadata(dir.join(VERIFIED_MARKER)).await.ok()?;
    let bytes = tokio::fs::read(dir.join("config.json")).await.ok()?;
    let stored: StoredConfig = serde_json::from_slice(&bytes).ok()?;
    if stored.digest() != digest {
        return None;
    }
    let len = tokio::fs::metadata(dir.join("rootfs.ext4"))
        .await
        .ok()?
        .len();
    (len == stored.config.rootfs_bytes).then_some(stored.config)
}

async fn download(
    store: &dyn ObjectStore,
    digest: &str,
    hex: &str,
    tmp: &Path,
) -> Result<StoredConfig, FetchError> {
    let serr = |source| FetchError::Store {
        digest: digest.to_string(),
        source,
    };
    let ioe = |path: PathBuf| move |source| FetchError::Io { path, source };
    tokio::fs::create_dir_all(tmp)
        .await
        .map_err(ioe(tmp.to_path_buf()))?;
    let config_bytes = store.get(&config_key(hex)).await.map_err(serr)?;
    let stored: StoredConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| FetchError::BadConfig {
            digest: digest.to_string(),
            message: e.to_string(),
        })?;
    let actual = stored.digest();
    if actual != digest {
        return Err(FetchError::Corrupt {
            digest: digest.to_string(),
            what: "config.json identity",
            expected: digest.to_string(),
            actual,
        });
    }
    let rootfs_path = tmp.join("rootfs.ext4");
    let mut file = tokio::fs::File::create(&rootfs_path)
        .await
        .map_err(ioe(rootfs_path.clone()))?;
    let mut stream = store.get_stream(&rootfs_key(hex)).await.map_err(serr)?;
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(serr)?;
        hasher.update(&chunk);
        len += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(ioe(rootfs_path.clone()))?;
    }
    file.sync_all().await.map_err(ioe(rootfs_path.clone()))?;
    drop(file);
    if len != stored.config.rootfs_bytes {
        return Err(FetchError::Corrupt {
            digest: digest.to_string(),
            what: "rootfs.ext4 size",
            expected: stored.config.rootfs_bytes.to_string(),
            actual: len.to_string(),
        });
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != stored.rootfs_sha256 {
        return Err(FetchError::Corrupt {
            digest: digest.to_string(),
            what: "rootfs.ext4 sha256",
            expected: stored.rootfs_sha256.clone(),
            actual,
        });
    }
    let cpath = tmp.join("config.json");
    tokio::fs::write(&cpath, &config_bytes)
        .await
        .map_err(ioe(cpath.clone()))?;
    let mpath = tmp.join(VERIFIED_MARKER);
    tokio::fs::write(&mpath, digest.as_bytes())
        .await
        .map_err(ioe(mpath.clone()))?;
    Ok(stored)
}
