//! Secrets files in the format of Mozilla/getsops `sops`, encrypted to age
//! recipients: `envs/<env>/apps/<app>/secrets.sops.yaml`.
//!
//! # Format
//!
//! A sops YAML file is the user's document with every (selected) leaf value
//! replaced by `ENC[AES256_GCM,data:<b64>,iv:<b64>,tag:<b64>,type:<t>]`, plus
//! a top-level `sops:` section of metadata:
//!
//! - one random 32-byte *data key* per file. Each value is sealed with
//!   AES-256-GCM under it, with a fresh **32-byte** nonce (`iv`) and the key
//!   path as associated data: every key from the root, each followed by `:`
//!   (`a:b:`); list elements use their list's path. The type tag (`str`,
//!   `int`, `int64`, `float`, `bool`, `bytes`) says how to read the plaintext
//!   back (`True`/`False` for booleans, Go's shortest `'f'` form for floats).
//!   Empty strings and nulls are never encrypted.
//! - `age:` — one entry per recipient: `recipient` (the `age1…` public key)
//!   and `enc`, an ASCII-armored age file whose payload is the data key.
//! - `mac:` — SHA-512 over the plaintext bytes of the values in document
//!   order (uppercase hex), sealed like a value with the `lastmodified`
//!   timestamp (RFC 3339) as associated data. With `mac_only_encrypted` only
//!   encrypted values count, and the hash is first fed SHA-256(`"sops"`).
//! - which values are encrypted: `unencrypted_suffix`, `encrypted_suffix`,
//!   `unencrypted_regex`, `encrypted_regex` (applied in sops' order to every
//!   key on the path). Files we write use the sops default,
//!   `unencrypted_suffix: _unencrypted`, and carry `version`.
//!
//! Reading accepts any single-document YAML map of nested maps, lists and
//! scalars (files written by `sops`); writing produces a flat map of
//! `NAME: value` strings, which `sops -d` reads back. Comments are not kept:
//! they are outside the MAC, so dropping them never invalidates a file.
//! Key groups (Shamir) and the comment-based rules are refused as
//! [`SopsError::Unsupported`].
//!
//! # Who can do what
//!
//! - **Anyone with the recipients' public keys** (the captain) can
//!   [`encrypt`] a complete set of secrets into a new file, and can list a
//!   file's [`SopsFile::names`] and [`SopsFile::recipients`] without
//!   decrypting anything: keys are plaintext in sops files.
//! - **A holder of an identity** (a follower node, an operator's CLI) can
//!   [`SopsFile::decrypt`], [`SopsFile::rewrap`] the same data key to a new
//!   recipient set (a node joined), and [`SopsFile::rotate`] to a fresh data
//!   key (a node left: rewrapping alone would not revoke it).
//!
//! ## Changing a secret when the writer cannot decrypt
//!
//! The captain never holds an identity, so it can read neither the data key
//! nor the old values; and without the data key it can neither add a value
//! to an existing file nor drop one (the MAC, sealed under the data key, covers
//! all of them). A secrets file is therefore always written **whole**, with a
//! fresh data key: `zw secrets set/unset` sends the captain the *complete*
//! desired set. The client builds it: an operator whose CLI holds an identity
//! decrypts the current file locally, applies the change to the [`Secrets`]
//! and sends the result; without an identity the user supplies every value.
//! The captain compares the names of the set it received with
//! [`SopsFile::names`] of the current file and refuses a write that would
//! silently drop names unless told to replace them. This keeps every file
//! a plain sops file (`sops -d`, `sops edit` and `sops updatekeys` keep
//! working) and keeps "the captain never decrypts" true by construction.
//!
//! Nothing in this module logs, and no error or `Debug` output contains a
//! plaintext value or key material: [`Secret`], [`Secrets`], [`DataKey`] and
//! [`DecryptedDocument`] print `[redacted]` and are zeroized on drop. Key
//! paths and names do appear in errors; sops stores them in cleartext anyway.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::iter;

use aes_gcm::aead::consts::U32;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::{AesGcm, Nonce};
use age::armor::{ArmoredReader, ArmoredWriter, Format};
use age::secrecy::zeroize::{Zeroize, Zeroizing};
use age::secrecy::{ExposeSecret, SecretString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;
use regex::Regex;
use serde_yaml::{Mapping, Value};
use sha2::{Digest, Sha256, Sha512};

/// The `sops:` version written into files we produce (the format is the
/// one of sops 3.x; readers do not depend on this field).
pub const SOPS_VERSION: &str = "3.9.4";
/// The `unencrypted_suffix` sops uses when no rule is given; files we write
/// carry it, so names with this suffix are refused by [`encrypt`].
pub const DEFAULT_UNENCRYPTED_SUFFIX: &str = "_unencrypted";
/// Top-level key of the metadata section.
const METADATA_KEY: &str = "sops";
/// Length of the data key and of the AES-GCM nonces sops uses.
const KEY_LEN: usize = 32;
const IV_LEN: usize = 32;
const TAG_LEN: usize = 16;
const ENC_PREFIX: &str = "ENC[AES256_GCM,";

/// AES-256-GCM with the 32-byte nonce sops uses.
type SopsGcm = AesGcm<Aes256, U32>;

/// Everything that can go wrong reading or writing a sops file. No variant
/// carries a plaintext value or key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SopsError {
    /// The text is not one YAML document.
    #[error("not a valid YAML document ({location})")]
    Yaml {
        /// Where the parser stopped (`line L, column C`), or what it refused.
        location: String,
    },
    /// The document has no top-level `sops:` section.
    #[error("no top-level `sops` metadata: this is not a sops-encrypted file")]
    MissingMetadata,
    /// A value or metadata field does not have the shape sops writes.
    #[error("malformed sops file at `{path}`: {reason}")]
    Malformed {
        /// Key path (`a:b:`) or metadata field (`sops.mac`).
        path: String,
        /// What is wrong (never the value itself).
        reason: String,
    },
    /// A sops feature this implementation does not handle.
    #[error("unsupported sops feature at `{path}`: {what}")]
    Unsupported {
        /// Key path or metadata field.
        path: String,
        /// The feature.
        what: String,
    },
    /// None of the given identities can unwrap the data key.
    #[error(
        "none of the given age identities is a recipient of this file (recipients: {})",
        .recipients.join(", ")
    )]
    NoMatchingRecipient {
        /// The `age1…` recipients the file is encrypted to.
        recipients: Vec<String>,
    },
    /// An `age:` entry addressed to one of our identities could not be opened.
    #[error("the data key wrapped for {recipient} could not be decrypted: {reason}")]
    DataKeyUnreadable {
        /// Recipient of the failing entry.
        recipient: String,
        /// The age error.
        reason: String,
    },
    /// A value did not authenticate under the data key.
    #[error(
        "value at `{path}` failed AES-GCM authentication: it was altered, or sealed under another data key"
    )]
    ValueAuthentication {
        /// Key path of the value.
        path: String,
    },
    /// The MAC does not match the values, or the MAC entry itself was altered.
    #[error("MAC mismatch: the file's values or its MAC were altered after it was written")]
    MacMismatch,
    /// A secret name that cannot be written.
    #[error("secret name {name:?} is not allowed: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The decrypted document is not a flat map of scalar values.
    #[error("`{path}` holds {found}, but zeitwork secrets are a flat map of NAME: value")]
    NotFlat {
        /// Top-level key.
        path: String,
        /// What was found there.
        found: &'static str,
    },
    /// Writing a file needs at least one recipient.
    #[error("at least one age recipient is required")]
    NoRecipients,
    /// age refused to wrap the data key.
    #[error("wrapping the data key with age failed: {0}")]
    Wrap(String),
}

fn malformed(path: impl Into<String>, reason: impl Into<String>) -> SopsError {
    SopsError::Malformed {
        path: path.into(),
        reason: reason.into(),
    }
}

fn unsupported(path: impl Into<String>, what: impl Into<String>) -> SopsError {
    SopsError::Unsupported {
        path: path.into(),
        what: what.into(),
    }
}

// ---------------------------------------------------------------------------
// Redacted plaintext types
// ---------------------------------------------------------------------------

/// One secret value. `Debug` prints `[redacted]`; the memory is zeroized on
/// drop.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The plaintext. Do not log it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

/// The secrets of one app: `NAME -> value`, sorted by name. `Debug` shows
/// the names only.
#[derive(Clone, Default)]
pub struct Secrets(BTreeMap<String, Secret>);

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name`, returning the previous value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<Secret>) -> Option<Secret> {
        self.0.insert(name.into(), value.into())
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Secret> {
        self.0.remove(name)
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.0.get(name)
    }

    /// Whether `name` is set.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// The names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// `(name, value)` pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Secret)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of secrets.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<Secret>> FromIterator<(K, V)> for Secrets {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Secrets(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl From<BTreeMap<String, String>> for Secrets {
    fn from(map: BTreeMap<String, String>) -> Self {
        map.into_iter().collect()
    }
}

/// A whole decrypted document (nested maps, lists, typed scalars), in file
/// order. `Debug` prints `[redacted]`; strings are zeroized on drop.
pub struct DecryptedDocument(Value);

impl DecryptedDocument {
    /// The plaintext tree. Do not log it.
    pub fn expose(&self) -> &Value {
        &self.0
    }
}

impl fmt::Debug for DecryptedDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DecryptedDocument([redacted])")
    }
}

impl Drop for DecryptedDocument {
    fn drop(&mut self) {
        scrub(&mut self.0);
    }
}

fn scrub(value: &mut Value) {
    match value {
        Value::String(s) => s.zeroize(),
        Value::Sequence(items) => items.iter_mut().for_each(scrub),
        Value::Mapping(map) => map.values_mut().for_each(scrub),
        Value::Tagged(tagged) => scrub(&mut tagged.value),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// A file's 32-byte data key. `Debug` prints `[redacted]`; zeroized on drop.
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(&mut key[..]);
        DataKey(key)
    }

    /// The raw key. Only for interoperability checks and tooling.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn cipher(&self) -> SopsGcm {
        SopsGcm::new_from_slice(&self.0[..]).expect("data key is 32 bytes")
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

// ---------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------

/// One `sops.age` entry: the data key wrapped for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgeEntry {
    /// The `age1…` public key.
    pub recipient: String,
    /// ASCII-armored age file holding the data key.
    pub enc: String,
}

/// Which values are encrypted, and what the MAC covers.
#[derive(Clone, Debug, Default)]
struct Rules {
    unencrypted_suffix: Option<String>,
    encrypted_suffix: Option<String>,
    unencrypted_regex: Option<Regex>,
    encrypted_regex: Option<Regex>,
    mac_only_encrypted: bool,
}

impl Rules {
    fn zeitwork_default() -> Self {
        Rules {
            unencrypted_suffix: Some(DEFAULT_UNENCRYPTED_SUFFIX.to_owned()),
            ..Rules::default()
        }
    }

    /// sops' decision for a leaf under `path` (the keys leading to it); the
    /// later rules override the earlier ones, as in sops.
    fn encrypts(&self, path: &[String]) -> bool {
        let mut encrypted = true;
        if let Some(suffix) = &self.unencrypted_suffix
            && path.iter().any(|k| k.ends_with(suffix.as_str()))
        {
            encrypted = false;
        }
        if let Some(suffix) = &self.encrypted_suffix {
            encrypted = path.iter().any(|k| k.ends_with(suffix.as_str()));
        }
        if let Some(re) = &self.unencrypted_regex
            && path.iter().any(|k| re.is_match(k))
        {
            encrypted = false;
        }
        if let Some(re) = &self.encrypted_regex {
            encrypted = path.iter().any(|k| re.is_match(k));
        }
        encrypted
    }

    /// The rule fields as they appear in `sops:`.
    fn to_entries(&self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        let text = |s: &str| Value::String(s.to_owned());
        if let Some(re) = &self.encrypted_regex {
            out.push(("encrypted_regex", text(re.as_str())));
        }
        if let Some(re) = &self.unencrypted_regex {
            out.push(("unencrypted_regex", text(re.as_str())));
        }
        if let Some(s) = &self.encrypted_suffix {
            out.push(("encrypted_suffix", text(s)));
        }
        if let Some(s) = &self.unencrypted_suffix {
            out.push(("unencrypted_suffix", text(s)));
        }
        if self.mac_only_encrypted {
            out.push(("mac_only_encrypted", Value::Bool(true)));
        }
        out
    }
}

#[derive(Clone, Debug)]
struct Metadata {
    age: Vec<AgeEntry>,
    lastmodified: String,
    mac: String,
    rules: Rules,
    version: Option<String>,
    /// Metadata keys we do not interpret (other key sources such as `pgp`
    /// or `kms`, empty lists older sops versions write), in file order.
    other: Vec<(String, Value)>,
}

/// Key sources other than age: their entries wrap the data key, so they
/// stay valid across [`SopsFile::rewrap`] but not across a rotation.
const FOREIGN_KEY_SOURCES: &[&str] = &["pgp", "kms", "gcp_kms", "azure_kv", "hc_vault", "hckms"];

fn meta_string(field: &str, value: &Value) -> Result<Option<String>, SopsError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(malformed(format!("sops.{field}"), "expected a string")),
    }
}

fn meta_regex(field: &str, value: &Value) -> Result<Option<Regex>, SopsError> {
    meta_string(field, value)?
        .map(|re| {
            Regex::new(&re)
                .map_err(|e| malformed(format!("sops.{field}"), format!("invalid regex: {e}")))
        })
        .transpose()
}

fn parse_age_entries(value: &Value) -> Result<Vec<AgeEntry>, SopsError> {
    let items = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Sequence(items) => items,
        _ => return Err(malformed("sops.age", "expected a list")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let path = format!("sops.age[{i}]");
            let map = item
                .as_mapping()
                .ok_or_else(|| malformed(&path, "expected a map"))?;
            let field = |name: &str| -> Result<String, SopsError> {
                map.get(name)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| malformed(format!("{path}.{name}"), "missing string"))
            };
            Ok(AgeEntry {
                recipient: field("recipient")?.trim().to_owned(),
                enc: field("enc")?,
            })
        })
        .collect()
}

impl Metadata {
    fn parse(value: &Value) -> Result<Self, SopsError> {
        let map = value
            .as_mapping()
            .ok_or_else(|| malformed("sops", "expected a map"))?;
        let mut age = Vec::new();
        let mut lastmodified = None;
        let mut mac = None;
        let mut rules = Rules::default();
        let mut version = None;
        let mut other = Vec::new();
        for (key, value) in map {
            let key = key
                .as_str()
                .ok_or_else(|| malformed("sops", "metadata keys must be strings"))?;
            match key {
                "age" => age = parse_age_entries(value)?,
                "lastmodified" => lastmodified = meta_string(key, value)?,
                "mac" => mac = meta_string(key, value)?,
                "unencrypted_suffix" => rules.unencrypted_suffix = meta_string(key, value)?,
                "encrypted_suffix" => rules.encrypted_suffix = meta_string(key, value)?,
                "unencrypted_regex" => rules.unencrypted_regex = meta_regex(key, value)?,
                "encrypted_regex" => rules.encrypted_regex = meta_regex(key, value)?,
                "mac_only_encrypted" => {
                    rules.mac_only_encrypted = match value {
                        Value::Null => false,
                        Value::Bool(b) => *b,
                        _ => return Err(malformed("sops.mac_only_encrypted", "expected a bool")),
                    }
                }
                "version" => {
                    version = match value {
                        Value::Number(n) => Some(n.to_string()),
                        other => meta_string(key, other)?,
                    }
                }
                "key_groups" => {
                    if !matches!(value, Value::Null)
                        && value.as_sequence().is_none_or(|s| !s.is_empty())
                    {
                        return Err(unsupported(
                            "sops.key_groups",
                            "key groups (Shamir secret sharing)",
                        ));
                    }
                }
                "encrypted_comment_regex" | "unencrypted_comment_regex" => {
                    if meta_string(key, value)?.is_some() {
                        return Err(unsupported(
                            format!("sops.{key}"),
                            "comment-based encryption rules",
                        ));
                    }
                }
                _ => other.push((key.to_owned(), value.clone())),
            }
        }
        Ok(Metadata {
            age,
            lastmodified: lastmodified.ok_or_else(|| malformed("sops.lastmodified", "missing"))?,
            mac: mac.ok_or_else(|| malformed("sops.mac", "missing"))?,
            rules,
            version,
            other,
        })
    }

    fn to_value(&self) -> Value {
        let mut map = Mapping::new();
        let age = self
            .age
            .iter()
            .map(|e| {
                let mut m = Mapping::new();
                m.insert("recipient".into(), Value::String(e.recipient.clone()));
                m.insert("enc".into(), Value::String(e.enc.clone()));
                Value::Mapping(m)
            })
            .collect();
        map.insert("age".into(), Value::Sequence(age));
        map.insert(
            "lastmodified".into(),
            Value::String(self.lastmodified.clone()),
        );
        map.insert("mac".into(), Value::String(self.mac.clone()));
        for (k, v) in &self.other {
            map.insert(Value::String(k.clone()), v.clone());
        }
        for (k, v) in self.rules.to_entries() {
            map.insert(k.into(), v);
        }
        if let Some(version) = &self.version {
            map.insert("version".into(), Value::String(version.clone()));
        }
        Value::Mapping(map)
    }
}

// ---------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------

/// A parsed sops file. Parsing decrypts nothing.
#[derive(Clone, Debug)]
pub struct SopsFile {
    /// The document without its `sops` key, values as stored.
    tree: Mapping,
    meta: Metadata,
}

impl SopsFile {
    /// Parses a sops YAML file.
    pub fn parse(yaml: &str) -> Result<Self, SopsError> {
        let doc: Value = serde_yaml::from_str(yaml).map_err(|e| SopsError::Yaml {
            location: match e.location() {
                Some(loc) => format!("line {}, column {}", loc.line(), loc.column()),
                // serde_yaml's messages without a location (several
                // documents, recursion limit) do not quote content.
                None => e.to_string(),
            },
        })?;
        let Value::Mapping(mut tree) = doc else {
            return Err(malformed("", "the document must be a map"));
        };
        let meta = tree
            .remove(METADATA_KEY)
            .ok_or(SopsError::MissingMetadata)?;
        let meta = Metadata::parse(&meta)?;
        tree.iter().try_for_each(|(k, v)| {
            let k = k
                .as_str()
                .ok_or_else(|| unsupported("", "non-string map key"))?;
            check_tree(v, &mut vec![k.to_owned()])
        })?;
        Ok(SopsFile { tree, meta })
    }

    /// Top-level keys (the secret names of a zeitwork file), in file order,
    /// read without decrypting.
    pub fn names(&self) -> Vec<&str> {
        self.tree.keys().filter_map(Value::as_str).collect()
    }

    /// The `age1…` recipients the data key is wrapped for.
    pub fn recipients(&self) -> Vec<&str> {
        self.meta.age.iter().map(|e| e.recipient.as_str()).collect()
    }

    /// The `sops.age` entries.
    pub fn age_entries(&self) -> &[AgeEntry] {
        &self.meta.age
    }

    /// The `sops.lastmodified` timestamp as written.
    pub fn last_modified(&self) -> &str {
        &self.meta.lastmodified
    }

    /// The `sops.version` field, if the file has one.
    pub fn version(&self) -> Option<&str> {
        self.meta.version.as_deref()
    }

    /// Unwraps the data key with the first identity that can, trying every
    /// `age:` entry.
    pub fn data_key(&self, identities: &[age::x25519::Identity]) -> Result<DataKey, SopsError> {
        let mut failure = None;
        for entry in &self.meta.age {
            match unwrap_data_key(&entry.enc, identities) {
                Ok(key) => return Ok(key),
                Err(Unwrap::NotForUs) => {}
                Err(Unwrap::Failed(reason)) => {
                    failure.get_or_insert(SopsError::DataKeyUnreadable {
                        recipient: entry.recipient.clone(),
                        reason,
                    });
                }
            }
        }
        Err(failure.unwrap_or_else(|| SopsError::NoMatchingRecipient {
            recipients: self.meta.age.iter().map(|e| e.recipient.clone()).collect(),
        }))
    }

    /// Decrypts the whole document and verifies its MAC.
    pub fn decrypt_document(
        &self,
        identities: &[age::x25519::Identity],
    ) -> Result<DecryptedDocument, SopsError> {
        let key = self.data_key(identities)?;
        self.decrypt_with_key(&key)
    }

    /// Decrypts with a known data key and verifies the MAC.
    fn decrypt_with_key(&self, key: &DataKey) -> Result<DecryptedDocument, SopsError> {
        let mut walk = Walk::new(&self.meta.rules, key, Direction::Decrypt);
        let plain = DecryptedDocument(Value::Mapping(walk.walk_map(&self.tree, &mut Vec::new())?));
        let computed = walk.finish();
        let stored = open_value(key, &self.meta.mac, &mac_ad(&self.meta.lastmodified)).map_err(
            |e| match e {
                SopsError::ValueAuthentication { .. } => SopsError::MacMismatch,
                other => other,
            },
        )?;
        let Value::String(stored) = &stored else {
            return Err(malformed("sops.mac", "the MAC must have type str"));
        };
        let stored = hex::decode(stored).map_err(|_| SopsError::MacMismatch)?;
        if !constant_time_eq(&stored, &computed) {
            return Err(SopsError::MacMismatch);
        }
        Ok(plain)
    }

    /// Decrypts a zeitwork secrets file: a flat map of `NAME: value`.
    /// Numbers and booleans (from hand-edited files) become their text;
    /// nested maps, lists and nulls are refused with [`SopsError::NotFlat`].
    pub fn decrypt(&self, identities: &[age::x25519::Identity]) -> Result<Secrets, SopsError> {
        let doc = self.decrypt_document(identities)?;
        let Value::Mapping(map) = doc.expose() else {
            return Err(malformed("", "the document must be a map"));
        };
        let mut secrets = Secrets::new();
        for (name, value) in map {
            let name = name.as_str().expect("keys were checked at parse time");
            let not_flat = |found| SopsError::NotFlat {
                path: name.to_owned(),
                found,
            };
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => number_text(n),
                Value::Null => return Err(not_flat("null")),
                Value::Sequence(_) => return Err(not_flat("a list")),
                Value::Mapping(_) => return Err(not_flat("a map")),
                Value::Tagged(_) => return Err(not_flat("a tagged value")),
            };
            secrets.insert(name, Secret::new(text));
        }
        Ok(secrets)
    }

    /// Wraps the **same** data key for `recipients` (replacing the `age:`
    /// list), e.g. when a node joins. Values, MAC and `lastmodified` are
    /// unchanged; other key sources (pgp, kms, …) are kept, since they wrap
    /// the same key. Needs one identity that can read the data key, and
    /// verifies the file first so a tampered file is never re-blessed.
    ///
    /// Dropping a recipient here does not revoke it (it may have kept the
    /// data key): use [`SopsFile::rotate`] for that.
    pub fn rewrap(
        &self,
        identities: &[age::x25519::Identity],
        recipients: &[age::x25519::Recipient],
    ) -> Result<String, SopsError> {
        let key = self.data_key(identities)?;
        drop(self.decrypt_with_key(&key)?);
        let mut meta = self.meta.clone();
        meta.age = wrap_for_all(&key, recipients)?;
        emit(&self.tree, &meta)
    }

    /// Re-encrypts every value under a **fresh** data key for `recipients`,
    /// with a new MAC and `lastmodified` (`now_millis`, unix milliseconds);
    /// the encryption rules of the file are kept. A recipient left out cannot
    /// read the new file. Entries of other key sources (pgp, kms, …) are
    /// dropped: they wrap the old key.
    pub fn rotate(
        &self,
        identities: &[age::x25519::Identity],
        recipients: &[age::x25519::Recipient],
        now_millis: i64,
    ) -> Result<String, SopsError> {
        let plain = self.decrypt_document(identities)?;
        let Value::Mapping(plain_tree) = plain.expose() else {
            return Err(malformed("", "the document must be a map"));
        };
        let other = self
            .meta
            .other
            .iter()
            .filter(|(k, _)| !FOREIGN_KEY_SOURCES.contains(&k.as_str()))
            .cloned()
            .collect();
        seal(
            plain_tree,
            self.meta.rules.clone(),
            other,
            recipients,
            now_millis,
        )
    }
}

/// Encrypts a complete set of secrets into a new sops file (YAML text)
/// under a fresh data key, wrapped for each of `recipients`. `now_millis`
/// (unix milliseconds) becomes `lastmodified`. Needs no identity: this is
/// what the captain uses. Empty values are stored as `''`, as sops does.
pub fn encrypt(
    secrets: &Secrets,
    recipients: &[age::x25519::Recipient],
    now_millis: i64,
) -> Result<String, SopsError> {
    let mut tree = Mapping::new();
    for (name, value) in secrets.iter() {
        check_name(name)?;
        tree.insert(
            Value::String(name.to_owned()),
            Value::String(value.expose().to_owned()),
        );
    }
    let result = seal(
        &tree,
        Rules::zeitwork_default(),
        Vec::new(),
        recipients,
        now_millis,
    );
    scrub(&mut Value::Mapping(tree));
    result
}

fn check_name(name: &str) -> Result<(), SopsError> {
    let invalid = |reason| {
        Err(SopsError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name == METADATA_KEY {
        return invalid("`sops` is the metadata key of the file");
    }
    if name.ends_with(DEFAULT_UNENCRYPTED_SUFFIX) {
        return invalid("names ending in `_unencrypted` are stored in cleartext by sops");
    }
    Ok(())
}

/// Encrypts a plaintext tree under a new data key and emits the file.
fn seal(
    plain: &Mapping,
    rules: Rules,
    other: Vec<(String, Value)>,
    recipients: &[age::x25519::Recipient],
    now_millis: i64,
) -> Result<String, SopsError> {
    let key = DataKey::generate();
    let age = wrap_for_all(&key, recipients)?;
    let lastmodified = format_rfc3339(now_millis);
    let mut walk = Walk::new(&rules, &key, Direction::Encrypt);
    let tree = walk.walk_map(plain, &mut Vec::new())?;
    let digest = walk.finish();
    let mac = seal_value(
        &key,
        hex::encode_upper(digest).as_bytes(),
        "str",
        &mac_ad(&lastmodified),
    );
    let meta = Metadata {
        age,
        lastmodified,
        mac,
        rules,
        version: Some(SOPS_VERSION.to_owned()),
        other,
    };
    emit(&tree, &meta)
}

fn emit(tree: &Mapping, meta: &Metadata) -> Result<String, SopsError> {
    let mut doc = tree.clone();
    doc.insert(METADATA_KEY.into(), meta.to_value());
    serde_yaml::to_string(&Value::Mapping(doc)).map_err(|e| SopsError::Yaml {
        location: format!("emitting: {e}"),
    })
}

/// Rejects what sops cannot represent: non-string keys, tags.
fn check_tree(value: &Value, path: &mut Vec<String>) -> Result<(), SopsError> {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                let Some(k) = k.as_str() else {
                    return Err(unsupported(ad_path(path), "non-string map key"));
                };
                path.push(k.to_owned());
                check_tree(v, path)?;
                path.pop();
            }
            Ok(())
        }
        Value::Sequence(items) => items.iter().try_for_each(|v| check_tree(v, path)),
        Value::Tagged(t) => Err(unsupported(ad_path(path), format!("YAML tag {}", t.tag))),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Walking the tree: encryption, decryption, MAC
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Encrypt,
    Decrypt,
}

struct Walk<'a> {
    rules: &'a Rules,
    key: &'a DataKey,
    direction: Direction,
    mac: Sha512,
}

impl<'a> Walk<'a> {
    fn new(rules: &'a Rules, key: &'a DataKey, direction: Direction) -> Self {
        let mut mac = Sha512::new();
        if rules.mac_only_encrypted {
            // sops seeds this variant with SHA-256("sops") so that its MAC
            // always differs from the MAC over all values.
            mac.update(Sha256::digest(b"sops"));
        }
        Walk {
            rules,
            key,
            direction,
            mac,
        }
    }

    fn finish(self) -> [u8; 64] {
        self.mac.finalize().into()
    }

    fn walk_map(&mut self, map: &Mapping, path: &mut Vec<String>) -> Result<Mapping, SopsError> {
        let mut out = Mapping::with_capacity(map.len());
        for (k, v) in map {
            let name = k
                .as_str()
                .ok_or_else(|| unsupported(ad_path(path), "non-string map key"))?;
            path.push(name.to_owned());
            let v = self.walk(v, path);
            path.pop();
            out.insert(k.clone(), v?);
        }
        Ok(out)
    }

    fn walk(&mut self, value: &Value, path: &mut Vec<String>) -> Result<Value, SopsError> {
        match value {
            Value::Mapping(map) => self.walk_map(map, path).map(Value::Mapping),
            // List elements share the path of their list.
            Value::Sequence(items) => items
                .iter()
                .map(|v| self.walk(v, path))
                .collect::<Result<_, _>>()
                .map(Value::Sequence),
            // sops leaves nulls alone and keeps them out of the MAC.
            Value::Null => Ok(Value::Null),
            Value::Tagged(t) => Err(unsupported(ad_path(path), format!("YAML tag {}", t.tag))),
            Value::Bool(_) | Value::Number(_) | Value::String(_) => self.leaf(value, path),
        }
    }

    fn leaf(&mut self, value: &Value, path: &[String]) -> Result<Value, SopsError> {
        let encrypted = self.rules.encrypts(path);
        let in_mac = encrypted || !self.rules.mac_only_encrypted;
        match self.direction {
            Direction::Encrypt => {
                let (bytes, ty) = plaintext_bytes(value, path)?;
                if in_mac {
                    self.mac.update(&bytes[..]);
                }
                if !encrypted || matches!(value, Value::String(s) if s.is_empty()) {
                    return Ok(value.clone());
                }
                Ok(Value::String(seal_value(
                    self.key,
                    &bytes,
                    ty,
                    &ad_path(path),
                )))
            }
            Direction::Decrypt => {
                let plain = if encrypted {
                    match value {
                        Value::String(s) if s.is_empty() => Value::String(String::new()),
                        Value::String(s) => open_value(self.key, s, &ad_path(path))?,
                        _ => {
                            return Err(malformed(
                                ad_path(path),
                                "expected an encrypted ENC[AES256_GCM,...] value",
                            ));
                        }
                    }
                } else {
                    value.clone()
                };
                if in_mac {
                    let (bytes, _) = plaintext_bytes(&plain, path)?;
                    self.mac.update(&bytes[..]);
                }
                Ok(plain)
            }
        }
    }
}

/// sops' associated data for a value: each key followed by `:`.
fn ad_path(path: &[String]) -> String {
    path.iter().map(|k| format!("{k}:")).collect()
}

/// The bytes sops encrypts and hashes for a scalar, and its type tag.
fn plaintext_bytes(
    value: &Value,
    path: &[String],
) -> Result<(Zeroizing<Vec<u8>>, &'static str), SopsError> {
    let (bytes, ty) = match value {
        Value::String(s) => (s.as_bytes().to_vec(), "str"),
        Value::Bool(true) => (b"True".to_vec(), "bool"),
        Value::Bool(false) => (b"False".to_vec(), "bool"),
        Value::Number(n) if n.is_f64() => (number_text(n).into_bytes(), "float"),
        Value::Number(n) => (n.to_string().into_bytes(), "int"),
        _ => return Err(malformed(ad_path(path), "expected a scalar value")),
    };
    Ok((Zeroizing::new(bytes), ty))
}

/// A number as sops prints it: integers in decimal, floats in Go's
/// shortest round-tripping `'f'` form (`1234.56789`, `1`, `-0`).
fn number_text(n: &serde_yaml::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() => {
            if f.is_nan() {
                "NaN".to_owned()
            } else if f.is_infinite() {
                if f > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
            } else {
                // Rust's Display is the shortest round-trip form and never
                // uses an exponent, like Go's FormatFloat(f, 'f', -1, 64).
                f.to_string()
            }
        }
        _ => n.to_string(),
    }
}

fn mac_ad(lastmodified: &str) -> String {
    normalize_rfc3339(lastmodified).unwrap_or_else(|| lastmodified.to_owned())
}

fn seal_value(key: &DataKey, plaintext: &[u8], ty: &str, ad: &str) -> String {
    let mut iv = [0u8; IV_LEN];
    rand::rng().fill_bytes(&mut iv);
    let sealed = key
        .cipher()
        .encrypt(
            Nonce::<U32>::from_slice(&iv),
            Payload {
                msg: plaintext,
                aad: ad.as_bytes(),
            },
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let (data, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    format!(
        "ENC[AES256_GCM,data:{},iv:{},tag:{},type:{ty}]",
        B64.encode(data),
        B64.encode(iv),
        B64.encode(tag)
    )
}

/// Opens one `ENC[...]` value into a typed YAML scalar.
fn open_value(key: &DataKey, text: &str, ad: &str) -> Result<Value, SopsError> {
    let path = || {
        if ad.is_empty() {
            "sops.mac".to_owned()
        } else {
            ad.to_owned()
        }
    };
    let bad = |reason: &str| malformed(path(), reason.to_owned());
    let body = text
        .strip_prefix(ENC_PREFIX)
        .and_then(|rest| rest.strip_suffix(']'))
        .ok_or_else(|| bad("expected an ENC[AES256_GCM,...] value"))?;
    let mut fields = [("data", ""), ("iv", ""), ("tag", ""), ("type", "")];
    let mut parts = body.split(',');
    for (name, slot) in fields.iter_mut() {
        let part = parts
            .next()
            .ok_or_else(|| bad("missing field in ENC[...]"))?;
        *slot = part
            .strip_prefix(*name)
            .and_then(|p| p.strip_prefix(':'))
            .ok_or_else(|| bad("fields of ENC[...] must be data, iv, tag, type"))?;
    }
    if parts.next().is_some() {
        return Err(bad("extra field in ENC[...]"));
    }
    let [(_, data), (_, iv), (_, tag), (_, ty)] = fields;
    let decode = |what: &str, s: &str| {
        B64.decode(s)
            .map_err(|_| malformed(path(), format!("invalid base64 in {what}")))
    };
    let mut sealed = decode("data", data)?;
    let iv = decode("iv", iv)?;
    let tag = decode("tag", tag)?;
    if iv.len() != IV_LEN {
        return Err(unsupported(
            path(),
            format!("{}-byte AES-GCM nonce", iv.len()),
        ));
    }
    if tag.len() != TAG_LEN {
        return Err(bad("the GCM tag must be 16 bytes"));
    }
    sealed.extend_from_slice(&tag);
    let plain = Zeroizing::new(
        key.cipher()
            .decrypt(
                Nonce::<U32>::from_slice(&iv),
                Payload {
                    msg: &sealed,
                    aad: ad.as_bytes(),
                },
            )
            .map_err(|_| SopsError::ValueAuthentication { path: path() })?,
    );
    let text = || {
        std::str::from_utf8(&plain)
            .map_err(|_| unsupported(path(), format!("non-UTF-8 `{ty}` value")))
    };
    let typed = |what: &str| malformed(path(), format!("decrypted `{ty}` value is not {what}"));
    Ok(match ty {
        "str" | "bytes" => Value::String(text()?.to_owned()),
        "int" | "int64" => Value::Number(
            text()?
                .parse::<i64>()
                .map_err(|_| typed("an integer"))?
                .into(),
        ),
        "float" => Value::Number(text()?.parse::<f64>().map_err(|_| typed("a float"))?.into()),
        "bool" => Value::Bool(parse_go_bool(text()?).ok_or_else(|| typed("a boolean"))?),
        "comment" => return Err(unsupported(path(), "encrypted comment as a value")),
        _ => return Err(bad("unknown value type")),
    })
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------
// age: wrapping the data key
// ---------------------------------------------------------------------------

enum Unwrap {
    NotForUs,
    Failed(String),
}

fn unwrap_data_key(enc: &str, identities: &[age::x25519::Identity]) -> Result<DataKey, Unwrap> {
    let decryptor = age::Decryptor::new(ArmoredReader::new(enc.as_bytes()))
        .map_err(|e| Unwrap::Failed(e.to_string()))?;
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => Unwrap::NotForUs,
            other => Unwrap::Failed(other.to_string()),
        })?;
    let mut plain = Zeroizing::new(Vec::with_capacity(KEY_LEN));
    reader
        .read_to_end(&mut plain)
        .map_err(|e| Unwrap::Failed(e.to_string()))?;
    let bytes: [u8; KEY_LEN] = plain[..]
        .try_into()
        .map_err(|_| Unwrap::Failed(format!("data key is {} bytes, expected 32", plain.len())))?;
    Ok(DataKey(Zeroizing::new(bytes)))
}

/// One `age:` entry per distinct recipient, each an armored age file of its
/// own, as sops writes them.
fn wrap_for_all(
    key: &DataKey,
    recipients: &[age::x25519::Recipient],
) -> Result<Vec<AgeEntry>, SopsError> {
    let mut seen = std::collections::BTreeSet::new();
    let mut entries = Vec::new();
    for recipient in recipients {
        let name = recipient.to_string();
        if seen.insert(name.clone()) {
            entries.push(AgeEntry {
                enc: wrap_data_key(key, recipient)?,
                recipient: name,
            });
        }
    }
    if entries.is_empty() {
        return Err(SopsError::NoRecipients);
    }
    Ok(entries)
}

fn wrap_data_key(key: &DataKey, recipient: &age::x25519::Recipient) -> Result<String, SopsError> {
    let wrap = |e: &dyn fmt::Display| SopsError::Wrap(e.to_string());
    let encryptor = age::Encryptor::with_recipients(iter::once(recipient as &dyn age::Recipient))
        .map_err(|e| wrap(&e))?;
    let armor = ArmoredWriter::wrap_output(Vec::new(), Format::AsciiArmor).map_err(|e| wrap(&e))?;
    let mut writer = encryptor.wrap_output(armor).map_err(|e| wrap(&e))?;
    writer.write_all(&key.0[..]).map_err(|e| wrap(&e))?;
    let armor = writer.finish().map_err(|e| wrap(&e))?;
    let bytes = armor.finish().map_err(|e| wrap(&e))?;
    let mut text = String::from_utf8(bytes).map_err(|e| wrap(&e))?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

// ---------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------

/// `YYYY-MM-DDTHH:MM:SSZ` for unix milliseconds (whole seconds, UTC), the
/// form sops writes in `lastmodified`.
fn format_rfc3339(now_millis: i64) -> String {
    let secs = now_millis.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// sops parses `lastmodified` and formats it again with Go's RFC 3339
/// layout before using it as associated data: fractional seconds vanish and
/// a zero offset becomes `Z`. `None` if the text is not RFC 3339.
fn normalize_rfc3339(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let zone = match rest {
        "Z" | "z" | "+00:00" | "-00:00" => "Z".to_owned(),
        offset
            if offset.len() == 6
                && matches!(offset.as_bytes()[0], b'+' | b'-')
                && offset.as_bytes()[3] == b':'
                && offset[1..3]
                    .bytes()
                    .chain(offset[4..].bytes())
                    .all(|c| c.is_ascii_digit()) =>
        {
            offset.to_owned()
        }
        _ => return None,
    };
    Some(format!("{}T{}{zone}", &s[..10], &s[11..19]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formatting_matches_known_dates() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_703_500_261_999), "2023-12-25T10:31:01Z");
        assert_eq!(format_rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(-1_000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn rfc3339_normalization_follows_go() {
        assert_eq!(
            normalize_rfc3339("2023-12-25T10:31:01Z").as_deref(),
            Some("2023-12-25T10:31:01Z")
        );
        assert_eq!(
            normalize_rfc3339("2023-12-25T10:31:01.123Z").as_deref(),
            Some("2023-12-25T10:31:01Z")
        );
        assert_eq!(
            normalize_rfc3339("2023-12-25T10:31:01+00:00").as_deref(),
            Some("2023-12-25T10:31:01Z")
        );
        assert_eq!(
            normalize_rfc3339("2023-12-25T10:31:01+02:00").as_deref(),
            Some("2023-12-25T10:31:01+02:00")
        );
        assert_eq!(normalize_rfc3339("yesterday"), None);
    }

    #[test]
    fn float_text_is_gos_shortest_f_form() {
        let text = |f: f64| number_text(&serde_yaml::Number::from(f));
        assert_eq!(text(1234.56789), "1234.56789");
        assert_eq!(text(1.0), "1");
        assert_eq!(text(1e21), "1000000000000000000000");
        assert_eq!(text(0.000001), "0.000001");
        assert_eq!(text(f64::INFINITY), "+Inf");
    }

    #[test]
    fn typed_scalars_of_a_hand_edited_file_read_as_text() {
        let identity = age::x25519::Identity::generate();
        let mut plain = Mapping::new();
        plain.insert("PORT".into(), Value::Number(8080.into()));
        plain.insert("DEBUG".into(), Value::Bool(true));
        plain.insert("RATIO".into(), Value::Number(1.5.into()));
        let yaml = seal(
            &plain,
            Rules::zeitwork_default(),
            Vec::new(),
            &[identity.to_public()],
            0,
        )
        .unwrap();
        assert!(
            yaml.contains("type:int]")
                && yaml.contains("type:bool]")
                && yaml.contains("type:float]")
        );
        let file = SopsFile::parse(&yaml).unwrap();
        let doc = file
            .decrypt_document(std::slice::from_ref(&identity))
            .unwrap();
        assert_eq!(doc.expose(), &Value::Mapping(plain));
        let secrets = file.decrypt(&[identity]).unwrap();
        let text = |n: &str| secrets.get(n).unwrap().expose().to_owned();
        assert_eq!(
            (text("PORT"), text("DEBUG"), text("RATIO")),
            ("8080".into(), "true".into(), "1.5".into())
        );
    }

    #[test]
    fn rules_apply_in_sops_order() {
        let rules = Rules {
            unencrypted_suffix: Some("_plain".into()),
            encrypted_regex: Some(Regex::new("^secret").unwrap()),
            ..Rules::default()
        };
        let p = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert!(
            rules.encrypts(&p(&["secret_plain"])),
            "encrypted_regex overrides the suffix"
        );
        assert!(!rules.encrypts(&p(&["other"])));
        assert!(rules.encrypts(&p(&["a", "secrets"])));
        assert!(Rules::default().encrypts(&p(&["x"])));
        assert!(!Rules::zeitwork_default().encrypts(&p(&["a_unencrypted", "b"])));
    }
}
