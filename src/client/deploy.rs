//! `zw deploy`: upload the source (a directory as a .tar.gz, or a git URL)
//! to the captain's build queue (`POST /v1/sources`, `POST /v1/builds`),
//! show the build log as it streams (`GET /v1/builds/{id}/logs`, SSE), then
//! release the image: a copy of the active release with the new image when
//! there is one (so its env vars, port, domains, secrets and instance count
//! stay), else `POST /v1/deployments`. Then follow the rollout to a
//! terminal status.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use api_types::builds::{BuildLogLine, BuildView, SourceView};
use indicatif::{ProgressBar, ProgressStyle};
use meta_schema::pb;
use serde_json::json;

use super::api::{Api, enc};
use super::creds::{self, ConnArgs};
use super::metarepo::{self, MetaClone};
use super::{AppArg, AppView, DeploymentView, app_name, reason_suffix, resolve_app};

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
    #[command(flatten)]
    pub follow: FollowArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

fn spinner() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// `dir` as a gzip'd tar with every entry under `src/`, without `.git`.
fn pack(dir: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let out = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    let gz = flate2::write::GzEncoder::new(out.reopen()?, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_dir("src", dir)
        .with_context(|| format!("packing {}", dir.display()))?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if name == ".git" {
            continue;
        }
        let inside = Path::new("src").join(&name);
        let ft = e.file_type()?;
        if ft.is_dir() {
            tar.append_dir_all(&inside, e.path())
        } else {
            tar.append_path_with_name(e.path(), &inside)
        }
        .with_context(|| format!("packing {}", e.path().display()))?;
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .context("finishing the source archive")?;
    Ok(out)
}

/// A line above the spinner; plain stderr when there is no terminal (the
/// spinner is hidden then, and so would be its lines).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// Prints a build's log as the captain streams it, until it ends; falls
/// back to polling when the stream breaks.
fn watch_build(client: &Api, id: &str, bar: &ProgressBar) -> anyhow::Result<BuildView> {
    let path = format!("/v1/builds/{}", enc(id));
    let mut from = 0i64;
    for _ in 0..100 {
        let resp = client.send_with(
            reqwest::Method::GET,
            &format!("{path}/logs?from={from}"),
            |r| {
                r.header("accept", "text/event-stream")
                    .timeout(Duration::from_secs(24 * 3600))
            },
        )?;
        let mut event = String::new();
        let mut data = String::new();
        for line in std::io::BufReader::new(resp).lines() {
            let Ok(line) = line else { break };
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            } else if line.is_empty() {
                match event.as_str() {
                    "line" => {
                        if let Ok(l) = serde_json::from_str::<BuildLogLine>(&data) {
                            from = l.seq;
                            let text = l.line.as_str();
                            if l.stream == "builder" {
                                if let Some(stage) = text.strip_prefix("stage: ") {
                                    bar.set_message(format!("building: {stage}"));
                                }
                                say(bar, format!("==> {text}"));
                            } else {
                                say(bar, format!("    {text}"));
                            }
                        }
                    }
                    "end" => {
                        return serde_json::from_str(&data).context("reading the finished build");
                    }
                    _ => {}
                }
                event.clear();
                data.clear();
            }
        }
        // The stream broke before the end: look, then resume after `from`.
        let b: BuildView = client.get(&path)?;
        if b.status == "succeeded" || b.status == "failed" {
            return Ok(b);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    bail!("lost the log stream of build {id} too often; see `GET {path}`")
}

/// Builds on the captain; returns the image digest and the source commit.
fn build(client: &Api, a: &DeployArgs, app: &AppView) -> anyhow::Result<(String, String)> {
    // Before packing and uploading anything: does this captain build?
    let health: serde_json::Value = client.get("/v1/health")?;
    if health["builds"] == serde_json::Value::Bool(false) {
        bail!(
            "the captain at {} does not build (no build backend there, or --build-workers 0); \
             build with `zw build` into a store the nodes read and deploy with `--image DIGEST`",
            client.base
        );
    }
    let mut body = json!({"app_id": app.id, "dockerfile": a.dockerfile.display().to_string()});
    let mut args = serde_json::Map::new();
    for s in &a.build_args {
        let (k, v) = s
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .with_context(|| format!("--build-arg {s:?} is not KEY=VALUE"))?;
        args.insert(k.to_string(), json!(v));
    }
    body["build_args"] = serde_json::Value::Object(args);
    let bar = spinner();
    let commit = match &a.git {
        Some(url) => {
            // Pin the branch (or HEAD) to a commit first, so the release
            // records exactly what was built.
            let commit = match &a.commit {
                Some(c) => c.clone(),
                None => remote_commit(url, a.branch.as_deref())?,
            };
            body["source"] = json!({"git": {"url": url, "commit": commit}});
            commit
        }
        None => {
            let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            let dir = dir
                .canonicalize()
                .with_context(|| format!("source directory {}", dir.display()))?;
            anyhow::ensure!(dir.is_dir(), "source {} is not a directory", dir.display());
            let commit = local_commit(&dir);
            bar.set_message(format!("packing {}", dir.display()));
            let archive = pack(&dir)?;
            let file = std::fs::File::open(archive.path())?;
            let size = file.metadata()?.len();
            bar.set_message(format!("uploading {} ({size} bytes)", dir.display()));
            let resp = client.send_with(reqwest::Method::POST, "/v1/sources", |r| {
                r.header("content-type", "application/gzip")
                    .timeout(Duration::from_secs(3600))
                    .body(reqwest::blocking::Body::sized(file, size))
            })?;
            let src: SourceView = resp
                .json()
                .context("reading the answer of POST /v1/sources")?;
            say(
                &bar,
                format!("uploaded {} ({} bytes)", short(&src.id), src.size_bytes),
            );
            body["source"] = json!({"upload": src.id});
            if !commit.is_empty() {
                body["source_commit"] = json!(commit);
            }
            commit
        }
    };
    let b: BuildView = client.post("/v1/builds", &body)?;
    bar.set_message(format!("build {} queued", b.id));
    let b = watch_build(client, &b.id, &bar);
    bar.finish_and_clear();
    let b = b?;
    if b.status != "succeeded" {
        bail!("build {} failed: {}", b.id, b.error);
    }
    eprintln!("built image {}", short(&b.image_digest));
    Ok((b.image_digest, commit))
}

/// The commit a remote's branch (or HEAD) points at now.
fn remote_commit(url: &str, branch: Option<&str>) -> anyhow::Result<String> {
    meta_schema::repo::remote_commit(url, branch)
        .with_context(|| format!("asking {url} for its head"))?
        .with_context(|| {
            format!(
                "{url} has no {}",
                branch.map_or("HEAD".to_string(), |b| format!("branch {b}"))
            )
        })
}

/// HEAD of a clean git work tree, else empty (the release records no commit).
fn local_commit(dir: &std::path::Path) -> String {
    meta_schema::repo::clean_head(dir).unwrap_or_default()
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
        None => build(&client, &a, &app)?,
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
    if let Some(u) = metarepo::url_of(&client, &m, &app)? {
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
                say(&bar, format!("  {last} -> {}", d.status));
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
