//! Following the meta repository: a local bare copy, fetched with gix on a
//! poll interval and at once when notified (`POST /v1/notify`). The applied
//! commit only moves forward: a fetched head that does not descend from the
//! last applied commit is refused and reported (log, status, heartbeat to
//! the captain), and the node keeps running what the applied commit says.
//! The applied commit is kept in a ledger, so a restarted follower resumes
//! at once from where it was, before any fetch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use meta_schema::repo::{MetaRepo, Remote};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::ledger::{Ledger, LedgerError};
use crate::plan::{Desired, secrets_key};
use crate::reconciler::{DesiredError, DesiredSource};
use zw_util::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("opening the local meta repository {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("fetching {branch} of {url}: {reason}")]
    Fetch {
        url: String,
        branch: String,
        reason: String,
    },
    #[error("checking ancestry of {head}: {reason}")]
    Ancestry { head: String, reason: String },
    #[error("the follow ledger")]
    Ledger(#[from] LedgerError),
}

/// On disk and in the status: where following stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowState {
    /// The commit desired state is read at.
    pub applied: Option<String>,
    /// The last head refused for not descending from `applied`.
    pub refused: Option<String>,
    pub refused_reason: Option<String>,
    /// Fetches done by this process, and the last error.
    #[serde(skip)]
    pub fetches: u64,
    #[serde(skip)]
    pub last_error: Option<String>,
}

/// What one fetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowOutcome {
    /// The remote has no such branch (yet).
    NoBranch,
    Unchanged(String),
    Advanced {
        from: Option<String>,
        to: String,
    },
    Refused {
        head: String,
        applied: String,
    },
}

pub struct MetaFollower {
    repo: MetaRepo,
    /// Where to fetch from: the first that answers, starting with the one
    /// that answered last (a node that joined has every captain's).
    remotes: Vec<Remote>,
    current: usize,
    branch: String,
    ledger: Ledger<FollowState>,
    status: watch::Sender<FollowState>,
}

impl MetaFollower {
    /// Opens (or creates) the local copy at `local` and the follow ledger.
    pub fn open(
        local: &Path,
        ledger_path: &Path,
        url: &str,
        branch: &str,
    ) -> Result<Self, FollowError> {
        Self::open_remotes(local, ledger_path, vec![Remote::new(url)], branch)
    }

    /// [`MetaFollower::open`] with several remotes to fail over between.
    pub fn open_remotes(
        local: &Path,
        ledger_path: &Path,
        remotes: Vec<Remote>,
        branch: &str,
    ) -> Result<Self, FollowError> {
        let repo = if local.join("HEAD").exists() {
            MetaRepo::open(local)
        } else {
            MetaRepo::init_empty_bare(local)
        }
        .map_err(|e| FollowError::Open {
            path: local.into(),
            reason: error_chain(&e),
        })?;
        let ledger: Ledger<FollowState> = Ledger::load(ledger_path)?;
        let (status, _) = watch::channel(ledger.data().clone());
        Ok(MetaFollower {
            repo,
            remotes,
            current: 0,
            branch: branch.to_string(),
            ledger,
            status,
        })
    }

    /// Fetches from the remote that answered last, else from the others in
    /// turn.
    async fn fetch_any(&mut self) -> Result<Option<String>, FollowError> {
        let n = self.remotes.len();
        let mut last = None;
        for k in 0..n {
            let i = (self.current + k) % n;
            let (repo, remote, branch) = (
                self.repo.clone(),
                self.remotes[i].clone(),
                self.branch.clone(),
            );
            let r = tokio::task::spawn_blocking(move || repo.fetch_remote(&remote, &branch))
                .await
                .expect("fetch does not panic");
            match r {
                Ok(head) => {
                    self.current = i;
                    return Ok(head);
                }
                Err(e) => {
                    last = Some(FollowError::Fetch {
                        url: meta_schema::repo::redact_url(&self.remotes[i].url),
                        branch: self.branch.clone(),
                        reason: error_chain(&e),
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| FollowError::Fetch {
            url: String::new(),
            branch: self.branch.clone(),
            reason: "no remote to fetch from".into(),
        }))
    }

    pub fn repo(&self) -> &MetaRepo {
        &self.repo
    }

    pub fn subscribe(&self) -> watch::Receiver<FollowState> {
        self.status.subscribe()
    }

    /// Fetches once and moves the applied commit forward if it may.
    pub async fn poll(&mut self) -> Result<FollowOutcome, FollowError> {
        let r = self.poll_inner().await;
        let mut st = self.ledger.data().clone();
        st.fetches = self.status.borrow().fetches + 1;
        st.last_error = r.as_ref().err().map(|e| e.to_string());
        self.status.send_replace(st);
        r
    }

    async fn poll_inner(&mut self) -> Result<FollowOutcome, FollowError> {
        let head = self.fetch_any().await?;
        let Some(head) = head else {
            return Ok(FollowOutcome::NoBranch);
        };
        let applied = self.ledger.data().applied.clone();
        if applied.as_deref() == Some(head.as_str()) {
            return Ok(FollowOutcome::Unchanged(head));
        }
        if let Some(applied) = applied.clone() {
            let (repo, a, h) = (self.repo.clone(), applied.clone(), head.clone());
            let forward = tokio::task::spawn_blocking(move || repo.is_ancestor(&a, &h))
                .await
                .expect("ancestry check does not panic")
                .map_err(|e| FollowError::Ancestry {
                    head: head.clone(),
                    reason: error_chain(&e),
                })?;
            if !forward {
                let reason =
                    format!("{head} does not descend from the applied commit {applied}; refused");
                if self.ledger.data().refused.as_deref() != Some(head.as_str()) {
                    tracing::error!(%head, %applied, "meta repo moved backwards or sideways: {reason}");
                    let d = self.ledger.data_mut();
                    d.refused = Some(head.clone());
                    d.refused_reason = Some(reason);
                    self.ledger.commit()?;
                }
                return Ok(FollowOutcome::Refused { head, applied });
            }
        }
        let d = self.ledger.data_mut();
        d.applied = Some(head.clone());
        d.refused = None;
        d.refused_reason = None;
        self.ledger.commit()?;
        tracing::info!(commit = %head, "applied meta commit");
        Ok(FollowOutcome::Advanced {
            from: applied,
            to: head,
        })
    }
}

/// Fetches on `poll_interval` and whenever `notify` fires; activates the
/// reconciler when the applied commit moved.
pub fn spawn(
    mut follower: MetaFollower,
    poll_interval: Duration,
    notify: Arc<Notify>,
    reconcile: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match follower.poll().await {
                Ok(FollowOutcome::Advanced { .. }) => reconcile.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "meta fetch failed; retrying on the next poll")
                }
            }
            // Cancel-safe: each arm only wakes the loop.
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(poll_interval) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
    })
}

/// Desired state of this node at the applied commit of the local copy.
pub struct MetaDesiredSource {
    pub repo: MetaRepo,
    pub node_id: String,
    pub follow: watch::Receiver<FollowState>,
    /// The node's age identity, to decrypt the secrets of its apps.
    pub identity: Option<age::x25519::Identity>,
}

/// Decrypts the secrets file of `env/app` in `tree` with `identity`.
fn read_secrets(
    tree: &meta_schema::MetaTree,
    env: &str,
    app: &str,
    identity: Option<&age::x25519::Identity>,
) -> Result<meta_schema::sops::Secrets, String> {
    let path = meta_schema::layout::secrets_path(env, app);
    let bytes = tree.get(&path).ok_or_else(|| format!("{path} is absent"))?;
    let text = std::str::from_utf8(bytes).map_err(|_| format!("{path} is not UTF-8"))?;
    let identity = identity.ok_or("this node has no age identity")?;
    meta_schema::sops::SopsFile::parse(text)
        .and_then(|f| f.decrypt(std::slice::from_ref(identity)))
        .map_err(|e| format!("{path}: {}", error_chain(&e)))
}

impl DesiredSource for MetaDesiredSource {
    fn desired(&self) -> BoxFuture<'_, Result<Desired, DesiredError>> {
        Box::pin(async move {
            let Some(commit) = self.follow.borrow().applied.clone() else {
                return Err(DesiredError::NotReady);
            };
            let (repo, node, c) = (self.repo.clone(), self.node_id.clone(), commit.clone());
            let identity = self.identity.clone();
            tokio::task::spawn_blocking(move || {
                let tree = repo.tree_at(&c).map_err(|e| error_chain(&e))?;
                let state = meta_schema::desired::desired_state(&tree, meta_schema::now_millis())
                    .map_err(|e| format!("{}: {e:?}", error_chain(&e)))?;
                let instances = state.instances_for_node(&node);
                let mut secrets = std::collections::BTreeMap::new();
                for i in instances
                    .iter()
                    .filter(|i| !i.release.secret_refs.is_empty())
                {
                    secrets
                        .entry(secrets_key(&i.env, &i.app))
                        .or_insert_with(|| read_secrets(&tree, &i.env, &i.app, identity.as_ref()));
                }
                // Instances of draining rollouts stop at their deadline.
                let drain_deadlines = state
                    .apps()
                    .flat_map(|app| app.draining.iter())
                    .filter_map(|r| Some((r, r.drain_deadline?)))
                    .flat_map(|(r, t)| {
                        r.latest
                            .instances
                            .iter()
                            .filter(|p| p.node == node)
                            .map(move |p| (p.instance_id.clone(), t))
                    })
                    .collect();
                Ok::<_, String>(Desired {
                    commit: Some(c),
                    instances,
                    drain_deadlines,
                    secrets,
                })
            })
            .await
            .expect("desired state does not panic")
            .map_err(|reason| DesiredError::Read { commit, reason })
        })
    }
}
