//! Keeping app secrets files encrypted to exactly their env's recipients.
//!
//! The captain lists every node's age recipient in every `env.pb`, but it
//! holds no identity: it cannot re-encrypt a secrets file written before a
//! node joined (the new node cannot read it) or after one left (the removed
//! node still can). A follower that can decrypt the file does it, after it
//! applied a commit: for every `envs/<env>/apps/<app>/secrets.sops.yaml`
//! whose recipients differ from its env's `age_recipients`, and that this
//! node's identity is a recipient of,
//!
//! - recipients only added: [`SopsFile::rewrap`] (same data key, values and
//!   MAC untouched) to exactly the env's recipients;
//! - any recipient removed: [`SopsFile::rotate`] (a fresh data key; the
//!   plaintext exists only in memory, zeroized on drop) to exactly the env's
//!   recipients, so the removed node's identity cannot read the new file;
//!
//! and sends the file to the captain (`PUT /v1/apps/{id}/secrets/file`,
//! with the commit it was read at as `base`), which commits it with a new
//! release. Several nodes may do it at once: the captain commits the first
//! and answers the others 200 without a commit.
//!
//! A file that no remaining node can decrypt (every node it was encrypted
//! to was removed) stays stale: only a new complete set written through the
//! captain replaces it. Work happens once per applied commit; a pass whose sends failed for a
//! reason that may pass (captain unreachable, app not yet mirrored) is
//! retried with backoff. Nothing here logs a value: errors name the app and
//! the reason only (sops errors and the captain's refusals never carry one).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use meta_schema::MetaTree;
use meta_schema::layout::MetaPath;
use meta_schema::repo::MetaRepo;
use meta_schema::sops::SopsFile;
use tokio::sync::watch;

use crate::captain::{Captain, CaptainError};
use crate::follow::FollowState;
use zw_util::error_chain;

/// Longest wait between retries of a failed pass.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// How a file is re-encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Recipients were only added: the same data key, wrapped for all.
    Rewrap,
    /// A recipient was removed: a fresh data key.
    Rotate,
}

/// A secrets file re-encrypted to its env's recipients (ciphertext only).
pub struct Rekeyed {
    pub env: String,
    pub app: String,
    pub action: Action,
    /// The new sops file.
    pub yaml: String,
}

impl Rekeyed {
    /// The captain's id of the app: `<name>.<env>`.
    pub fn app_id(&self) -> String {
        format!("{}.{}", self.app, self.env)
    }
}

/// A file this node should re-encrypt but could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `<name>.<env>`.
    pub app_id: String,
    /// Why (never a value).
    pub reason: String,
}

/// The secrets files of `tree` whose recipients differ from their env's and
/// that `identity` can decrypt, re-encrypted to exactly the env's
/// recipients. Files already right, of an env without recipients, or not
/// encrypted to `identity` are left out. `Err` when `tree` is not a valid
/// meta tree (nothing can be decided from it).
pub fn plan(
    tree: &MetaTree,
    identity: &age::x25519::Identity,
    now_millis: i64,
) -> Result<Vec<Result<Rekeyed, Failure>>, String> {
    let state = meta_schema::desired::desired_state(tree, now_millis)
        .map_err(|e| format!("the meta tree is not valid: {}", error_chain(&e)))?;
    let mine = identity.to_public().to_string();
    let mut out = Vec::new();
    for (path, bytes) in tree.iter() {
        let Some(MetaPath::Secrets { env, app }) = MetaPath::parse(path) else {
            continue;
        };
        let Some(env_state) = state.envs.get(&env) else {
            continue;
        };
        let wanted: BTreeSet<&str> = env_state
            .env
            .age_recipients
            .iter()
            .map(|r| r.recipient.as_str())
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let app_id = format!("{app}.{env}");
        let fail = |reason: String| Failure {
            app_id: app_id.clone(),
            reason,
        };
        let file = match std::str::from_utf8(bytes)
            .map_err(|_| format!("{path} is not UTF-8"))
            .and_then(|t| SopsFile::parse(t).map_err(|e| format!("{path}: {e}")))
        {
            Ok(f) => f,
            Err(reason) => {
                out.push(Err(fail(reason)));
                continue;
            }
        };
        let listed = file.recipients();
        let have: BTreeSet<&str> = listed.iter().copied().collect();
        if have == wanted && have.len() == listed.len() {
            continue;
        }
        if !have.contains(mine.as_str()) {
            // Another node that can read it does it.
            continue;
        }
        let mut recipients = Vec::with_capacity(wanted.len());
        let mut seen = BTreeSet::new();
        let mut bad = None;
        for r in &env_state.env.age_recipients {
            if !seen.insert(r.recipient.as_str()) {
                continue;
            }
            match r.recipient.parse::<age::x25519::Recipient>() {
                Ok(k) => recipients.push(k),
                Err(_) => {
                    bad = Some(format!(
                        "the age recipient of {:?} in env {env:?} is not an age X25519 recipient",
                        r.name
                    ));
                    break;
                }
            }
        }
        if let Some(reason) = bad {
            out.push(Err(fail(reason)));
            continue;
        }
        let action = if have.is_subset(&wanted) {
            Action::Rewrap
        } else {
            Action::Rotate
        };
        let ids = std::slice::from_ref(identity);
        let yaml = match action {
            Action::Rewrap => file.rewrap(ids, &recipients),
            Action::Rotate => file.rotate(ids, &recipients, now_millis),
        };
        match yaml {
            Ok(yaml) => out.push(Ok(Rekeyed {
                env,
                app,
                action,
                yaml,
            })),
            Err(e) => out.push(Err(fail(format!("{path}: {e}")))),
        }
    }
    Ok(out)
}

/// Re-encrypts with this node's identity and sends to the captain.
pub struct Rekeyer {
    pub repo: MetaRepo,
    pub identity: age::x25519::Identity,
    pub captain: Arc<dyn Captain>,
}

/// Whether a refusal of the captain may pass at the same commit.
fn may_pass(e: &CaptainError) -> bool {
    // 400: the captain cannot read what this node wrote; 409: the head moved
    // (env recipients or the file changed), and the next commit brings it.
    !matches!(
        e,
        CaptainError::Status {
            status: 400 | 409,
            ..
        }
    )
}

impl Rekeyer {
    /// One pass at `commit`. Returns false when part of it should be
    /// retried at the same commit.
    pub async fn pass(&self, commit: &str) -> bool {
        let (repo, identity, c) = (self.repo.clone(), self.identity.clone(), commit.to_string());
        let planned = tokio::task::spawn_blocking(move || {
            let tree = repo.tree_at(&c).map_err(|e| (true, error_chain(&e)))?;
            plan(&tree, &identity, meta_schema::now_millis()).map_err(|e| (false, e))
        })
        .await
        .expect("re-encrypting secrets does not panic");
        let files = match planned {
            Ok(files) => files,
            Err((retry, reason)) => {
                tracing::warn!(%commit, %reason, "secrets files not re-encrypted");
                return !retry;
            }
        };
        let mut done = true;
        for f in files {
            let f = match f {
                Ok(f) => f,
                Err(Failure { app_id, reason }) => {
                    tracing::warn!(app = %app_id, %reason, "secrets file not re-encrypted");
                    continue;
                }
            };
            let app_id = f.app_id();
            match self
                .captain
                .put_secrets_file(&app_id, commit, &f.yaml)
                .await
            {
                Ok(()) => {
                    tracing::info!(app = %app_id, action = ?f.action, %commit, "secrets file re-encrypted to the env's recipients and accepted by the captain (committed, or already right when another node was first)")
                }
                Err(e) => {
                    let retry = may_pass(&e);
                    done &= !retry;
                    tracing::warn!(app = %app_id, reason = %error_chain(&e), retry, "re-encrypted secrets file not accepted");
                }
            }
        }
        done
    }
}

/// Runs a [`Rekeyer`] pass whenever the applied commit changes; a pass to
/// retry is retried after `retry`, doubling up to 5 minutes.
pub fn spawn(
    rekeyer: Rekeyer,
    mut follow: watch::Receiver<FollowState>,
    retry: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut done: Option<String> = None;
        let mut attempted: Option<String> = None;
        let mut delay = retry;
        loop {
            let applied = follow.borrow_and_update().applied.clone();
            let mut wait = None;
            if let Some(c) = applied
                && done.as_ref() != Some(&c)
            {
                if attempted.as_ref() != Some(&c) {
                    delay = retry;
                }
                attempted = Some(c.clone());
                if rekeyer.pass(&c).await {
                    done = Some(c);
                } else {
                    wait = Some(delay);
                    delay = (delay * 2).min(MAX_RETRY);
                }
            }
            // Cancel-safe: each arm only wakes the loop.
            tokio::select! {
                r = follow.changed() => if r.is_err() { return },
                _ = async {
                    match wait {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::future::BoxFuture;
    use meta_schema::layout::{env_path, secrets_path};
    use meta_schema::pb;
    use meta_schema::sops::Secrets;
    use prost::Message;

    use super::*;
    use crate::captain::{Heartbeat, InstanceReport, NodeRegistration, Registered};

    const VALUE: &str = "value-never-logged-5e1f";

    fn tree(recipients: &[&age::x25519::Identity], file_to: &[&age::x25519::Identity]) -> MetaTree {
        let env = pb::Env {
            name: "production".into(),
            age_recipients: recipients
                .iter()
                .enumerate()
                .map(|(i, id)| pb::AgeRecipient {
                    name: format!("node-{i}"),
                    recipient: id.to_public().to_string(),
                })
                .collect(),
            ..Default::default()
        };
        let mut secrets = Secrets::new();
        secrets.insert("API_KEY", VALUE);
        let to: Vec<_> = file_to.iter().map(|i| i.to_public()).collect();
        let yaml = meta_schema::sops::encrypt(&secrets, &to, 1_700_000_000_000).unwrap();
        let mut t = MetaTree::new();
        t.insert(env_path("production"), env.encode_to_vec());
        t.insert(secrets_path("production", "web"), yaml.into_bytes());
        t
    }

    fn value(yaml: &str, id: &age::x25519::Identity) -> Result<String, String> {
        SopsFile::parse(yaml)
            .unwrap()
            .decrypt(std::slice::from_ref(id))
            .map(|s| s.get("API_KEY").unwrap().expose().to_string())
            .map_err(|e| e.to_string())
    }

    fn data_key(yaml: &str, id: &age::x25519::Identity) -> [u8; 32] {
        *SopsFile::parse(yaml)
            .unwrap()
            .data_key(std::slice::from_ref(id))
            .unwrap()
            .expose()
    }

    #[test]
    fn a_joined_node_gets_the_same_data_key() {
        let (a, b) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let t = tree(&[&a, &b], &[&a]);
        let old = std::str::from_utf8(t.get(&secrets_path("production", "web")).unwrap())
            .unwrap()
            .to_string();
        let out = plan(&t, &a, 1_700_000_001_000).unwrap();
        assert_eq!(out.len(), 1);
        let r = out.into_iter().next().unwrap().unwrap();
        assert_eq!(
            (r.app_id().as_str(), r.action),
            ("web.production", Action::Rewrap)
        );
        assert_eq!(value(&r.yaml, &b).unwrap(), VALUE);
        assert_eq!(value(&r.yaml, &a).unwrap(), VALUE);
        assert_eq!(data_key(&r.yaml, &b), data_key(&old, &a));
        let mut got = SopsFile::parse(&r.yaml)
            .unwrap()
            .recipients()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>();
        got.sort();
        let mut want = vec![a.to_public().to_string(), b.to_public().to_string()];
        want.sort();
        assert_eq!(got, want);
        // B cannot read the old file, so it has nothing to do.
        assert!(plan(&t, &b, 1_700_000_001_000).unwrap().is_empty());
    }

    #[test]
    fn a_removed_node_loses_the_new_data_key() {
        let (a, b) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let t = tree(&[&b], &[&a, &b]);
        let old = std::str::from_utf8(t.get(&secrets_path("production", "web")).unwrap())
            .unwrap()
            .to_string();
        let out = plan(&t, &b, 1_700_000_001_000).unwrap();
        let r = out.into_iter().next().unwrap().unwrap();
        assert_eq!(r.action, Action::Rotate);
        assert_eq!(value(&r.yaml, &b).unwrap(), VALUE);
        let refused = value(&r.yaml, &a).unwrap_err();
        assert!(
            refused.contains("none of the given age identities"),
            "{refused}"
        );
        assert_ne!(data_key(&r.yaml, &b), data_key(&old, &b));
        assert_eq!(
            SopsFile::parse(&r.yaml).unwrap().recipients(),
            [b.to_public().to_string()]
        );
        assert!(!r.yaml.contains(VALUE));
    }

    #[test]
    fn files_already_right_are_left_alone() {
        let (a, b) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        assert!(plan(&tree(&[&a, &b], &[&b, &a]), &a, 0).unwrap().is_empty());
        // An env without recipients: nothing to encrypt to.
        assert!(plan(&tree(&[], &[&a]), &a, 0).unwrap().is_empty());
    }

    #[test]
    fn a_file_that_does_not_verify_is_reported_without_its_value() {
        let (a, b) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let mut t = tree(&[&a, &b], &[&a]);
        let path = secrets_path("production", "web");
        let yaml = std::str::from_utf8(t.get(&path).unwrap())
            .unwrap()
            .to_string();
        let at =
            yaml.find("mac: ENC[AES256_GCM,data:").unwrap() + "mac: ENC[AES256_GCM,data:".len();
        let mut bytes = yaml.into_bytes();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        t.insert(path, bytes);
        let out = plan(&t, &a, 0).unwrap();
        let f = out.into_iter().next().unwrap().err().expect("refused");
        assert_eq!(f.app_id, "web.production");
        assert!(f.reason.contains("MAC"), "{}", f.reason);
        assert!(!f.reason.contains(VALUE));
    }

    /// Records the files sent; answers each with the next status (200 when
    /// none is left).
    #[derive(Default)]
    struct FakeCaptain {
        sent: Mutex<Vec<(String, String, String)>>,
        answers: Mutex<Vec<u16>>,
    }

    impl Captain for FakeCaptain {
        fn register<'a>(
            &'a self,
            _r: &'a NodeRegistration,
        ) -> BoxFuture<'a, Result<Registered, CaptainError>> {
            unreachable!("re-encryption never registers")
        }
        fn heartbeat<'a>(
            &'a self,
            _n: &'a str,
            _h: &'a Heartbeat,
        ) -> BoxFuture<'a, Result<(), CaptainError>> {
            unreachable!("re-encryption never sends heartbeats")
        }
        fn report_instance<'a>(
            &'a self,
            _r: &'a InstanceReport,
        ) -> BoxFuture<'a, Result<(), CaptainError>> {
            unreachable!("re-encryption never reports instances")
        }
        fn put_secrets_file<'a>(
            &'a self,
            app_id: &'a str,
            base: &'a str,
            yaml: &'a str,
        ) -> BoxFuture<'a, Result<(), CaptainError>> {
            Box::pin(async move {
                self.sent
                    .lock()
                    .unwrap()
                    .push((app_id.into(), base.into(), yaml.into()));
                let status = self.answers.lock().unwrap().pop().unwrap_or(200);
                if status == 200 {
                    Ok(())
                } else {
                    Err(CaptainError::Status {
                        op: "test",
                        url: String::new(),
                        status,
                        body: String::new(),
                    })
                }
            })
        }
    }

    fn commit_tree(t: &MetaTree) -> (tempfile::TempDir, MetaRepo, String) {
        let dir = tempfile::tempdir().unwrap();
        let repo = MetaRepo::init_bare(&dir.path().join("meta.git")).unwrap();
        let mut cs = meta_schema::repo::ChangeSet::new();
        for (p, b) in t.iter() {
            cs = cs.add(p, b.to_vec());
        }
        let c = repo.commit("main", &cs, "test").unwrap();
        (dir, repo, c)
    }

    #[tokio::test]
    async fn a_pass_sends_the_file_and_retries_only_what_may_pass() {
        let (a, b) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let (_dir, repo, commit) = commit_tree(&tree(&[&a, &b], &[&a]));
        let captain = Arc::new(FakeCaptain::default());
        let rk = Rekeyer {
            repo,
            identity: a.clone(),
            captain: captain.clone(),
        };
        assert!(rk.pass(&commit).await, "accepted: done");
        *captain.answers.lock().unwrap() = vec![503];
        assert!(!rk.pass(&commit).await, "captain unavailable: retry");
        *captain.answers.lock().unwrap() = vec![409];
        assert!(
            rk.pass(&commit).await,
            "the head moved: the next commit decides"
        );
        let sent = captain.sent.lock().unwrap();
        assert_eq!(sent.len(), 3);
        for (app, base, yaml) in sent.iter() {
            assert_eq!(
                (app.as_str(), base.as_str()),
                ("web.production", commit.as_str())
            );
            assert_eq!(value(yaml, &b).unwrap(), VALUE);
        }
    }
}
