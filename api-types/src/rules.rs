//! The rules of names and values the captain accepts, as the schemas of
//! its OpenAPI document (`schema_with = ...` on the wire types). The
//! captain enforces the same rules (`captain::app::validate`, meta-schema's
//! validation); the OpenAPI fuzz test (`tests/openapi_fuzz.rs`) sends data
//! that matches these schemas and data that does not, and fails when the
//! captain refuses the one or takes the other.
//!
//! Patterns are anchored and use only what ECMA-262 and Python's `re` read
//! alike (no look-around, no `\s`, whose meaning differs).

use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, SchemaType, Type};

/// A DNS label: 1-63 of `a-z`, `0-9` and `-`, not starting or ending with `-`.
pub const DNS_LABEL: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// An image or upload digest: `sha256:` and 64 lowercase hex digits.
pub const DIGEST: &str = "^sha256:[0-9a-f]{64}$";
/// A git commit id, full or abbreviated.
pub const COMMIT: &str = "^[0-9A-Fa-f]{4,64}$";
/// An environment variable name.
pub const ENV_VAR_NAME: &str = "^[A-Za-z_][A-Za-z0-9_]*$";
/// A custom domain: at least two DNS labels (any case: stored lower case),
/// no wildcard.
pub const CUSTOM_DOMAIN: &str = "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$";
/// A project id: `prj-` and lowercase letters and digits.
pub const PROJECT_ID: &str = "^prj-[a-z0-9]{1,60}$";
/// An app id: `<app>.<env>`, two DNS labels.
pub const APP_ID: &str =
    "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// A ULID as the captain writes it (26 Crockford base32, upper case).
pub const ULID: &str = "^[0-7][0-9A-HJKMNP-TV-Z]{25}$";
/// A text with at least one character that is not whitespace.
/// (`str::trim` drops Unicode white space.)
pub const NOT_BLANK: &str =
    "[^\\x09-\\x0d\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";
/// Characters Rust's `char::is_whitespace` or `char::is_control` match.
const SPACE_OR_CONTROL: &str =
    "\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";

fn string(pattern: Option<String>, min: Option<usize>, max: Option<usize>) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(pattern)
        .min_length(min)
        .max_length(max)
}

fn nullable(b: ObjectBuilder, t: Type) -> Object {
    b.schema_type(SchemaType::from_iter([t, Type::Null]))
        .build()
}

fn map(keys: Schema, values: Schema) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(keys))
        .additional_properties(Some(values))
}

fn any_string() -> Schema {
    Schema::Object(ObjectBuilder::new().schema_type(Type::String).build())
}

/// `^...$` of a character class that has no whitespace or control character.
fn no_space(min: usize, max: usize) -> ObjectBuilder {
    string(
        Some(format!("^[^{SPACE_OR_CONTROL}]*$")),
        Some(min),
        Some(max),
    )
}

pub fn dns_label() -> Object {
    string(Some(DNS_LABEL.into()), Some(1), Some(63)).build()
}

pub fn opt_dns_label() -> Object {
    nullable(
        string(Some(DNS_LABEL.into()), Some(1), Some(63)),
        Type::String,
    )
}

pub fn digest() -> Object {
    string(Some(DIGEST.into()), None, None).build()
}

/// An image digest, or "" for none.
pub fn opt_digest_or_empty() -> Object {
    nullable(
        string(Some("^(sha256:[0-9a-f]{64})?$".into()), None, None),
        Type::String,
    )
}

/// A commit id, or "" for none.
pub fn opt_commit_or_empty() -> Object {
    nullable(
        string(Some("^([0-9A-Fa-f]{4,64})?$".into()), None, None),
        Type::String,
    )
}

pub fn commit_or_empty() -> Object {
    string(Some("^([0-9A-Fa-f]{4,64})?$".into()), None, None).build()
}

/// Environment variables: names `[A-Za-z_][A-Za-z0-9_]*`, any values.
pub fn opt_env_vars() -> Object {
    nullable(
        map(
            Schema::Object(string(Some(ENV_VAR_NAME.into()), None, None).build()),
            any_string(),
        ),
        Type::Object,
    )
}

/// Secret values by name: environment variable names that do not end in
/// `_unencrypted` (sops leaves such keys in plain text).
pub fn secret_values() -> Object {
    map(Schema::Object(secret_name_schema()), any_string()).build()
}

fn secret_name_schema() -> Object {
    string(Some(ENV_VAR_NAME.into()), Some(1), None)
        .description(Some(
            "an environment variable name; not `sops`, not ending in `_unencrypted`",
        ))
        .build()
}

/// Secret names (the `unset` list).
pub fn secret_names() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(secret_name_schema())
        .build()
}

/// Build arguments: names that are not empty and have no `=`.
pub fn build_args() -> Object {
    map(
        Schema::Object(string(Some("^[^=]+$".into()), Some(1), None).build()),
        any_string(),
    )
    .build()
}

/// Custom domains of an app.
pub fn custom_domains() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(string(Some(CUSTOM_DOMAIN.into()), None, Some(253)).build())
        .build()
}

/// A git URL or (development) path: 1-2048 characters, no whitespace or
/// control character.
pub fn repo() -> Object {
    no_space(1, 2048).build()
}

/// A git branch name: 1-255 characters, no whitespace, control character
/// or any of `~^:?*[\`, no `..`, not starting with `-` or `/`, not ending
/// with `/` or `.`.
pub fn opt_branch() -> Object {
    let c_no_dot = format!("[^{SPACE_OR_CONTROL}~^:?*\\[\\\\.]");
    let c_first = format!("[^{SPACE_OR_CONTROL}~^:?*\\[\\\\/.-]");
    let c_last = format!("[^{SPACE_OR_CONTROL}~^:?*\\[\\\\/.]");
    // No "..": every '.' is followed by a character that is not '.'.
    let pattern = format!("^({c_first}|\\.{c_no_dot})(({c_no_dot}|\\.{c_no_dot})*{c_last})?$");
    nullable(string(Some(pattern), Some(1), Some(255)), Type::String)
}

/// A Dockerfile path inside the source: relative, no `..` component; ""
/// for the default.
pub fn opt_dockerfile() -> Object {
    // A component that is not "..": "", ".", "x...", ".x...", "..x...".
    let comp = "(\\.|[^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+)?";
    let first = "(\\.|[^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+)";
    nullable(
        string(Some(format!("^({first}(/{comp})*)?$")), None, None),
        Type::String,
    )
}

/// An email address as the waitlist takes it: one `@`, a domain name.
pub fn email() -> Object {
    let local = format!("[^@{SPACE_OR_CONTROL}]+");
    let label = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
    string(
        Some(format!("^{local}@(\\*\\.)?{label}(\\.{label})*$")),
        Some(3),
        Some(254),
    )
    .build()
}

/// A health check path: starts with `/`.
pub fn opt_http_path() -> Object {
    nullable(string(Some("^/".into()), None, None), Type::String)
}

/// A token's name: 1-200 characters once surrounding whitespace is trimmed.
pub fn token_name() -> Object {
    string(Some(format!("[^{SPACE_OR_CONTROL}]")), Some(1), Some(200)).build()
}

/// A text with something other than white space in it.
pub fn not_blank() -> Object {
    string(Some(NOT_BLANK.into()), Some(1), None).build()
}

/// Not empty.
pub fn non_empty() -> Object {
    string(None, Some(1), None).build()
}

/// An instance id: 1-128 characters.
pub fn instance_id() -> Object {
    string(None, Some(1), Some(128)).build()
}

/// An `http(s)://` URL, or "" for none.
pub fn http_url_or_empty() -> Object {
    string(Some("^(https?://|$)".into()), None, None).build()
}

/// An age X25519 recipient (`age1...`), or "" for none.
pub fn age_recipient_or_empty() -> Object {
    string(Some("^(age1|$)".into()), None, None).build()
}

/// The role of a joining host.
pub fn join_role() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["worker", "edge"]))
        .build()
}

/// The kinds of token `POST /v1/tokens` makes (node and edge credentials
/// come with joining).
pub fn created_token_kind() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["admin", "user"]))
        .build()
}

/// A member's role in a project (default member).
pub fn opt_member_role() -> Object {
    nullable(
        ObjectBuilder::new().enum_values(Some([Some("owner"), Some("member"), None])),
        Type::String,
    )
}
