//! The meta repository as the CLI sees it: a clone of the captain's
//! `/meta.git` (git smart HTTP, the API token as a Bearer header passed
//! through git's environment, never its arguments). A new release made from
//! an existing one (rollback, env, scale, redeploy) is a new immutable file
//! committed and pushed here; the captain's pre-receive hook validates it
//! and its mirror indexes it before the push returns.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context as _, bail};
use meta_schema::pb;
use prost::Message as _;

use super::api::{Api, enc};
use super::{AppView, DeploymentView};

pub struct MetaClone {
    dir: tempfile::TempDir,
    token: String,
    url: String,
}

impl MetaClone {
    /// Clone the captain's meta repository into a temporary directory.
    pub fn open(client: &Api) -> anyhow::Result<MetaClone> {
        let dir = tempfile::Builder::new().prefix("zw-meta-").tempdir()?;
        let m = MetaClone {
            dir,
            token: client.token().to_string(),
            url: format!("{}/meta.git", client.base),
        };
        let dest = m.dir.path().join("repo");
        let out = m.git_in(
            m.dir.path(),
            &["clone", "--quiet", "--no-tags", &m.url, "repo"],
        )?;
        if !out.status.success() {
            bail!(
                "cloning the meta repository {} (from {}): {}",
                m.url,
                client.base_origin,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        debug_assert!(dest.is_dir());
        Ok(m)
    }

    fn repo(&self) -> std::path::PathBuf {
        self.dir.path().join("repo")
    }

    fn git_in(&self, cwd: &Path, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("git")
            .current_dir(cwd)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Bearer {}", self.token),
            )
            .output()
            .context("running git (is it installed?)")
    }

    fn git(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.git_in(&self.repo(), args)
    }

    /// A file's bytes at a commit; `None` when it is not there.
    pub fn read_at(&self, commit: &str, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let spec = format!("{commit}:{path}");
        let out = self.git(&["cat-file", "blob", &spec])?;
        Ok(out.status.success().then_some(out.stdout))
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
        let out = self.git(&["rev-parse", &format!("HEAD:{path}")])?;
        if !out.status.success() {
            bail!(
                "git rev-parse HEAD:{path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((
            names,
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }

    /// Commit `release` (with the app's current secrets) as a new file and
    /// push it; returns its id.
    pub fn push_release(&self, release: &pb::Release, message: &str) -> anyhow::Result<String> {
        let mut release = release.clone();
        let (refs, blob) = self.current_secrets(&release.env, &release.app)?;
        release.secret_refs = refs;
        release.secrets_blob = blob;
        let release = &release;
        let path = meta_schema::layout::release_path(&release.env, &release.app, &release.id);
        let full = self.repo().join(&path);
        std::fs::create_dir_all(full.parent().context("release path has a parent")?)?;
        std::fs::write(&full, release.encode_to_vec())?;
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = self.git(args)?;
            if !out.status.success() {
                bail!(
                    "git {}: {}{}",
                    args.first().copied().unwrap_or(""),
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        run(&["add", "--", &path])?;
        let has_name = self
            .git(&["config", "--get", "user.name"])?
            .status
            .success();
        let has_email = self
            .git(&["config", "--get", "user.email"])?
            .status
            .success();
        let mut args: Vec<&str> = Vec::new();
        if !has_name {
            args.extend(["-c", "user.name=zw"]);
        }
        if !has_email {
            args.extend(["-c", "user.email=zw@localhost"]);
        }
        args.extend(["commit", "--quiet", "--no-verify", "-m", message]);
        run(&args)?;
        // The captain commits too (rollouts write deployment files): when
        // the push loses that race, replay our one new file on the new head.
        let branch =
            String::from_utf8_lossy(&self.git(&["rev-parse", "--abbrev-ref", "HEAD"])?.stdout)
                .trim()
                .to_string();
        let mut out = self.git(&["push", "--quiet", "origin", "HEAD"])?;
        for _ in 0..5 {
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success()
                || !(err.contains("non-fast-forward") || err.contains("fetch first"))
            {
                break;
            }
            run(&["fetch", "--quiet", "origin"])?;
            run(&[
                "-c",
                "user.name=zw",
                "-c",
                "user.email=zw@localhost",
                "rebase",
                "--quiet",
                &format!("origin/{branch}"),
            ])?;
            out = self.git(&["push", "--quiet", "origin", "HEAD"])?;
        }
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err
                .lines()
                .map(|l| l.trim_start_matches("remote:").trim())
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("To ")
                        && !l.starts_with("error: failed to push")
                })
                .collect();
            bail!("the captain refused the new release: {}", lines.join("; "));
        }
        Ok(release.id.clone())
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
        git(&other, &["add", "README"]);
        git(&other, &["commit", "-q", "-m", "init"]);
        git(&other, &["push", "-q", "origin", "HEAD:main"]);

        let m = MetaClone {
            dir: tempfile::tempdir().unwrap(),
            token: "unused-by-file-urls".into(),
            url: bare.display().to_string(),
        };
        let out = m
            .git_in(m.dir.path(), &["clone", "--quiet", &m.url, "repo"])
            .unwrap();
        assert!(out.status.success());

        // Someone else commits after our clone.
        std::fs::write(other.join("deployment"), "by the captain\n").unwrap();
        git(&other, &["add", "deployment"]);
        git(&other, &["commit", "-q", "-m", "deployment"]);
        git(&other, &["push", "-q", "origin", "HEAD:main"]);

        let r = pb::Release {
            id: meta_schema::new_id(),
            app: "hello".into(),
            env: "production".into(),
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
