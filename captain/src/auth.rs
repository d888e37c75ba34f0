//! API tokens: random secrets of which only the sha256 is stored, checked
//! on every call by [`require`] with the access level of the route.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

pub use api_types::tokens::TokenKind;

use crate::db::TokenRow;
use crate::error::{ApiError, Code};
use crate::state::AppState;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, waitlist; webhooks check their own signature).
    Public,
    /// Node-facing: node tokens, and user/admin tokens.
    Node,
    /// User and admin tokens.
    User,
    /// Admin tokens only.
    Admin,
    /// Edges (and admins): the route stream.
    Edge,
    /// Hosts that joined the cluster (workers and edges): their own
    /// certificate renewal.
    Member,
    /// git smart HTTP: the handler authenticates itself (HTTP Basic or
    /// Bearer, with a challenge git understands); node tokens may fetch,
    /// only user and admin tokens may push.
    Git,
}

impl Access {
    /// The role a route needs, as the OpenAPI document's `x-zeitwork-role`.
    pub fn role(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Node => "node",
            Access::User => "user",
            Access::Admin => "admin",
            Access::Git => "git",
            Access::Edge => "edge",
            Access::Member => "member",
        }
    }

    /// Who may call a route, in words (the operation's description).
    pub fn describe(self) -> &'static str {
        match self {
            Access::Public => "Role: public (no token; webhooks check their own signature).",
            Access::Node => {
                "Role: node. A node token acts for its own node and the instances placed on it; admin tokens may too; user tokens only where the route says (reads of their own projects' instances and images)."
            }
            Access::User => {
                "Role: user. A user token acts inside the projects its user is a member of (anything else is not found); admin tokens see every project."
            }
            Access::Admin => "Role: admin (admin tokens only).",
            Access::Edge => "Role: edge (an edge's credential from joining; admin tokens too).",
            Access::Member => {
                "Role: member (the credential a worker or an edge got when it joined)."
            }
            Access::Git => {
                "Role: git (HTTP Basic or Bearer token): node tokens may fetch; user tokens may push release files of their own apps; admins anything valid."
            }
        }
    }
}

/// The authenticated caller of a request (a request extension).
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub kind: TokenKind,
    /// For node tokens: the node the token was issued to.
    pub node_id: Option<String>,
    /// For user tokens: the user.
    pub user_id: Option<String>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.kind == TokenKind::Admin
    }

    /// May this caller act for `node` (report its instances, send its
    /// heartbeat)? Only that node's own token, and admins.
    pub fn may_act_for_node(&self, node: &str) -> bool {
        match self.kind {
            TokenKind::Admin => true,
            TokenKind::Node => self.node_id.as_deref() == Some(node),
            TokenKind::User | TokenKind::Edge => false,
        }
    }
}

/// A new secret token: a kind prefix and 32 random bytes, hex.
pub fn new_secret(kind: TokenKind) -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    let prefix = match kind {
        TokenKind::Admin => "zwa",
        TokenKind::User => "zwu",
        TokenKind::Node => "zwn",
        TokenKind::Edge => "zwe",
    };
    format!("{prefix}_{}", hex::encode(b))
}

/// What the database stores of a token.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Create and store a token; returns its row and the secret (shown once).
pub async fn issue(
    db: &crate::db::Db,
    kind: TokenKind,
    name: &str,
    node_id: Option<&str>,
    user_id: Option<&str>,
) -> Result<(TokenRow, String), crate::db::DbError> {
    let secret = new_secret(kind);
    let row = TokenRow {
        id: meta_schema::new_id(),
        kind: kind.as_str().to_string(),
        name: name.to_string(),
        node_id: node_id.map(str::to_string),
        user_id: user_id.map(str::to_string),
        created_at: meta_schema::now_millis(),
        revoked_at: None,
    };
    db.insert_token(&row, &hash_secret(&secret)).await?;
    Ok((row, secret))
}

/// The secret of a request: `Authorization: Bearer <token>`, or HTTP Basic
/// with the token as password (what git sends).
pub fn presented_secret(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    if let Some(t) = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
    {
        return Some(t.trim().to_string());
    }
    let b = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, pass) = text.split_once(':')?;
    Some(pass.to_string())
}

/// Authenticate a request's headers.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(secret) = presented_secret(headers) else {
        return Err(ApiError::new(
            Code::Unauthorized,
            "missing credentials: send Authorization: Bearer <token>",
        ));
    };
    let Some(row) = state.db.token_by_hash(&hash_secret(&secret)).await? else {
        return Err(ApiError::new(
            Code::Unauthorized,
            "invalid or revoked token",
        ));
    };
    let kind = TokenKind::parse(&row.kind).ok_or_else(|| {
        ApiError::new(
            Code::Unauthorized,
            format!("token has unknown kind {:?}", row.kind),
        )
    })?;
    Ok(Caller {
        token_id: row.id,
        kind,
        node_id: row.node_id,
        user_id: row.user_id,
    })
}

/// Is a caller of `kind` allowed on a route of `access`?
pub fn allowed(access: Access, kind: TokenKind) -> bool {
    match access {
        Access::Public => true,
        Access::Git => kind != TokenKind::Edge,
        Access::Node => kind != TokenKind::Edge,
        Access::User => matches!(kind, TokenKind::User | TokenKind::Admin),
        Access::Admin => kind == TokenKind::Admin,
        Access::Edge => matches!(kind, TokenKind::Edge | TokenKind::Admin),
        Access::Member => matches!(kind, TokenKind::Node | TokenKind::Edge),
    }
}

/// Middleware: authenticate and authorise for `access`, then put the
/// [`Caller`] into the request's extensions.
pub async fn require(
    State((state, access)): State<(AppState, Access)>,
    mut req: Request,
    next: Next,
) -> Response {
    if matches!(access, Access::Public | Access::Git) {
        return next.run(req).await;
    }
    let caller = match authenticate(&state, req.headers()).await {
        Ok(c) => c,
        Err(e) => return unauthorized(e, "Bearer"),
    };
    if !allowed(access, caller.kind) {
        let need = match access {
            Access::Admin => "an admin token",
            Access::Edge => "an edge's credential",
            Access::Member => "a worker's or an edge's credential",
            Access::Node => "a node, user or admin token",
            _ => "a user or admin token",
        };
        return ApiError::new(
            Code::Forbidden,
            format!(
                "a {} token may not call this endpoint; it needs {need}",
                caller.kind.as_str()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// A 401 with a `WWW-Authenticate` challenge of `scheme`.
pub fn unauthorized(e: ApiError, scheme: &'static str) -> Response {
    let mut r = e.into_response();
    let v = if scheme == "Basic" {
        HeaderValue::from_static("Basic realm=\"zeitwork meta repository\"")
    } else {
        HeaderValue::from_static("Bearer realm=\"zeitwork\"")
    };
    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    r
}

/// Headers-only authentication for handlers that do their own (git): a
/// refusal carries a Basic challenge git understands.
pub async fn authenticate_git(st: &AppState, headers: &HeaderMap) -> Result<Caller, Response> {
    authenticate(st, headers)
        .await
        .map_err(|e| unauthorized(e, "Basic"))
}
