//! `zw follower`: the node agent as a command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::image::LocalDirImageSource;
use crate::net::InstanceRange;
use crate::runtime::RuntimeChoice;
use crate::runtime::qemu::GuestImage;
use crate::{Follower, FollowerConfig};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Directory for the ledger, the meta repo copy, instance state, logs.
    #[arg(long, env = "ZW_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Captain base URLs, comma-separated (`http://op1:7700,http://op2:7700`):
    /// calls go to the one that answered last and on to the next when it
    /// does not answer. Without it the node runs standalone and reports
    /// nowhere.
    #[arg(long, env = "ZW_CAPTAIN")]
    pub captain: Option<String>,
    /// A join token (`zw cluster token create --role worker`): the node
    /// joins the cluster once and keeps its key, certificate and credential
    /// in `<data-dir>/enrolment.json` (later starts need no token, no
    /// --token and no --meta-repo). A command line is readable by every
    /// user of the host: prefer --join-token-file or ZW_JOIN_TOKEN.
    #[arg(long)]
    pub join_token: Option<String>,
    /// File holding the join token.
    #[arg(long, conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// Serve the mTLS node-proxy here (`[::]:4433`) with the node's
    /// certificate from the cluster; edges reach instances through it.
    #[arg(long)]
    pub proxy_listen: Option<SocketAddr>,
    /// Token for the captain's API (also accepted on this node's API), else
    /// $ZW_TOKEN. A command line is readable by every user of the host:
    /// prefer --token-file or $ZW_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// File holding the token for the captain's API.
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Meta repository to follow: URL (file://, http(s)://) or path.
    /// Default for a node that joined the cluster: the captains'.
    #[arg(long, env = "ZW_META_REPO", default_value = "")]
    pub meta_repo: String,
    #[arg(long, default_value = "main")]
    pub branch: String,
    #[arg(long, value_enum, default_value_t = RuntimeChoice::Auto)]
    pub runtime: RuntimeChoice,
    /// Node id; default: generated once and kept in the data dir.
    #[arg(long)]
    pub node_id: Option<String>,
    #[arg(long, default_value = "local")]
    pub region: String,
    /// Node API listen address.
    #[arg(long, default_value = "[::1]:7710")]
    pub listen: SocketAddr,
    /// Address advertised to the captain; default: the listen IP.
    #[arg(long)]
    pub address: Option<String>,
    /// The node's instance range, a /64 (`fd00:7a77:0:12::/64`); default:
    /// derived from the node id.
    #[arg(long)]
    pub instance_range: Option<String>,
    /// Object store directory (`images/<hex>/...`) used in place. Default:
    /// with `--captain`, the captain's image API (downloads verified and
    /// cached in `<data-dir>/images`); without, `<data-dir>/store`.
    #[arg(long)]
    pub image_store: Option<PathBuf>,
    /// Kernel and initramfs of qemu guests (see `qemu::prepare_guest`).
    #[arg(long, requires = "qemu_initramfs")]
    pub qemu_kernel: Option<PathBuf>,
    #[arg(long, requires = "qemu_kernel")]
    pub qemu_initramfs: Option<PathBuf>,
    /// Uncompressed kernel (virtio-mmio on the command line) and initramfs
    /// of firecracker guests.
    #[arg(long, requires = "firecracker_initramfs")]
    pub firecracker_kernel: Option<PathBuf>,
    #[arg(long, requires = "firecracker_kernel")]
    pub firecracker_initramfs: Option<PathBuf>,
    /// Seconds between meta fetches when not notified.
    #[arg(long, default_value_t = 5)]
    pub poll_seconds: u64,
}

/// How `zw follower` takes its token for the captain.
pub const TOKEN_FLAGS: zw_util::SecretFlags = zw_util::SecretFlags {
    what: "node token",
    flag: "--token",
    file_flag: "--token-file",
    env: "ZW_TOKEN",
};

// `zw follower` takes a join token as `zw edge` does.
use edge::cli::JOIN_TOKEN_FLAGS;

impl Args {
    pub fn config(&self) -> anyhow::Result<FollowerConfig> {
        // Absolute: the runtimes hand image and rootfs paths to programs
        // (mount, runc, qemu) that run in other directories.
        let data_dir = std::path::absolute(&self.data_dir)
            .with_context(|| format!("the data directory {}", self.data_dir.display()))?;
        let mut cfg = FollowerConfig::new(&data_dir, &self.meta_repo);
        cfg.captain_url = self.captain.clone();
        cfg.join_token = JOIN_TOKEN_FLAGS
            .resolve_warned(self.join_token.as_deref(), self.join_token_file.as_deref())?;
        cfg.proxy_listen = self.proxy_listen;
        cfg.token = TOKEN_FLAGS
            .resolve_warned(self.token.as_deref(), self.token_file.as_deref())?
            .unwrap_or_default();
        cfg.branch = self.branch.clone();
        cfg.runtime = self.runtime;
        cfg.node_id = self.node_id.clone();
        cfg.region = self.region.clone();
        cfg.api_listen = self.listen;
        cfg.address = self.address.clone();
        cfg.poll_interval = Duration::from_secs(self.poll_seconds.max(1));
        if let Some(r) = &self.instance_range {
            cfg.instance_range = Some(InstanceRange::parse(r).context("--instance-range")?);
        }
        if let (Some(kernel), Some(initramfs)) = (&self.qemu_kernel, &self.qemu_initramfs) {
            cfg.vm.qemu_guest = Some(GuestImage {
                kernel: kernel.clone(),
                initramfs: initramfs.clone(),
            });
        }
        if let (Some(kernel), Some(initramfs)) =
            (&self.firecracker_kernel, &self.firecracker_initramfs)
        {
            cfg.vm.firecracker_guest = Some(GuestImage {
                kernel: kernel.clone(),
                initramfs: initramfs.clone(),
            });
        }
        if let Some(s) = &self.image_store {
            cfg.images = Some(Arc::new(LocalDirImageSource::new(s)));
        }
        Ok(cfg)
    }
}

/// Runs the follower until SIGINT or SIGTERM. Instances keep running after
/// it exits; the next start on the same data dir adopts them.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = args.config()?;
    let f = Follower::start(cfg)
        .await
        .context("starting the follower")?;
    tracing::info!(node = %f.node_id, api = %f.api_addr, proxy = ?f.proxy_addr, "follower running");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down; instances keep running");
    f.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Zw {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_become_the_follower_config() {
        let zw = Zw::try_parse_from([
            "zw",
            "--data-dir",
            "/var/lib/zw",
            "--captain",
            "http://captain:7700",
            "--token",
            "t0k",
            "--meta-repo",
            "file:///srv/meta.git",
            "--runtime",
            "process",
            "--instance-range",
            "fd00:7a77:0:42::/64",
            "--poll-seconds",
            "7",
        ])
        .unwrap();
        let cfg = zw.args.config().unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/zw"));
        assert_eq!(cfg.captain_url.as_deref(), Some("http://captain:7700"));
        assert_eq!(cfg.token, "t0k");
        assert_eq!(cfg.meta_repo, "file:///srv/meta.git");
        assert_eq!(cfg.runtime, RuntimeChoice::Process);
        assert_eq!(
            cfg.instance_range.unwrap().to_string(),
            "fd00:7a77:0:42::/64"
        );
        assert_eq!(cfg.poll_interval, Duration::from_secs(7));
        assert!(cfg.vm.qemu_guest.is_none());
        // No --image-store: `Follower::start` takes images from the captain.
        assert!(cfg.images.is_none());

        let bad = Zw::try_parse_from([
            "zw",
            "--data-dir",
            "d",
            "--meta-repo",
            "m",
            "--instance-range",
            "nope",
        ])
        .unwrap();
        assert!(bad.args.config().is_err());
        // The token from a file (not on the command line).
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("token");
        std::fs::write(&file, "t0k-from-file\n").unwrap();
        let f = file.to_str().unwrap();
        let zw = Zw::try_parse_from(["zw", "--data-dir", "d", "--token-file", f]).unwrap();
        assert_eq!(zw.args.config().unwrap().token, "t0k-from-file");
        let both = ["zw", "--data-dir", "d", "--token", "t", "--token-file", f];
        assert!(Zw::try_parse_from(both).is_err());
        std::fs::write(&file, "\n").unwrap();
        let zw = Zw::try_parse_from(["zw", "--data-dir", "d", "--token-file", f]).unwrap();
        let e = format!(
            "{:#}",
            zw.args.config().err().expect("an empty file is refused")
        );
        assert!(e.contains("holds no node token"), "{e}");
        // A guest kernel needs its initramfs.
        assert!(
            Zw::try_parse_from([
                "zw",
                "--data-dir",
                "d",
                "--meta-repo",
                "m",
                "--qemu-kernel",
                "k"
            ])
            .is_err()
        );
    }
}
