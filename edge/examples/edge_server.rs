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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Worker threads follow TOKIO_WORKER_THREADS or the CPU affinity mask
    // (taskset), like any tokio multi-thread runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(edge::cli::run(cli.args))
}
