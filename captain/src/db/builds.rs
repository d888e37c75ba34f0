//! The build queue's rows and queries (migration 0002).

use api_types::builds::BuildLogLine;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Db, DbError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRow {
    pub id: String,
    pub app_id: String,
    /// `git` or `upload`.
    pub source_kind: String,
    /// The git URL, or the store key of the uploaded tarball.
    pub source_url: String,
    pub source_branch: String,
    pub source_commit: String,
    pub dockerfile: String,
    /// JSON object of build arguments.
    pub build_args: String,
    /// JSON [`DeploySpec`], empty = build only.
    pub deploy_spec: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub error: String,
    pub image_digest: String,
    pub deployment_id: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

const BUILD_COLS: &str = "id, app_id, source_kind, source_url, source_branch, source_commit, dockerfile, build_args, deploy_spec, status, attempts, next_attempt_at, error, image_digest, deployment_id, created_at, started_at, finished_at, updated_at";

impl BuildRow {
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(BuildRow {
            id: r.try_get("id")?,
            app_id: r.try_get("app_id")?,
            source_kind: r.try_get("source_kind")?,
            source_url: r.try_get("source_url")?,
            source_branch: r.try_get("source_branch")?,
            source_commit: r.try_get("source_commit")?,
            dockerfile: r.try_get("dockerfile")?,
            build_args: r.try_get("build_args")?,
            deploy_spec: r.try_get("deploy_spec")?,
            status: r.try_get("status")?,
            attempts: r.try_get("attempts")?,
            next_attempt_at: r.try_get("next_attempt_at")?,
            error: r.try_get("error")?,
            image_digest: r.try_get("image_digest")?,
            deployment_id: r.try_get("deployment_id")?,
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }

    pub fn is_terminal(&self) -> bool {
        self.status == "succeeded" || self.status == "failed"
    }
}

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { op, source }
}

/// Queries of the build queue.
impl Db {
    pub async fn insert_build(&self, b: &BuildRow) -> Result<(), DbError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO builds ({BUILD_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
        )))
        .bind(&b.id)
        .bind(&b.app_id)
        .bind(&b.source_kind)
        .bind(&b.source_url)
        .bind(&b.source_branch)
        .bind(&b.source_commit)
        .bind(&b.dockerfile)
        .bind(&b.build_args)
        .bind(&b.deploy_spec)
        .bind(&b.status)
        .bind(b.attempts)
        .bind(b.next_attempt_at)
        .bind(&b.error)
        .bind(&b.image_digest)
        .bind(&b.deployment_id)
        .bind(b.created_at)
        .bind(b.started_at)
        .bind(b.finished_at)
        .bind(b.updated_at)
        .execute(self.pool())
        .await
        .map_err(q("inserting a build"))?;
        Ok(())
    }

    pub async fn build(&self, id: &str) -> Result<Option<BuildRow>, DbError> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {BUILD_COLS} FROM builds WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(q("reading a build"))?;
        r.as_ref()
            .map(BuildRow::from_row)
            .transpose()
            .map_err(q("reading a build"))
    }

    /// Newest first; `app_id` filters.
    /// Builds of the apps of the projects `user` is a member of.
    pub async fn builds_of_user(&self, user: &str, limit: i64) -> Result<Vec<BuildRow>, DbError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {BUILD_COLS} FROM builds WHERE app_id IN \
             (SELECT a.id FROM apps a JOIN project_members m ON m.project_id = a.project_id WHERE m.user_id = $1) \
             ORDER BY id DESC LIMIT $2"
        )))
        .bind(user)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(q("listing builds"))?
        .iter()
        .map(BuildRow::from_row)
        .collect::<Result<_, _>>()
        .map_err(q("listing builds"))
    }

    pub async fn builds(&self, app_id: Option<&str>, limit: i64) -> Result<Vec<BuildRow>, DbError> {
        let rows = match app_id {
            Some(a) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {BUILD_COLS} FROM builds WHERE app_id = $1 ORDER BY id DESC LIMIT $2"
            )))
            .bind(a)
            .bind(limit),
            None => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {BUILD_COLS} FROM builds ORDER BY id DESC LIMIT $1"
            )))
            .bind(limit),
        }
        .fetch_all(self.pool())
        .await
        .map_err(q("listing builds"))?;
        rows.iter()
            .map(BuildRow::from_row)
            .collect::<Result<_, _>>()
            .map_err(q("listing builds"))
    }

    /// Claim the oldest due build for captain `by` for `claim_ms`: a queued
    /// one, or one whose claim lapsed (its captain died). A lapsed build that
    /// has used `max_attempts` is failed instead. Times are the database's.
    pub async fn claim_build(
        &self,
        by: &str,
        claim_ms: i64,
        max_attempts: i64,
    ) -> Result<Option<BuildRow>, DbError> {
        let now = self.now_sql();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE builds SET status = 'failed', finished_at = {now}, updated_at = {now}, claimed_by = '', \
             error = 'the captain running it stopped during every attempt of this build' \
             WHERE status = 'building' AND claimed_until < {now} AND attempts >= $1"
        )))
        .bind(max_attempts)
        .execute(self.pool())
        .await
        .map_err(q("failing abandoned builds"))?;
        let due = format!(
            "((status = 'queued' AND next_attempt_at <= {now}) OR (status = 'building' AND claimed_until < {now}))"
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE builds SET status = 'building', attempts = attempts + 1, started_at = {now}, updated_at = {now}, \
             claimed_by = $1, claimed_until = {now} + $2 \
             WHERE {due} AND id = (SELECT id FROM builds WHERE {due} ORDER BY id LIMIT 1) \
             RETURNING {BUILD_COLS}"
        )))
        .bind(by)
        .bind(claim_ms)
        .fetch_optional(self.pool())
        .await
        .map_err(q("claiming a build"))?;
        r.as_ref()
            .map(BuildRow::from_row)
            .transpose()
            .map_err(q("claiming a build"))
    }

    /// Extend `by`'s claim on build `id`; false when the claim is no longer
    /// `by`'s (it lapsed and another captain took the build over).
    pub async fn renew_build_claim(
        &self,
        id: &str,
        by: &str,
        claim_ms: i64,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE builds SET claimed_until = {} + $3 WHERE id = $1 AND claimed_by = $2 AND status = 'building'",
            self.now_sql()
        )))
        .bind(id)
        .bind(by)
        .bind(claim_ms)
        .execute(self.pool())
        .await
        .map_err(q("renewing a build claim"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Give up `by`'s claims (a captain stopping): another takes them now.
    pub async fn release_build_claims(&self, by: &str) -> Result<u64, DbError> {
        Ok(sqlx::query(
            "UPDATE builds SET claimed_until = 0 WHERE claimed_by = $1 AND status = 'building'",
        )
        .bind(by)
        .execute(self.pool())
        .await
        .map_err(q("releasing build claims"))?
        .rows_affected())
    }

    /// Puts a claimed build back in the queue after an infrastructure fault.
    pub async fn requeue_build(
        &self,
        id: &str,
        by: &str,
        next_attempt_at: i64,
        error: &str,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE builds SET status = 'queued', next_attempt_at = $2, error = $3, updated_at = $4, claimed_by = '' \
             WHERE id = $1 AND status = 'building' AND claimed_by = $5",
        )
        .bind(id)
        .bind(next_attempt_at)
        .bind(error)
        .bind(now)
        .bind(by)
        .execute(self.pool())
        .await
        .map_err(q("re-queueing a build"))?;
        Ok(())
    }

    /// Ends a build `by` claimed (a captain whose claim lapsed writes
    /// nothing: the build is another's now).
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_build(
        &self,
        id: &str,
        by: &str,
        status: &str,
        error: &str,
        image_digest: &str,
        deployment_id: &str,
        now: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE builds SET status = $2, error = $3, image_digest = $4, deployment_id = $5, finished_at = $6, updated_at = $6, claimed_by = '' \
             WHERE id = $1 AND claimed_by = $7",
        )
        .bind(id)
        .bind(status)
        .bind(error)
        .bind(image_digest)
        .bind(deployment_id)
        .bind(now)
        .bind(by)
        .execute(self.pool())
        .await
        .map_err(q("finishing a build"))?;
        Ok(())
    }

    pub async fn insert_build_logs(
        &self,
        build_id: &str,
        lines: &[BuildLogLine],
    ) -> Result<(), DbError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pool()
            .begin()
            .await
            .map_err(q("storing build log lines"))?;
        for l in lines {
            sqlx::query("INSERT INTO build_logs (build_id, seq, t, stream, line) VALUES ($1, $2, $3, $4, $5)")
                .bind(build_id)
                .bind(l.seq)
                .bind(l.t)
                .bind(&l.stream)
                .bind(&l.line)
                .execute(&mut *tx)
                .await
                .map_err(q("storing build log lines"))?;
        }
        tx.commit().await.map_err(q("storing build log lines"))?;
        Ok(())
    }

    /// Lines after `after` (a seq), oldest first.
    pub async fn build_logs(
        &self,
        build_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BuildLogLine>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, t, stream, line FROM build_logs WHERE build_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(build_id)
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(q("reading build log lines"))?;
        rows.iter()
            .map(|r| {
                Ok(BuildLogLine {
                    seq: r.try_get("seq")?,
                    t: r.try_get("t")?,
                    stream: r.try_get("stream")?,
                    line: r.try_get("line")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(q("reading build log lines"))
    }

    /// The highest seq stored for a build (0 when none).
    pub async fn last_build_log_seq(&self, build_id: &str) -> Result<i64, DbError> {
        let r = sqlx::query("SELECT MAX(seq) AS m FROM build_logs WHERE build_id = $1")
            .bind(build_id)
            .fetch_one(self.pool())
            .await
            .map_err(q("reading build log lines"))?;
        Ok(r.try_get::<Option<i64>, _>("m")
            .map_err(q("reading build log lines"))?
            .unwrap_or(0))
    }
}
