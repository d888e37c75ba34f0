//! `GET /v1/apps/{id}/logs?from=<unix-nanos>&limit=N[&instance=<id>]`: an
//! app's log lines, collected from its instances on their nodes through
//! [`crate::nodelink`] and merged by time.
//!
//! The app's instances are those followers reported (the `instances`
//! table), but for stopped ones (their node deleted them, logs included;
//! `?instance=` still asks for one). Every instance on a node that is not
//! offline is asked, at once,
//! for its lines stamped after `from` (at most `limit` each); the answers
//! are merged by stamp and the first `limit` returned, each tagged with its
//! instance. `X-Last-Log-Nano` is the stamp of the last line returned, or
//! `from` when none: the next `from`, so a poller never gets a line twice.
//! A node that does not answer (or is offline, or has no link) does not
//! fail the request: its id is listed in `X-Log-Unreachable` and logged.
//!
//! Stamps are per instance (strictly increasing, given by the follower when
//! it collects a line, see `follower::logs`), so merging pages of several
//! instances could return B's line at 105 while A still has to stamp a line
//! at 103; the next page, from 105, would skip it. To avoid that, each
//! follower says up to when its instance's lines are complete
//! (`X-Log-Collected-Nano`: every later line gets a larger stamp), and only
//! lines up to the smallest such mark over the instances asked are
//! returned; the rest wait for the next poll. The merge still skips:
//! - lines of a node that did not answer (listed in `X-Log-Unreachable`)
//!   and that are stamped before the `X-Last-Log-Nano` a client already
//!   moved past;
//! - lines of an instance the captain did not know yet (its first report
//!   arrives after a page that moved past its first stamps);
//! - lines of a follower too old to send `X-Log-Collected-Nano`, when they
//!   are collected late with an older stamp than an already returned
//!   `X-Last-Log-Nano`.
//!
//! A line stamped by a node whose clock is behind is never skipped by this
//! (the marks are in each node's own clock), only held back until the
//! slowest clock passes it.

use std::collections::BTreeSet;

use api_types::logs::AppLogLine;

use super::{AppError, Result};
use crate::nodelink::NodeLink;
use crate::state::AppState;

/// Lines per page when the query does not say.
pub const DEFAULT_LIMIT: usize = 1000;
/// Most lines of one page.
pub const MAX_LIMIT: usize = 10_000;

/// One page of an app's logs.
pub struct LogPage {
    pub lines: Vec<AppLogLine>,
    /// The next `from`.
    pub last: u64,
    /// Nodes that did not answer.
    pub unreachable: BTreeSet<String>,
}

/// App `id`'s log lines stamped after `from` (unix nanoseconds), at most
/// `limit` (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]), of one
/// `instance` or all of them.
pub async fn read(
    st: &AppState,
    id: &str,
    from: u64,
    limit: Option<usize>,
    instance: Option<&str>,
) -> Result<LogPage> {
    let app = st
        .db
        .app(id)
        .await?
        .ok_or_else(|| AppError::not_found("app", id))?;
    let limit = limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let instances = st
        .db
        .instances_of_app(&app.env, &app.name, instance)
        .await?;
    if let Some(only) = instance
        && instances.is_empty()
    {
        return Err(AppError::NoSuch(format!(
            "app {id:?} has no instance {only:?}"
        )));
    }

    let wanted: BTreeSet<&str> = instances.iter().map(|(_, n)| n.as_str()).collect();
    let mut unreachable = BTreeSet::new();
    let mut asked = Vec::new();
    for n in st.db.nodes().await? {
        if !wanted.contains(n.id.as_str()) {
            continue;
        }
        if n.state == "offline" {
            tracing::warn!(app = %id, node = %n.id, "app logs: node is offline; its lines are left out");
            unreachable.insert(n.id);
        } else {
            asked.push(n);
        }
    }
    // Instances of nodes no longer registered went with their node.
    let links = NodeLink::to_nodes(st, asked)
        .await
        .map_err(|e| AppError::internal("linking to the app's nodes", e))?;
    let mut calls = Vec::new();
    for (instance, node) in &instances {
        match links.get(node) {
            Some(Ok(link)) => calls.push(async move {
                (
                    instance.as_str(),
                    node.as_str(),
                    link.instance_logs(instance, from, limit).await,
                )
            }),
            // Warned once per node (the insert is false for its others).
            Some(Err(e)) if unreachable.insert(node.clone()) => {
                tracing::warn!(app = %id, %node, error = %e, "app logs: node cannot be called");
            }
            Some(Err(_)) | None => {}
        }
    }
    let answers = futures::future::join_all(calls).await;

    let mut complete_to = u64::MAX;
    let mut lines = Vec::new();
    for (instance, node, r) in answers {
        match r {
            Ok(page) => {
                // A full page is complete only up to its last line.
                let mark = if page.lines.len() >= limit {
                    page.lines.last().map_or(from, |l| l.t)
                } else {
                    page.collected.unwrap_or(u64::MAX)
                };
                complete_to = complete_to.min(mark);
                lines.extend(page.lines.into_iter().map(|l| AppLogLine {
                    t: l.t,
                    line: l.line,
                    instance: instance.to_string(),
                }));
            }
            // Reported once, but no longer on its node (removed).
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                if unreachable.insert(node.to_string()) {
                    tracing::warn!(app = %id, %node, error = %zw_util::ErrorChain(&e), "app logs: node did not answer; its lines are left out");
                }
            }
        }
    }
    let lines = merge(lines, complete_to, limit);
    let last = lines.last().map_or(from, |l| l.t);

    Ok(LogPage {
        lines,
        last,
        unreachable,
    })
}

/// The lines stamped up to `complete_to`, oldest first, at most `limit`. A
/// page never ends between two lines of the same stamp (of different
/// instances): the next page starts after that stamp.
pub fn merge(mut lines: Vec<AppLogLine>, complete_to: u64, limit: usize) -> Vec<AppLogLine> {
    lines.retain(|l| l.t <= complete_to);
    lines.sort_by(|a, b| (a.t, &a.instance).cmp(&(b.t, &b.instance)));
    if lines.len() > limit {
        let cut = lines[limit].t;
        lines.truncate(limit);
        let keep = lines.iter().filter(|l| l.t < cut).count();
        if keep > 0 {
            lines.truncate(keep);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(t: u64, i: &str) -> AppLogLine {
        AppLogLine {
            t,
            line: format!("{i}@{t}"),
            instance: i.into(),
        }
    }

    #[test]
    fn merge_orders_holds_back_and_never_splits_a_stamp() {
        let v = vec![l(5, "b"), l(1, "a"), l(3, "b"), l(4, "a"), l(9, "a")];
        let m = merge(v.clone(), 5, 10);
        let ts: Vec<u64> = m.iter().map(|x| x.t).collect();
        assert_eq!(ts, [1, 3, 4, 5]);
        assert_eq!(merge(v, u64::MAX, 2).len(), 2);
        // Two instances stamped 7: a page of 2 stops before them.
        let m = merge(vec![l(6, "a"), l(7, "a"), l(7, "b")], u64::MAX, 2);
        assert_eq!(m, vec![l(6, "a")]);
    }
}
