//! The follower's side of the captain's API: registration, heartbeats with
//! node resources, instance reports. [`Captain`] is a trait so the
//! reconciler and the heartbeat loop are testable without a captain.

use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CaptainError {
    #[error("{op} {url}")]
    Http {
        op: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{op} {url}: captain answered {status}: {body}")]
    Status {
        op: &'static str,
        url: String,
        status: u16,
        body: String,
    },
}

const REGISTER: &str = "registering at";

/// `POST /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub id: String,
    pub address: String,
    pub region: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub age_recipient: String,
    pub api_url: String,
    pub proxy_addr: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Registered {
    #[serde(default)]
    pub node: serde_json::Value,
    pub token: String,
    /// The key the captain calls this node's API with, valid until the next
    /// registration (empty from captains that predate it).
    #[serde(default)]
    pub api_key: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub memory_used_bytes: u64,
    pub instances: u32,
}

/// Where the node is in following the meta repo; sent with heartbeats so a
/// refused (non-descendant) head reaches the captain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaStatus {
    pub applied_commit: Option<String>,
    pub refused_commit: Option<String>,
    pub refused_reason: Option<String>,
}

/// `PUT /v1/nodes/{id}/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub state: String,
    pub resources: Resources,
    #[serde(default)]
    pub meta: MetaStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Starting,
    Healthy,
    Unhealthy,
    Failed,
    Stopped,
}

impl InstanceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Healthy => "healthy",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Failed => "failed",
            InstanceState::Stopped => "stopped",
        }
    }
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub id: String,
    pub node_id: String,
    pub env: String,
    pub app: String,
    pub rollout_id: String,
    pub release_id: String,
    pub state: InstanceState,
    pub reason: String,
    pub address: String,
    pub port: u16,
    pub attempts: u32,
}

impl CaptainError {
    /// The captain refused the credential (unknown or revoked token).
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            CaptainError::Status {
                status: 401 | 403,
                ..
            }
        )
    }
}

pub trait Captain: Send + Sync + 'static {
    /// Registers with the bootstrap credential; later calls use the node
    /// token the captain issues.
    fn register<'a>(
        &'a self,
        reg: &'a NodeRegistration,
    ) -> BoxFuture<'a, Result<Registered, CaptainError>>;
    /// Uses a node token issued earlier (kept on disk across restarts), or
    /// forgets it (`None`) to register again.
    fn set_node_token(&self, token: Option<String>) {
        let _ = token;
    }
    fn heartbeat<'a>(
        &'a self,
        node_id: &'a str,
        hb: &'a Heartbeat,
    ) -> BoxFuture<'a, Result<(), CaptainError>>;
    fn report_instance<'a>(
        &'a self,
        report: &'a InstanceReport,
    ) -> BoxFuture<'a, Result<(), CaptainError>>;
    /// `PUT /v1/apps/{app_id}/secrets/file?base=`: the app's secrets file
    /// re-encrypted by this node to its env's recipients (see
    /// [`crate::rekey`]); `base` is the commit it was read at.
    fn put_secrets_file<'a>(
        &'a self,
        app_id: &'a str,
        base: &'a str,
        yaml: &'a str,
    ) -> BoxFuture<'a, Result<(), CaptainError>>;
}

/// No captain (a standalone node): nothing is sent; state is visible on the
/// node API only.
#[derive(Debug, Default)]
pub struct NoCaptain;

impl Captain for NoCaptain {
    fn register<'a>(
        &'a self,
        _reg: &'a NodeRegistration,
    ) -> BoxFuture<'a, Result<Registered, CaptainError>> {
        Box::pin(async {
            Ok(Registered {
                node: serde_json::Value::Null,
                token: String::new(),
                api_key: String::new(),
            })
        })
    }
    fn heartbeat<'a>(
        &'a self,
        _node_id: &'a str,
        _hb: &'a Heartbeat,
    ) -> BoxFuture<'a, Result<(), CaptainError>> {
        Box::pin(async { Ok(()) })
    }
    fn report_instance<'a>(
        &'a self,
        _report: &'a InstanceReport,
    ) -> BoxFuture<'a, Result<(), CaptainError>> {
        Box::pin(async { Ok(()) })
    }
    fn put_secrets_file<'a>(
        &'a self,
        _app_id: &'a str,
        _base: &'a str,
        _yaml: &'a str,
    ) -> BoxFuture<'a, Result<(), CaptainError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The captain's HTTP API. Registration uses the bootstrap token; every
/// other call uses the node token the registration returned.
pub struct HttpCaptain {
    base: String,
    bootstrap: String,
    node_token: ArcSwap<Option<String>>,
    http: reqwest::Client,
}

impl HttpCaptain {
    pub fn new(base_url: &str, token: &str) -> Self {
        HttpCaptain {
            base: base_url.trim_end_matches('/').to_string(),
            bootstrap: token.to_string(),
            node_token: ArcSwap::from_pointee(None),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("a reqwest client with rustls builds"),
        }
    }

    /// The token calls other than registration are sent with now.
    pub fn token(&self) -> String {
        (**self.node_token.load())
            .clone()
            .unwrap_or_else(|| self.bootstrap.clone())
    }

    /// [`HttpCaptain::token`] as a getter for other clients of the captain
    /// (the image store): each call reads the token of the registration
    /// current then, since it rotates at every registration.
    pub fn token_source(self: &Arc<Self>) -> builder::TokenSource {
        let me = self.clone();
        Arc::new(move || me.token())
    }

    /// Base URL of the captain (no trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn send<B: Serialize + ?Sized>(
        &self,
        op: &'static str,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<reqwest::Response, CaptainError> {
        let url = format!("{}{}", self.base, path);
        let token = if op == REGISTER {
            self.bootstrap.clone()
        } else {
            self.token()
        };
        let resp = self
            .http
            .request(method, &url)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .map_err(|source| CaptainError::Http {
                op,
                url: url.clone(),
                source,
            })?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            Err(CaptainError::Status {
                op,
                url,
                status,
                body: body.chars().take(500).collect(),
            })
        }
    }
}

impl Captain for HttpCaptain {
    fn register<'a>(
        &'a self,
        reg: &'a NodeRegistration,
    ) -> BoxFuture<'a, Result<Registered, CaptainError>> {
        Box::pin(async move {
            let resp = self
                .send(REGISTER, reqwest::Method::POST, "/v1/nodes", reg)
                .await?;
            let url = format!("{}/v1/nodes", self.base);
            let r: Registered = resp.json().await.map_err(|source| CaptainError::Http {
                op: "reading the registration answer of",
                url,
                source,
            })?;
            if !r.token.is_empty() {
                self.node_token.store(Arc::new(Some(r.token.clone())));
            }
            Ok(r)
        })
    }

    fn set_node_token(&self, token: Option<String>) {
        self.node_token.store(Arc::new(token));
    }

    fn heartbeat<'a>(
        &'a self,
        node_id: &'a str,
        hb: &'a Heartbeat,
    ) -> BoxFuture<'a, Result<(), CaptainError>> {
        Box::pin(async move {
            let path = format!("/v1/nodes/{node_id}/state");
            self.send("heartbeat to", reqwest::Method::PUT, &path, hb)
                .await
                .map(drop)
        })
    }

    fn report_instance<'a>(
        &'a self,
        report: &'a InstanceReport,
    ) -> BoxFuture<'a, Result<(), CaptainError>> {
        Box::pin(async move {
            self.send(
                "instance report to",
                reqwest::Method::POST,
                "/v1/instances",
                report,
            )
            .await
            .map(drop)
        })
    }

    fn put_secrets_file<'a>(
        &'a self,
        app_id: &'a str,
        base: &'a str,
        yaml: &'a str,
    ) -> BoxFuture<'a, Result<(), CaptainError>> {
        Box::pin(async move {
            const OP: &str = "sending a re-encrypted secrets file to";
            // Both are safe in a URL: an app id is `<dns-label>.<dns-label>`,
            // a commit id is hexadecimal.
            let url = format!("{}/v1/apps/{app_id}/secrets/file?base={base}", self.base);
            let resp = self
                .http
                .put(&url)
                .bearer_auth(self.token())
                .header(reqwest::header::CONTENT_TYPE, "application/yaml")
                .body(yaml.to_string())
                .send()
                .await
                .map_err(|source| CaptainError::Http {
                    op: OP,
                    url: url.clone(),
                    source,
                })?;
            if resp.status().is_success() {
                return Ok(());
            }
            // The captain's refusals name the app and the reason, never a
            // value (it cannot read them).
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            Err(CaptainError::Status {
                op: OP,
                url,
                status,
                body: body.chars().take(500).collect(),
            })
        })
    }
}

/// What this node has: CPUs, memory, disk of the data dir, memory in use.
pub fn node_resources(data_dir: &std::path::Path, instances: u32) -> Resources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let memory_bytes = field("MemTotal:");
    let memory_used_bytes = memory_bytes.saturating_sub(field("MemAvailable:"));
    let disk_bytes = nix::sys::statvfs::statvfs(data_dir)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0);
    Resources {
        cpus,
        memory_bytes,
        disk_bytes,
        memory_used_bytes,
        instances,
    }
}
