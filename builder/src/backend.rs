//! Dockerfile build backends: `buildah` (daemonless) and `docker` (when an
//! engine answers). A backend builds a context and writes the image as an
//! OCI layout directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::error::{BuildError, Stage};
use crate::log::{LogLine, LogSink, LogStream, TailLog};
use crate::tools::find_tool;

/// Number of log lines kept for error messages.
pub const LOG_TAIL_LINES: usize = 30;

/// What to build.
#[derive(Debug, Clone)]
pub struct BackendRequest {
    /// The build context directory.
    pub context_dir: PathBuf,
    /// The Dockerfile (inside the context).
    pub dockerfile: PathBuf,
    pub build_args: Vec<(String, String)>,
    /// Local image name to tag the result with.
    pub tag: String,
    /// Where to write the OCI layout (must not exist yet).
    pub oci_dir: PathBuf,
}

/// A Dockerfile build backend. Errors say whose fault a failure is: a
/// failing Dockerfile step is [`BuildError::User`] with the log tail, a
/// crashed or unusable backend is [`BuildError::Infrastructure`].
pub trait BuildBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Build `req` and write the image to `req.oci_dir` as an OCI layout
    /// whose manifest is tagged `latest`.
    fn build<'a>(
        &'a self,
        req: &'a BackendRequest,
        log: &'a dyn LogSink,
    ) -> BoxFuture<'a, Result<(), BuildError>>;
}

/// Run `cmd`, stream its output lines to `log`, return its exit status.
async fn run_logged(
    mut cmd: Command,
    tool: &str,
    stage: Stage,
    log: &TailLog<'_>,
) -> Result<std::process::ExitStatus, BuildError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| BuildError::infra(stage, format!("could not start {tool}"), e))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (status, (), ()) = tokio::join!(
        child.wait(),
        pump(stdout, LogStream::Stdout, log),
        pump(stderr, LogStream::Stderr, log)
    );
    status.map_err(|e| BuildError::infra(stage, format!("waiting for {tool}"), e))
}

async fn pump(r: impl AsyncRead + Unpin, stream: LogStream, log: &TailLog<'_>) {
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    // Bounded by the child's output; ends at EOF or on a read error.
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                log.line(LogLine { stream, text });
            }
        }
    }
}

/// Classify a failed backend run from its status and log tail.
fn classify(
    tool: &str,
    step: &str,
    status: std::process::ExitStatus,
    tail: Vec<String>,
    user_markers: &[&str],
) -> BuildError {
    use std::os::unix::process::ExitStatusExt;
    let text = tail.join("\n");
    let lower = text.to_lowercase();
    if let Some(sig) = status.signal() {
        return BuildError::Infrastructure {
            stage: Stage::Build,
            message: format!("{tool} {step} was killed by signal {sig} (backend crashed)"),
            transient: true,
            log_tail: tail,
            cause: None,
        };
    }
    if lower.contains("no space left on device") || lower.contains("disk quota exceeded") {
        return BuildError::Infrastructure {
            stage: Stage::Build,
            message: format!("{tool} {step} ran out of disk space ({status})"),
            transient: true,
            log_tail: tail,
            cause: None,
        };
    }
    if user_markers.iter().any(|m| text.contains(m)) {
        let message = tail
            .iter()
            .rev()
            .find(|l| user_markers.iter().any(|m| l.contains(m)))
            .cloned()
            .unwrap_or_else(|| format!("{tool} {step} failed ({status})"));
        return BuildError::User {
            message,
            log_tail: tail,
        };
    }
    BuildError::Infrastructure {
        stage: Stage::Build,
        message: format!("{tool} {step} failed ({status})"),
        transient: true,
        log_tail: tail,
        cause: None,
    }
}

// ---------------------------------------------------------------- buildah

/// Daemonless builds with `buildah bud --isolation chroot --storage-driver vfs`,
/// with its own storage under a data directory (no global state), and
/// `--timestamp 0` so that the same input gives the same image digest.
#[derive(Debug, Clone)]
pub struct BuildahBackend {
    binary: PathBuf,
    storage_root: PathBuf,
    run_root: PathBuf,
}

impl BuildahBackend {
    /// A backend keeping its storage under `state_dir`.
    pub fn new(state_dir: &Path) -> Result<Self, BuildError> {
        let binary = find_tool("buildah").ok_or_else(|| {
            BuildError::infra_permanent(
                Stage::Build,
                "buildah is not installed (Debian: apt-get install buildah)",
            )
        })?;
        Ok(Self {
            binary,
            storage_root: state_dir.join("storage"),
            run_root: state_dir.join("run"),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.storage_root)
            .arg("--runroot")
            .arg(&self.run_root)
            .arg("--storage-driver")
            .arg("vfs")
            .env("BUILDAH_ISOLATION", "chroot")
            .env("LC_ALL", "C");
        cmd
    }

    const USER_MARKERS: &'static [&'static str] = &[
        "building at STEP",
        "error parsing",
        "Dockerfile parse error",
        "unknown instruction",
    ];
}

impl BuildBackend for BuildahBackend {
    fn name(&self) -> &'static str {
        "buildah"
    }

    fn build<'a>(
        &'a self,
        req: &'a BackendRequest,
        log: &'a dyn LogSink,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            let tail = TailLog::new(log, LOG_TAIL_LINES);
            let mut cmd = self.command();
            cmd.arg("bud")
                .args([
                    "--isolation",
                    "chroot",
                    "--timestamp",
                    "0",
                    "--layers",
                    "--format",
                    "oci",
                ])
                .arg("-f")
                .arg(&req.dockerfile)
                .arg("-t")
                .arg(&req.tag);
            for (k, v) in &req.build_args {
                cmd.arg("--build-arg").arg(format!("{k}={v}"));
            }
            cmd.arg(&req.context_dir);
            let status = run_logged(cmd, "buildah", Stage::Build, &tail).await?;
            if !status.success() {
                return Err(classify(
                    "buildah",
                    "bud",
                    status,
                    tail.tail(),
                    Self::USER_MARKERS,
                ));
            }

            let _ = tokio::fs::remove_dir_all(&req.oci_dir).await;
            let mut push = self.command();
            push.arg("push")
                .arg("--quiet")
                .arg(&req.tag)
                .arg(format!("oci:{}:latest", req.oci_dir.display()));
            let status = run_logged(push, "buildah", Stage::Export, &tail).await?;
            // Drop the tag; the layer cache (--layers) stays for the next build.
            let mut rmi = self.command();
            rmi.arg("rmi").arg(&req.tag);
            let _ = run_logged(
                rmi,
                "buildah",
                Stage::Export,
                &TailLog::new(&crate::log::NullLog, 1),
            )
            .await;
            if !status.success() {
                return Err(BuildError::Infrastructure {
                    stage: Stage::Export,
                    message: format!("buildah push to an OCI layout failed ({status})"),
                    transient: true,
                    log_tail: tail.tail(),
                    cause: None,
                });
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------- docker

/// Builds with a Docker engine (`docker build`, then `docker save`, whose
/// archive is an OCI layout since Docker 25). Only usable when an engine
/// answers ([`DockerBackend::engine_answers`]). Docker builds are not made
/// reproducible here, so rebuilding after the engine's cache is gone may
/// yield a new digest.
#[derive(Debug, Clone)]
pub struct DockerBackend {
    binary: PathBuf,
}

impl DockerBackend {
    pub fn new() -> Result<Self, BuildError> {
        let binary = find_tool("docker").ok_or_else(|| {
            BuildError::infra_permanent(Stage::Build, "docker CLI is not installed")
        })?;
        Ok(Self { binary })
    }

    /// Whether a Docker engine answers (`docker version` reaches the server).
    pub async fn engine_answers(&self) -> bool {
        let out = Command::new(&self.binary)
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output();
        matches!(tokio::time::timeout(std::time::Duration::from_secs(10), out).await, Ok(Ok(o)) if o.status.success() && !o.stdout.is_empty())
    }

    const USER_MARKERS: &'static [&'static str] = &[
        "did not complete successfully",
        "dockerfile parse error",
        "failed to compute cache key",
        "unknown instruction",
    ];
}

impl BuildBackend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn build<'a>(
        &'a self,
        req: &'a BackendRequest,
        log: &'a dyn LogSink,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            let tail = TailLog::new(log, LOG_TAIL_LINES);
            let mut cmd = Command::new(&self.binary);
            cmd.args(["build", "--progress=plain"])
                .arg("-f")
                .arg(&req.dockerfile)
                .arg("-t")
                .arg(&req.tag);
            for (k, v) in &req.build_args {
                cmd.arg("--build-arg").arg(format!("{k}={v}"));
            }
            cmd.arg(&req.context_dir).env("DOCKER_BUILDKIT", "1");
            let status = run_logged(cmd, "docker", Stage::Build, &tail).await?;
            if !status.success() {
                return Err(classify(
                    "docker",
                    "build",
                    status,
                    tail.tail(),
                    Self::USER_MARKERS,
                ));
            }
            let _ = tokio::fs::remove_dir_all(&req.oci_dir).await;
            tokio::fs::create_dir_all(&req.oci_dir)
                .await
                .map_err(|e| BuildError::infra(Stage::Export, "creating the OCI directory", e))?;
            let archive = req.oci_dir.with_extension("tar");
            let mut save = Command::new(&self.binary);
            save.arg("save").arg("-o").arg(&archive).arg(&req.tag);
            let status = run_logged(save, "docker", Stage::Export, &tail).await?;
            // Drop the tag; the engine's build cache stays for the next build.
            let mut rmi = Command::new(&self.binary);
            rmi.arg("rmi").arg(&req.tag);
            let _ = run_logged(
                rmi,
                "docker",
                Stage::Export,
                &TailLog::new(&crate::log::NullLog, 1),
            )
            .await;
            if !status.success() {
                return Err(BuildError::Infrastructure {
                    stage: Stage::Export,
                    message: format!("docker save failed ({status})"),
                    transient: true,
                    log_tail: tail.tail(),
                    cause: None,
                });
            }
            let (archive2, dir) = (archive.clone(), req.oci_dir.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut ar = tar::Archive::new(std::fs::File::open(&archive2)?);
                ar.unpack(&dir)?;
                std::fs::remove_file(&archive2)
            })
            .await
            .map_err(|e| BuildError::infra(Stage::Export, "unpacking docker save output", e))?
            .map_err(|e| BuildError::infra(Stage::Export, "unpacking docker save output", e))?;
            if !req.oci_dir.join("index.json").exists() {
                return Err(BuildError::infra_permanent(
                    Stage::Export,
                    "docker save did not write an OCI layout (index.json); Docker 25 or newer is needed",
                ));
            }
            tag_single_manifest_latest(&req.oci_dir).map_err(|e| {
                BuildError::infra(Stage::Export, "reading docker save index.json", e)
            })?;
            Ok(())
        })
    }
}

/// `docker save` names the manifest by the image name; the exporter looks
/// for `latest`. Rewrite the ref-name annotation of the (single) manifest.
fn tag_single_manifest_latest(dir: &Path) -> std::io::Result<()> {
    let path = dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path)?).map_err(std::io::Error::other)?;
    if let Some(obj) = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .and_then(|m| m.first_mut())
        .and_then(|first| first.as_object_mut())
        && let Some(ann) = obj
            .entry("annotations")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
    {
        ann.insert("org.opencontainers.image.ref.name".into(), "latest".into());
    }
    std::fs::write(
        &path,
        serde_json::to_vec(&index).map_err(std::io::Error::other)?,
    )
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendKind {
    /// buildah if installed (daemonless, reproducible), else docker if an engine answers.
    #[default]
    Auto,
    Buildah,
    Docker,
}

/// Construct the backend for `kind`, keeping buildah's state under `state_dir`.
pub async fn select_backend(
    kind: BackendKind,
    state_dir: &Path,
) -> Result<Box<dyn BuildBackend>, BuildError> {
    match kind {
        BackendKind::Buildah => Ok(Box::new(BuildahBackend::new(state_dir)?)),
        BackendKind::Docker => {
            let d = DockerBackend::new()?;
            if !d.engine_answers().await {
                return Err(BuildError::infra_permanent(
                    Stage::Build,
                    "no Docker engine answers (docker version failed)",
                ));
            }
            Ok(Box::new(d))
        }
        BackendKind::Auto => {
            if let Ok(b) = BuildahBackend::new(state_dir) {
                return Ok(Box::new(b));
            }
            if let Ok(d) = DockerBackend::new()
                && d.engine_answers().await
            {
                return Ok(Box::new(d));
            }
            Err(BuildError::infra_permanent(
                Stage::Build,
                "no build backend: buildah is not installed and no Docker engine answers (Debian: apt-get install buildah)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn classification() {
        let tail = |s: &str| s.lines().map(String::from).collect::<Vec<_>>();
        let e = classify(
            "buildah",
            "bud",
            std::process::ExitStatus::from_raw(3 << 8),
            tail("out\nError: building at STEP \"RUN x\": exit status 3"),
            BuildahBackend::USER_MARKERS,
        );
        assert!(matches!(&e, BuildError::User { message, .. } if message.contains("RUN x")));
        let e = classify(
            "buildah",
            "bud",
            std::process::ExitStatus::from_raw(9),
            tail("partial"),
            BuildahBackend::USER_MARKERS,
        );
        assert!(e.is_retryable());
        let e = classify(
            "buildah",
            "bud",
            std::process::ExitStatus::from_raw(1 << 8),
            tail("Error: building at STEP \"COPY\": write /x: no space left on device"),
            BuildahBackend::USER_MARKERS,
        );
        assert!(e.is_retryable());
    }
}
