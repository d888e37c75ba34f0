//! `zw edge`: flags and the run loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::feed::{self, FeedConfig};
use crate::pki::{Ca, IssuedCert};
use crate::proxy::{Proxy, ProxyConfig};
use crate::routes::RouteTable;
use crate::server::{Limits, Server};
use crate::table::Routes;
use crate::tls::{self, CertResolver};

/// File name of the route cache inside `--data-dir`.
pub const ROUTE_CACHE_FILE: &str = "routes.json";

/// `zw edge` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Captain base URLs, comma-separated (`http://op1:7700,http://op2:7700`):
    /// the route stream is read from one and the next is tried when it
    /// fails. An edge that joined also knows the captains they named.
    #[arg(long, env = "ZW_CAPTAIN")]
    pub captain: Option<String>,
    /// Bearer token for the captain (an edge token), when the edge did not
    /// join the cluster with --join-token; else $ZW_EDGE_TOKEN. A command
    /// line is readable by every user of the host: prefer --token-file or
    /// $ZW_EDGE_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// File holding the edge token.
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// A join token (`zw cluster token create --role edge`): the edge joins
    /// the cluster once, and keeps its key, certificate and credential in
    /// `<data-dir>/enrolment.json` (later starts need no token). A command
    /// line is readable by every user of the host: prefer
    /// --join-token-file or ZW_JOIN_TOKEN.
    #[arg(long)]
    pub join_token: Option<String>,
    /// File holding the join token.
    #[arg(long, conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// This edge's name in the cluster (a DNS label). Default: generated
    /// once and kept in `<data-dir>/edge-name`.
    #[arg(long)]
    pub name: Option<String>,
    /// PEM file of a CA to trust for the captain's HTTPS.
    #[arg(long)]
    pub captain_ca: Option<PathBuf>,
    /// Plain HTTP listen address.
    #[arg(long, default_value = "[::]:80")]
    pub http: SocketAddr,
    /// HTTPS listen address (omit with --no-https).
    #[arg(long, default_value = "[::]:443")]
    pub https: SocketAddr,
    /// Do not listen for HTTPS.
    #[arg(long)]
    pub no_https: bool,
    /// State directory: route cache, local CA, mTLS material.
    #[arg(long, default_value = "/var/lib/zeitwork/edge")]
    pub data_dir: PathBuf,
    /// Serve a static route table (JSON `RouteTable`) instead of following a
    /// captain.
    #[arg(long)]
    pub routes_file: Option<PathBuf>,
    /// Extra names (or `*.parent`) the local development CA issues for.
    #[arg(long = "domain")]
    pub domains: Vec<String>,
    /// PEM certificate chain served when no other certificate matches
    /// (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// ACME directory URL; enables certificates for every HTTP route domain
    /// (e.g. https://acme-v02.api.letsencrypt.org/directory).
    #[arg(long)]
    pub acme_directory: Option<String>,
    /// ACME contact (`mailto:...`), repeatable.
    #[arg(long)]
    pub acme_contact: Vec<String>,
    /// PEM root of the ACME server's own HTTPS (test CAs such as pebble).
    #[arg(long)]
    pub acme_root: Option<PathBuf>,
    /// ACME challenge to answer.
    #[arg(long, value_enum, default_value = "http01")]
    pub acme_challenge: crate::acme::Challenge,
    /// Renew ACME certificates this many days before expiry.
    #[arg(long, default_value_t = 30)]
    pub acme_renew_days: u64,
    /// Do not issue local-CA certificates.
    #[arg(long)]
    pub no_local_ca: bool,
    /// Directory with `ca.crt` (cluster CA), `edge.crt`, `edge.key` (the
    /// edge's client certificate) for mTLS to node-proxies. Default:
    /// `<data-dir>/mtls`.
    #[arg(long)]
    pub mtls_dir: Option<PathBuf>,
    /// Most open client connections.
    #[arg(long, default_value_t = 100_000)]
    pub max_connections: usize,
    /// Most open connections of one client (an IPv4 address, an IPv6 /64);
    /// 0: no limit.
    #[arg(long, default_value_t = crate::server::DEFAULT_MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,
    /// Seconds a client has to send a request head (also keep-alive idle).
    #[arg(long, default_value_t = 30)]
    pub header_timeout_secs: u64,
    /// Largest request head in bytes.
    #[arg(long, default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Seconds a backend has to answer with headers.
    #[arg(long, default_value_t = 60)]
    pub response_timeout_secs: u64,
    /// Disable the per-request access log.
    #[arg(long)]
    pub no_access_log: bool,
}

/// Runs the edge until Ctrl-C / SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let edge_token = edge_token(&args)?;
    crate::tls::install_default_provider();
    let shutdown = CancellationToken::new();
    let routes = Arc::new(Routes::new());
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let cache = args.data_dir.join(ROUTE_CACHE_FILE);

    // Joined once (or joining now): the credential, the captains and the
    // mTLS material come from the enrolment.
    let enrol_path = args.data_dir.join(crate::member::ENROLMENT_FILE);
    let membership = enrolment(&args, &enrol_path, &shutdown).await?;
    let mut captains_for_renewal = None;

    let mut feed_task = None;
    if let Some(path) = &args.routes_file {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let table = RouteTable::from_json(&bytes)
            .with_context(|| format!("route table {}", path.display()))?;
        routes.replace(&table);
        tracing::info!(
            version = table.version,
            routes = table.routes.len(),
            "serving static route table"
        );
    } else {
        match feed::load_cache(&cache) {
            Ok(Some(table)) => {
                routes.replace(&table);
                tracing::info!(
                    version = table.version,
                    "serving cached route table until the captain answers"
                );
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(error = %crate::proxy::error_chain(&err), "ignoring the route cache")
            }
        }
        let given = crate::member::parse_captains(args.captain.as_deref().unwrap_or(""));
        let token = match &membership {
            Some(m) => m.load().credential.clone(),
            None => {
                if given.is_empty() {
                    anyhow::bail!("--captain is required unless --routes-file is given");
                }
                edge_token.clone().context(
                    "give --join-token (or --join-token-file, ZW_JOIN_TOKEN) to join the cluster, or --token-file (or ZW_EDGE_TOKEN) of an edge",
                )?
            }
        };
        let captains = match &membership {
            Some(m) => Arc::new(crate::member::Captains::new(merge(
                &given,
                &m.load().captains,
            ))),
            None => Arc::new(crate::member::Captains::new(given)),
        };
        captains_for_renewal = Some(captains.clone());
        let captain_ca_pem = match &args.captain_ca {
            Some(p) => Some(
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            ),
            None => None,
        };
        let cfg = FeedConfig {
            captains,
            token,
            cache_path: Some(cache),
            captain_ca_pem,
            idle_timeout: Duration::from_secs(60),
            max_backoff: Duration::from_secs(10),
        };
        let (r, s) = (routes.clone(), shutdown.clone());
        feed_task = Some(tokio::spawn(async move { feed::follow(cfg, r, s).await }));
    }

    let mtls_dir = args
        .mtls_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("mtls"));
    let mut renewal = None;
    let mtls = if let Some(m) = &membership {
        let e = m.load_full();
        let cert = crate::upstream::ClientCert::new(&e.issued())
            .context("the edge's enrolled certificate")?;
        if let Some(captains) = captains_for_renewal.clone() {
            let (cert, m) = (cert.clone(), m.clone());
            renewal = Some(tokio::spawn(crate::member::keep_renewed(
                enrol_path.clone(),
                m,
                captains,
                move |e| {
                    if let Err(err) = cert.set(&e.issued()) {
                        tracing::error!(error = %crate::proxy::error_chain(&err), "using the renewed certificate");
                    }
                },
                shutdown.clone(),
            )));
        }
        Some(
            crate::upstream::mtls_client_config_with(&e.ca_pem, cert)
                .context("mTLS client configuration")?,
        )
    } else if mtls_dir.join("edge.crt").exists() {
        let ca = std::fs::read_to_string(mtls_dir.join("ca.crt"))
            .with_context(|| format!("reading {}/ca.crt", mtls_dir.display()))?;
        let client =
            IssuedCert::load(&mtls_dir, "edge").context("loading the edge client certificate")?;
        Some(
            crate::upstream::mtls_client_config(&ca, &client)
                .context("mTLS client configuration")?,
        )
    } else {
        tracing::warn!(dir = %mtls_dir.display(), "no edge client certificate; mTLS backends will answer 502");
        None
    };

    let proxy = Proxy::new(
        routes.clone(),
        mtls,
        ProxyConfig {
            response_timeout: Duration::from_secs(args.response_timeout_secs),
            access_log: !args.no_access_log,
            ..ProxyConfig::default()
        },
    );
    let limits = Limits {
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        header_timeout: Duration::from_secs(args.header_timeout_secs),
        max_header_bytes: args.max_header_bytes,
        ..Limits::default()
    };
    let http01 = proxy.http01().clone();
    let server = Server::new(proxy, limits, shutdown.clone());

    let http = TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding HTTP {}", args.http))?;
    tracing::info!(addr = %http.local_addr()?, "edge listening (HTTP)");
    let mut tasks = tokio::task::JoinSet::new();
    {
        let s = server.clone();
        tasks.spawn(async move { s.serve_http(http).await });
    }
    if !args.no_https {
        let local_ca = if args.no_local_ca {
            None
        } else {
            Some(
                Ca::load_or_create(
                    &args.data_dir.join("local-ca"),
                    "zeitwork local development CA",
                )
                .context("local CA")?,
            )
        };
        let resolver = CertResolver::new(routes.clone(), local_ca, args.domains.clone());
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            let chain =
                std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
            let key_pem =
                std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            let (chain, key) = crate::pki::parse_pem(&chain, &key_pem, cert)?;
            resolver.set_fallback(Some(crate::pki::certified_key(chain, &key)?));
        }
        if let Some(directory_url) = &args.acme_directory {
            let cfg = crate::acme::AcmeConfig {
                directory_url: directory_url.clone(),
                contact: args.acme_contact.clone(),
                server_root: args.acme_root.clone(),
                state_dir: args.data_dir.join("acme"),
                renew_before: Duration::from_secs(args.acme_renew_days * 24 * 3600),
                challenge: args.acme_challenge,
                scan_interval: Duration::from_secs(60),
                retry_after_failure: Duration::from_secs(600),
            };
            let manager = crate::acme::AcmeManager::new(cfg, resolver.clone(), http01.clone());
            tasks.spawn(manager.run(routes.clone(), shutdown.clone()));
        }
        let tls_cfg = tls::server_config(resolver)?;
        let https = TcpListener::bind(args.https)
            .await
            .with_context(|| format!("binding HTTPS {}", args.https))?;
        tracing::info!(addr = %https.local_addr()?, "edge listening (HTTPS)");
        let s = server.clone();
        tasks.spawn(async move { s.serve_https(https, tls_cfg).await });
    }

    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some(t) = feed_task {
        let _ = t.await;
    }
    if let Some(t) = renewal {
        let _ = t.await;
    }
    Ok(())
}

fn merge(first: &[String], then: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in first.iter().chain(then) {
        if !out.contains(c) {
            out.push(c.clone());
        }
    }
    out
}

/// How `zw edge` takes its edge token.
pub const TOKEN_FLAGS: zw_util::SecretFlags = zw_util::SecretFlags {
    what: "edge token",
    flag: "--token",
    file_flag: "--token-file",
    env: "ZW_EDGE_TOKEN",
};

/// The edge token of `--token`, `--token-file` or `$ZW_EDGE_TOKEN`; one on
/// the command line is warned about on stderr.
fn edge_token(args: &Args) -> anyhow::Result<Option<String>> {
    Ok(TOKEN_FLAGS.resolve_warned(args.token.as_deref(), args.token_file.as_deref())?)
}

/// The join token of the flags, from the command line, the environment or
/// its file.
fn join_token(args: &Args) -> anyhow::Result<Option<String>> {
    Ok(JOIN_TOKEN_FLAGS
        .resolve_warned(args.join_token.as_deref(), args.join_token_file.as_deref())?)
}

/// How `zw edge` and `zw follower` take a join token.
pub const JOIN_TOKEN_FLAGS: zw_util::SecretFlags = zw_util::SecretFlags {
    what: "join token",
    flag: "--join-token",
    file_flag: "--join-token-file",
    env: "ZW_JOIN_TOKEN",
};

/// The edge's enrolment: the file kept from an earlier join, else a join
/// now with the join token (retried while no captain answers; a refusal
/// ends the start with the captain's reason).
async fn enrolment(
    args: &Args,
    path: &std::path::Path,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<arc_swap::ArcSwap<crate::member::Enrolment>>>> {
    use crate::member::{Enrolment, JoinParams, MemberError};
    if let Some(e) = Enrolment::load(path)? {
        e.check_role(crate::pki::Role::Edge)?;
        tracing::info!(name = %e.name, "member of the cluster (enrolment kept in {})", path.display());
        return Ok(Some(Arc::new(arc_swap::ArcSwap::from_pointee(e))));
    }
    let Some(token) = join_token(args)? else {
        return Ok(None);
    };
    let captains = crate::member::parse_captains(args.captain.as_deref().unwrap_or(""));
    anyhow::ensure!(
        !captains.is_empty(),
        "--captain is required to join the cluster"
    );
    let name = match &args.name {
        Some(n) => n.clone(),
        None => {
            let p = args.data_dir.join("edge-name");
            match std::fs::read_to_string(&p) {
                Ok(n) if !n.trim().is_empty() => n.trim().to_string(),
                _ => {
                    let n = format!("edge-{}", ulid::Ulid::new().to_string().to_lowercase());
                    crate::pki::write_atomic(&p, n.as_bytes(), 0o644)?;
                    n
                }
            }
        }
    };
    let http = crate::member::http_client();
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        let params = JoinParams {
            name: name.clone(),
            ..JoinParams::default()
        };
        match crate::member::join(&http, &captains, &token, crate::pki::Role::Edge, params).await {
            Ok(e) => {
                e.save(path)?;
                tracing::info!(name = %e.name, "joined the cluster as an edge");
                return Ok(Some(Arc::new(arc_swap::ArcSwap::from_pointee(e))));
            }
            Err(err @ MemberError::Unreachable { .. }) => {
                tracing::warn!(error = %crate::proxy::error_chain(&err), "joining: no captain answered; retrying in {delay:?}");
            }
            Err(err) => return Err(anyhow::Error::new(err).context("joining the cluster")),
        }
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("stopped before joining the cluster"),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(10));
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
