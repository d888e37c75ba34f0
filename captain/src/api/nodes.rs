//! Nodes and instances: the node protocol (register, heartbeat, report)
//! and the operator views.

use api_types::nodes::{
    InstanceReport, InstanceStateUpdate, InstanceView, NodeHeartbeat, NodeView, RegisterNode,
    RegisteredNode,
};
use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::json;
use crate::app::{access, nodes};
use crate::auth::Caller;
use crate::db::{InstanceRow, NodeRow};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::state::AppState;

impl From<NodeRow> for NodeView {
    fn from(n: NodeRow) -> Self {
        NodeView {
            id: n.id,
            address: n.address,
            region: n.region,
            cpus: n.cpus,
            memory_bytes: n.memory_bytes,
            disk_bytes: n.disk_bytes,
            age_recipient: n.age_recipient,
            api_url: n.api_url,
            proxy_addr: n.proxy_addr,
            state: n.state,
            memory_used_bytes: n.memory_used_bytes,
            instances: n.instances,
            last_seen: n.last_seen,
            registered_at: n.registered_at,
            applied_commit: n.applied_commit,
            refused_commit: n.refused_commit,
            refused_reason: n.refused_reason,
            drain: n.drain,
        }
    }
}

impl From<InstanceRow> for InstanceView {
    fn from(x: InstanceRow) -> Self {
        InstanceView {
            id: x.id,
            node_id: x.node_id,
            env: x.env,
            app: x.app,
            rollout_id: x.rollout_id,
            release_id: x.release_id,
            state: x.state,
            reason: x.reason,
            address: x.address,
            port: x.port,
            attempts: x.attempts,
            created_at: x.created_at,
            updated_at: x.updated_at,
        }
    }
}

pub async fn list_nodes(State(st): State<AppState>) -> Result<Response, ApiError> {
    let v: Vec<NodeView> = st.db.nodes().await?.into_iter().map(Into::into).collect();
    Ok(json(StatusCode::OK, v))
}

pub async fn register_node(
    State(st): State<AppState>,
    ApiJson(b): ApiJson<RegisterNode>,
) -> Result<Response, ApiError> {
    let r = nodes::register(&st, b).await?;
    let status = if r.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(
        status,
        RegisteredNode {
            node: r.node.into(),
            token: r.token,
            api_key: r.api_key,
        },
    ))
}

pub async fn get_node(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let n = st
        .db
        .node(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("node", &id))?;
    Ok(json(StatusCode::OK, NodeView::from(n)))
}

pub async fn delete_node(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    nodes::remove(&st, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn drain_node(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<api_types::nodes::SetDrain>,
) -> Result<Response, ApiError> {
    let n = nodes::set_drain(&st, &id, b.drain).await?;
    Ok(json(StatusCode::OK, NodeView::from(n)))
}

pub async fn node_heartbeat(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<NodeHeartbeat>,
) -> Result<Response, ApiError> {
    let n = nodes::heartbeat(&st, &caller, &id, b).await?;
    Ok(json(StatusCode::OK, NodeView::from(n)))
}

#[derive(Deserialize)]
pub struct InstanceQuery {
    node_id: Option<String>,
}

/// `GET /v1/instances`: a node sees its own instances, a user those of
/// their apps, an admin all.
pub async fn list_instances(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<InstanceQuery>,
) -> Result<Response, ApiError> {
    let node = match (&caller.node_id, &q.node_id) {
        (Some(own), Some(asked)) if own != asked => {
            return Err(crate::app::AppError::Forbidden(format!(
                "this node token belongs to {own:?}, not to node {asked:?}"
            ))
            .into());
        }
        (Some(own), _) => Some(own.as_str()),
        (None, asked) => asked.as_deref(),
    };
    let visible = if caller.node_id.is_some() {
        None
    } else {
        access::app_ids(&st, &caller).await?
    };
    let v: Vec<InstanceView> = st
        .db
        .instances(node)
        .await?
        .into_iter()
        .filter(|x| {
            visible
                .as_ref()
                .is_none_or(|ids| ids.contains(&crate::meta::app_id(&x.env, &x.app)))
        })
        .map(Into::into)
        .collect();
    Ok(json(StatusCode::OK, v))
}

pub async fn report_instance(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(b): ApiJson<InstanceReport>,
) -> Result<Response, ApiError> {
    let row = nodes::report_instance(&st, &caller, b).await?;
    Ok(json(StatusCode::OK, InstanceView::from(row)))
}

pub async fn get_instance(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let x = access::instance(&st, &caller, &id).await?;
    Ok(json(StatusCode::OK, InstanceView::from(x)))
}

pub async fn delete_instance(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    nodes::delete_instance(&st, &caller, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn set_instance_state(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<InstanceStateUpdate>,
) -> Result<Response, ApiError> {
    let x = nodes::set_instance_state(&st, &caller, &id, b.state, &b.reason).await?;
    Ok(json(StatusCode::OK, InstanceView::from(x)))
}
