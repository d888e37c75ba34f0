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

/// The wire types of the node protocol are the captain's own.
pub use api_types::nodes::{
    InstanceReport, InstanceState, NodeEndpoints, NodeHeartbeat as Heartbeat,
    NodeMetaStatus as MetaStatus, NodeResources as Resources, NodeState,
    RegisterNode as NodeRegistration,
};

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

/// The captains' HTTP API. Registration uses the bootstrap token; every
/// other call uses the node token the registration returned. A node that
/// joined the cluster ([`HttpCaptain::enrolled`]) has its credential from
/// the join and "registers" at each start with a heartbeat carrying its
/// current addresses. Each call goes to the captain that answered last and
/// on to the next one when a captain does not answer (connection refused
/// or timed out, 502-504).
pub struct HttpCaptain {
    captains: Arc<edge::member::Captains>,
    bootstrap: String,
    node_token: ArcSwap<Option<String>>,
    /// A joined node's API key (from its enrolment).
    enrolled_api_key: Option<String>,
    http: reqwest::Client,
}

impl HttpCaptain {
    /// `base_urls`: one captain URL or several, comma-separated.
    pub fn new(base_urls: &str, token: &str) -> Self {
        Self::with_captains(
            Arc::new(edge::member::Captains::new(edge::member::parse_captains(
                base_urls,
            ))),
            token,
        )
    }

    pub fn with_captains(captains: Arc<edge::member::Captains>, token: &str) -> Self {
        HttpCaptain {
            captains,
            bootstrap: token.to_string(),
            node_token: ArcSwap::from_pointee(None),
            enrolled_api_key: None,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .connect_timeout(std::time::Duration::from_secs(3))
                .build()
                .expect("a reqwest client with rustls builds"),
        }
    }

    /// A node that joined the cluster: `credential` is its node token,
    /// `api_key` the key the captains call its API with.
    pub fn enrolled(
        captains: Arc<edge::member::Captains>,
        credential: &str,
        api_key: &str,
    ) -> Self {
        let mut c = Self::with_captains(captains, "");
        c.node_token = ArcSwap::from_pointee(Some(credential.to_string()));
        c.enrolled_api_key = Some(api_key.to_string());
        c
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

    /// Base URL of the captain asked first now (no trailing `/`).
    pub fn base_url(&self) -> String {
        self.captains.current().1.unwrap_or_default()
    }

    /// The captains this node knows.
    pub fn captains(&self) -> &Arc<edge::member::Captains> {
        &self.captains
    }

    /// Sends a request to each captain in turn until one answers.
    async fn send_any(
        &self,
        op: &'static str,
        path: &str,
        request: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CaptainError> {
        let order = self.captains.in_order();
        let mut last = None;
        for (k, base) in order.iter().enumerate() {
            let url = format!("{base}{path}");
            match request(&url).send().await {
                Ok(resp) if matches!(resp.status().as_u16(), 502..=504) && k + 1 < order.len() => {
                    tracing::warn!(captain = %base, status = resp.status().as_u16(), "captain unavailable; trying the next one");
                    self.captains.failed(self.index_of(base));
                    last = Some(CaptainError::Status {
                        op,
                        url,
                        status: resp.status().as_u16(),
                        body: String::new(),
                    });
                }
                Ok(resp) => {
                    self.captains.answered(base);
                    return check(op, url, resp).await;
                }
                Err(source) if source.is_connect() || source.is_timeout() => {
                    if k + 1 < order.len() {
                        tracing::warn!(captain = %base, error = %zw_util::ErrorChain(&source), "captain unreachable; trying the next one");
                    }
                    self.captains.failed(self.index_of(base));
                    last = Some(CaptainError::Http { op, url, source });
                }
                Err(source) => return Err(CaptainError::Http { op, url, source }),
            }
        }
        Err(last.unwrap_or(CaptainError::Status {
            op,
            url: path.to_string(),
            status: 0,
            body: "no captain configured".into(),
        }))
    }

    fn index_of(&self, base: &str) -> usize {
        self.captains
            .all()
            .iter()
            .position(|c| c == base)
            .unwrap_or(0)
    }

    async fn send<B: Serialize + ?Sized>(
        &self,
        op: &'static str,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<reqwest::Response, CaptainError> {
        let token = if op == REGISTER {
            self.bootstrap.clone()
        } else {
            self.token()
        };
        self.send_any(op, path, |url| {
            self.http
                .request(method.clone(), url)
                .bearer_auth(&token)
                .json(body)
        })
        .await
    }
}

/// The answer if it is a success, else its status and body as the error.
async fn check(
    op: &'static str,
    url: String,
    resp: reqwest::Response,
) -> Result<reqwest::Response, CaptainError> {
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

impl Captain for HttpCaptain {
    fn register<'a>(
        &'a self,
        reg: &'a NodeRegistration,
    ) -> BoxFuture<'a, Result<Registered, CaptainError>> {
        Box::pin(async move {
            if let Some(api_key) = &self.enrolled_api_key {
                // Joined already: the node exists; tell the captains where
                // it is reached now.
                let hb = Heartbeat {
                    state: NodeState::Online,
                    resources: None,
                    meta: None,
                    endpoints: Some(NodeEndpoints {
                        address: reg.address.clone(),
                        api_url: reg.api_url.clone(),
                        proxy_addr: reg.proxy_addr.clone(),
                        age_recipient: reg.age_recipient.clone(),
                    }),
                };
                self.heartbeat(&reg.id, &hb).await?;
                return Ok(Registered {
                    node: serde_json::Value::Null,
                    token: String::new(),
                    api_key: api_key.clone(),
                });
            }
            let resp = self
                .send(REGISTER, reqwest::Method::POST, "/v1/nodes", reg)
                .await?;
            let url = format!("{}/v1/nodes", self.base_url());
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
        // A joined node's credential is its membership: only removing the
        // node revokes it, and registering again cannot replace it.
        if self.enrolled_api_key.is_none() {
            self.node_token.store(Arc::new(token));
        }
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
            // a commit id is hexadecimal. The captains' refusals name the
            // app and the reason, never a value (they cannot read them).
            let path = format!("/v1/apps/{app_id}/secrets/file?base={base}");
            let token = self.token();
            self.send_any(OP, &path, |url| {
                self.http
                    .put(url)
                    .bearer_auth(&token)
                    .header(reqwest::header::CONTENT_TYPE, "application/yaml")
                    .body(yaml.to_string())
            })
            .await
            .map(drop)
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
