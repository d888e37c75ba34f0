//! `zw up`: captain (with its build queue and builder), follower (with its
//! node-proxy) and edge in one process, with embedded defaults only: SQLite,
//! a local meta repository, a local object store and a local CA, all under
//! one data directory.
//!
//! ```text
//! <data-dir>/captain.db, meta.git, admin.token, api.url   the captain
//! <data-dir>/store/                                       object store (images, sources)
//! <data-dir>/builder/                                     build work dirs, buildah storage
//! <data-dir>/pki/                                         local CA
//! <data-dir>/follower/                                    node agent state, ledger
//! <data-dir>/edge/                                        route cache, certificates
//! ```
//!
//! Ctrl-C stops every instance this process started; the next `zw up`
//! brings back whatever the meta repository says should run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use edge::node_proxy::{NodeProxy, NodeProxyConfig};
use edge::pki::Ca;
use follower::runtime::RuntimeChoice;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where everything is kept (default: $ZW_DATA_DIR, else
    /// ~/.local/share/zeitwork).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address of the REST API (and of /meta.git).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub api: SocketAddr,
    /// Plain HTTP of the edge: apps at http://<app>.localhost:<port>.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// HTTPS of the edge (local CA certificates for *.localhost).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub https: SocketAddr,
    /// How instances run.
    #[arg(long, value_enum, default_value = "auto")]
    pub runtime: RuntimeChoice,
    /// Kernel and initramfs of qemu guests (`scripts/prepare-kernel.sh` and
    /// `scripts/build-initramfs.sh` make them). Without them `auto` checks
    /// whether KVM works here and, if it does, prepares the guest itself
    /// (into <data-dir>/guest); else it runs instances in the sandboxed
    /// `process` runtime, and says why.
    #[arg(long, requires = "qemu_initramfs")]
    pub qemu_kernel: Option<PathBuf>,
    #[arg(long, requires = "qemu_kernel")]
    pub qemu_initramfs: Option<PathBuf>,
}

/// The data directory `zw up` and the user CLI agree on.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ZW_DATA_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("zeitwork")
}

/// Wraps the edge's flags so `zw up` builds them exactly as `zw edge` would
/// parse them.
#[derive(Parser)]
struct EdgeFlags {
    #[command(flatten)]
    args: edge::cli::Args,
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// The mTLS material of the local node-proxy and of the edge, issued by the
/// local CA (kept across restarts).
fn local_pki(data: &Path) -> Result<(String, edge::pki::IssuedCert)> {
    let ca = Ca::load_or_create(&data.join("pki"), "zeitwork local CA").context("local CA")?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let proxy = ca
        .issue_node_proxy("local-node", &names)
        .context("node-proxy certificate")?;
    let mtls = data.join("edge").join("mtls");
    std::fs::create_dir_all(&mtls).with_context(|| format!("creating {}", mtls.display()))?;
    let client = ca
        .issue_edge_client("zw-up-edge")
        .context("edge client certificate")?;
    client
        .save(&mtls, "edge")
        .context("saving the edge client certificate")?;
    write_file(&mtls.join("ca.crt"), ca.cert_pem())?;
    Ok((ca.cert_pem().to_string(), proxy))
}

pub async fn run(args: UpArgs) -> Result<()> {
    edge::tls::install_default_provider();
    let data = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let data = data
        .canonicalize()
        .with_context(|| format!("resolving {}", data.display()))?;

    // Captain: data dir root, embedded SQLite and meta repo.
    let mut ccfg = captain::Config::new(&data);
    ccfg.listen = args.api;
    ccfg.poll_interval = Duration::from_secs(5);
    ccfg.rollout_interval = Duration::from_millis(500);
    ccfg.app_url_template = format!("http://{{app}}.{{domain}}:{}", args.http.port());
    // The builder: `zw deploy` uploads sources to the captain, which builds
    // them into the local store the follower boots images from.
    let mut bcfg = builder::BuilderConfig::new(data.join("builder"));
    bcfg.backend = builder::BackendKind::Auto;
    let store: Arc<dyn builder::ObjectStore> =
        Arc::new(builder::LocalStore::new(data.join("store")));
    ccfg.builder = match builder::Builder::new(store, bcfg).await {
        Ok(b) => Some(Arc::new(b)),
        Err(e) => {
            eprintln!("warning: no build backend, `zw deploy DIR` cannot build here: {e}");
            None
        }
    };
    let captain = captain::Captain::start(ccfg)
        .await
        .context("starting the captain")?;
    let api_url = format!("http://{}", captain.local_addr());
    write_file(&data.join("api.url"), &api_url)?;
    let token_path = data.join("admin.token");
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading {}", token_path.display()))?
        .trim()
        .to_string();

    // Node-proxy listener first: the follower registers its address.
    let (ca_pem, proxy_cert) = local_pki(&data)?;
    let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the node-proxy")?;
    let proxy_addr = proxy_listener.local_addr()?;

    let store = data.join("store");
    let mut fcfg = follower::FollowerConfig::new(
        data.join("follower"),
        data.join("meta.git").display().to_string(),
    );
    fcfg.captain_url = Some(api_url.clone());
    fcfg.token = token.clone();
    fcfg.runtime = args.runtime;
    if let (Some(kernel), Some(initramfs)) = (&args.qemu_kernel, &args.qemu_initramfs) {
        fcfg.vm.qemu_guest = Some(follower::runtime::qemu::GuestImage {
            kernel: kernel.clone(),
            initramfs: initramfs.clone(),
        });
    } else if args.runtime == RuntimeChoice::Auto {
        // A real microVM wherever one can run: only with a working KVM
        // (under TCG every instruction is emulated).
        match follower::runtime::qemu::auto_guest(&data.join("guest")).await {
            Ok(guest) => fcfg.vm.qemu_guest = Some(guest),
            Err(why) => fcfg.vm.qemu_skip = Some(why),
        }
    }
    fcfg.images = Some(Arc::new(follower::image::LocalDirImageSource {
        root: store.clone(),
    }));
    fcfg.proxy_addr = Some(proxy_addr.to_string());
    fcfg.poll_interval = Duration::from_secs(5);
    fcfg.reconcile_interval = Duration::from_secs(1);
    fcfg.heartbeat_interval = Duration::from_secs(2);
    let follower = follower::Follower::start(fcfg)
        .await
        .context("starting the follower")?;

    // The node-proxy resolves an instance id through the follower's ledger.
    let instances = follower.reconciler.instances.clone();
    let resolver = move |id: &str| -> Option<SocketAddr> {
        let map = instances.borrow();
        let rec = map.get(id)?;
        Some(SocketAddr::from((rec.ip, rec.port)))
    };
    let node_proxy = NodeProxy::new(
        &ca_pem,
        &proxy_cert,
        Arc::new(resolver),
        NodeProxyConfig::default(),
    )
    .context("node-proxy TLS")?;
    let stop = CancellationToken::new();
    let proxy_task = tokio::spawn(node_proxy.serve(proxy_listener, stop.clone()));

    // Every commit the captain writes or indexes wakes the follower at once.
    let mut commits = captain.state().commits.subscribe();
    let notify = follower.notify.clone();
    let bridge = tokio::spawn(async move {
        while commits.changed().await.is_ok() {
            notify.notify_one();
        }
    });

    let edge_dir = data.join("edge");
    let flags = EdgeFlags::try_parse_from([
        "edge".to_string(),
        format!("--captain={api_url}"),
        format!("--token-file={}", token_path.display()),
        format!("--http={}", args.http),
        format!("--https={}", args.https),
        format!("--data-dir={}", edge_dir.display()),
        "--domain=*.localhost".to_string(),
    ])
    .context("edge flags")?;
    let edge_task = tokio::spawn(edge::cli::run(flags.args));

    println!("zeitwork is up");
    println!("  API:          {api_url}   (git: {api_url}/meta.git)");
    println!("  admin token:  {}", token_path.display());
    println!(
        "  apps:         http://<app>.localhost:{}  https://<app>.localhost:{}",
        args.http.port(),
        args.https.port()
    );
    println!("  runtime:      {}", follower.runtime_reason);
    println!("  data:         {}", data.display());
    println!("Ctrl-C stops everything, instances included; `zw up` again brings them back.");

    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; }
        r = edge_task => {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.context("the edge stopped")),
                Err(e) => anyhow::bail!("the edge task failed: {e}"),
            }
        }
    }
    eprintln!("stopping: instances, follower, captain");
    bridge.abort();
    stop.cancel();
    follower.shutdown_and_stop_instances().await;
    let _ = proxy_task.await;
    captain.shutdown().await;
    Ok(())
}
