//! `zw build`: build a directory or git URL and print the image digest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::BackendKind;
use crate::build::{
    BuildOptions, Builder, BuilderConfig, DEFAULT_MAX_CONTEXT_BYTES, parse_build_arg,
};
use crate::error::Stage;
use crate::log::{LogLine, LogSink, LogStream};
use crate::source::{GitHubSource, GitRev, Source, looks_like_git_url};
use crate::store::{LocalStore, ObjectStore, S3Config, S3Store};

/// Where images are stored: a local directory or an S3 bucket. Shared by
/// `zw build` and `zw captain`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Local store directory (default: <data-dir>/store).
    #[arg(long, conflicts_with_all = ["s3_endpoint", "s3_bucket"])]
    pub store: Option<PathBuf>,
    /// S3 endpoint URL (path-style); credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long, requires = "s3_bucket")]
    pub s3_endpoint: Option<String>,
    /// S3 bucket; enables the S3 store.
    #[arg(long)]
    pub s3_bucket: Option<String>,
    /// S3 region.
    #[arg(long, default_value = "us-east-1")]
    pub s3_region: String,
}

impl StoreArgs {
    /// The store these flags name; `data_dir/store` by default.
    pub fn open(&self, data_dir: &Path) -> anyhow::Result<Arc<dyn ObjectStore>> {
        Ok(match &self.s3_bucket {
            Some(bucket) => {
                let mut cfg = S3Config::from_env(bucket.clone());
                if let Some(ep) = &self.s3_endpoint {
                    cfg.endpoint = Some(ep.clone());
                }
                cfg.region = self.s3_region.clone();
                Arc::new(S3Store::new(cfg)?)
            }
            None => Arc::new(LocalStore::new(
                self.store.clone().unwrap_or_else(|| data_dir.join("store")),
            )),
        })
    }
}

/// Arguments of `zw build`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A local directory, a git URL (https://, ssh://, file://, git@host:path) or github:OWNER/REPO.
    pub source: String,
    /// App name (used in logs and the local image tag).
    #[arg(long)]
    pub app: Option<String>,
    /// Directory for work files and the backend's storage.
    #[arg(long, env = "ZW_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Dockerfile path inside the source.
    #[arg(long, default_value = "Dockerfile")]
    pub dockerfile: PathBuf,
    /// Build argument KEY=VALUE (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Git branch (or, for github:, any reference).
    #[arg(long, conflicts_with = "commit")]
    pub branch: Option<String>,
    /// Git commit (40 hex digits).
    #[arg(long)]
    pub commit: Option<String>,
    /// Build backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Largest build context accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_CONTEXT_BYTES)]
    pub max_context_bytes: u64,
    /// Token for github: sources.
    #[arg(long, env = "GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<String>,
    /// GitHub API base URI (GitHub Enterprise).
    #[arg(long, env = "ZW_GITHUB_API")]
    pub github_api: Option<String>,
    /// Print one JSON object on stdout instead of a progress display.
    #[arg(long)]
    pub json: bool,
}

fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/zeitwork")
    } else {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".local/share/zeitwork")
    }
}

/// The [`Source`] named by the arguments.
pub fn source_from_args(args: &Args) -> anyhow::Result<Source> {
    if let Some(rest) = args.source.strip_prefix("github:") {
        let (owner, repo) = rest
            .split_once('/')
            .context("github source must be github:OWNER/REPO")?;
        anyhow::ensure!(
            !owner.is_empty() && !repo.is_empty() && !repo.contains('/'),
            "github source must be github:OWNER/REPO"
        );
        let reference = args
            .commit
            .clone()
            .or_else(|| args.branch.clone())
            .unwrap_or_else(|| "HEAD".into());
        return Ok(Source::GitHub(GitHubSource {
            owner: owner.into(),
            repo: repo.trim_end_matches(".git").into(),
            reference,
            token: args.github_token.clone(),
            api_base: args.github_api.clone(),
        }));
    }
    if looks_like_git_url(&args.source) {
        let rev = match (&args.branch, &args.commit) {
            (Some(b), _) => GitRev::Branch(b.clone()),
            (None, Some(c)) => GitRev::Commit(c.clone()),
            (None, None) => GitRev::DefaultBranch,
        };
        return Ok(Source::Git {
            url: args.source.clone(),
            rev,
        });
    }
    anyhow::ensure!(
        args.branch.is_none() && args.commit.is_none(),
        "--branch/--commit need a git URL, not a local directory"
    );
    Ok(Source::Local(PathBuf::from(&args.source)))
}

/// Progress display on stderr: a spinner with the stage, log lines above it.
struct ProgressLog {
    bar: ProgressBar,
}

impl LogSink for ProgressLog {
    fn line(&self, line: LogLine) {
        let prefix = if line.stream == LogStream::Builder {
            "==> "
        } else {
            "    "
        };
        self.bar.println(format!("{prefix}{}", line.text));
    }
    fn stage(&self, stage: Stage) {
        self.bar.set_message(format!("{stage}"));
    }
}

/// Plain log lines on stderr (with `--json`).
struct StderrLog;

impl LogSink for StderrLog {
    fn line(&self, line: LogLine) {
        eprintln!("{}", line.text);
    }
}

/// Run `zw build`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let store = args.store.open(&data_dir)?;
    let source = source_from_args(&args)?;
    let build_args = args
        .build_args
        .iter()
        .map(|a| parse_build_arg(a))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = BuildOptions {
        app: args.app.clone(),
        dockerfile: args.dockerfile.clone(),
        build_args,
    };
    let mut config = BuilderConfig::new(&data_dir);
    config.backend = args.backend;
    config.max_context_bytes = args.max_context_bytes;
    let builder = Builder::new(store, config).await?;

    if args.json {
        let result = builder.build(source, opts, &StderrLog).await;
        match result {
            Ok(a) => {
                println!("{}", serde_json::json!({ "app": args.app, "artifact": a }));
                Ok(())
            }
            Err(e) => {
                println!(
                    "{}",
                    serde_json::json!({ "app": args.app, "error": e.to_string(), "fault": e.fault() })
                );
                Err(e.into())
            }
        }
    } else {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let log = ProgressLog { bar: bar.clone() };
        let result = builder.build(source, opts, &log).await;
        bar.finish_and_clear();
        let a = result?;
        eprintln!(
            "{} {} ({} bytes, {})",
            if a.uploaded { "built" } else { "unchanged" },
            args.app.as_deref().unwrap_or(""),
            a.config.rootfs_bytes,
            builder.store().describe()
        );
        println!("{}", a.digest);
        Ok(())
    }
}
