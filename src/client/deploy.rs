//! `zw deploy`: build the source locally with the `builder` crate into the
//! object store of the data dir (the one `zw up` serves images from; the
//! captain has no build endpoint), then release the image: a copy of the
//! active release with the new image when there is one (so its env vars,
//! port, domains, secrets and instance count stay), else
//! `POST /v1/deployments`. Then follow the rollout to a terminal status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use builder::{
    BackendKind, BuildOptions, Builder, BuilderConfig, GitRev, LocalStore, LogLine, LogSink,
    LogStream, ObjectStore, Source, Stage,
};
use indicatif::{ProgressBar, ProgressStyle};
use meta_schema::pb;
use serde_json::json;

use super::api::{Api, enc};
use super::creds::{self, ConnArgs};
use super::metarepo::{self, MetaClone};
use super::{AppArg, DeploymentView, app_name, reason_suffix, resolve_app};

/// How to wait for a rollout.
#[derive(Debug, Clone, clap::Args)]
pub struct FollowArgs {
    /// Do not wait for the rollout; print the release and return.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds (the rollout goes on).
    #[arg(long, default_value_t = 900, value_name = "SECS")]
    pub wait_timeout: u64,
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// Source directory with a Dockerfile (default: the current directory).
    #[arg(conflicts_with_all = ["git", "image"])]
    pub dir: Option<PathBuf>,
    /// Build this git URL instead of a directory.
    #[arg(long, value_name = "URL", conflicts_with = "image")]
    pub git: Option<String>,
    /// Git branch of --git.
    #[arg(long, requires = "git", conflicts_with = "commit")]
    pub branch: Option<String>,
    /// Git commit of --git (40 hex digits).
    #[arg(long, requires = "git")]
    pub commit: Option<String>,
    /// Deploy an image already in the store ("sha256:<hex>"), without building.
    #[arg(long, value_name = "DIGEST")]
    pub image: Option<String>,
    #[command(flatten)]
    pub app: AppArg,
    /// Port the app listens on (default: the active release's, else $PORT).
    #[arg(long)]
    pub port: Option<u32>,
    /// HTTP health check path (default: the active release's).
    #[arg(long, value_name = "PATH")]
    pub health_check: Option<String>,
    /// Instances to run (default: the active release's, else 3).
    #[arg(long)]
    pub instances: Option<u32>,
    /// Dockerfile path inside the source.
    #[arg(long, default_value = "Dockerfile")]
    pub dockerfile: PathBuf,
    /// Build argument KEY=VALUE (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Build backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Data dir whose store receives the image (default: $ZW_DATA_DIR, else ~/.local/share/zeitwork).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

struct BarLog(ProgressBar);

impl LogSink for BarLog {
    fn line(&self, line: LogLine) {
        let prefix = if line.stream == LogStream::Builder {
            "==> "
        } else {
            "    "
        };
        self.0.println(format!("{prefix}{}", line.text));
    }
    fn stage(&self, stage: Stage) {
        self.0.set_message(format!("building: {stage}"));
    }
}

fn spinner() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn build(a: &DeployArgs, app: &str) -> anyhow::Result<(String, String)> {
    let data_dir = super::data_dir(a.data_dir.clone());
    let (source, commit) = match &a.git {
        Some(url) => {
            // Pin the branch (or HEAD) to a commit first, so the release
            // records exactly what was built.
            let commit = match &a.commit {
                Some(c) => c.clone(),
                None => remote_commit(url, a.branch.as_deref())?,
            };
            (
                Source::Git {
                    url: url.clone(),
                    rev: GitRev::Commit(commit.clone()),
                },
                commit,
            )
        }
        None => {
            let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            let dir = dir
                .canonicalize()
                .with_context(|| format!("source directory {}", dir.display()))?;
            let commit = local_commit(&dir);
            (Source::Local(dir), commit)
        }
    };
    let build_args = a
        .build_args
        .iter()
        .map(|s| builder::parse_build_arg(s))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = BuildOptions {
        app: Some(app.to_string()),
        dockerfile: a.dockerfile.clone(),
        build_args,
    };
    let mut config = BuilderConfig::new(&data_dir);
    config.backend = a.backend;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(data_dir.join("store")));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let bar = spinner();
    bar.set_message(format!("building {source}"));
    let result = rt.block_on(async {
        let b = Builder::new(store, config).await?;
        b.build(source, opts, &BarLog(bar.clone())).await
    });
    bar.finish_and_clear();
    let artifact = result?;
    eprintln!(
        "{} image {} ({} bytes)",
        if artifact.uploaded {
            "built"
        } else {
            "unchanged"
        },
        artifact.digest,
        artifact.config.rootfs_bytes
    );
    Ok((artifact.digest, commit))
}

/// The commit a remote's branch (or HEAD) points at now.
fn remote_commit(url: &str, branch: Option<&str>) -> anyhow::Result<String> {
    let refname = branch.map_or_else(|| "HEAD".to_string(), |b| format!("refs/heads/{b}"));
    let out = std::process::Command::new("git")
        .args(["ls-remote", "--", url, &refname])
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .context("running git ls-remote (is git installed?)")?;
    if !out.status.success() {
        bail!(
            "git ls-remote {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(sha) = text.lines().find_map(|l| {
        let (sha, name) = l.split_once('\t')?;
        (name == refname).then(|| sha.to_string())
    }) else {
        bail!(
            "{url} has no {}",
            branch.map_or("HEAD".to_string(), |b| format!("branch {b}"))
        );
    };
    Ok(sha)
}

/// HEAD of a clean git work tree, else empty (the release records no commit).
fn local_commit(dir: &std::path::Path) -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match (run(&["rev-parse", "HEAD"]), run(&["status", "--porcelain"])) {
        (Some(head), Some(dirty)) if dirty.is_empty() => head,
        _ => String::new(),
    }
}

pub fn run(a: DeployArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    if let Some(p) = a.port
        && !(1..=65_535).contains(&p)
    {
        bail!("--port must be 1-65535");
    }
    if a.instances == Some(0) {
        bail!("--instances must be at least 1");
    }
    let (digest, commit) = match &a.image {
        Some(d) => (d.clone(), String::new()),
        None => build(&a, &app.name)?,
    };
    let m = MetaClone::open(&client)?;
    let id = match metarepo::active(&client, &app)? {
        Some(active) => {
            let base = m.release(&active)?;
            let mut r = metarepo::copy_release(&base);
            r.image_digest = digest.clone();
            let src = r.source.get_or_insert_with(Default::default);
            src.commit = commit;
            if let Some(url) = &a.git {
                src.repo = url.clone();
                if let Some(b) = &a.branch {
                    src.branch = b.clone();
                }
            }
            if let Some(p) = a.port {
                r.port = p;
            }
            if let Some(n) = a.instances {
                r.min_instances = n;
            }
            if let Some(h) = &a.health_check {
                let hc = r.health_check.get_or_insert_with(Default::default);
                hc.kind = Some(pb::health_check::Kind::HttpPath(h.clone()));
            }
            let msg = format!("Deploy {} to {} in {}", short(&digest), app.name, app.env);
            m.push_release(&r, &msg)?
        }
        None => {
            let mut body = json!({"app_id": app.id, "image_digest": digest});
            if !commit.is_empty() {
                body["commit"] = json!(commit);
            }
            if let Some(p) = a.port {
                body["port"] = json!(p);
            }
            if let Some(n) = a.instances {
                body["min_instances"] = json!(n);
            }
            if let Some(h) = &a.health_check {
                body["health_check_path"] = json!(h);
            }
            let d: DeploymentView = client.post("/v1/deployments", &body)?;
            d.id
        }
    };
    eprintln!("released {id} of {} ({})", app.name, short(&digest));
    follow(&client, &id, &a.follow)?;
    if let Some(u) = metarepo::url_of(&m, &app)? {
        println!("{u}");
    }
    Ok(())
}

fn short(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("sha256:{}", &hex[..hex.len().min(12)])
}

/// Follow a deployment to `running` (Ok) or `failed` (Err), with a spinner.
pub fn follow(client: &Api, id: &str, f: &FollowArgs) -> anyhow::Result<()> {
    let path = format!("/v1/deployments/{}", enc(id));
    let d: DeploymentView = client.get(&path)?;
    if f.no_wait {
        eprintln!("release {id}: {}{}", d.status, reason_suffix(&d.reason));
        return Ok(());
    }
    let bar = spinner();
    let deadline = Instant::now() + Duration::from_secs(f.wait_timeout);
    let mut last = String::new();
    let mut d = d;
    loop {
        if d.status != last {
            if !last.is_empty() {
                bar.println(format!("  {last} -> {}", d.status));
            }
            last = d.status.clone();
        }
        bar.set_message(format!(
            "release {id}: {}{}",
            d.status,
            reason_suffix(&d.reason)
        ));
        match d.status.as_str() {
            "running" => {
                bar.finish_and_clear();
                eprintln!("release {id} is running");
                return Ok(());
            }
            "failed" => {
                bar.finish_and_clear();
                bail!("release {id} failed: {}", d.reason);
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            bar.finish_and_clear();
            bail!(
                "release {id} is still {} after {}s; the rollout goes on (see `zw status`)",
                d.status,
                f.wait_timeout
            );
        }
        std::thread::sleep(Duration::from_millis(500));
        d = client.get(&path)?;
    }
}
