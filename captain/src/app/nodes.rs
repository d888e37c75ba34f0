//! Nodes and the instances they report: registration, heartbeats, instance
//! reports. A node's credential may act only for its own node and the
//! instances on it ([`crate::auth::Caller::may_act_for_node`]).

use api_types::nodes::{InstanceReport, InstanceState, NodeHeartbeat, RegisterNode};
use api_types::tokens::TokenKind;

use super::validate::{check_name, to_i64};
use super::{AppError, Result};
use crate::auth::{self, Caller};
use crate::db::{InstanceRow, NodeRow};
use crate::state::AppState;

/// What a registration gives the node.
pub struct Registration {
    pub node: NodeRow,
    /// The node token (shown once).
    pub token: String,
    /// The key the captain calls the node's API with (shown once).
    pub api_key: String,
    /// A node that was not registered before.
    pub created: bool,
}

/// Users never act for nodes: refused before anything is looked up.
fn node_or_admin(caller: &Caller) -> Result<()> {
    if matches!(caller.kind, TokenKind::User | TokenKind::Edge) {
        return Err(AppError::Forbidden(
            "user tokens may not act for a node".into(),
        ));
    }
    Ok(())
}

fn may_act_for(caller: &Caller, node: &str) -> Result<()> {
    if caller.may_act_for_node(node) {
        Ok(())
    } else {
        Err(AppError::Forbidden(format!(
            "this node token belongs to {:?}, not to node {node:?}",
            caller.node_id.as_deref().unwrap_or("")
        )))
    }
}

fn check_endpoints(e: &api_types::nodes::NodeEndpoints) -> Result<()> {
    if e.address.trim().is_empty() {
        return Err(AppError::BadRequest("a node needs an address".into()));
    }
    let http = e.api_url.starts_with("http://") || e.api_url.starts_with("https://");
    if !e.api_url.is_empty() && !http {
        return Err(AppError::BadRequest(format!(
            "api_url {:?} is not an http(s) URL",
            e.api_url
        )));
    }
    if !e.age_recipient.is_empty() && !e.age_recipient.starts_with("age1") {
        return Err(AppError::BadRequest(
            "age_recipient must be an age X25519 recipient (age1...)".into(),
        ));
    }
    Ok(())
}

/// Register a node (again: a follower registers at every start, maybe on
/// new ports). A known node gets its row updated and a fresh token; its
/// old tokens stop working.
pub async fn register(st: &AppState, b: RegisterNode) -> Result<Registration> {
    check_name("node id", &b.id)?;
    if b.address.trim().is_empty() {
        return Err(AppError::BadRequest("a node needs an address".into()));
    }
    if !b.age_recipient.is_empty() && !b.age_recipient.starts_with("age1") {
        return Err(AppError::BadRequest(
            "age_recipient must be an age X25519 recipient (age1...)".into(),
        ));
    }
    let now = meta_schema::now_millis();
    let row = NodeRow {
        id: b.id.clone(),
        address: b.address,
        region: b.region,
        cpus: i64::from(b.cpus),
        memory_bytes: to_i64("memory_bytes", b.memory_bytes)?,
        disk_bytes: to_i64("disk_bytes", b.disk_bytes)?,
        age_recipient: b.age_recipient,
        api_url: b.api_url,
        proxy_addr: b.proxy_addr,
        state: "online".into(),
        memory_used_bytes: 0,
        instances: 0,
        last_seen: now,
        registered_at: now,
        applied_commit: String::new(),
        refused_commit: String::new(),
        refused_reason: String::new(),
        drain: false,
    };
    let mut created = true;
    match st.db.insert_node(&row).await {
        Ok(()) => {}
        Err(e) if e.is_unique_violation() => {
            if !st.db.reregister_node(&row).await? {
                return Err(AppError::Conflict(format!(
                    "node {:?} was removed while registering; try again",
                    row.id
                )));
            }
            st.db.revoke_node_tokens(&row.id, now).await?;
            created = false;
            tracing::info!(node = %row.id, "node registered again; previous node tokens revoked");
        }
        Err(e) => return Err(e.into()),
    }
    if !row.age_recipient.is_empty() {
        super::envs::add_node_recipient(st, &row.id, &row.age_recipient).await?;
    }
    let (issued, token) = auth::issue(
        &st.db,
        TokenKind::Node,
        &format!("node {}", row.id),
        Some(&row.id),
        None,
    )
    .await?;
    let api_key = crate::nodelink::issue_key(&st.config.cluster_key_path(), &row.id, &issued.id)
        .map_err(|e| AppError::internal("issuing the node's API key", e))?;
    let node = st.db.node(&row.id).await?.unwrap_or(row);
    Ok(Registration {
        node,
        token,
        api_key,
        created,
    })
}

/// Remove a node: its age recipient leaves every env, its tokens are
/// revoked.
pub async fn remove(st: &AppState, id: &str) -> Result<()> {
    // Recipient first: if that commit fails the node is still listed and
    // the removal can be retried (a no-op commit-wise when already removed).
    super::envs::remove_node_recipient(st, id).await?;
    if !st.db.delete_node(id).await? {
        return Err(AppError::not_found("node", id));
    }
    st.db
        .revoke_node_tokens(id, meta_schema::now_millis())
        .await?;
    // A worker that joined: it renews its certificate no more.
    st.db
        .remove_member_host(id, meta_schema::now_millis())
        .await?;
    Ok(())
}

/// Drain node `id` (or stop draining it): the planner moves its instances
/// to other nodes, health-gated, and places nothing new on it. The node's
/// own heartbeats do not undo it.
pub async fn set_drain(st: &AppState, id: &str, drain: bool) -> Result<NodeRow> {
    if !st.db.set_drain(id, drain).await? {
        return Err(AppError::not_found("node", id));
    }
    st.rollout_wake.notify_one();
    st.db
        .node(id)
        .await?
        .ok_or_else(|| AppError::not_found("node", id))
}

/// A node's heartbeat: its state, resources and where it is in following
/// the meta repository.
pub async fn heartbeat(
    st: &AppState,
    caller: &Caller,
    id: &str,
    b: NodeHeartbeat,
) -> Result<NodeRow> {
    node_or_admin(caller)?;
    may_act_for(caller, id)?;
    let res = match b.resources {
        Some(r) => Some((
            i64::from(r.cpus),
            to_i64("memory_bytes", r.memory_bytes)?,
            to_i64("disk_bytes", r.disk_bytes)?,
            to_i64("memory_used_bytes", r.memory_used_bytes)?,
            i64::from(r.instances),
        )),
        None => None,
    };
    let before = match &b.endpoints {
        Some(e) => {
            check_endpoints(e)?;
            st.db.node(id).await?
        }
        None => None,
    };
    let endpoints = b.endpoints.clone();
    let hb = crate::db::Heartbeat {
        endpoints: b
            .endpoints
            .map(|e| (e.address, e.api_url, e.proxy_addr, e.age_recipient)),
        state: b.state.as_str().to_string(),
        resources: res,
        meta: b.meta.map(|m| {
            (
                m.applied_commit.unwrap_or_default(),
                m.refused_commit.unwrap_or_default(),
                m.refused_reason.unwrap_or_default(),
            )
        }),
    };
    if !st.db.heartbeat(id, &hb, meta_schema::now_millis()).await? {
        return Err(AppError::not_found("node", id));
    }
    // A new age key (the node's data dir was replaced): its envs' secrets
    // are encrypted to it from now on.
    if let (Some(e), Some(before)) = (&endpoints, &before)
        && !e.age_recipient.is_empty()
        && e.age_recipient != before.age_recipient
    {
        super::envs::add_node_recipient(st, id, &e.age_recipient).await?;
    }
    st.db
        .node(id)
        .await?
        .ok_or_else(|| AppError::not_found("node", id))
}

/// An instance as its node reports it (upsert by id). An instance reported
/// by one node is never taken over by another's report.
pub async fn report_instance(
    st: &AppState,
    caller: &Caller,
    b: InstanceReport,
) -> Result<InstanceRow> {
    node_or_admin(caller)?;
    may_act_for(caller, &b.node_id)?;
    if b.id.is_empty() || b.id.chars().count() > 128 || b.release_id.is_empty() {
        return Err(AppError::BadRequest(
            "an instance report needs an id (at most 128 characters) and a release_id".into(),
        ));
    }
    check_name("env", &b.env)?;
    check_name("app", &b.app)?;
    let now = meta_schema::now_millis();
    let existing = st.db.instance(&b.id).await?;
    if let Some(x) = &existing {
        may_act_for(caller, &x.node_id)?;
    }
    let row = InstanceRow {
        id: b.id,
        node_id: b.node_id,
        env: b.env,
        app: b.app,
        rollout_id: b.rollout_id,
        release_id: b.release_id,
        state: b.state.as_str().into(),
        reason: b.reason,
        address: b.address,
        port: i64::from(b.port),
        attempts: i64::from(b.attempts),
        created_at: existing.map_or(now, |x| x.created_at),
        updated_at: now,
    };
    st.db.upsert_instance(&row).await?;
    super::deploy::check_running(st, &row.release_id).await?;
    // A report can complete or fail a rollout and changes the routes.
    st.rollout_wake.notify_one();
    st.routes_wake.notify_one();
    Ok(row)
}

async fn instance_for(st: &AppState, caller: &Caller, id: &str) -> Result<InstanceRow> {
    node_or_admin(caller)?;
    let x = st
        .db
        .instance(id)
        .await?
        .ok_or_else(|| AppError::not_found("instance", id))?;
    may_act_for(caller, &x.node_id)?;
    Ok(x)
}

pub async fn set_instance_state(
    st: &AppState,
    caller: &Caller,
    id: &str,
    state: InstanceState,
    reason: &str,
) -> Result<InstanceRow> {
    let x = instance_for(st, caller, id).await?;
    st.db
        .set_instance_state(id, state.as_str(), reason, meta_schema::now_millis())
        .await?;
    super::deploy::check_running(st, &x.release_id).await?;
    st.db
        .instance(id)
        .await?
        .ok_or_else(|| AppError::not_found("instance", id))
}

pub async fn delete_instance(st: &AppState, caller: &Caller, id: &str) -> Result<()> {
    instance_for(st, caller, id).await?;
    st.db.delete_instance(id).await?;
    Ok(())
}
