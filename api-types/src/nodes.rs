//! Nodes and the instances they report: the node protocol (register, heartbeat, report) and the operator views.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    pub address: String,
    pub region: String,
    pub cpus: i64,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
    pub age_recipient: String,
    pub api_url: String,
    pub proxy_addr: String,
    pub state: String,
    pub memory_used_bytes: i64,
    pub instances: i64,
    pub last_seen: i64,
    pub registered_at: i64,
    /// Meta repo commit the node's follower last applied.
    pub applied_commit: String,
    /// A head the follower refused (does not descend from what it applied).
    pub refused_commit: String,
    pub refused_reason: String,
    /// An admin asked to drain it: its instances move elsewhere.
    #[serde(default)]
    pub drain: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterNode {
    #[schema(schema_with = crate::rules::dns_label)]
    pub id: String,
    #[schema(schema_with = crate::rules::not_blank)]
    pub address: String,
    #[serde(default)]
    pub region: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    #[serde(default)]
    #[schema(schema_with = crate::rules::age_recipient_or_empty)]
    pub age_recipient: String,
    #[serde(default)]
    pub api_url: String,
    #[serde(default)]
    pub proxy_addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisteredNode {
    pub node: NodeView,
    /// The node's token (shown once): it may call only node-facing endpoints.
    pub token: String,
    /// The key the captain calls the node's API with (shown once; the node
    /// accepts it until its next registration). Derived, never stored.
    pub api_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Online,
    Draining,
    Offline,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Draining => "draining",
            NodeState::Offline => "offline",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeResources {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub memory_used_bytes: u64,
    pub instances: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeHeartbeat {
    pub state: NodeState,
    pub resources: Option<NodeResources>,
    pub meta: Option<NodeMetaStatus>,
    /// Where the node is reached now (a worker that joined the cluster
    /// sends them with its first heartbeat of each start: its ports may
    /// have changed since it joined).
    #[serde(default)]
    pub endpoints: Option<NodeEndpoints>,
}

/// Where a node is reached, and the age recipient its secrets are
/// encrypted to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeEndpoints {
    #[schema(schema_with = crate::rules::not_blank)]
    pub address: String,
    /// Its node API (`http://addr:port`).
    #[schema(schema_with = crate::rules::http_url_or_empty)]
    pub api_url: String,
    /// Its mTLS node-proxy (`addr:port`).
    pub proxy_addr: String,
    #[serde(default)]
    #[schema(schema_with = crate::rules::age_recipient_or_empty)]
    pub age_recipient: String,
}

/// Where the node's follower is in following the meta repo.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeMetaStatus {
    pub applied_commit: Option<String>,
    pub refused_commit: Option<String>,
    pub refused_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Healthy,
    Unhealthy,
    Failed,
    Stopped,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Healthy => "healthy",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Failed => "failed",
            InstanceState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceView {
    pub id: String,
    pub node_id: String,
    pub env: String,
    pub app: String,
    pub rollout_id: String,
    pub release_id: String,
    pub state: String,
    pub reason: String,
    pub address: String,
    pub port: i64,
    pub attempts: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceReport {
    #[schema(schema_with = crate::rules::instance_id)]
    pub id: String,
    pub node_id: String,
    #[schema(schema_with = crate::rules::dns_label)]
    pub env: String,
    #[schema(schema_with = crate::rules::dns_label)]
    pub app: String,
    #[serde(default)]
    pub rollout_id: String,
    #[schema(schema_with = crate::rules::non_empty)]
    pub release_id: String,
    pub state: InstanceState,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub attempts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStateUpdate {
    pub state: InstanceState,
    #[serde(default)]
    pub reason: String,
}

/// Drain a node, or stop draining it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetDrain {
    pub drain: bool,
}
