//! Object stores: where images live, keyed by content digest.
//!
//! [`LocalStore`] (a directory, the default) and [`S3Store`] (any
//! S3-compatible service through aws-sdk-s3) behind one [`ObjectStore`]
//! trait, plus [`CaptainStore`], a read-only view of the images a captain
//! serves (what a follower on another machine fetches from). Keys are
//! `/`-separated relative paths such as `images/<hex>/rootfs.ext4`.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

/// A stream of an object's bytes.
pub type ObjectStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// Errors of an object store. [`StoreError::is_transient`] tells whether a
/// retry may help (unreachable service, I/O faults such as a full disk).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{store}: object {key:?} not found")]
    NotFound { store: String, key: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("{store}: {op} {key:?}")]
    Io {
        store: String,
        op: &'static str,
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("{store}: {op} {key:?}: {message}")]
    Remote {
        store: String,
        op: &'static str,
        key: String,
        message: String,
        transient: bool,
    },
    #[error("S3 configuration: {0}")]
    Config(String),
    #[error("{store}: {op} {key:?}: this store is read-only")]
    ReadOnly {
        store: String,
        op: &'static str,
        key: String,
    },
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::NotFound { .. }
            | StoreError::InvalidKey { .. }
            | StoreError::Config(_)
            | StoreError::ReadOnly { .. } => false,
            StoreError::Io { source, .. } => !matches!(
                source.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData
            ),
            StoreError::Remote { transient, .. } => *transient,
        }
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// A content store for build artifacts. Implementations are safe to share
/// between tasks. Writes of one key are atomic: a reader sees the whole old
/// object, the whole new one, or none.
pub trait ObjectStore: Send + Sync {
    /// A short description for logs and errors (e.g. `local:/var/lib/x`, `s3://bucket`).
    fn describe(&self) -> String;
    /// Upload the file at `src` (streamed, never fully in memory).
    fn put_file<'a>(&'a self, key: &'a str, src: &'a Path)
    -> BoxFuture<'a, Result<(), StoreError>>;
    /// Upload a small object from memory.
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Read a whole (small) object into memory.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move {
            let mut stream = self.get_stream(key).await?;
            let mut out = Vec::new();
            while let Some(chunk) = stream.next().await {
                out.extend_from_slice(&chunk?);
            }
            Ok(Bytes::from(out))
        })
    }
    /// Stream an object (for large files).
    fn get_stream<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectStream, StoreError>>;
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Delete an object; deleting a missing object succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// All keys starting with `prefix`, sorted.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;
}

/// Check that `key` is a plain relative `/`-separated path.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.starts_with('/') || key.ends_with('/') {
        return bad("must not start or end with '/'");
    }
    if key.contains('\\') || key.contains('\0') {
        return bad("must not contain '\\' or NUL");
    }
    if key
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("empty, '.' or '..' path component");
    }
    Ok(())
}

// ---------------------------------------------------------------- local

/// A store in a local directory (the default).
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
    fn io(&self, op: &'static str, key: &str, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::NotFound && matches!(op, "get" | "open") {
            return StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            };
        }
        StoreError::Io {
            store: self.describe(),
            op,
            key: key.to_string(),
            source,
        }
    }
    fn tmp_path(&self, dest: &Path) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dest.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
    }
    async fn write_atomically(
        &self,
        key: &str,
        dest: &Path,
        src: WriteSource<'_>,
    ) -> Result<(), StoreError> {
        let parent = dest.parent().expect("key has a parent: the store root");
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| self.io("put", key, e))?;
        let tmp = self.tmp_path(dest);
        let result = async {
            match src {
                WriteSource::File(src) => {
                    tokio::fs::copy(src, &tmp).await?;
                    tokio::fs::File::open(&tmp).await?.sync_all().await?;
                }
                WriteSource::Bytes(data) => {
                    let mut f = tokio::fs::File::create(&tmp).await?;
                    f.write_all(&data).await?;
                    f.sync_all().await?;
                }
            }
            tokio::fs::rename(&tmp, dest).await
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(self.io("put", key, e));
        }
        Ok(())
    }
}

enum WriteSource<'a> {
    File(&'a Path),
    Bytes(Bytes),
}

impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    fn put_file<'a>(
        &'a self,
        key: &'a str,
        src: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let dest = self.path(key)?;
            self.write_atomically(key, &dest, WriteSource::File(src))
                .await
        })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let dest = self.path(key)?;
            self.write_atomically(key, &dest, WriteSource::Bytes(data))
                .await
        })
    }

    fn get_stream<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectStream, StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| self.io("get", key, e))?;
            let store = self.describe();
            let key = key.to_string();
            let stream =
                tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |r| {
                    r.map_err(|source| StoreError::Io {
                        store: store.clone(),
                        op: "read",
                        key: key.clone(),
                        source,
                    })
                });
            Ok(Box::pin(stream) as ObjectStream)
        })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::metadata(&path).await {
                Ok(m) => Ok(m.is_file()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // A missing key is only "absent" if the store itself is there.
                    match tokio::fs::metadata(&self.root).await {
                        Ok(_) => Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                        Err(e) => Err(self.io("exists", key, e)),
                    }
                }
                Err(e) => Err(self.io("exists", key, e)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.io("delete", key, e)),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let root = self.root.clone();
            let prefix_owned = prefix.to_string();
            let result = tokio::task::spawn_blocking(move || list_local(&root, &prefix_owned))
                .await
                .map_err(|e| StoreError::Io {
                    store: self.describe(),
                    op: "list",
                    key: prefix.to_string(),
                    source: io::Error::other(e),
                })?;
            result.map_err(|e| self.io("list", prefix, e))
        })
    }
}

fn list_local(root: &Path, prefix: &str) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                continue; // an upload in progress
            }
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = entry.file_type()?;
            if ft.is_dir() {
                // Only descend where the prefix can still match.
                let dir_key = format!("{key}/");
                if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                    stack.push((entry.path(), key));
                }
            } else if ft.is_file() && key.starts_with(prefix) {
                out.push(key);
            }
        }
    }
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------- S3

/// Configuration of an [`S3Store`].
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Custom endpoint such as `http://127.0.0.1:9000`; `None` means AWS.
    pub endpoint: Option<String>,
    /// Region, `us-east-1` by default.
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible servers.
    pub force_path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Key prefix inside the bucket (no leading or trailing `/`), e.g. `zeitwork`.
    pub prefix: Option<String>,
    /// Attempts made by the SDK itself for one operation before the error
    /// reaches the builder's [`crate::RetryPolicy`].
    pub sdk_max_attempts: u32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl S3Config {
    /// A configuration for `bucket`, with endpoint, region and credentials
    /// taken from the standard environment variables (`AWS_ENDPOINT_URL`,
    /// `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) when set.
    pub fn from_env(bucket: impl Into<String>) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            bucket: bucket.into(),
            endpoint: var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            force_path_style: true,
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            prefix: None,
            sdk_max_attempts: 2,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// A store in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Store {
    pub fn new(config: S3Config) -> Result<Self, StoreError> {
        if config.bucket.is_empty() {
            return Err(StoreError::Config("bucket name is empty".into()));
        }
        let (Some(access), Some(secret)) = (
            config.access_key_id.clone(),
            config.secret_access_key.clone(),
        ) else {
            return Err(StoreError::Config(
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or pass them in S3Config)".into(),
            ));
        };
        let creds = aws_credential_types::Credentials::new(
            access,
            secret,
            config.session_token.clone(),
            None,
            "zeitwork",
        );
        let timeouts = aws_smithy_types::timeout::TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .build();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(config.region.clone()))
            .credentials_provider(creds)
            .force_path_style(config.force_path_style)
            .timeout_config(timeouts)
            // Plain bodies with Content-Length, no aws-chunked CRC trailers:
            // S3-compatible servers differ in their support (moto returns
            // mismatching CRCs for multi-chunk uploads). Integrity is checked
            // end to end by sha256 instead (see `fetch_image`).
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .retry_config(
                aws_smithy_types::retry::RetryConfig::standard()
                    .with_max_attempts(config.sdk_max_attempts.max(1)),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        let prefix = match config.prefix.as_deref().map(|p| p.trim_matches('/')) {
            Some(p) if !p.is_empty() => format!("{p}/"),
            _ => String::new(),
        };
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(builder.build()),
            bucket: config.bucket,
            prefix,
        })
    }

    /// Create the bucket unless it exists already (setup and tests).
    pub async fn create_bucket_if_missing(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(self.remote("head_bucket", "", e)),
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.remote("create_bucket", "", e)),
        }
    }

    fn full_key(&self, key: &str) -> Result<String, StoreError> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    fn remote<E, R>(&self, op: &'static str, key: &str, err: SdkError<E, R>) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let status = status_of(&err);
        let transient = match &err {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => true,
            SdkError::ServiceError(_) => {
                matches!(status, Some(s) if s >= 500 || s == 429 || s == 408)
            }
            _ => false,
        };
        let detail = match (&err, err.code()) {
            (_, Some(code)) => format!("{code}: {}", err.message().unwrap_or("")),
            (SdkError::DispatchFailure(d), _) => format!("service unreachable: {d:?}"),
            _ => format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&err)
            ),
        };
        let message = match status {
            Some(s) => format!("HTTP {s}: {detail}"),
            None => detail,
        };
        StoreError::Remote {
            store: self.describe(),
            op,
            key: key.to_string(),
            message,
            transient,
        }
    }
}

/// Access to the HTTP status of a raw SDK response.
pub trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn status_of<E, R: HasStatus>(err: &SdkError<E, R>) -> Option<u16> {
    err.raw_response().map(HasStatus::status_code)
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn put_file<'a>(
        &'a self,
        key: &'a str,
        src: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let full = self.full_key(key)?;
            let body = ByteStream::from_path(src)
                .await
                .map_err(|e| StoreError::Io {
                    store: self.describe(),
                    op: "put (read source)",
                    key: key.to_string(),
                    source: io::Error::other(e),
                })?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(full)
                .body(body)
                .send()
                .await
                .map_err(|e| self.remote("put", key, e))?;
            Ok(())
        })
    }

    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let full = self.full_key(key)?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(full)
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| self.remote("put", key, e))?;
            Ok(())
        })
    }

    fn get_stream<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectStream, StoreError>> {
        Box::pin(async move {
            let full = self.full_key(key)?;
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(full)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) if status_of(&e) == Some(404) && e.code() != Some("NoSuchBucket") => {
                    return Err(StoreError::NotFound {
                        store: self.describe(),
                        key: key.to_string(),
                    });
                }
                Err(e) => return Err(self.remote("get", key, e)),
            };
            let store = self.describe();
            let key = key.to_string();
            let stream = futures::stream::unfold(Some(out.body), move |body| {
                let store = store.clone();
                let key = key.clone();
                async move {
                    let mut body = body?;
                    match body.next().await {
                        Some(Ok(b)) => Some((Ok(b), Some(body))),
                        Some(Err(e)) => Some((
                            Err(StoreError::Remote {
                                store,
                                op: "get (body)",
                                key,
                                message: aws_smithy_types::error::display::DisplayErrorContext(&e)
                                    .to_string(),
                                transient: true,
                            }),
                            None,
                        )),
                        None => None,
                    }
                }
            });
            Ok(Box::pin(stream) as ObjectStream)
        })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let full = self.full_key(key)?;
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(full)
                .send()
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if status_of(&e) == Some(404) => Ok(false),
                Err(e) => Err(self.remote("exists", key, e)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let full = self.full_key(key)?;
            match self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(full)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if status_of(&e) == Some(404) && e.code() != Some("NoSuchBucket") => Ok(()),
                Err(e) => Err(self.remote("delete", key, e)),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let full_prefix = format!("{}{prefix}", self.prefix);
            let mut keys = Vec::new();
            let mut token: Option<String> = None;
            // Bounded: at most 10_000 pages of 1000 keys.
            for _ in 0..10_000 {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| self.remote("list", prefix, e))?;
                for obj in out.contents() {
                    if let Some(rel) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                        keys.push(rel.to_string());
                    }
                }
                match out.next_continuation_token() {
                    Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            keys.sort();
            Ok(keys)
        })
    }
}

// ---------------------------------------------------------------- captain

/// The credential of each request to a captain, read at every request: a
/// follower's node token rotates at each registration.
pub type TokenSource = Arc<dyn Fn() -> String + Send + Sync>;

/// The images a captain serves, as a read-only store:
/// `images/<hex>/rootfs.ext4` is `GET {base}/v1/images/sha256:<hex>/download`
/// and `images/<hex>/config.json` the same with `?part=config` (node
/// access). Bodies are streamed. A 404 is [`StoreError::NotFound`]; an
/// unreachable captain, a 5xx, a 408/429 and a 401 (the token may have
/// rotated since it was read) are transient. Writes, deletes, listing and
/// any other key are refused: the captain's API serves downloads only.
#[derive(Clone)]
pub struct CaptainStore {
    base: String,
    token: TokenSource,
    http: reqwest::Client,
}

impl std::fmt::Debug for CaptainStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptainStore")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl CaptainStore {
    /// A store over the captain at `base_url` (`http://captain:7700`),
    /// sending `token()` as the bearer of every request. Connecting times
    /// out after 5 s and a body that stalls for 60 s fails; a download as
    /// such has no deadline (a rootfs may be large).
    pub fn new(base_url: &str, token: TokenSource) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build()
            .expect("a reqwest client with rustls builds");
        Self::with_client(base_url, token, http)
    }

    /// Same, with a client of the caller's (timeouts, proxies).
    pub fn with_client(base_url: &str, token: TokenSource, http: reqwest::Client) -> Self {
        CaptainStore {
            base: base_url.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    /// The download URL of an image object key.
    pub fn url_of(&self, key: &str) -> Result<String, StoreError> {
        validate_key(key)?;
        let bad = || StoreError::InvalidKey {
            key: key.to_string(),
            reason: "a captain serves only images/<hex>/rootfs.ext4 and images/<hex>/config.json",
        };
        let mut parts = key.split('/');
        let (Some("images"), Some(hex), Some(file), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let digest = format!("sha256:{hex}");
        if crate::image::digest_hex(&digest).is_none() {
            return Err(bad());
        }
        match file {
            "rootfs.ext4" => Ok(format!("{}/v1/images/{digest}/download", self.base)),
            "config.json" => Ok(format!(
                "{}/v1/images/{digest}/download?part=config",
                self.base
            )),
            _ => Err(bad()),
        }
    }

    fn read_only(&self, op: &'static str, key: &str) -> StoreError {
        StoreError::ReadOnly {
            store: self.describe(),
            op,
            key: key.to_string(),
        }
    }

    fn remote(&self, op: &'static str, key: &str, message: String, transient: bool) -> StoreError {
        StoreError::Remote {
            store: self.describe(),
            op,
            key: key.to_string(),
            message,
            transient,
        }
    }

    /// Sends `method` to the object's URL; a success is returned, anything
    /// else becomes the matching error.
    async fn send(
        &self,
        op: &'static str,
        method: reqwest::Method,
        key: &str,
    ) -> Result<reqwest::Response, StoreError> {
        let url = self.url_of(key)?;
        let resp = self
            .http
            .request(method, &url)
            .bearer_auth((self.token)())
            .send()
            .await
            .map_err(|e| self.remote(op, key, reqwest_chain(&e), true))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            });
        }
        let transient = status.is_server_error() || matches!(status.as_u16(), 401 | 408 | 429);
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.trim().chars().take(300).collect();
        Err(self.remote(op, key, format!("HTTP {status}: {body}"), transient))
    }
}

/// A reqwest error with its causes (its `Display` omits them, e.g.
/// "connection refused").
fn reqwest_chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

impl ObjectStore for CaptainStore {
    fn describe(&self) -> String {
        format!("captain:{}", self.base)
    }

    fn put_file<'a>(
        &'a self,
        key: &'a str,
        _src: &'a Path,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { Err(self.read_only("put", key)) })
    }

    fn put<'a>(&'a self, key: &'a str, _data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { Err(self.read_only("put", key)) })
    }

    fn get_stream<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<ObjectStream, StoreError>> {
        Box::pin(async move {
            let resp = self.send("get", reqwest::Method::GET, key).await?;
            let store = self.describe();
            let key = key.to_string();
            let stream = resp.bytes_stream().map(move |r| {
                r.map_err(|e| StoreError::Remote {
                    store: store.clone(),
                    op: "get (body)",
                    key: key.clone(),
                    message: reqwest_chain(&e),
                    transient: true,
                })
            });
            Ok(Box::pin(stream) as ObjectStream)
        })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            match self.send("exists", reqwest::Method::HEAD, key).await {
                Ok(_) => Ok(true),
                Err(e) if e.is_not_found() => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { Err(self.read_only("delete", key)) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move { Err(self.read_only("list", prefix)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("images/ab/rootfs.ext4").is_ok());
        for bad in ["", "/abs", "a/../b", "a//b", "a/./b", "dir/", "a\\b"] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn local_store_put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("store"));
        assert!(!store.exists("a/b.txt").await.unwrap());
        store
            .put("a/b.txt", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, vec![7u8; 1_000_000]).unwrap();
        store.put_file("a/c/big.bin", &src).await.unwrap();
        store.put("z.txt", Bytes::from_static(b"z")).await.unwrap();
        assert!(store.exists("a/b.txt").await.unwrap());
        assert_eq!(&store.get("a/b.txt").await.unwrap()[..], b"hello");
        assert_eq!(store.get("a/c/big.bin").await.unwrap().len(), 1_000_000);
        assert_eq!(
            store.list("a/").await.unwrap(),
            vec!["a/b.txt".to_string(), "a/c/big.bin".to_string()]
        );
        assert_eq!(store.list("").await.unwrap().len(), 3);
        store.delete("a/b.txt").await.unwrap();
        store.delete("a/b.txt").await.unwrap();
        assert!(!store.exists("a/b.txt").await.unwrap());
        assert!(store.get("a/b.txt").await.unwrap_err().is_not_found());
        assert!(matches!(
            store.put("../x", Bytes::new()).await,
            Err(StoreError::InvalidKey { .. })
        ));
    }

    #[tokio::test]
    async fn captain_store_maps_image_keys_and_refuses_writes() {
        let token: TokenSource = Arc::new(|| "t".to_string());
        let store = CaptainStore::new("http://captain:7700/", token);
        let hex = "ab".repeat(32);
        assert_eq!(
            store.url_of(&format!("images/{hex}/rootfs.ext4")).unwrap(),
            format!("http://captain:7700/v1/images/sha256:{hex}/download")
        );
        assert_eq!(
            store.url_of(&format!("images/{hex}/config.json")).unwrap(),
            format!("http://captain:7700/v1/images/sha256:{hex}/download?part=config")
        );
        for bad in [
            format!("sources/{hex}.tar.gz"),
            format!("images/{hex}/other"),
            format!("images/{hex}/rootfs.ext4/x"),
            "images/ABC/rootfs.ext4".to_string(),
            format!("images/{}/rootfs.ext4", "AB".repeat(32)),
        ] {
            assert!(
                matches!(store.url_of(&bad), Err(StoreError::InvalidKey { .. })),
                "{bad} accepted"
            );
        }
        let key = format!("images/{hex}/config.json");
        for err in [
            store.put(&key, Bytes::new()).await.unwrap_err(),
            store.put_file(&key, Path::new("/x")).await.unwrap_err(),
            store.delete(&key).await.unwrap_err(),
            store.list("images/").await.unwrap_err(),
        ] {
            assert!(matches!(err, StoreError::ReadOnly { .. }), "{err}");
            assert!(!err.is_transient());
            assert!(err.to_string().contains("read-only"), "{err}");
        }
    }
}
