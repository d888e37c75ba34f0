//! The [`Builder`]: source -> Dockerfile build -> OCI layers -> ext4 -> object store.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::backend::{BackendKind, BackendRequest, BuildBackend, select_backend};
use crate::error::{BuildError, InputError, Stage};
use crate::ext4::{Ext4Options, make_ext4};
use crate::image::{
    Artifact, FORMAT, ImageConfig, StoredConfig, config_key, digest_hex, image_digest, rootfs_key,
};
use crate::log::LogSink;
use crate::oci::{apply_image, read_layout};
use crate::retry::RetryPolicy;
use crate::source::{Source, materialize};
use crate::store::ObjectStore;

/// Default limit of a build context: 1 GiB.
pub const DEFAULT_MAX_CONTEXT_BYTES: u64 = 1 << 30;

/// How a [`Builder`] works.
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// Work directories and the backend's storage live here.
    pub data_dir: PathBuf,
    pub backend: BackendKind,
    pub retry: RetryPolicy,
    pub ext4: Ext4Options,
    /// Largest build context accepted, in bytes.
    pub max_context_bytes: u64,
}

impl BuilderConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            backend: BackendKind::Auto,
            retry: RetryPolicy::default(),
            ext4: Ext4Options::default(),
            max_context_bytes: DEFAULT_MAX_CONTEXT_BYTES,
        }
    }
}

/// Per-build options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// App name, used for the local image tag and log messages.
    pub app: Option<String>,
    /// Dockerfile path relative to the context (`Dockerfile` by default).
    pub dockerfile: PathBuf,
    pub build_args: Vec<(String, String)>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            app: None,
            dockerfile: PathBuf::from("Dockerfile"),
            build_args: Vec::new(),
        }
    }
}

/// Parse a `KEY=VALUE` build argument.
pub fn parse_build_arg(s: &str) -> Result<(String, String), InputError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(InputError::InvalidBuildArg(s.to_string())),
    }
}

/// Resolve `dockerfile` inside `context`; it must exist and must not leave
/// the context (lexically or through symlinks).
pub fn resolve_dockerfile(context: &Path, dockerfile: &Path) -> Result<PathBuf, InputError> {
    let escapes = || InputError::DockerfileEscapesContext {
        path: dockerfile.to_path_buf(),
        context: context.to_path_buf(),
    };
    let mut depth: i64 = 0;
    for c in dockerfile.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(escapes());
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(escapes()),
        }
    }
    let joined = context.join(dockerfile);
    let real = match joined.canonicalize() {
        Ok(p) => p,
        Err(_) => return Err(InputError::NoDockerfile { path: joined }),
    };
    let ctx = context
        .canonicalize()
        .map_err(|_| InputError::SourceNotFound(context.to_path_buf()))?;
    if !real.starts_with(&ctx) {
        return Err(escapes());
    }
    if !real.is_file() {
        return Err(InputError::NoDockerfile { path: joined });
    }
    Ok(real)
}

/// Builds images and stores them content-addressed. Cheap to share behind an `Arc`.
pub struct Builder {
    store: Arc<dyn ObjectStore>,
    backend: Box<dyn BuildBackend>,
    config: BuilderConfig,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("store", &self.store.describe())
            .field("backend", &self.backend.name())
            .field("config", &self.config)
            .finish()
    }
}

/// Removes a build's work directory when the build ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sanitize_tag(app: Option<&str>) -> String {
    let name: String = app
        .unwrap_or("image")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if name.is_empty() {
        "image".into()
    } else {
        name.chars().take(64).collect()
    }
}

async fn blocking<T: Send + 'static>(
    stage: Stage,
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BuildError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BuildError::infra(stage, what, e))
}

fn export_err(stage: Stage, what: &str, e: crate::oci::ExportError) -> BuildError {
    let transient = e.is_transient();
    BuildError::Infrastructure {
        stage,
        message: what.to_string(),
        transient,
        log_tail: Vec::new(),
        cause: Some(Box::new(e)),
    }
}

/// sha256 of a file as `sha256:<hex>`, and its size.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h)?;
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

impl Builder {
    /// A builder with the backend chosen by `config.backend`.
    pub async fn new(
        store: Arc<dyn ObjectStore>,
        config: BuilderConfig,
    ) -> Result<Self, BuildError> {
        let backend = select_backend(config.backend, &config.data_dir.join("buildah")).await?;
        Ok(Self::with_backend(store, backend, config))
    }

    /// A builder with an explicit backend.
    pub fn with_backend(
        store: Arc<dyn ObjectStore>,
        backend: Box<dyn BuildBackend>,
        config: BuilderConfig,
    ) -> Self {
        Self {
            store,
            backend,
            config,
        }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn config(&self) -> &BuilderConfig {
        &self.config
    }

    fn new_work_dir(&self) -> Result<WorkDir, BuildError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = self
            .config
            .data_dir
            .join("work")
            .join(format!("{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| {
            BuildError::infra(
                Stage::Source,
                format!("creating work directory {}", dir.display()),
                e,
            )
        })?;
        Ok(WorkDir(dir))
    }

    /// Build `source` and store the image. User faults fail at once;
    /// infrastructure faults of each step are retried per the retry policy.
    pub async fn build(
        &self,
        source: Source,
        opts: BuildOptions,
        log: &dyn LogSink,
    ) -> Result<Artifact, BuildError> {
        let retry = &self.config.retry;
        let work = self.new_work_dir()?;
        log.stage(Stage::Source);
        log.builder(format!("source: {source}"));
        let context = retry
            .run("source", log, |_| {
                materialize(&source, &work.0, self.config.max_context_bytes, log)
            })
            .await?;
        let dockerfile = resolve_dockerfile(&context, &opts.dockerfile)?;

        log.stage(Stage::Build);
        let n = work
            .0
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let req = BackendRequest {
            context_dir: context.clone(),
            dockerfile,
            build_args: opts.build_args.clone(),
            tag: format!(
                "localhost/zw-build/{}:{}",
                sanitize_tag(opts.app.as_deref()),
                n
            ),
            oci_dir: work.0.join("oci"),
        };
        log.builder(format!("building with {}", self.backend.name()));
        retry
            .run("build", log, |_| self.backend.build(&req, log))
            .await?;

        log.stage(Stage::Export);
        let oci_dir = req.oci_dir.clone();
        let image = blocking(Stage::Export, "reading the OCI layout", move || {
            read_layout(&oci_dir, Some("latest"))
        })
        .await?
        .map_err(|e| export_err(Stage::Export, "reading the built image", e))?;
        let digest = image_digest(FORMAT, &image.manifest_digest, &image.config);
        let hex = digest_hex(&digest)
            .expect("image_digest is well formed")
            .to_string();
        let (rkey, ckey) = (rootfs_key(&hex), config_key(&hex));
        log.builder(format!(
            "image {digest} (OCI manifest {})",
            image.manifest_digest
        ));

        let exists = retry
            .run("store lookup", log, |_| async {
                self.store
                    .exists(&ckey)
                    .await
                    .map_err(|e| BuildError::store(Stage::Upload, e))
            })
            .await?;
        if exists {
            match self.stored_config(&ckey, &digest, log).await? {
                Some(stored) => {
                    log.builder(format!(
                        "{digest} is already in {}: nothing to upload",
                        self.store.describe()
                    ));
                    return Ok(Artifact {
                        digest,
                        config: stored.config,
                        rootfs_sha256: stored.rootfs_sha256,
                        oci_manifest: stored.oci_manifest,
                        rootfs_key: rkey,
                        config_key: ckey,
                        uploaded: false,
                    });
                }
                None => log.builder(format!(
                    "stored config of {digest} is unusable: rebuilding the artifact"
                )),
            }
        }

        let rootfs_dir = work.0.join("rootfs");
        let ext4_path = work.0.join("rootfs.ext4");
        // Export and filesystem steps only touch local disk: a fault there
        // (disk full, I/O error) is retried from a clean tree.
        let (rootfs_sha256, rootfs_bytes) = retry
            .run("export", log, |_| {
                self.export(&image, &rootfs_dir, &ext4_path, &digest, log)
            })
            .await?;

        let config = ImageConfig {
            rootfs_bytes,
            ..image.config.clone()
        };
        let stored = StoredConfig {
            config: config.clone(),
            format: FORMAT.into(),
            oci_manifest: image.manifest_digest.clone(),
            rootfs_sha256: rootfs_sha256.clone(),
        };
        debug_assert_eq!(stored.digest(), digest);
        let config_json =
            Bytes::from(serde_json::to_vec_pretty(&stored).expect("config serializes"));

        log.stage(Stage::Upload);
        // rootfs first: config.json marks a complete artifact.
        retry
            .run("rootfs upload", log, |_| async {
                self.store
                    .put_file(&rkey, &ext4_path)
                    .await
                    .map_err(|e| BuildError::store(Stage::Upload, e))
            })
            .await?;
        retry
            .run("config upload", log, |_| async {
                self.store
                    .put(&ckey, config_json.clone())
                    .await
                    .map_err(|e| BuildError::store(Stage::Upload, e))
            })
            .await?;
        log.builder(format!("uploaded {digest} to {}", self.store.describe()));
        Ok(Artifact {
            digest,
            config,
            rootfs_sha256,
            oci_manifest: image.manifest_digest,
            rootfs_key: rkey,
            config_key: ckey,
            uploaded: true,
        })
    }

    /// Apply the layers of `image` to `rootfs_dir`, make `ext4_path` of it,
    /// and return the image's sha256 and size.
    async fn export(
        &self,
        image: &crate::oci::OciImage,
        rootfs_dir: &Path,
        ext4_path: &Path,
        digest: &str,
        log: &dyn LogSink,
    ) -> Result<(String, u64), BuildError> {
        log.stage(Stage::Export);
        let _ = tokio::fs::remove_dir_all(rootfs_dir).await;
        let (img2, root2) = (image.clone(), rootfs_dir.to_path_buf());
        let stats = blocking(Stage::Export, "applying layers", move || {
            apply_image(&img2, &root2)
        })
        .await?
        .map_err(|e| export_err(Stage::Export, "applying image layers", e))?;
        log.builder(format!(
            "applied {} layer(s): {} entries, {} whiteouts, {} opaque dirs, {} file bytes",
            stats.layers, stats.entries, stats.whiteouts, stats.opaque_dirs, stats.file_bytes
        ));

        log.stage(Stage::Filesystem);
        let (root3, out3, seed, opts3) = (
            rootfs_dir.to_path_buf(),
            ext4_path.to_path_buf(),
            digest.to_string(),
            self.config.ext4.clone(),
        );
        let fs_stats = blocking(Stage::Filesystem, "mkfs.ext4", move || {
            make_ext4(&root3, &out3, &seed, &opts3)
        })
        .await?
        .map_err(|e| export_err(Stage::Filesystem, "making the ext4 image", e))?;
        // The tree is in the image now; free the space before uploading.
        let _ = tokio::fs::remove_dir_all(rootfs_dir).await;
        let p2 = ext4_path.to_path_buf();
        let (sha, bytes) = blocking(Stage::Filesystem, "hashing rootfs", move || {
            sha256_file(&p2)
        })
        .await?
        .map_err(|e| BuildError::infra(Stage::Filesystem, "hashing rootfs.ext4", e))?;
        log.builder(format!(
            "rootfs.ext4: {bytes} bytes ({} bytes of content, {} inodes)",
            fs_stats.content_bytes, fs_stats.inodes
        ));
        Ok((sha, bytes))
    }

    /// The stored config of `digest`, or `None` if it is corrupt or belongs to another digest.
    async fn stored_config(
        &self,
        ckey: &str,
        digest: &str,
        log: &dyn LogSink,
    ) -> Result<Option<StoredConfig>, BuildError> {
        let bytes = self
            .config
            .retry
            .run("store read", log, |_| async {
                self.store
                    .get(ckey)
                    .await
                    .map_err(|e| BuildError::store(Stage::Upload, e))
            })
            .await?;
        Ok(serde_json::from_slice::<StoredConfig>(&bytes)
            .ok()
            .filter(|s| s.digest() == digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compile-time check: the captain can `tokio::spawn` builds and fetches.
    #[allow(dead_code)]
    fn futures_are_send(b: &Builder, log: &dyn LogSink, store: &dyn ObjectStore) {
        fn is_send<T: Send>(_: &T) {}
        is_send(&b.build(Source::Local(PathBuf::new()), BuildOptions::default(), log));
        is_send(&crate::fetch_image(store, "sha256:00", Path::new("/")));
    }

    #[test]
    fn build_args() {
        assert_eq!(
            parse_build_arg("A=b=c").unwrap(),
            ("A".into(), "b=c".into())
        );
        assert_eq!(parse_build_arg("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_build_arg("=x").is_err());
        assert!(parse_build_arg("novalue").is_err());
    }

    #[test]
    fn dockerfile_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("sub")).unwrap();
        std::fs::write(ctx.join("sub/Dockerfile.prod"), "FROM scratch\n").unwrap();
        std::fs::write(dir.path().join("Outside"), "FROM scratch\n").unwrap();
        std::os::unix::fs::symlink("../Outside", ctx.join("Link")).unwrap();
        assert!(resolve_dockerfile(&ctx, Path::new("sub/Dockerfile.prod")).is_ok());
        assert!(matches!(
            resolve_dockerfile(&ctx, Path::new("Dockerfile")),
            Err(InputError::NoDockerfile { .. })
        ));
        assert!(matches!(
            resolve_dockerfile(&ctx, Path::new("../Outside")),
            Err(InputError::DockerfileEscapesContext { .. })
        ));
        assert!(matches!(
            resolve_dockerfile(&ctx, Path::new("/etc/passwd")),
            Err(InputError::DockerfileEscapesContext { .. })
        ));
        assert!(matches!(
            resolve_dockerfile(&ctx, Path::new("Link")),
            Err(InputError::DockerfileEscapesContext { .. })
        ));
        assert!(matches!(
            resolve_dockerfile(&ctx, Path::new("sub")),
            Err(InputError::NoDockerfile { .. })
        ));
    }

    #[test]
    fn tags_are_sanitized() {
        assert_eq!(sanitize_tag(Some("My App!")), "my-app");
        assert_eq!(sanitize_tag(None), "image");
        assert_eq!(sanitize_tag(Some("///")), "image");
    }
}
