//! Envs: their `env.pb` documents, created when an app first needs one
//! and kept listing every registered node's age recipient. The captain's
//! read-modify-writes of `env.pb` are serialised by [`env_lock`].

use meta_schema::layout::MetaPath;
use meta_schema::pb;
use meta_schema::repo::{ChangeSet, RepoError};
use prost::Message;

use super::seal::is_age_recipient;
use crate::db::{Db, DbError};
use crate::meta::{MetaError, MetaStore};
use crate::state::AppState;

/// Serialises the captain's read-modify-write of `env.pb` files (node
/// recipients, env creation), so no update is lost between two of them.
pub fn env_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    &LOCK
}

/// The age recipients of the registered nodes, by node id (those that are
/// not X25519 recipients left out, as [`add_node_recipient`] does).
pub async fn node_recipients(db: &Db) -> Result<Vec<pb::AgeRecipient>, DbError> {
    Ok(db
        .nodes()
        .await?
        .into_iter()
        .filter(|n| is_age_recipient(&n.age_recipient))
        .map(|n| pb::AgeRecipient {
            name: n.id,
            recipient: n.age_recipient,
        })
        .collect())
}

/// Applies `change` to the recipients of every env at the head, committing
/// the changed `env.pb` files in one commit (none when nothing changes).
async fn update_envs(
    meta: &std::sync::Arc<MetaStore>,
    message: &str,
    change: impl Fn(&mut Vec<pb::AgeRecipient>),
) -> Result<Option<String>, MetaError> {
    let _g = env_lock().lock().await;
    let Some(head) = meta.head().await? else {
        return Ok(None);
    };
    let tree = meta.tree(head).await?;
    let mut cs = ChangeSet::new();
    let mut envs = Vec::new();
    for (path, bytes) in tree.iter() {
        if !matches!(MetaPath::parse(path), Some(MetaPath::Env { .. })) {
            continue;
        }
        // An undecodable env.pb cannot be at a valid head; skip rather
        // than guess.
        let Ok(mut env) = pb::Env::decode(bytes) else {
            continue;
        };
        let before = env.age_recipients.clone();
        change(&mut env.age_recipients);
        if env.age_recipients != before {
            envs.push(env.name.clone());
            cs = cs.replace(path, env.encode_to_vec());
        }
    }
    if cs.is_empty() {
        return Ok(None);
    }
    let msg = format!("{message} (envs: {})", envs.join(", "));
    meta.commit(cs, msg).await.map(Some)
}

/// Lists `node`'s recipient in every env (replacing an older key of the
/// same node).
pub async fn add_node_recipient(
    st: &AppState,
    node: &str,
    recipient: &str,
) -> Result<(), MetaError> {
    if !is_age_recipient(recipient) {
        // Listing it would make every later secrets write of every env fail.
        tracing::warn!(%node, "the node's age recipient is not an age X25519 recipient; it is not added to the envs and the node cannot read secrets");
        return Ok(());
    }
    let commit = update_envs(&st.meta, &format!("Node {node} can read secrets"), |list| {
        if let Some(r) = list.iter_mut().find(|r| r.name == node) {
            r.recipient = recipient.to_string();
        } else {
            list.push(pb::AgeRecipient {
                name: node.to_string(),
                recipient: recipient.to_string(),
            });
        }
    })
    .await?;
    if commit.is_some() {
        tracing::info!(%node, "node's age recipient added to every env");
        st.mirror_wake.notify_one();
    }
    Ok(())
}

/// Removes `node`'s recipient from every env. Files already encrypted to
/// it stay readable with its key until they are rewritten (`zw secrets
/// rotate`).
pub async fn remove_node_recipient(st: &AppState, node: &str) -> Result<(), MetaError> {
    let commit = update_envs(
        &st.meta,
        &format!("Node {node} removed from the secrets recipients"),
        |list| list.retain(|r| r.name != node),
    )
    .await?;
    if commit.is_some() {
        tracing::info!(%node, "node's age recipient removed from every env");
        st.mirror_wake.notify_one();
    }
    Ok(())
}

/// Make sure `envs/<env>/env.pb` exists, committing it when absent with
/// the platform domains and the age recipients of every registered node
/// (see [`super::secrets`]).
pub async fn ensure_env(st: &AppState, env: &str) -> Result<(), MetaError> {
    if st.meta.env_known(env) {
        return Ok(());
    }
    // Held while reading the nodes and committing, so a node registering
    // meanwhile is either read here or finds this env.pb to update.
    let _g = env_lock().lock().await;
    let path = meta_schema::layout::env_path(env);
    let exists = match st.meta.head().await? {
        Some(h) => st.meta.tree(h).await?.contains(&path),
        None => false,
    };
    if !exists {
        let doc = pb::Env {
            name: env.to_string(),
            domains: st.config.platform_domains.clone(),
            regions: vec![],
            age_recipients: node_recipients(&st.db).await?,
        };
        match st
            .meta
            .commit(
                ChangeSet::new().add(path, doc.encode_to_vec()),
                format!("Create env {env}"),
            )
            .await
        {
            Ok(_) => {}
            Err(MetaError::Repo {
                source: RepoError::AlreadyExists { .. },
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    st.meta.mark_env_known(env);
    Ok(())
}
