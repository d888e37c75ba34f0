//! A blocking client of the captain's REST API. Errors are turned into
//! messages a user can act on: the API's own `{"error":{"code","message"}}`
//! as `<message> (<code>)`, and a failed connection with the URL and where
//! that URL came from.

use std::fmt;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use reqwest::Method;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where a setting was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env(&'static str),
    File(std::path::PathBuf),
    Login(std::path::PathBuf),
    DataDir(std::path::PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag => write!(f, "the command line flag"),
            Origin::Env(v) => write!(f, "${v}"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Login(p) => write!(f, "`zw login` credentials in {}", p.display()),
            Origin::DataDir(p) => write!(f, "the local `zw up` data dir {}", p.display()),
        }
    }
}

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ApiError {}

/// The API base URL, the token, and where each came from.
pub struct Api {
    pub base: String,
    pub base_origin: Origin,
    token: String,
    pub token_origin: Origin,
    http: Client,
}

impl Api {
    pub fn new(
        base: &str,
        base_origin: Origin,
        token: String,
        token_origin: Origin,
    ) -> anyhow::Result<Api> {
        let base = base.trim().trim_end_matches('/').to_string();
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "the API URL {base:?} (from {base_origin}) must start with http:// or https://"
        );
        let http = Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("zw/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("creating the HTTP client")?;
        Ok(Api {
            base,
            base_origin,
            token,
            token_origin,
            http,
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Send a request; a non-2xx answer becomes an [`ApiError`].
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Response> {
        self.send_with(method, path, |r| match body {
            Some(b) => r.json(b),
            None => r,
        })
    }

    /// Like [`Api::send`], with the request shaped by `shape` (headers, a
    /// streamed body, a longer timeout).
    pub fn send_with(
        &self,
        method: Method,
        path: &str,
        shape: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) -> anyhow::Result<Response> {
        let url = format!("{}{path}", self.base);
        let req = shape(
            self.http
                .request(method.clone(), &url)
                .bearer_auth(&self.token),
        );
        let resp = req
            .send()
            .map_err(|e| self.transport_error(&method, path, e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let mut err = self.error_of(resp);
        if err.status == 401 {
            err.message = format!("{} (token from {})", err.message, self.token_origin);
        }
        Err(err.into())
    }

    fn transport_error(&self, method: &Method, path: &str, e: reqwest::Error) -> anyhow::Error {
        let what = if e.is_connect() {
            "cannot connect to"
        } else if e.is_timeout() {
            "timed out talking to"
        } else {
            "request failed to"
        };
        let mut cause = String::new();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        if cause.is_empty() {
            cause = e.to_string();
        }
        anyhow!(
            "{what} the API at {} (from {}) for {method} {path}: {cause}",
            self.base,
            self.base_origin
        )
    }

    fn error_of(&self, resp: Response) -> ApiError {
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        let err = parsed.as_ref().map(|v| &v["error"]);
        match err {
            Some(e) if e["message"].is_string() => ApiError {
                status,
                code: e["code"].as_str().unwrap_or("unknown").to_string(),
                message: e["message"].as_str().unwrap_or_default().to_string(),
            },
            _ => ApiError {
                status,
                code: format!("http_{status}"),
                message: if text.trim().is_empty() {
                    format!("the API at {} answered HTTP {status}", self.base)
                } else {
                    format!(
                        "the API at {} answered HTTP {status}: {}",
                        self.base,
                        text.trim()
                    )
                },
            },
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let r = self.send(Method::GET, path, None)?;
        r.json()
            .with_context(|| format!("reading the answer of GET {path}"))
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        let b = serde_json::to_value(body)?;
        let r = self.send(Method::POST, path, Some(&b))?;
        r.json()
            .with_context(|| format!("reading the answer of POST {path}"))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(Method::DELETE, path, None)?;
        Ok(())
    }
}

/// Percent-encode one path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
