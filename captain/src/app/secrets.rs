//! App secrets, as the captain sees them: it can *encrypt* but never decrypt.
//!
//! - Every registered node's age recipient is listed in every env's
//!   `env.pb` (`age_recipients`, name = node id): registering a node adds it
//!   to all envs, removing a node removes it, and a new env starts with all
//!   of them ([`super::envs::ensure_env`]). `env.pb` is replaced
//!   whole in one commit; these writes are serialised by [`env_lock`].
//! - `PUT /v1/apps/{id}/secrets` takes the **complete** desired set of an
//!   app's secrets. The captain holds no age identity, so it can read
//!   neither the old values nor the data key of the current file: it cannot
//!   merge a change into it. It encrypts the set with a fresh data key to
//!   the env's recipients ([`meta_schema::sops::encrypt`]) and, in one
//!   commit, replaces the secrets file and adds a Release copying the app's
//!   newest release with `secret_refs` = the names and `secrets_blob` = the
//!   git blob id of the new file (so the rollout restarts the instances with
//!   the new values). A name present in the current file but absent from the
//!   set must be listed in `unset`, so a forgotten name is never dropped
//!   silently (409 naming the missing names).
//! - `GET /v1/apps/{id}/secrets` answers names and recipients only.
//!
//! Plaintext values exist in the captain only between the request body and
//! the encryption, inside [`Secrets`] (zeroized on drop, `Debug` redacted):
//! no log line, database row, response or error message carries one. The
//! request body is parsed by `crate::api::secrets`, not by `crate::error::ApiJson`, because
//! serde's messages quote offending values (`invalid type: integer 42`).
//!
//! - `PUT /v1/apps/{id}/secrets/file`: a node that joins after a secrets
//!   file was written is not among its recipients, and a removed node still
//!   is. A follower that can decrypt the file re-encrypts it
//!   (`follower::rekey`: the same data key when nodes were only added, a
//!   fresh one when one left) and sends the whole sops file here. The
//!   captain checks what it can without decrypting (the names of the
//!   current file, exactly the env's recipients, the file unchanged since
//!   the node's `base` commit) and commits it with a release, as above. It
//!   is idempotent: when the file at the head already has the env's
//!   recipients (another node was first) it answers 200 without a commit.
//!   Until then the `GET` answer says `stale`.

use std::collections::BTreeSet;

use meta_schema::MetaTree;
use meta_schema::layout::{app_dir, env_path, release_path, secrets_path};
use meta_schema::pb;
use meta_schema::repo::{ChangeSet, blob_id};
use meta_schema::sops::{Secrets, SopsFile};
use prost::Message;

use super::envs::env_lock;
use super::seal::{SealError, seal};
use super::validate::is_env_var_name;
use super::{AppError, Result};
use crate::auth::Caller;
use crate::db::AppRow;
use crate::meta::MetaError;
use crate::state::AppState;

/// Serialises the captain's writes of secrets files (a read of the file at
/// the head, checks, and the commit), so a node's re-encryption never
/// overwrites a set written meanwhile and racing nodes commit once.
fn file_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    &LOCK
}

/// An app's secrets as the captain can see them: names and recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretsInfo {
    pub app_id: String,
    pub env: String,
    pub app: String,
    /// Names in the secrets file at the meta repo head.
    pub names: Vec<String>,
    /// Meta repo path of the secrets file.
    pub path: String,
    /// Recipients (node ids / operator names) the file is encrypted to.
    pub recipients: Vec<String>,
    /// Recipients listed in the env's env.pb.
    pub env_recipients: Vec<String>,
    /// Not encrypted to exactly the env's recipients.
    pub stale: bool,
    /// Release made by a write (none when the app has no release yet).
    pub release: Option<String>,
    /// Commit of a write.
    pub commit: Option<String>,
}

/// The complete desired set of an app's secrets.
pub struct SetSecrets {
    /// Every secret the app should have; replaces the file whole.
    pub secrets: Secrets,
    /// Names of the current file deliberately left out of `secrets`.
    pub unset: Vec<String>,
}

async fn app_of(st: &AppState, id: &str) -> Result<AppRow> {
    st.db
        .app(id)
        .await?
        .ok_or_else(|| AppError::not_found("app", id))
}

async fn head_tree(st: &AppState) -> Result<MetaTree, MetaError> {
    match st.meta.head().await? {
        Some(h) => st.meta.tree(h).await,
        None => Ok(MetaTree::new()),
    }
}

fn env_of(tree: &MetaTree, env: &str) -> Result<Option<pb::Env>> {
    tree.get(&env_path(env))
        .map(|b| {
            pb::Env::decode(b)
                .map_err(|e| AppError::internal(format!("env.pb of {env:?} does not decode"), e))
        })
        .transpose()
}

fn secrets_file(tree: &MetaTree, env: &str, app: &str) -> Result<Option<SopsFile>> {
    let path = secrets_path(env, app);
    let Some(bytes) = tree.get(&path) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| AppError::internal(format!("{path} is not UTF-8"), e))?;
    SopsFile::parse(text)
        .map(Some)
        .map_err(|e| AppError::internal(path, e))
}

/// The newest release of `app` in `tree`, copied as a new release with
/// `secret_refs` = `names` and `secrets_blob` = `blob` (none when the app
/// has no release yet).
fn release_copy(
    tree: &MetaTree,
    app: &AppRow,
    names: &[String],
    blob: &str,
) -> Result<Option<pb::Release>> {
    let prefix = format!("{}/releases/", app_dir(&app.env, &app.name));
    let newest = tree
        .iter()
        .filter(|(p, _)| p.starts_with(&prefix) && p.ends_with(".pb"))
        .max_by(|a, b| a.0.cmp(b.0))
        .map(|(p, b)| {
            pb::Release::decode(b)
                .map_err(|e| AppError::internal(format!("{p} does not decode"), e))
        })
        .transpose()?;
    Ok(newest.map(|old| pb::Release {
        id: meta_schema::new_id(),
        secret_refs: names.to_vec(),
        secrets_blob: blob.to_string(),
        created_at: meta_schema::now_millis(),
        rollback_of: String::new(),
        ..old
    }))
}

/// Names of the recipients of `file`, by the env's names where known.
fn info(app: &AppRow, env: Option<&pb::Env>, file: Option<&SopsFile>) -> SecretsInfo {
    let env_recipients: Vec<&pb::AgeRecipient> = env
        .map(|e| e.age_recipients.iter().collect())
        .unwrap_or_default();
    let (names, keys): (Vec<String>, BTreeSet<String>) = match file {
        Some(f) => (
            f.names().into_iter().map(str::to_string).collect(),
            f.recipients().into_iter().map(str::to_string).collect(),
        ),
        None => (vec![], BTreeSet::new()),
    };
    let wanted: BTreeSet<String> = env_recipients.iter().map(|r| r.recipient.clone()).collect();
    let recipients = keys
        .iter()
        .map(|k| {
            env_recipients
                .iter()
                .find(|r| &r.recipient == k)
                .map(|r| r.name.clone())
                .unwrap_or_else(|| k.clone())
        })
        .collect();
    SecretsInfo {
        app_id: app.id.clone(),
        env: app.env.clone(),
        app: app.name.clone(),
        names,
        path: secrets_path(&app.env, &app.name),
        recipients,
        env_recipients: env_recipients.iter().map(|r| r.name.clone()).collect(),
        stale: file.is_some() && keys != wanted,
        release: None,
        commit: None,
    }
}

/// Names and recipients of app `id`'s secrets, never values.
pub async fn get(st: &AppState, id: &str) -> Result<SecretsInfo> {
    let app = app_of(st, id).await?;
    let tree = head_tree(st).await?;
    let env = env_of(&tree, &app.env)?;
    let file = secrets_file(&tree, &app.env, &app.name)?;
    Ok(info(&app, env.as_ref(), file.as_ref()))
}

/// Encrypt the complete set to the env's recipients; one commit replaces
/// the file and adds a release using it.
pub async fn put(st: &AppState, id: &str, req: SetSecrets) -> Result<SecretsInfo> {
    let SetSecrets { secrets, unset } = req;
    let app = app_of(st, id).await?;
    let bad: Vec<&str> = secrets
        .names()
        .chain(unset.iter().map(String::as_str))
        .filter(|n| {
            !is_env_var_name(n) || n.ends_with(meta_schema::sops::DEFAULT_UNENCRYPTED_SUFFIX)
        })
        .collect();
    if !bad.is_empty() {
        return Err(AppError::InvalidName(format!(
            "not secret names (environment variable names [A-Za-z_][A-Za-z0-9_]*, not ending in {}): {}",
            meta_schema::sops::DEFAULT_UNENCRYPTED_SUFFIX,
            bad.join(", ")
        )));
    }
    if let Some(both) = unset.iter().find(|n| secrets.contains(n)) {
        return Err(AppError::BadRequest(format!(
            "{both} is both set and unset"
        )));
    }
    super::envs::ensure_env(st, &app.env).await?;
    // A re-encryption sent by a node checks the file at the head against
    // what it re-encrypted, then commits: not in between.
    let _g = file_lock().lock().await;
    let tree = head_tree(st).await?;
    let env = env_of(&tree, &app.env)?.unwrap_or_default();
    if env.age_recipients.is_empty() {
        return Err(AppError::Conflict(format!(
            "env {:?} has no age recipients yet: register a node (its follower does at start) before setting secrets",
            app.env
        )));
    }
    let path = secrets_path(&app.env, &app.name);
    if let Some(current) = secrets_file(&tree, &app.env, &app.name)? {
        let dropped: Vec<&str> = current
            .names()
            .into_iter()
            .filter(|n| !secrets.contains(n) && !unset.iter().any(|u| u == n))
            .collect();
        if !dropped.is_empty() {
            return Err(AppError::Conflict(format!(
                "the captain cannot decrypt the current secrets to keep them: send every secret again, or list the ones to remove in `unset`; missing: {}",
                dropped.join(", ")
            )));
        }
    }
    let recipients: Vec<(&str, &str)> = env
        .age_recipients
        .iter()
        .map(|r| (r.name.as_str(), r.recipient.as_str()))
        .collect();
    let yaml = seal(&secrets, &recipients, meta_schema::now_millis()).map_err(|e| match e {
        SealError::Recipient(_) => AppError::Conflict(format!("env {:?}: {e}", app.env)),
        SealError::Sops(e) => AppError::BadRequest(format!("cannot encrypt the secrets: {e}")),
    })?;
    let names: Vec<String> = secrets.names().map(str::to_string).collect();
    drop(secrets);
    let bytes = yaml.into_bytes();
    let blob = blob_id(&bytes);
    let mut cs = ChangeSet::new().replace(path.clone(), bytes);
    let release = release_copy(&tree, &app, &names, &blob)?;
    if let Some(r) = &release {
        cs = cs.add(release_path(&app.env, &app.name, &r.id), r.encode_to_vec());
    }
    let message = match &release {
        Some(r) => format!(
            "Secrets of {} in {}: {} (release {})",
            app.name,
            app.env,
            names.join(", "),
            r.id
        ),
        None => format!(
            "Secrets of {} in {}: {}",
            app.name,
            app.env,
            names.join(", ")
        ),
    };
    let commit = st.meta.commit(cs, message).await?;
    tracing::info!(app = %app.id, env = %app.env, names = ?names, %commit, "secrets written");
    st.mirror_wake.notify_one();
    st.rollout_wake.notify_one();
    let tree = head_tree(st).await?;
    let env = env_of(&tree, &app.env)?;
    let file = secrets_file(&tree, &app.env, &app.name)?;
    let mut v = info(&app, env.as_ref(), file.as_ref());
    v.release = release.map(|r| r.id);
    v.commit = Some(commit);
    Ok(v)
}

/// `name` of the env recipient `key`, or the key itself.
fn recipient_name<'a>(env: &'a pb::Env, key: &'a str) -> &'a str {
    env.age_recipients
        .iter()
        .find(|r| r.recipient == key)
        .map_or(key, |r| r.name.as_str())
}

/// A node that can decrypt the app's secrets file sends it re-encrypted to
/// exactly the env's recipients (the same data key when nodes were only
/// added, a fresh one when one was removed). The captain checks what it
/// can without decrypting: same names as the current file, recipients =
/// the env's, and (with `base`) the file unchanged since that commit.
/// Idempotent: when the file at the head already has those recipients
/// (another node was first), no commit. Else one commit replaces the file
/// and adds a release copying the newest one with the new `secrets_blob`.
pub async fn put_file(
    st: &AppState,
    caller: &Caller,
    id: &str,
    base: Option<String>,
    yaml: String,
) -> Result<SecretsInfo> {
    // A node re-encrypts only the secrets of apps placed on it (it needs
    // them for their instances); an admin may do it for any; a user never
    // (refused before anything is looked up, so nothing leaks).
    if caller.node_id.is_none() && !caller.is_admin() {
        return Err(AppError::Forbidden(
            "only nodes re-encrypt secrets files".into(),
        ));
    }
    let app = app_of(st, id).await?;
    if !caller.is_admin() {
        let node = caller.node_id.as_deref().unwrap_or("");
        let placed = match st.meta.head().await? {
            Some(h) => {
                let tree = st.meta.tree(h).await?;
                meta_schema::desired::desired_state(&tree, meta_schema::now_millis())
                    .map(|s| {
                        s.instances_for_node(node)
                            .iter()
                            .any(|i| i.env == app.env && i.app == app.name)
                    })
                    .unwrap_or(false)
            }
            None => false,
        };
        if node.is_empty() || !placed {
            return Err(AppError::Forbidden(format!(
                "only a node with instances of app {id} placed on it may re-encrypt its secrets"
            )));
        }
    }
    let new = SopsFile::parse(&yaml)
        .map_err(|e| AppError::BadRequest(format!("not a sops secrets file: {e}")))?;
    if let Some(base) = &base
        && (base.len() < 40 || !base.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(AppError::BadRequest(
            "base must be a commit id (hexadecimal)".into(),
        ));
    }
    // Neither env.pb (the recipients) nor the file changes until the commit.
    let _e = env_lock().lock().await;
    let _g = file_lock().lock().await;
    let tree = head_tree(st).await?;
    let env = env_of(&tree, &app.env)?.unwrap_or_default();
    let wanted: BTreeSet<&str> = env
        .age_recipients
        .iter()
        .map(|r| r.recipient.as_str())
        .collect();
    if wanted.is_empty() {
        return Err(AppError::Conflict(format!(
            "env {:?} has no age recipients",
            app.env
        )));
    }
    let path = secrets_path(&app.env, &app.name);
    let Some(current) = secrets_file(&tree, &app.env, &app.name)? else {
        return Err(AppError::Conflict(format!(
            "{path} does not exist: there is nothing to re-encrypt"
        )));
    };
    let new_names: BTreeSet<&str> = new.names().into_iter().collect();
    let cur_names: BTreeSet<&str> = current.names().into_iter().collect();
    if new_names != cur_names {
        let diff = |a: &BTreeSet<&str>, b: &BTreeSet<&str>| {
            a.difference(b).copied().collect::<Vec<_>>().join(", ")
        };
        return Err(AppError::Conflict(format!(
            "a re-encrypted file must hold the names of {path}; added: [{}], missing: [{}]",
            diff(&new_names, &cur_names),
            diff(&cur_names, &new_names)
        )));
    }
    let got: BTreeSet<&str> = new.recipients().into_iter().collect();
    if got != wanted || got.len() != new.recipients().len() {
        let names = |s: &BTreeSet<&str>| {
            s.iter()
                .map(|k| recipient_name(&env, k))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(AppError::Conflict(format!(
            "the file must be encrypted to exactly the recipients of env {:?} ([{}]), once each; it is encrypted to [{}]",
            app.env,
            names(&wanted),
            names(&got)
        )));
    }
    let have: BTreeSet<&str> = current.recipients().into_iter().collect();
    if have == wanted {
        // Another node re-encrypted it first (or it never was stale).
        return Ok(info(&app, Some(&env), Some(&current)));
    }
    if let Some(base) = &base {
        let at_base = st.meta.tree(base.clone()).await.map_err(|_| {
            AppError::Conflict(format!(
                "base {base} is not a commit of the meta repository"
            ))
        })?;
        if at_base.get(&path) != tree.get(&path) {
            return Err(AppError::Conflict(format!(
                "{path} changed since {base}: re-encrypt the file at the head"
            )));
        }
    }
    let names: Vec<String> = current.names().into_iter().map(str::to_string).collect();
    let bytes = yaml.into_bytes();
    let blob = blob_id(&bytes);
    let release = release_copy(&tree, &app, &names, &blob)?;
    let mut cs = ChangeSet::new().replace(path.clone(), bytes);
    if let Some(r) = &release {
        cs = cs.add(release_path(&app.env, &app.name, &r.id), r.encode_to_vec());
    }
    // The captain cannot check which key the node used; it says what the
    // node was asked to do.
    let removed = !have.is_subset(&wanted);
    let what = if removed {
        "re-encrypted by a node (a recipient left: fresh data key)"
    } else {
        "re-wrapped by a node (recipients added)"
    };
    let message = format!(
        "Secrets of {} in {} {what}; recipients: {}{}",
        app.name,
        app.env,
        env.age_recipients
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        release
            .as_ref()
            .map(|r| format!(" (release {})", r.id))
            .unwrap_or_default()
    );
    let commit = st.meta.commit(cs, message).await?;
    tracing::info!(app = %app.id, env = %app.env, removed, %commit, "secrets file re-encrypted by a node");
    st.mirror_wake.notify_one();
    st.rollout_wake.notify_one();
    let mut v = info(&app, Some(&env), Some(&new));
    v.release = release.map(|r| r.id);
    v.commit = Some(commit);
    Ok(v)
}

/// `secret_refs` and `secrets_blob` for a new release of `env/app`: the
/// names and blob id of its secrets file at the head (empty without one).
pub async fn current_refs(st: &AppState, env: &str, app: &str) -> Result<(Vec<String>, String)> {
    let tree = head_tree(st).await?;
    let path = secrets_path(env, app);
    let Some(bytes) = tree.get(&path) else {
        return Ok((vec![], String::new()));
    };
    let names = secrets_file(&tree, env, app)?
        .map(|f| f.names().into_iter().map(str::to_string).collect())
        .unwrap_or_default();
    Ok((names, blob_id(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_is_gits() {
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            blob_id(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }
}
