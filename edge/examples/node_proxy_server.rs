//! Runs a node-proxy in front of one instance, as a follower would, with a
//! throwaway cluster CA (used by `scripts/bench-edge.sh` to measure the
//! whole edge -> node-proxy -> instance path).
//!
//! Writes into `--dir`: `ca.crt`/`ca.key` (the cluster CA), `node.crt`/
//! `node.key` (the node-proxy's certificate for its IP and `node-1.bench`) and `edge.crt`/
//! `edge.key` (an edge client certificate; `--dir` works as the edge's
//! `--mtls-dir`). Serves until killed. `EDGE_CURRENT_THREAD=1` runs it on a
//! current-thread runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use edge::node_proxy::{NodeProxy, NodeProxyConfig};
use edge::pki::Ca;

#[derive(Parser)]
#[command(name = "node-proxy-server")]
struct Cli {
    /// Where the CA and the certificates are written.
    #[arg(long)]
    dir: PathBuf,
    /// Listen address.
    #[arg(long)]
    listen: SocketAddr,
    /// The one instance: `ID=ADDR`.
    #[arg(long)]
    instance: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (id, addr) = cli
        .instance
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("--instance wants ID=ADDR"))?;
    let (id, addr): (String, SocketAddr) = (id.to_owned(), addr.parse()?);
    std::fs::create_dir_all(&cli.dir)?;
    edge::tls::install_default_provider();
    let ca = Ca::generate("bench cluster CA")?;
    ca.save(&cli.dir)?;
    // The IP the edge dials, and a DNS name for clients (such as nginx)
    // that do not check IP addresses in certificates.
    let names = [cli.listen.ip().to_string(), "node-1.bench".to_owned()];
    let node = ca.issue_node_proxy("node-1", &names)?;
    node.save(&cli.dir, "node")?;
    ca.issue_edge_client("edge-1")?.save(&cli.dir, "edge")?;

    let rt = if std::env::var_os("EDGE_CURRENT_THREAD").is_some_and(|v| v == "1") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let resolver = Arc::new(move |i: &str| (i == id).then_some(addr));
        let np = NodeProxy::new(ca.cert_pem(), &node, resolver, NodeProxyConfig::default())?;
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        np.serve(listener, tokio_util::sync::CancellationToken::new())
            .await;
        anyhow::Ok(())
    })
}
