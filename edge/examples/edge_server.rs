//! Runs the edge exactly as `zw edge` does, as a standalone binary (used by
//! `scripts/bench-edge.sh`, which needs an optimised build of the edge
//! alone). Logging: `ZW_LOG` (default `warn`).

use clap::Parser;

#[derive(Parser)]
#[command(name = "edge-server")]
struct Cli {
    #[command(flatten)]
    args: edge::cli::Args,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Lines go to stderr from a writer thread, in batches: a `write` per
    // access-log line would cost as much as the rest of the request.
    // Blocking when the writer falls behind: no line is dropped.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The default (128k lines) is allocated and touched up front: MBs.
        .buffered_lines_limit(8192)
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Worker threads follow TOKIO_WORKER_THREADS or the CPU affinity mask
    // (taskset), like any tokio multi-thread runtime. EDGE_CURRENT_THREAD=1
    // runs everything on the main thread instead (one worker, no
    // cross-thread scheduling).
    let rt = if std::env::var_os("EDGE_CURRENT_THREAD").is_some_and(|v| v == "1") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(edge::cli::run(cli.args))
}
