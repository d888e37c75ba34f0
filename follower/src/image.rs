//! Where instance images come from. An image is a directory holding
//! `rootfs.ext4` and `config.json`, keyed by its content digest
//! (`sha256:<hex>`); the object store layout is `images/<hex>/rootfs.ext4`
//! and `images/<hex>/config.json`, as the builder writes it.
//!
//! [`ImageSource`] is the reconciler's only way to get one, so the reconcile
//! loop is testable without a store. [`LocalDirImageSource`] uses a local
//! store directory in place (one machine, `zw up`, tests);
//! [`StoreImageSource`] downloads from any builder object store into the
//! node's image cache, verifying every byte (`builder::fetch_image`): over
//! the captain's API ([`builder::CaptainStore`]) it is the default of a
//! node with a captain.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image digest {0:?} is not of the form sha256:<64 hex digits>")]
    BadDigest(String),
    #[error("image {digest} is not in the store ({path} is missing)")]
    NotFound { digest: String, path: PathBuf },
    #[error("image {digest}: config {path} is unreadable")]
    BadConfig {
        digest: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("image {digest}: rootfs {path} is not an ext4 filesystem: {reason}")]
    BadRootfs {
        digest: String,
        path: PathBuf,
        reason: String,
    },
    #[error("image {digest}: downloading it into the image cache")]
    Fetch {
        digest: String,
        #[source]
        source: Box<builder::FetchError>,
    },
    #[error("image {digest}: reading {path}")]
    Io {
        digest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The runtime part of an OCI image config, as the builder records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Environment; accepted as OCI `["K=V", ...]` or as a map.
    #[serde(default, deserialize_with = "de_env")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: String,
    #[serde(default)]
    pub user: String,
    /// Accepted as numbers or OCI `"8080/tcp"` strings.
    #[serde(default, deserialize_with = "de_ports")]
    pub exposed_ports: Vec<u16>,
    #[serde(default)]
    pub rootfs_bytes: u64,
}

fn de_env<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Env {
        List(Vec<String>),
        Map(BTreeMap<String, String>),
    }
    Ok(match Option::<Env>::deserialize(d)? {
        None => BTreeMap::new(),
        Some(Env::Map(m)) => m,
        Some(Env::List(l)) => l
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv, String::new()),
            })
            .collect(),
    })
}

fn de_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        N(u16),
        S(String),
    }
    let ports = Option::<Vec<Port>>::deserialize(d)?.unwrap_or_default();
    ports
        .into_iter()
        .map(|p| match p {
            Port::N(n) => Ok(n),
            Port::S(s) => s
                .split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("bad exposed port {s:?}"))),
        })
        .collect()
}

/// An image ready to boot.
#[derive(Debug, Clone)]
pub struct FetchedImage {
    /// Directory with `rootfs.ext4` and `config.json`.
    pub dir: PathBuf,
    pub config: ImageConfig,
}

/// A place images are fetched from.
pub trait ImageSource: Send + Sync + 'static {
    /// Makes the image `digest` available under `cache_dir` (or returns a
    /// directory that already holds it, immutable) and reads its config.
    fn fetch<'a>(
        &'a self,
        digest: &'a str,
        cache_dir: &'a Path,
    ) -> BoxFuture<'a, Result<FetchedImage, ImageError>>;
}

/// The hex part of a `sha256:<hex>` digest, refusing anything that could
/// escape a directory.
pub fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(ImageError::BadDigest(digest.to_string()))
    }
}

/// A local directory with the object store's layout (`images/<hex>/...`):
/// the default store of a single machine, and of tests. Images are
/// content-addressed and immutable, so they are used in place.
#[derive(Debug, Clone)]
pub struct LocalDirImageSource {
    pub root: PathBuf,
}

impl LocalDirImageSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDirImageSource { root: root.into() }
    }

    /// Directory an image with this digest lives in.
    pub fn image_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("images").join(digest_hex(digest)?))
    }
}

impl ImageSource for LocalDirImageSource {
    fn fetch<'a>(
        &'a self,
        digest: &'a str,
        _cache_dir: &'a Path,
    ) -> BoxFuture<'a, Result<FetchedImage, ImageError>> {
        Box::pin(async move {
            let dir = self.image_dir(digest)?;
            let digest = digest.to_string();
            tokio::task::spawn_blocking(move || load_image_dir(&digest, dir))
                .await
                .expect("image check does not panic")
        })
    }
}

/// Images from an object store (by default the captain's image API),
/// downloaded into the node's image cache (`cache_dir/<hex>/`) and verified
/// there: config.json against the digest, rootfs.ext4 against the size and
/// sha256 it records. An image verified before is used from the cache
/// without asking the store.
pub struct StoreImageSource {
    store: Arc<dyn builder::ObjectStore>,
}

impl StoreImageSource {
    pub fn new(store: Arc<dyn builder::ObjectStore>) -> Self {
        StoreImageSource { store }
    }

    /// Images from the captain at `base_url`, asked with `token()` (the
    /// node token of the current registration, read at every request).
    pub fn captain(base_url: &str, token: builder::TokenSource) -> Self {
        Self::new(Arc::new(builder::CaptainStore::new(base_url, token)))
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }
}

impl ImageSource for StoreImageSource {
    fn fetch<'a>(
        &'a self,
        digest: &'a str,
        cache_dir: &'a Path,
    ) -> BoxFuture<'a, Result<FetchedImage, ImageError>> {
        Box::pin(async move {
            let hex = digest_hex(digest)?;
            // The builder's digests always carry their algorithm.
            let digest = format!("sha256:{}", hex.to_ascii_lowercase());
            let (dir, _) = builder::fetch_image(self.store.as_ref(), &digest, cache_dir)
                .await
                .map_err(|source| ImageError::Fetch {
                    digest: digest.clone(),
                    source: Box::new(source),
                })?;
            tokio::task::spawn_blocking(move || load_image_dir(&digest, dir))
                .await
                .expect("image check does not panic")
        })
    }
}

/// Images from whichever of several captains answers: each is asked in the
/// order of [`edge::member::Captains`] (the one that answered last first)
/// until one has the image.
pub struct CaptainsImageSource {
    captains: Arc<edge::member::Captains>,
    sources: Vec<(String, StoreImageSource)>,
}

impl CaptainsImageSource {
    pub fn new(captains: Arc<edge::member::Captains>, token: builder::TokenSource) -> Self {
        let sources = captains
            .all()
            .iter()
            .map(|c| (c.clone(), StoreImageSource::captain(c, token.clone())))
            .collect();
        CaptainsImageSource { captains, sources }
    }

    pub fn describe(&self) -> String {
        let all: Vec<_> = self.sources.iter().map(|(_, s)| s.describe()).collect();
        all.join(", ")
    }
}

impl ImageSource for CaptainsImageSource {
    fn fetch<'a>(
        &'a self,
        digest: &'a str,
        cache_dir: &'a Path,
    ) -> BoxFuture<'a, Result<FetchedImage, ImageError>> {
        Box::pin(async move {
            let mut last = None;
            for url in self.captains.in_order() {
                let Some((_, source)) = self.sources.iter().find(|(c, _)| *c == url) else {
                    continue;
                };
                match source.fetch(digest, cache_dir).await {
                    Ok(img) => return Ok(img),
                    Err(e) => {
                        tracing::warn!(captain = %url, error = %zw_util::ErrorChain(&e), "image not fetched from this captain");
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or_else(|| ImageError::NotFound {
                digest: digest.to_string(),
                path: PathBuf::new(),
            }))
        })
    }
}

/// Checks an image directory (config parses, rootfs carries the ext4 magic)
/// and reads its config.
pub fn load_image_dir(digest: &str, dir: PathBuf) -> Result<FetchedImage, ImageError> {
    let config_path = dir.join("config.json");
    let rootfs = dir.join("rootfs.ext4");
    for p in [&config_path, &rootfs] {
        if !p.is_file() {
            return Err(ImageError::NotFound {
                digest: digest.to_string(),
                path: p.clone(),
            });
        }
    }
    let io = |path: &Path| {
        let (digest, path) = (digest.to_string(), path.to_path_buf());
        move |source| ImageError::Io {
            digest,
            path,
            source,
        }
    };
    let bytes = std::fs::read(&config_path).map_err(io(&config_path))?;
    let config: ImageConfig =
        serde_json::from_slice(&bytes).map_err(|source| ImageError::BadConfig {
            digest: digest.to_string(),
            path: config_path.clone(),
            source,
        })?;
    check_ext4(&rootfs).map_err(|reason| ImageError::BadRootfs {
        digest: digest.to_string(),
        path: rootfs.clone(),
        reason,
    })?;
    Ok(FetchedImage { dir, config })
}

/// The ext4 superblock starts at byte 1024; its magic 0xEF53 is at 0x38.
fn check_ext4(path: &Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    f.seek(SeekFrom::Start(1024 + 0x38))
        .map_err(|e| e.to_string())?;
    let mut magic = [0u8; 2];
    f.read_exact(&mut magic)
        .map_err(|_| "file too short".to_string())?;
    if u16::from_le_bytes(magic) == 0xEF53 {
        Ok(())
    } else {
        Err(format!(
            "bad superblock magic {:#06x}",
            u16::from_le_bytes(magic)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_accepts_oci_and_map_forms() {
        let c: ImageConfig = serde_json::from_str(
            r#"{"entrypoint":["/bin/busybox"],"cmd":["httpd"],"env":["PATH=/bin","A=b=c"],
                "workdir":"/www","user":"nobody","exposed_ports":["8080/tcp", 9000],"rootfs_bytes":5}"#,
        )
        .unwrap();
        assert_eq!(c.env.get("A").map(String::as_str), Some("b=c"));
        assert_eq!(c.exposed_ports, vec![8080, 9000]);
        let m: ImageConfig = serde_json::from_str(r#"{"env":{"K":"v"}}"#).unwrap();
        assert_eq!(m.env.get("K").map(String::as_str), Some("v"));
    }

    #[test]
    fn digests_cannot_escape() {
        assert!(digest_hex("sha256:../../etc").is_err());
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
