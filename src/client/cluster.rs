//! The operator commands: `zw cluster token create` (a join token for a
//! worker or an edge) and `zw nodes list|drain|remove`. They need an admin
//! token; the captain's refusal is shown as it words it.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use api_types::cluster::{ClusterMemberView, CreateJoinToken, JoinToken};
use api_types::nodes::{InstanceView, NodeView, SetDrain};
use reqwest::Method;

use super::api::{self, Api, ApiError};
use super::creds::{self, ConnArgs};

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Join tokens: a host joins with one (`zw follower --join-token-file`).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a join token (single use, expiring) and print it.
    Create(TokenCreateArgs),
}

#[derive(Debug, clap::Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The role the host joins as: `worker` or `edge`.
    #[arg(long)]
    pub role: String,
    /// How long the token may be used: `90s`, `30m`, `1h`, `7d` (default
    /// 1h, at most 7d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Print `{"token", "role", "expires_at"}` instead of the token alone.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum NodesCommand {
    /// Workers and edges: role, state, drain, last heartbeat, instances.
    List(NodesListArgs),
    /// Drain a node: its instances move to other nodes, nothing new is
    /// placed on it.
    Drain(DrainArgs),
    /// Remove a node or an edge from the cluster: its credential is
    /// revoked, its certificate is not renewed.
    Remove(RemoveArgs),
}

#[derive(Debug, clap::Args)]
pub struct NodesListArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print `{"nodes": [...], "members": [...]}` as the API gives them.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The node's id (see `zw nodes list`).
    pub id: String,
    /// Stop draining: the node takes instances again.
    #[arg(long, conflicts_with = "wait")]
    pub off: bool,
    /// Wait until no instance runs on the node any more, printing progress.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits: `90s`, `5m`, `1h`.
    #[arg(long, requires = "wait", default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// The node's id or the edge's name (see `zw nodes list`).
    pub id: String,
}

pub fn run_cluster(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Token(TokenCommand::Create(a)) => token_create(a),
    }
}

pub fn run_nodes(cmd: NodesCommand) -> anyhow::Result<()> {
    match cmd {
        NodesCommand::List(a) => list(a),
        NodesCommand::Drain(a) => drain(a),
        NodesCommand::Remove(a) => remove(a),
    }
}

fn token_create(a: TokenCreateArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let t: JoinToken = client
        .post(
            "/v1/cluster/join-tokens",
            &CreateJoinToken {
                role: a.role.clone(),
                ttl_seconds: a.ttl.map(|d| d.as_secs()),
            },
        )
        .context("making a join token")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        println!("{}", t.token);
    }
    Ok(())
}

/// `3s ago`, `5m ago`, `2h ago`, `4d ago`; `never` for 0.
pub fn age(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 {
        return "never".into();
    }
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn list(a: NodesListArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let nodes: Vec<NodeView> = client.get("/v1/nodes").context("listing nodes")?;
    let members: Vec<ClusterMemberView> = client
        .get("/v1/cluster/members")
        .context("listing the cluster's members")?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "nodes": nodes,
                "members": members,
            }))?
        );
        return Ok(());
    }
    let now = now_ms();
    let mut rows: Vec<[String; 7]> = vec![[
        "ID".into(),
        "ROLE".into(),
        "STATE".into(),
        "DRAIN".into(),
        "HEARTBEAT".into(),
        "INSTANCES".into(),
        "ADDRESS".into(),
    ]];
    for n in &nodes {
        rows.push([
            n.id.clone(),
            "worker".into(),
            n.state.clone(),
            if n.drain { "yes" } else { "no" }.into(),
            age(now, n.last_seen),
            n.instances.to_string(),
            n.address.clone(),
        ]);
    }
    // Edges have no node row: they are members of the cluster only.
    for m in members
        .iter()
        .filter(|m| m.role != "worker" && m.removed_at.is_none())
    {
        let state = if m.cert_expires_at * 1000 > now {
            "joined"
        } else {
            "cert expired"
        };
        rows.push([
            m.id.clone(),
            m.role.clone(),
            state.into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    if rows.len() == 1 {
        println!("no nodes (a worker joins with `zw cluster token create --role worker`)");
        return Ok(());
    }
    let mut width = [0usize; 7];
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

/// The instances on node `id` that still run (a stopped one is only a
/// report left behind).
fn running_on(client: &Api, id: &str) -> anyhow::Result<Vec<InstanceView>> {
    let all: Vec<InstanceView> = client
        .get(&format!("/v1/instances?node_id={}", api::enc(id)))
        .with_context(|| format!("listing the instances of node {id}"))?;
    Ok(all.into_iter().filter(|i| i.state != "stopped").collect())
}

fn drain(a: DrainArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let drain = !a.off;
    let path = format!("/v1/nodes/{}/drain", api::enc(&a.id));
    let body = serde_json::to_value(SetDrain { drain })?;
    let _: NodeView = client
        .send(Method::PUT, &path, Some(&body))?
        .json()
        .with_context(|| format!("reading the answer of PUT {path}"))?;
    if !drain {
        println!("node {} takes instances again", a.id);
        return Ok(());
    }
    println!(
        "node {} is draining: its instances move to other nodes, nothing new is placed on it",
        a.id
    );
    if !a.wait {
        return Ok(());
    }
    let start = Instant::now();
    let mut last: Option<usize> = None;
    loop {
        let left = running_on(&client, &a.id)?;
        if left.is_empty() {
            println!(
                "node {} is empty ({:.0?})",
                a.id,
                Duration::from_secs(start.elapsed().as_secs())
            );
            return Ok(());
        }
        if last != Some(left.len()) {
            let names: Vec<String> = left
                .iter()
                .map(|i| format!("{}.{} {}", i.app, i.env, i.state))
                .collect();
            println!(
                "node {}: {} instance{} left: {}",
                a.id,
                left.len(),
                if left.len() == 1 { "" } else { "s" },
                names.join(", ")
            );
            last = Some(left.len());
        }
        if start.elapsed() >= a.timeout {
            anyhow::bail!(
                "node {} still has {} instance{} after {}: see `zw nodes list` and the apps' `zw status`",
                a.id,
                left.len(),
                if left.len() == 1 { "" } else { "s" },
                humantime::format_duration(a.timeout)
            );
        }
        std::thread::sleep(Duration::from_secs(1).min(a.timeout.saturating_sub(start.elapsed())));
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApiError>()
        .is_some_and(|e| e.status == 404)
}

fn remove(a: RemoveArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let id = api::enc(&a.id);
    match client.delete(&format!("/v1/cluster/members/{id}")) {
        Ok(()) => {
            println!("{} removed from the cluster", a.id);
            return Ok(());
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    // A node registered without joining (`POST /v1/nodes`).
    match client.delete(&format!("/v1/nodes/{id}")) {
        Ok(()) => {
            println!("node {} removed", a.id);
            Ok(())
        }
        Err(e) if is_not_found(&e) => {
            anyhow::bail!(
                "no node and no member of the cluster is named {:?} (see `zw nodes list`)",
                a.id
            )
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_a_person_would() {
        assert_eq!(age(10_000, 0), "never");
        assert_eq!(age(10_000, 9_000), "1s ago");
        assert_eq!(age(10_000, 11_000), "0s ago");
        assert_eq!(age(200_000, 20_000), "3m ago");
        assert_eq!(age(8_000_000, 1), "2h ago");
        assert_eq!(age(3 * 86_400_000, 1), "2d ago");
    }
}
