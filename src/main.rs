//! `zw`: the one binary of zeitwork. Each subcommand dispatches into its
//! crate; this file only parses arguments and sets up logging.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod client;
mod meta_cmd;
mod secrets_cmd;
mod up;

#[derive(Parser)]
#[command(name = "zw", version, about = "zeitwork: git-driven microVM platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with a meta repository: init, validate, decode, log, revert.
    #[command(subcommand)]
    Meta(meta_cmd::MetaCommand),
    /// Run captain, follower and edge in one process with embedded defaults.
    Up(up::UpArgs),
    /// The control plane: REST API, mirror database, meta repo writer.
    Captain(captain::cli::Args),
    /// The node agent: follows the meta repo and runs instances.
    Follower(follower::cli::Args),
    /// The TLS edge proxy.
    Edge(edge::cli::Args),
    /// Validates a push to the captain's meta repo (its git pre-receive hook).
    #[command(name = "captain-pre-receive", hide = true)]
    CaptainPreReceive,
    /// Build a directory or git URL (Dockerfile) into a microVM image in the object store.
    Build(builder::cli::Args),
    #[command(flatten)]
    Client(client::Command),
    /// An app's secrets: set, unset, list (names only), rotate.
    #[command(subcommand)]
    Secrets(secrets_cmd::SecretsCommand),
}

/// Logs go to stderr, coloured only on a terminal. The long-running
/// services (`up`, `captain`, `follower`, `edge`) write from a thread of
/// their own, in batches: the edge's access log is a line per request, and a
/// `write` per line costs as much as the rest of the request. Such a writer
/// blocks when it falls behind (no line is dropped); the returned guard
/// flushes it when `main` returns.
fn init_tracing(service: bool) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ZW_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    if service {
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            // The default (128k lines) is allocated and touched up front: MBs.
            .buffered_lines_limit(8192)
            .thread_name("zw-log")
            .finish(std::io::stderr());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(ansi)
            .try_init();
        return Some(guard);
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
    None
}

fn run_async(
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(fut)?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let service = matches!(
        cli.command,
        Command::Up(_) | Command::Captain(_) | Command::Follower(_) | Command::Edge(_)
    );
    let _flush_logs = init_tracing(service);
    let result = match cli.command {
        Command::Meta(cmd) => meta_cmd::run(cmd),
        Command::Up(args) => run_async(up::run(args)),
        Command::Captain(args) => run_async(captain::cli::run(args)),
        Command::Follower(args) => run_async(follower::cli::run(args)),
        Command::Edge(args) => run_async(edge::cli::run(args)),
        Command::CaptainPreReceive => Ok(match captain::hooks::main_entry() {
            0 => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        }),
        Command::Client(cmd) => client::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Secrets(cmd) => secrets_cmd::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Build(args) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(builder::cli::run(args)))
            .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
