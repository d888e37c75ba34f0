//! Leadership among the captains of one database: exactly one at a time
//! runs the rollout planner, node notification and node liveness.
//!
//! The lease is a row of the `leases` table (migration 0005) with a holder,
//! an epoch and an expiry measured by the database's clock (so captains on
//! different hosts agree on time). Every captain tries to take or renew it
//! every [`RENEW`] (the `lease` background task); the holder's lease lasts
//! [`TTL`]. A captain counts itself leader only until its last renewal plus
//! the TTL minus a margin, by its own monotonic clock: one that cannot
//! renew (database unreachable, process paused) stops leading before any
//! other captain can take over.
//!
//! **Fencing.** A write of a leader is a commit carrying its epoch
//! (`ChangeSet::fenced`): `MetaRepo` refuses it when the repository's
//! `cluster/leader.pb` already holds a higher epoch, and sets the file to
//! its own otherwise; and just before committing the leader checks in the
//! database that it still holds the lease at that epoch. A paused leader
//! that wakes after losing its lease is refused by one or the other.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::db::{Db, DbError};

/// The lease's name in the `leases` table.
pub const LEASE: &str = "leader";
/// How long a lease lasts without renewal.
pub const TTL: Duration = Duration::from_secs(3);
/// How often every captain tries to take or renew it.
pub const RENEW: Duration = Duration::from_millis(700);
/// A leader stops leading this long before its lease would expire.
const MARGIN: Duration = Duration::from_millis(500);

/// This captain's view of the lease.
pub struct Leadership {
    /// This captain's id (the lease holder's name).
    pub id: String,
    epoch: AtomicI64,
    until: Mutex<Option<Instant>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("this captain is not the leader")]
    NotLeader,
    #[error("this captain lost the leader's lease (epoch {epoch}) before writing")]
    Lost { epoch: i64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl Leadership {
    pub fn new(id: impl Into<String>) -> Leadership {
        Leadership {
            id: id.into(),
            epoch: AtomicI64::new(0),
            until: Mutex::new(None),
        }
    }

    /// The epoch this captain leads at, while its lease is valid.
    pub fn epoch(&self) -> Option<i64> {
        let until = *self.until.lock().expect("leader lock");
        match until {
            Some(u) if Instant::now() < u => Some(self.epoch.load(Ordering::SeqCst)),
            _ => None,
        }
    }

    pub fn is_leader(&self) -> bool {
        self.epoch().is_some()
    }

    /// Take or renew the lease; returns the epoch while this captain leads.
    pub async fn renew(&self, db: &Db) -> Result<Option<i64>, DbError> {
        let asked = Instant::now();
        let ttl_ms = i64::try_from(TTL.as_millis()).unwrap_or(3000);
        match db.acquire_lease(LEASE, &self.id, ttl_ms).await {
            Ok(Some(epoch)) => {
                let was = self.epoch.swap(epoch, Ordering::SeqCst);
                // Counted from before the request: the database's expiry is
                // later than this.
                *self.until.lock().expect("leader lock") = Some(asked + TTL - MARGIN);
                if was != epoch {
                    tracing::info!(captain = %self.id, epoch, "this captain leads");
                }
                Ok(Some(epoch))
            }
            Ok(None) => {
                self.step_down();
                Ok(None)
            }
            Err(e) => {
                // Cannot renew: lead only until the last renewal runs out.
                Err(e)
            }
        }
    }

    /// Stop leading now (the lease is someone else's, or we are stopping).
    pub fn step_down(&self) {
        let mut until = self.until.lock().expect("leader lock");
        if until.take().is_some() {
            tracing::warn!(captain = %self.id, "this captain no longer leads");
        }
    }

    /// The epoch to fence a write with: this captain leads and the
    /// database agrees, now.
    pub async fn fence(&self, db: &Db) -> Result<u64, LeaderError> {
        let epoch = self.epoch().ok_or(LeaderError::NotLeader)?;
        if !db.holds_lease(LEASE, &self.id, epoch).await? {
            self.step_down();
            return Err(LeaderError::Lost { epoch });
        }
        Ok(u64::try_from(epoch).unwrap_or(0))
    }

    /// Give the lease up (a clean stop), so another captain leads at once.
    pub async fn release(&self, db: &Db) {
        if self.is_leader() {
            self.step_down();
            let _ = db.release_lease(LEASE, &self.id).await;
        }
    }
}
