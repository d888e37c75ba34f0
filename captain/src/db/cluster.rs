//! Several captains on one database (migration 0005): the leader's lease,
//! the captains seen, join tokens, shared secrets, the hosts that joined.

use sqlx::Row as _;

use super::{Backend, Db, DbError};

type Result<T, E = DbError> = std::result::Result<T, E>;

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { op, source }
}

/// One join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRow {
    pub id: String,
    pub role: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub used_by: String,
}

/// A host that joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub id: String,
    pub role: String,
    pub token_id: String,
    pub cert_serial: String,
    pub cert_expires_at: i64,
    pub joined_at: i64,
    pub removed_at: Option<i64>,
}

fn member_of(r: &sqlx::any::AnyRow) -> std::result::Result<MemberRow, sqlx::Error> {
    Ok(MemberRow {
        id: r.try_get("id")?,
        role: r.try_get("role")?,
        token_id: r.try_get("token_id")?,
        cert_serial: r.try_get("cert_serial")?,
        cert_expires_at: r.try_get("cert_expires_at")?,
        joined_at: r.try_get("joined_at")?,
        removed_at: r.try_get("removed_at")?,
    })
}

impl Db {
    /// The database's clock in unix milliseconds, as SQL: every captain
    /// measures leases by the same clock.
    pub fn now_sql(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// The database's clock now (unix ms).
    pub async fn now(&self) -> Result<i64> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {} AS now",
            self.now_sql()
        )))
        .fetch_one(self.pool())
        .await
        .map_err(q("reading the database clock"))?;
        r.try_get::<i64, _>("now")
            .map_err(q("reading the database clock"))
    }

    /// Take or renew lease `name` for `holder` for `ttl_ms`: its epoch when
    /// `holder` holds it now (the epoch grows when the holder changes),
    /// `None` when another holder's lease has not expired.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<Option<i64>> {
        let now = self.now_sql();
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE leases SET epoch = CASE WHEN holder = $1 THEN epoch ELSE epoch + 1 END, \
             holder = $1, expires_at = {now} + $2 \
             WHERE name = $3 AND (holder = $1 OR expires_at < {now}) RETURNING epoch"
        )))
        .bind(holder)
        .bind(ttl_ms)
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .map_err(q("taking the lease"))?;
        r.map(|r| r.try_get::<i64, _>("epoch"))
            .transpose()
            .map_err(q("taking the lease"))
    }

    /// Does `holder` hold lease `name` at `epoch`, unexpired, now?
    pub async fn holds_lease(&self, name: &str, holder: &str, epoch: i64) -> Result<bool> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) AS n FROM leases WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > {}",
            self.now_sql()
        )))
        .bind(name)
        .bind(holder)
        .bind(epoch)
        .fetch_one(self.pool())
        .await
        .map_err(q("checking the lease"))?;
        Ok(r.try_get::<i64, _>("n").map_err(q("checking the lease"))? > 0)
    }

    /// Give lease `name` up (a captain stopping), so another takes it at once.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("UPDATE leases SET expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(self.pool())
            .await
            .map_err(q("releasing the lease"))?;
        Ok(())
    }

    /// (holder, epoch, expires_at) of lease `name`.
    pub async fn lease(&self, name: &str) -> Result<Option<(String, i64, i64)>> {
        let r = sqlx::query("SELECT holder, epoch, expires_at FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading the lease"))?;
        r.map(|r| {
            Ok::<_, sqlx::Error>((
                r.try_get("holder")?,
                r.try_get("epoch")?,
                r.try_get("expires_at")?,
            ))
        })
        .transpose()
        .map_err(q("reading the lease"))
    }

    /// Record that captain `id` (serving `api_url`) is alive.
    pub async fn captain_seen(&self, id: &str, api_url: &str, started_at: i64) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO captains (id, api_url, started_at, last_seen) VALUES ($1, $2, $3, {now}) \
             ON CONFLICT (id) DO UPDATE SET api_url = excluded.api_url, last_seen = excluded.last_seen",
            now = self.now_sql()
        )))
        .bind(id)
        .bind(api_url)
        .bind(started_at)
        .execute(self.pool())
        .await
        .map_err(q("recording a captain"))?;
        Ok(())
    }

    /// (id, api_url) of the captains seen in the last `within_ms`.
    pub async fn live_captains(&self, within_ms: i64) -> Result<Vec<(String, String)>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, api_url FROM captains WHERE last_seen > {} - $1 ORDER BY id",
            self.now_sql()
        )))
        .bind(within_ms)
        .fetch_all(self.pool())
        .await
        .map_err(q("listing captains"))?
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("api_url")?)))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(q("listing captains"))
    }

    pub async fn insert_join_token(&self, t: &JoinTokenRow, hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO join_tokens (id, hash, role, created_at, expires_at, used_at, used_by) VALUES ($1, $2, $3, $4, $5, NULL, '')",
        )
        .bind(&t.id)
        .bind(hash)
        .bind(&t.role)
        .bind(t.created_at)
        .bind(t.expires_at)
        .execute(self.pool())
        .await
        .map_err(q("creating a join token"))?;
        Ok(())
    }

    /// The join token whose secret hashes to `hash`, whatever its state.
    pub async fn join_token_by_hash(&self, hash: &str) -> Result<Option<JoinTokenRow>> {
        let r = sqlx::query(
            "SELECT id, role, created_at, expires_at, used_at, used_by FROM join_tokens WHERE hash = $1",
        )
        .bind(hash)
        .fetch_optional(self.pool())
        .await
        .map_err(q("reading a join token"))?;
        r.map(|r| {
            Ok::<_, sqlx::Error>(JoinTokenRow {
                id: r.try_get("id")?,
                role: r.try_get("role")?,
                created_at: r.try_get("created_at")?,
                expires_at: r.try_get("expires_at")?,
                used_at: r.try_get("used_at")?,
                used_by: r.try_get("used_by")?,
            })
        })
        .transpose()
        .map_err(q("reading a join token"))
    }

    /// Use join token `id` once: false when it was used already.
    pub async fn use_join_token(&self, id: &str, by: &str, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE join_tokens SET used_at = $1, used_by = $2 WHERE id = $3 AND used_at IS NULL",
        )
        .bind(now)
        .bind(by)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(q("using a join token"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn cluster_secret(&self, name: &str) -> Result<Option<String>> {
        let r = sqlx::query("SELECT value FROM cluster_secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading a cluster secret"))?;
        r.map(|r| r.try_get::<String, _>("value"))
            .transpose()
            .map_err(q("reading a cluster secret"))
    }

    /// Store `value` under `name` unless one is there; returns the stored
    /// value (the first captain's wins a race).
    pub async fn init_cluster_secret(&self, name: &str, value: &str, now: i64) -> Result<String> {
        sqlx::query(
            "INSERT INTO cluster_secrets (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(q("storing a cluster secret"))?;
        Ok(self
            .cluster_secret(name)
            .await?
            .unwrap_or_else(|| value.to_string()))
    }

    pub async fn upsert_member(&self, m: &MemberRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO members (id, role, token_id, cert_serial, cert_expires_at, joined_at, removed_at) VALUES ($1, $2, $3, $4, $5, $6, NULL) \
             ON CONFLICT (id) DO UPDATE SET role = excluded.role, token_id = excluded.token_id, cert_serial = excluded.cert_serial, \
             cert_expires_at = excluded.cert_expires_at, joined_at = excluded.joined_at, removed_at = NULL",
        )
        .bind(&m.id)
        .bind(&m.role)
        .bind(&m.token_id)
        .bind(&m.cert_serial)
        .bind(m.cert_expires_at)
        .bind(m.joined_at)
        .execute(self.pool())
        .await
        .map_err(q("recording a member"))?;
        Ok(())
    }

    pub async fn member(&self, id: &str) -> Result<Option<MemberRow>> {
        let r = sqlx::query(
            "SELECT id, role, token_id, cert_serial, cert_expires_at, joined_at, removed_at FROM members WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(q("reading a member"))?;
        r.map(|r| member_of(&r))
            .transpose()
            .map_err(q("reading a member"))
    }

    /// Every host that joined, removed ones too, by id.
    pub async fn cluster_members(&self) -> Result<Vec<MemberRow>> {
        sqlx::query(
            "SELECT id, role, token_id, cert_serial, cert_expires_at, joined_at, removed_at FROM members ORDER BY id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("listing members"))?
        .iter()
        .map(member_of)
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(q("listing members"))
    }

    /// The member whose credential is token `token_id`.
    pub async fn member_by_token(&self, token_id: &str) -> Result<Option<MemberRow>> {
        let r = sqlx::query("SELECT id FROM members WHERE token_id = $1")
            .bind(token_id)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading a member"))?;
        match r {
            Some(r) => {
                let id: String = r.try_get("id").map_err(q("reading a member"))?;
                self.member(&id).await
            }
            None => Ok(None),
        }
    }

    /// Mark a member removed (it renews nothing from now on).
    pub async fn remove_member_host(&self, id: &str, now: i64) -> Result<bool> {
        let r =
            sqlx::query("UPDATE members SET removed_at = $1 WHERE id = $2 AND removed_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(self.pool())
                .await
                .map_err(q("removing a member"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Set or clear the admin's drain of node `id`.
    pub async fn set_drain(&self, id: &str, drain: bool) -> Result<bool> {
        let r = sqlx::query("UPDATE nodes SET drain = $1 WHERE id = $2")
            .bind(i64::from(drain))
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(q("draining a node"))?;
        Ok(r.rows_affected() > 0)
    }
}
