//! Tenants: users, project members, the projects of an image, the
//! waitlist's admissions (migration 0004).

use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Db, DbError, ProjectRow};

type Result<T, E = DbError> = std::result::Result<T, E>;

fn q(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { op, source }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub login: String,
    /// GitHub's numeric user id; empty for a local user.
    pub github_id: String,
    pub created_at: i64,
}

impl UserRow {
    fn from_row(r: &AnyRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(UserRow {
            id: r.try_get("id")?,
            login: r.try_get("login")?,
            github_id: r.try_get("github_id")?,
            created_at: r.try_get("created_at")?,
        })
    }
}

/// A member of a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub project_id: String,
    pub user_id: String,
    pub login: String,
    /// `owner` or `member`.
    pub role: String,
    pub created_at: i64,
}

/// One entry of the waitlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitlistRow {
    pub id: String,
    pub email: String,
    pub github_login: String,
    pub github_id: String,
    pub created_at: i64,
    pub admitted_at: Option<i64>,
}

impl Db {
    pub async fn insert_user(&self, u: &UserRow) -> Result<()> {
        sqlx::query("INSERT INTO users (id, login, github_id, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&u.id)
            .bind(&u.login)
            .bind(&u.github_id)
            .bind(u.created_at)
            .execute(self.pool())
            .await
            .map_err(q("inserting a user"))?;
        Ok(())
    }

    pub async fn user(&self, id: &str) -> Result<Option<UserRow>> {
        let r = sqlx::query("SELECT id, login, github_id, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading a user"))?;
        r.map(|r| UserRow::from_row(&r))
            .transpose()
            .map_err(q("reading a user"))
    }

    pub async fn user_by_github(&self, github_id: &str) -> Result<Option<UserRow>> {
        let r = sqlx::query(
            "SELECT id, login, github_id, created_at FROM users WHERE github_id = $1 AND github_id <> ''",
        )
        .bind(github_id)
        .fetch_optional(self.pool())
        .await
        .map_err(q("reading a user"))?;
        r.map(|r| UserRow::from_row(&r))
            .transpose()
            .map_err(q("reading a user"))
    }

    pub async fn users(&self) -> Result<Vec<UserRow>> {
        sqlx::query("SELECT id, login, github_id, created_at FROM users ORDER BY id")
            .fetch_all(self.pool())
            .await
            .map_err(q("listing users"))?
            .iter()
            .map(UserRow::from_row)
            .collect::<std::result::Result<_, _>>()
            .map_err(q("listing users"))
    }

    /// The role of `user` in `project` (`owner`, `member`), if any.
    pub async fn member_role(&self, project: &str, user: &str) -> Result<Option<String>> {
        let r =
            sqlx::query("SELECT role FROM project_members WHERE project_id = $1 AND user_id = $2")
                .bind(project)
                .bind(user)
                .fetch_optional(self.pool())
                .await
                .map_err(q("reading a membership"))?;
        r.map(|r| r.try_get::<String, _>("role"))
            .transpose()
            .map_err(q("reading a membership"))
    }

    /// Add (or change the role of) a member.
    pub async fn set_member(&self, project: &str, user: &str, role: &str, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO project_members (project_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (project_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(project)
        .bind(user)
        .bind(role)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(q("adding a member"))?;
        Ok(())
    }

    pub async fn remove_member(&self, project: &str, user: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
            .bind(project)
            .bind(user)
            .execute(self.pool())
            .await
            .map_err(q("removing a member"))?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn members(&self, project: &str) -> Result<Vec<MemberRow>> {
        sqlx::query(
            "SELECT m.project_id, m.user_id, u.login, m.role, m.created_at FROM project_members m \
             JOIN users u ON u.id = m.user_id WHERE m.project_id = $1 ORDER BY m.created_at, m.user_id",
        )
        .bind(project)
        .fetch_all(self.pool())
        .await
        .map_err(q("listing members"))?
        .iter()
        .map(|r| {
            Ok(MemberRow {
                project_id: r.try_get("project_id")?,
                user_id: r.try_get("user_id")?,
                login: r.try_get("login")?,
                role: r.try_get("role")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(q("listing members"))
    }

    /// Ids of the projects `user` is a member of.
    pub async fn projects_of_user(&self, user: &str) -> Result<Vec<String>> {
        sqlx::query("SELECT project_id FROM project_members WHERE user_id = $1 ORDER BY project_id")
            .bind(user)
            .fetch_all(self.pool())
            .await
            .map_err(q("listing a user's projects"))?
            .iter()
            .map(|r| r.try_get::<String, _>("project_id"))
            .collect::<std::result::Result<_, _>>()
            .map_err(q("listing a user's projects"))
    }

    /// Projects `user` is a member of.
    pub async fn member_projects(&self, user: &str) -> Result<Vec<ProjectRow>> {
        let ids = self.projects_of_user(user).await?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(p) = self.project(&id).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Record that `project` built (or deployed) image `digest`.
    pub async fn add_image_project(&self, digest: &str, project: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO image_projects (digest, project_id) VALUES ($1, $2) ON CONFLICT (digest, project_id) DO NOTHING",
        )
        .bind(digest)
        .bind(project)
        .execute(self.pool())
        .await
        .map_err(q("recording an image's project"))?;
        Ok(())
    }

    /// The projects that built image `digest`.
    pub async fn image_projects(&self, digest: &str) -> Result<Vec<String>> {
        sqlx::query("SELECT project_id FROM image_projects WHERE digest = $1 ORDER BY project_id")
            .bind(digest)
            .fetch_all(self.pool())
            .await
            .map_err(q("reading an image's projects"))?
            .iter()
            .map(|r| r.try_get::<String, _>("project_id"))
            .collect::<std::result::Result<_, _>>()
            .map_err(q("reading an image's projects"))
    }

    pub async fn waitlist(&self) -> Result<Vec<WaitlistRow>> {
        sqlx::query(
            "SELECT id, email, github_login, github_id, created_at, admitted_at FROM waitlist ORDER BY created_at, id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("listing the waitlist"))?
        .iter()
        .map(|r| {
            Ok(WaitlistRow {
                id: r.try_get("id")?,
                email: r.try_get("email")?,
                github_login: r.try_get("github_login")?,
                github_id: r.try_get("github_id")?,
                created_at: r.try_get("created_at")?,
                admitted_at: r.try_get("admitted_at")?,
            })
        })
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(q("listing the waitlist"))
    }

    /// Put a GitHub user on the waitlist (once); true when added now.
    pub async fn waitlist_github(
        &self,
        id: &str,
        email: &str,
        login: &str,
        github_id: &str,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO waitlist (id, email, github_login, github_id, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (email) DO UPDATE SET github_login = excluded.github_login, github_id = excluded.github_id",
        )
        .bind(id)
        .bind(email)
        .bind(login)
        .bind(github_id)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(q("joining the waitlist"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Admit waitlist entry `id`; false when there is none.
    pub async fn admit(&self, id: &str, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE waitlist SET admitted_at = $1 WHERE id = $2 AND admitted_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(q("admitting from the waitlist"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Was the GitHub user `github_id` admitted from the waitlist?
    pub async fn admitted(&self, github_id: &str) -> Result<bool> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM waitlist WHERE github_id = $1 AND github_id <> '' AND admitted_at IS NOT NULL",
        )
        .bind(github_id)
        .fetch_one(self.pool())
        .await
        .map_err(q("reading the waitlist"))?;
        Ok(r.try_get::<i64, _>("n")
            .map_err(q("reading the waitlist"))?
            > 0)
    }
}
