//! `rollout`: one pass of the rollout planner ([`crate::rollout::plan`])
//! over what is observed now, and the deployment files it proposes written.

use futures::future::BoxFuture;
use meta_schema::desired::{DesiredState, desired_state};
use meta_schema::layout::deployment_path;
use meta_schema::now_millis;
use meta_schema::repo::ChangeSet;
use prost::Message;

use crate::db::{InstanceRow, NodeRow};
use crate::rollout::{Action, Limits, plan};
use crate::state::AppState;

pub struct Rollout;

impl super::Task for Rollout {
    fn activate<'a>(
        &'a mut self,
        st: &'a AppState,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        Box::pin(async move {
            let limits = Limits {
                timeout: st.config.rollout_timeout,
                node_grace: st.config.node_grace,
            };
            let actions = pass(st, &limits)
                .await
                .map_err(|e| zw_util::error_chain(&e))?;
            Ok(serde_json::json!({
                "actions": actions.iter().map(Action::commit_message).collect::<Vec<_>>(),
            }))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("the meta repository head is invalid; no rollout acts on it")]
    Desired(#[from] meta_schema::desired::MetaError),
    #[error(transparent)]
    Leader(#[from] crate::leader::LeaderError),
}

/// What the captain's reconcilers read on every activation: desired state
/// at the meta repo's head and the observed instances and nodes.
pub struct Observed {
    pub state: DesiredState,
    pub instances: Vec<InstanceRow>,
    pub nodes: Vec<NodeRow>,
}

impl Observed {
    /// `None` while the meta repository has no commit.
    pub async fn read(captain: &AppState, now: i64) -> Result<Option<Observed>, RolloutError> {
        let Some(head) = captain.meta.head().await? else {
            return Ok(None);
        };
        let tree = captain.meta.tree(head).await?;
        Ok(Some(Observed {
            state: desired_state(&tree, now)?,
            instances: captain.db.instances(None).await?,
            nodes: captain.db.nodes().await?,
        }))
    }
}

/// One pass: read, plan, write. Returns the actions taken.
pub async fn pass(captain: &AppState, limits: &Limits) -> Result<Vec<Action>, RolloutError> {
    let now = now_millis();
    let Some(Observed {
        state,
        instances,
        nodes,
    }) = Observed::read(captain, now).await?
    else {
        return Ok(Vec::new());
    };
    let actions = plan(&state, &instances, &nodes, now, limits);
    for action in &actions {
        let d = action.deployment();
        // Fenced: written only while this captain holds the leader's lease,
        // and never after a newer leader wrote (crate::leader).
        let epoch = captain.leader.fence(&captain.db).await?;
        let changes = ChangeSet::new()
            .add(deployment_path(&d.env, &d.app, &d.id), d.encode_to_vec())
            .fenced(epoch, captain.leader.id.clone());
        captain
            .meta
            .commit(changes, action.commit_message())
            .await?;
        tracing::info!(env = %d.env, app = %d.app, rollout = %d.rollout_id, "{}", action.commit_message());
        if let Some(rel) = &d.release {
            let (from, to) = match action {
                Action::Start(_) => ("building", "starting"),
                Action::Promote(_) => ("starting", "running"),
                Action::Fail(_) => ("starting", "failed"),
                // The release's status does not change.
                Action::Restart(_) | Action::Replace(_) | Action::Shrink(_) => continue,
            };
            // Best effort: the release's row may already have moved on
            // (e.g. a rollback of a release that once ran).
            let _ = captain
                .db
                .set_deployment_status(&rel.id, from, to, &d.reason, now)
                .await;
            if matches!(action, Action::Start(_)) {
                let _ = captain
                    .db
                    .set_deployment_status(&rel.id, "pending", to, "", now)
                    .await;
            }
        }
    }
    if !actions.is_empty() {
        captain.mirror_wake.notify_one();
        captain.routes_wake.notify_one();
    }
    Ok(actions)
}
