//! The meta repository as the CLI sees it: a clone of the captain's
//! `/meta.git` (git smart HTTP, the API token as a Bearer header passed
//! through git's environment, never its arguments). A new release made from
//! an existing one (rollback, env, scale, redeploy) is a new immutable file
//! committed and pushed here; the captain's pre-receive hook validates it
//! and its mirror indexes it before the push returns.

use anyhow::{Context as _, bail};
use meta_schema::pb;
use meta_schema::repo::{ChangeSet, DEFAULT_BRANCH, Identity, MetaRepo, Remote, RepoError};
use prost::Message as _;

use super::api::{Api, enc};
use super::{AppView, DeploymentView};

pub struct MetaClone {
    _dir: tempfile::TempDir,
    repo: MetaRepo,
    remote: Remote,
    /// The captain's head when cloned.
    head: String,
}

impl MetaClone {
    /// Clone the captain's meta repository into a temporary directory.
    pub fn open(client: &Api) -> anyhow::Result<MetaClone> {
        let dir = tempfile::Builder::new().prefix("zw-meta-").tempdir()?;
        let remote = Remote::with_bearer(format!("{}/meta.git", client.base), client.token());
        let repo = MetaRepo::init_empty_bare(&dir.path().join("repo"))?;
        let head = repo
            .fetch_remote(&remote, DEFAULT_BRANCH)
            .with_context(|| {
                format!(
                    "cloning the meta repository {} (from {})",
                    remote.url, client.base_origin
                )
            })?
            .with_context(|| format!("the meta repository {} has no commit", remote.url))?;
        repo.force_branch(DEFAULT_BRANCH, &head)?;
        Ok(MetaClone {
            _dir: dir,
            repo,
            remote,
            head,
        })
    }

    /// A file's bytes at a commit (`HEAD`: the head cloned); `None` when it
    /// is not there.
    pub fn read_at(&self, commit: &str, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let commit = if commit == "HEAD" { &self.head } else { commit };
        match self.repo.blob_at(commit, path) {
            Ok(b) => Ok(b),
            Err(RepoError::NoCommit { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The release a deployment is made of, read from the commit that added
    /// it (so a reverted release can still be copied), else from HEAD.
    pub fn release(&self, d: &DeploymentView) -> anyhow::Result<pb::Release> {
        let mut bytes = None;
        if !d.commit.is_empty() {
            bytes = self.read_at(&d.commit, &d.path)?;
        }
        if bytes.is_none() {
            bytes = self.read_at("HEAD", &d.path)?;
        }
        let Some(b) = bytes else {
            bail!(
                "release {} ({}) is not in the meta repository",
                d.id,
                d.path
            );
        };
        pb::Release::decode(b.as_slice()).with_context(|| format!("decoding {}", d.path))
    }

    /// The domains of an env, from its `env.pb` at HEAD.
    pub fn env_domains(&self, env: &str) -> anyhow::Result<Vec<String>> {
        match self.read_at("HEAD", &meta_schema::layout::env_path(env))? {
            Some(b) => Ok(pb::Env::decode(b.as_slice())?.domains),
            None => Ok(Vec::new()),
        }
    }

    /// The names and git blob id of an app's secrets file at HEAD (empty
    /// without one), as the captain puts them into every new release: the
    /// follower reads the values from the file at HEAD, so a release must
    /// name the secrets that file has now, not those of the release it copies.
    pub fn current_secrets(&self, env: &str, app: &str) -> anyhow::Result<(Vec<String>, String)> {
        let path = meta_schema::layout::secrets_path(env, app);
        let Some(bytes) = self.read_at("HEAD", &path)? else {
            return Ok((Vec::new(), String::new()));
        };
        let text = std::str::from_utf8(&bytes).with_context(|| format!("{path} is not UTF-8"))?;
        let file =
            meta_schema::sops::SopsFile::parse(text).with_context(|| format!("parsing {path}"))?;
        let names = file.names().into_iter().map(str::to_string).collect();
        Ok((names, meta_schema::repo::blob_id(&bytes)))
    }

    /// Commit `release` (with the app's current secrets) as a new file and
    /// push it; returns its id. The captain commits too (rollouts write
    /// deployment files): when the push loses that race, the one new file
    /// is committed again on the new head.
    pub fn push_release(&self, release: &pb::Release, message: &str) -> anyhow::Result<String> {
        let mut release = release.clone();
        let (refs, blob) = self.current_secrets(&release.env, &release.app)?;
        release.secret_refs = refs;
        release.secrets_blob = blob;
        let path = meta_schema::layout::release_path(&release.env, &release.app, &release.id);
        let changes = ChangeSet::new().add(path, release.encode_to_vec());
        let who = Identity {
            name: "zw".into(),
            email: "zw@localhost".into(),
        };
        match self
            .repo
            .commit_and_push(&self.remote, DEFAULT_BRANCH, &changes, message, &who)
        {
            Ok(_) => Ok(release.id),
            Err(RepoError::Refused { detail }) => {
                bail!("the captain refused the new release: {detail}")
            }
            Err(RepoError::Invalid(errors)) => {
                bail!("the new release would make the meta repository invalid: {errors}")
            }
            Err(e) => Err(e).context("pushing the new release to the meta repository"),
        }
    }
}

/// A copy of `base` as a new release (new id, now).
pub fn copy_release(base: &pb::Release) -> pb::Release {
    pb::Release {
        id: meta_schema::new_id(),
        created_at: meta_schema::now_millis(),
        rollback_of: String::new(),
        ..base.clone()
    }
}

/// Where an app is reached: the captain's app URL template (`GET
/// /v1/health`, e.g. `http://{app}.{domain}:8080` under `zw up`) with the
/// app's first env domain.
pub fn app_url(client: &Api, app: &AppView) -> anyhow::Result<Option<String>> {
    let m = MetaClone::open(client)?;
    url_of(client, &m, app)
}

pub fn url_of(client: &Api, m: &MetaClone, app: &AppView) -> anyhow::Result<Option<String>> {
    let health: serde_json::Value = client.get("/v1/health")?;
    let template = health["app_url"]
        .as_str()
        .filter(|t| t.contains("{app}"))
        .unwrap_or("https://{app}.{domain}")
        .to_string();
    Ok(m.env_domains(&app.env)?
        .first()
        .map(|d| template.replace("{app}", &app.name).replace("{domain}", d)))
}

/// The active deployment of an app, if any.
pub fn active(client: &Api, app: &AppView) -> anyhow::Result<Option<DeploymentView>> {
    match &app.active_release {
        Some(id) => Ok(Some(client.get(&format!("/v1/deployments/{}", enc(id)))?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;

    fn git(cwd: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .current_dir(cwd)
            .args(["-c", "user.name=T", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A push that loses the race with another commit (as the captain's
    /// rollout writes) is replayed on the new head: both files arrive.
    #[test]
    fn push_release_replays_on_a_concurrent_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let bare = tmp.path().join("meta.git");
        git(
            tmp.path(),
            &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
        );
        let other = tmp.path().join("other");
        git(
            tmp.path(),
            &[
                "clone",
                "-q",
                bare.to_str().unwrap(),
                other.to_str().unwrap(),
            ],
        );
        std::fs::write(other.join("README"), "meta\n").unwrap();
        let env = other.join(meta_schema::layout::env_path("production"));
        std::fs::create_dir_all(env.parent().unwrap()).unwrap();
        std::fs::write(
            &env,
            pb::Env {
                name: "production".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .unwrap();
        git(&other, &["add", "README", "envs"]);
        git(&other, &["commit", "-q", "-m", "init"]);
        git(&other, &["push", "-q", "origin", "HEAD:main"]);

        let dir = tempfile::tempdir().unwrap();
        let remote = Remote::with_bearer(bare.display().to_string(), "unused-by-file-urls");
        let repo = MetaRepo::init_empty_bare(&dir.path().join("repo")).unwrap();
        let head = repo.fetch_remote(&remote, "main").unwrap().unwrap();
        repo.force_branch("main", &head).unwrap();
        let m = MetaClone {
            _dir: dir,
            repo,
            remote,
            head,
        };

        // Someone else commits after our clone.
        std::fs::write(other.join("deployment"), "by the captain\n").unwrap();
        git(&other, &["add", "deployment"]);
        git(&other, &["commit", "-q", "-m", "deployment"]);
        git(&other, &["push", "-q", "origin", "HEAD:main"]);

        let r = pb::Release {
            id: meta_schema::new_id(),
            app: "hello".into(),
            env: "production".into(),
            image_digest: format!("sha256:{}", "a".repeat(64)),
            created_at: meta_schema::now_millis(),
            ..Default::default()
        };
        let id = m.push_release(&r, "Release").unwrap();
        git(&other, &["pull", "-q", "origin", "main"]);
        assert!(other.join("deployment").is_file());
        let path = other.join(meta_schema::layout::release_path(
            "production",
            "hello",
            &id,
        ));
        let back = pb::Release::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
        assert_eq!(back, r);
    }
}
