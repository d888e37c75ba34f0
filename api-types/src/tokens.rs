//! API tokens.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Kinds of token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    Admin,
    User,
    /// A worker's credential (its node's row and instances).
    Node,
    /// An edge's credential (the route stream).
    Edge,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::User => "user",
            TokenKind::Node => "node",
            TokenKind::Edge => "edge",
        }
    }
    pub fn parse(s: &str) -> Option<TokenKind> {
        match s {
            "admin" => Some(TokenKind::Admin),
            "user" => Some(TokenKind::User),
            "node" => Some(TokenKind::Node),
            "edge" => Some(TokenKind::Edge),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub node_id: Option<String>,
    /// For user tokens: the user (`usr-...`).
    #[serde(default)]
    pub user_id: Option<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[schema(schema_with = crate::rules::token_name)]
    pub name: String,
    /// admin or user (node tokens are issued by node registration).
    #[schema(schema_with = crate::rules::created_token_kind)]
    pub kind: TokenKind,
    /// For a user token: the user it acts as (`usr-...`); none makes a
    /// new user named after the token.
    pub user_id: Option<String>,
}

/// A user.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: String,
    pub login: String,
    /// GitHub's user id, for users who signed in with GitHub.
    pub github_id: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: TokenView,
    /// The secret; shown once, only its hash is stored.
    pub secret: String,
}
