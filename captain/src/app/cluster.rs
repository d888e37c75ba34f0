//! Joining the cluster: join tokens, the cluster CA, enrolment of workers
//! and edges, certificate renewal.
//!
//! - **Join tokens** are made by admins for one role (`worker`, `edge`),
//!   expire, and are used once (the `UPDATE ... WHERE used_at IS NULL`
//!   decides a race). Only their hash is stored.
//! - **The cluster CA** is one for all captains: its certificate and its
//!   key, sealed (AES-256-GCM) with a key derived from the cluster key, are
//!   in the database (`cluster_secrets`); the first captain to start makes
//!   it. The key is never in the meta repository nor in any answer.
//! - **Enrolment**: a host makes its own key and sends a certificate
//!   request with its join token; the captain signs a certificate whose
//!   name, addresses, role (extended key usage) and validity it decides,
//!   and issues a credential of the role: a worker's is a node token (its
//!   node row and the instances on it, the meta repository, images), an
//!   edge's an edge token (the route stream). A worker is registered as a
//!   node in the same step.
//! - **Renewal**: the credential renews its certificate while its host is
//!   a member; a removed host renews nothing, so every peer refuses it once
//!   its certificate expires (within `member_cert_validity`), and the
//!   captains refuse its revoked credential at once.

use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use api_types::cluster::{
    ClusterMemberView, CreateJoinToken, JoinRequest, JoinToken, Joined, RenewRequest, Renewed,
};
use api_types::nodes::RegisterNode;
use api_types::tokens::TokenKind;
use base64::Engine;
use edge::pki::{Ca, Role};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::validate::check_name;
use super::{AppError, Result};
use crate::auth::{self, Caller};
use crate::db::cluster::{JoinTokenRow, MemberRow};
use crate::state::AppState;

/// How long a join token lasts when the admin does not say.
pub const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(3600);
/// The longest a join token may last.
pub const MAX_JOIN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const CA_SECRET: &str = "cluster-ca";

fn role_of(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| AppError::BadRequest(format!("role {s:?} is not worker or edge")))
}

/// Make a join token for a role.
pub async fn create_join_token(st: &AppState, req: CreateJoinToken) -> Result<JoinToken> {
    let role = role_of(&req.role)?;
    let ttl = req
        .ttl_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_JOIN_TTL);
    if ttl.is_zero() || ttl > MAX_JOIN_TTL {
        return Err(AppError::BadRequest(format!(
            "a join token lasts from 1 second to 7 days (ttl_seconds 1-{}), not {} seconds",
            MAX_JOIN_TTL.as_secs(),
            ttl.as_secs()
        )));
    }
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    let secret = format!("zwj_{}", hex::encode(b));
    let now = st.db.now().await?;
    let row = JoinTokenRow {
        id: meta_schema::new_id(),
        role: role.as_str().into(),
        created_at: now,
        expires_at: now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2),
        used_at: None,
        used_by: String::new(),
    };
    st.db
        .insert_join_token(&row, &auth::hash_secret(&secret))
        .await?;
    Ok(JoinToken {
        token: secret,
        role: row.role,
        expires_at: row.expires_at,
    })
}

/// The key sealing the CA's key: derived from the cluster key.
fn sealing_key(st: &AppState) -> Result<[u8; 32]> {
    let key = crate::nodelink::link_secret(&st.config.cluster_key_path())
        .map_err(|e| AppError::internal("reading the cluster key", e))?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key");
    mac.update(b"zeitwork cluster CA seal");
    Ok(mac.finalize().into_bytes().into())
}

fn seal(key: &[u8; 32], plain: &[u8]) -> Result<String> {
    let cipher = Aes256Gcm::new(key.into());
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), plain)
        .map_err(|_| AppError::internal("sealing the CA key", std::io::Error::other("AES-GCM")))?;
    let mut out = nonce.to_vec();
    out.extend(ct);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

fn unseal(key: &[u8; 32], sealed: &str) -> Result<Vec<u8>> {
    let bad = || {
        AppError::internal(
            "opening the cluster CA's key",
            std::io::Error::other(
                "it does not open with this captain's cluster key: give every captain the same --cluster-key-file",
            ),
        )
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .map_err(|_| bad())?;
    if raw.len() < 12 {
        return Err(bad());
    }
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(&raw[..12]), &raw[12..])
        .map_err(|_| bad())
}

/// The cluster CA: from the database, made by the first captain.
pub async fn ca(st: &AppState) -> Result<&Ca> {
    st.cluster_ca.get_or_try_init(|| load_ca(st)).await
}

async fn load_ca(st: &AppState) -> Result<Ca> {
    let key = sealing_key(st)?;
    let stored = match st.db.cluster_secret(CA_SECRET).await? {
        Some(v) => v,
        None => {
            let ca = Ca::generate("zeitwork cluster CA")
                .map_err(|e| AppError::internal("making the cluster CA", e))?;
            let v = serde_json::json!({
                "cert_pem": ca.cert_pem(),
                "key_sealed": seal(&key, ca.key_pem().as_bytes())?,
            })
            .to_string();
            st.db
                .init_cluster_secret(CA_SECRET, &v, meta_schema::now_millis())
                .await?
        }
    };
    let v: serde_json::Value = serde_json::from_str(&stored)
        .map_err(|e| AppError::internal("reading the cluster CA", e))?;
    let cert = v["cert_pem"].as_str().unwrap_or_default();
    let key_pem = String::from_utf8(unseal(&key, v["key_sealed"].as_str().unwrap_or_default())?)
        .map_err(|e| AppError::internal("reading the cluster CA", e))?;
    Ca::from_pem(cert, &key_pem).map_err(|e| AppError::internal("the cluster CA", e))
}

/// The captains' API URLs (those seen alive lately), this one first.
pub async fn captains(st: &AppState) -> Result<Vec<String>> {
    let mine = st
        .config
        .advertise_url
        .clone()
        .unwrap_or_else(|| st.api_url.clone());
    let mut out = vec![mine.clone()];
    for (_, url) in st.db.live_captains(15_000).await? {
        if !out.contains(&url) {
            out.push(url);
        }
    }
    Ok(out)
}

/// Enrol a host with a join token.
pub async fn join(st: &AppState, token: &str, req: JoinRequest) -> Result<Joined> {
    let refused = |why: &str| AppError::Forbidden(format!("join refused: {why}"));
    let Some(t) = st.db.join_token_by_hash(&auth::hash_secret(token)).await? else {
        return Err(refused("the join token is not one this cluster made"));
    };
    let now_db = st.db.now().await?;
    if t.used_at.is_some() {
        return Err(refused(&format!(
            "the join token was used already (by {:?}); make a new one with `zw cluster token create`",
            t.used_by
        )));
    }
    if t.expires_at <= now_db {
        return Err(refused(
            "the join token has expired; make a new one with `zw cluster token create`",
        ));
    }
    let role = role_of(&req.role)?;
    if req.role != t.role {
        return Err(refused(&format!(
            "the join token is for the {} role, not {}",
            t.role, req.role
        )));
    }
    check_name(&format!("{} name", role.as_str()), &req.name)?;
    for a in &req.addresses {
        if a.parse::<std::net::IpAddr>().is_err() && !meta_schema::layout::is_domain(a) {
            return Err(AppError::BadRequest(format!(
                "address {a:?} is neither an IP address nor a DNS name"
            )));
        }
    }
    // Signed before the token is used: a bad request does not burn it.
    let ca = ca(st).await?;
    let mut names = vec![req.name.clone()];
    names.extend(req.addresses.iter().cloned());
    let signed = ca
        .sign_csr(
            &req.csr_pem,
            role,
            &req.name,
            &names,
            st.config.member_cert_validity,
        )
        .map_err(|e| {
            AppError::BadRequest(format!(
                "the certificate request: {}",
                zw_util::ErrorChain(&e)
            ))
        })?;
    if !st.db.use_join_token(&t.id, &req.name, now_db).await? {
        return Err(refused("the join token was used already"));
    }
    let now = meta_schema::now_millis();
    let (credential, token_id, api_key, meta_repo) = match role {
        Role::Worker => {
            let r = super::nodes::register(
                st,
                RegisterNode {
                    id: req.name.clone(),
                    address: req
                        .addresses
                        .first()
                        .cloned()
                        .unwrap_or_else(|| req.name.clone()),
                    region: req.region.clone(),
                    cpus: req.cpus,
                    memory_bytes: req.memory_bytes,
                    disk_bytes: req.disk_bytes,
                    age_recipient: req.age_recipient.clone(),
                    api_url: req.api_url.clone(),
                    proxy_addr: req.proxy_addr.clone(),
                },
            )
            .await?;
            let token_id = st
                .db
                .token_by_hash(&auth::hash_secret(&r.token))
                .await?
                .map(|t| t.id)
                .unwrap_or_default();
            let mine = st
                .config
                .advertise_url
                .clone()
                .unwrap_or_else(|| st.api_url.clone());
            (
                r.token,
                token_id,
                Some(r.api_key),
                Some(format!("{mine}/meta.git")),
            )
        }
        Role::Edge => {
            let (row, secret) = auth::issue(
                &st.db,
                TokenKind::Edge,
                &format!("edge {}", req.name),
                None,
                None,
            )
            .await?;
            (secret, row.id, None, None)
        }
    };
    st.db
        .upsert_member(&MemberRow {
            id: req.name.clone(),
            role: role.as_str().into(),
            token_id,
            cert_serial: signed.serial.clone(),
            cert_expires_at: signed.not_after,
            joined_at: now,
            removed_at: None,
        })
        .await?;
    tracing::info!(name = %req.name, role = role.as_str(), "a host joined the cluster");
    Ok(Joined {
        name: req.name,
        role: role.as_str().into(),
        certificate_pem: signed.chain_pem,
        ca_pem: ca.cert_pem().to_string(),
        cert_expires_at: signed.not_after,
        credential,
        api_key,
        captains: captains(st).await?,
        meta_repo,
    })
}

/// Renew the certificate of the host whose credential calls.
pub async fn renew(st: &AppState, caller: &Caller, req: RenewRequest) -> Result<Renewed> {
    let name = match caller.kind {
        TokenKind::Node => caller.node_id.clone().unwrap_or_default(),
        TokenKind::Edge => st
            .db
            .member_by_token(&caller.token_id)
            .await?
            .map(|m| m.id)
            .unwrap_or_default(),
        _ => String::new(),
    };
    let Some(m) = st
        .db
        .member(&name)
        .await?
        .filter(|m| m.removed_at.is_none())
    else {
        return Err(AppError::Forbidden(
            "this credential belongs to no member of the cluster (removed?)".into(),
        ));
    };
    let role = role_of(&m.role)?;
    let mut names = vec![m.id.clone()];
    if role == Role::Worker
        && let Some(n) = st.db.node(&m.id).await?
    {
        names.extend(cert_names_of(&n.address, &n.proxy_addr));
    }
    let ca = ca(st).await?;
    let signed = ca
        .sign_csr(
            &req.csr_pem,
            role,
            &m.id,
            &names,
            st.config.member_cert_validity,
        )
        .map_err(|e| {
            AppError::BadRequest(format!(
                "the certificate request: {}",
                zw_util::ErrorChain(&e)
            ))
        })?;
    st.db
        .upsert_member(&MemberRow {
            cert_serial: signed.serial.clone(),
            cert_expires_at: signed.not_after,
            token_id: caller.token_id.clone(),
            ..m
        })
        .await?;
    Ok(Renewed {
        certificate_pem: signed.chain_pem,
        ca_pem: ca.cert_pem().to_string(),
        cert_expires_at: signed.not_after,
        captains: captains(st).await?,
    })
}

/// The names a worker's certificate carries: its address, and the host
/// part of its node-proxy address.
fn cert_names_of(address: &str, proxy_addr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let host = |a: &str| -> String {
        if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
            sa.ip().to_string()
        } else {
            a.rsplit_once(':')
                .map_or(a, |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_string()
        }
    };
    for a in [address, proxy_addr] {
        let h = host(a);
        if !h.is_empty() && !out.contains(&h) {
            out.push(h);
        }
    }
    out
}

/// Every host that joined, removed ones too.
pub async fn members(st: &AppState) -> Result<Vec<ClusterMemberView>> {
    Ok(st
        .db
        .cluster_members()
        .await?
        .into_iter()
        .map(|m| ClusterMemberView {
            id: m.id,
            role: m.role,
            joined_at: m.joined_at,
            cert_expires_at: m.cert_expires_at,
            removed_at: m.removed_at,
        })
        .collect())
}

/// A host leaves the cluster: its credential is revoked now, its
/// certificate is renewed no more; a worker's node goes too.
pub async fn remove_member(st: &AppState, name: &str) -> Result<()> {
    let m = st
        .db
        .member(name)
        .await?
        .filter(|m| m.removed_at.is_none())
        .ok_or_else(|| AppError::not_found("member", name))?;
    if m.role == "worker" && st.db.node(name).await?.is_some() {
        return super::nodes::remove(st, name).await;
    }
    st.db
        .revoke_token(&m.token_id, meta_schema::now_millis())
        .await?;
    st.db
        .remove_member_host(name, meta_schema::now_millis())
        .await?;
    Ok(())
}
