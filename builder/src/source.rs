//! Build sources: a local directory, a git repository (any URL gix can
//! fetch, shallow), or a GitHub repository tarball (octocrab, with a token).

use std::fs;
use std::io::{self, Write};
use std::num::NonZeroU32;
use std::path::{Component, Path, PathBuf};

use http_body_util::BodyExt;

use crate::error::{BuildError, InputError, Stage};
use crate::log::LogSink;
use crate::oci::resolve_in_root;
use zw_util::error_chain;

/// Which revision of a git repository to build.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GitRev {
    /// The remote's `HEAD`.
    #[default]
    DefaultBranch,
    Branch(String),
    /// A full commit id (40 hex digits).
    Commit(String),
}

impl std::fmt::Display for GitRev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitRev::DefaultBranch => f.write_str("HEAD"),
            GitRev::Branch(b) => write!(f, "branch {b}"),
            GitRev::Commit(c) => write!(f, "commit {c}"),
        }
    }
}

/// A GitHub repository at a reference, fetched as a tarball.
#[derive(Clone, PartialEq, Eq)]
pub struct GitHubSource {
    pub owner: String,
    pub repo: String,
    /// Branch, tag or commit sha.
    pub reference: String,
    /// A token with read access (installation or personal); `None` for public repositories.
    pub token: Option<String>,
    /// API base URI; `None` for `https://api.github.com`.
    pub api_base: Option<String>,
}

impl std::fmt::Debug for GitHubSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubSource")
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .field("reference", &self.reference)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("api_base", &self.api_base)
            .finish()
    }
}

/// Where the code to build comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    Git { url: String, rev: GitRev },
    GitHub(GitHubSource),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Local(p) => write!(f, "{}", p.display()),
            Source::Git { url, rev } => write!(f, "{url} ({rev})"),
            Source::GitHub(g) => write!(f, "github:{}/{}@{}", g.owner, g.repo, g.reference),
        }
    }
}

/// Whether `s` looks like a git URL rather than a local path.
pub fn looks_like_git_url(s: &str) -> bool {
    [
        "http://",
        "https://",
        "git://",
        "ssh://",
        "file://",
        "git+ssh://",
    ]
    .iter()
    .any(|p| s.starts_with(p))
        || (s.contains('@') && s.contains(':') && !s.starts_with('/') && !s.starts_with('.'))
}

/// Count the bytes of regular files under `dir` (symlinks not followed),
/// failing as soon as `limit` is exceeded.
pub fn check_context_size(dir: &Path, limit: u64) -> Result<u64, BuildError> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d)
            .map_err(|e| BuildError::infra(Stage::Source, format!("reading {}", d.display()), e))?;
        for entry in rd {
            let entry = entry.map_err(|e| {
                BuildError::infra(Stage::Source, format!("reading {}", d.display()), e)
            })?;
            let ft = entry
                .file_type()
                .map_err(|e| BuildError::infra(Stage::Source, "stat", e))?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
                if total > limit {
                    return Err(InputError::ContextTooLarge {
                        limit,
                        counted: total,
                    }
                    .into());
                }
            }
        }
    }
    Ok(total)
}

/// Materialise `source` as a directory. Local sources are used in place;
/// others are written to `work/context`. Returns the context directory.
pub async fn materialize(
    source: &Source,
    work: &Path,
    limit: u64,
    log: &dyn LogSink,
) -> Result<PathBuf, BuildError> {
    match source {
        Source::Local(dir) => {
            if !dir.is_dir() {
                return Err(InputError::SourceNotFound(dir.clone()).into());
            }
            let dir = dir
                .canonicalize()
                .map_err(|_| InputError::SourceNotFound(dir.clone()))?;
            let d2 = dir.clone();
            let size = tokio::task::spawn_blocking(move || check_context_size(&d2, limit))
                .await
                .map_err(|e| BuildError::infra(Stage::Source, "context size check", e))??;
            log.builder(format!("context {}: {size} bytes", dir.display()));
            Ok(dir)
        }
        Source::Git { url, rev } => {
            let (url, rev, work) = (url.clone(), rev.clone(), work.to_path_buf());
            log.builder(format!(
                "fetching {} ({rev})",
                meta_schema::repo::redact_url(&url)
            ));
            let (ctx, commit, size) =
                tokio::task::spawn_blocking(move || fetch_git(&url, &rev, &work, limit))
                    .await
                    .map_err(|e| BuildError::infra(Stage::Source, "git fetch task", e))??;
            log.builder(format!("checked out commit {commit}: {size} bytes"));
            Ok(ctx)
        }
        Source::GitHub(gh) => fetch_github(gh, work, limit, log).await,
    }
}

fn fetch_git(
    url: &str,
    rev: &GitRev,
    work: &Path,
    limit: u64,
) -> Result<(PathBuf, String, u64), BuildError> {
    // Credentials in the URL (a token for a private repository) never
    // reach an error, a log or the build's view, whatever git says.
    let shown = meta_schema::repo::redact_url(url);
    let scrub = |message: String| meta_schema::repo::redact_url_in(&message, url);
    let unreachable = |message: String| {
        BuildError::from(InputError::GitUnreachable {
            url: shown.clone(),
            message: scrub(message),
        })
    };
    let repo_dir = work.join("repo.git");
    let ctx = work.join("context");
    let _ = fs::remove_dir_all(&repo_dir);
    let _ = fs::remove_dir_all(&ctx);
    let parsed = gix::url::parse(gix::bstr::BStr::new(url.as_bytes())).map_err(|e| {
        InputError::InvalidGitUrl {
            url: shown.clone(),
            message: scrub(e.to_string()),
        }
    })?;
    if parsed.scheme == gix::url::Scheme::File && !Path::new(&parsed.path.to_string()).exists() {
        return Err(unreachable(format!(
            "local repository path {} does not exist",
            parsed.path
        )));
    }
    let mut prepare =
        gix::prepare_clone_bare(parsed, &repo_dir).map_err(|e| unreachable(error_chain(&e)))?;
    prepare = prepare.with_shallow(gix::remote::fetch::Shallow::DepthAtRemote(
        NonZeroU32::new(1).expect("1 > 0"),
    ));
    match rev {
        GitRev::DefaultBranch => {}
        GitRev::Branch(b) => {
            prepare = prepare.with_ref_name(Some(b.as_str())).map_err(|e| {
                InputError::GitRevisionNotFound {
                    url: url.to_string(),
                    rev: rev.to_string(),
                    message: error_chain(&e),
                }
            })?;
        }
        GitRev::Commit(c) => {
            if c.len() != 40 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(InputError::GitRevisionNotFound {
                    url: url.to_string(),
                    rev: rev.to_string(),
                    message: "a commit must be given as 40 hex digits".into(),
                }
                .into());
            }
            prepare = prepare.with_revision(Some(c.as_str())).map_err(|e| {
                InputError::GitRevisionNotFound {
                    url: url.to_string(),
                    rev: rev.to_string(),
                    message: error_chain(&e),
                }
            })?;
        }
    }
    let interrupt = std::sync::atomic::AtomicBool::new(false);
    let (repo, _outcome) = prepare
        .fetch_only(gix::progress::Discard, &interrupt)
        .map_err(|e| {
            let msg = error_chain(&e);
            let lower = msg.to_lowercase();
            let rev_problem = !matches!(rev, GitRev::DefaultBranch)
                && (lower.contains("not our ref")
                    || lower.contains("not found")
                    || lower.contains("couldn't find")
                    || lower.contains("could not find")
                    || lower.contains("did not match"));
            if rev_problem {
                BuildError::from(InputError::GitRevisionNotFound {
                    url: shown.clone(),
                    rev: rev.to_string(),
                    message: scrub(msg),
                })
            } else {
                unreachable(msg)
            }
        })?;
    let commit = repo
        .head_commit()
        .map_err(|e| InputError::GitRevisionNotFound {
            url: url.to_string(),
            rev: rev.to_string(),
            message: error_chain(&e),
        })?;
    let commit_id = commit.id.to_string();
    let tree = commit
        .tree()
        .map_err(|e| BuildError::infra(Stage::Source, "reading the commit's tree", e))?;
    let mut recorder = gix::traverse::tree::Recorder::default();
    tree.traverse()
        .breadthfirst(&mut recorder)
        .map_err(|e| BuildError::infra(Stage::Source, "walking the commit's tree", e))?;
    fs::create_dir_all(&ctx)
        .map_err(|e| BuildError::infra(Stage::Source, "creating the context directory", e))?;
    let mut total = 0u64;
    for entry in recorder.records {
        let rel = entry.filepath.to_string();
        let rel_path = safe_relative(&rel).ok_or_else(|| InputError::UnsafePath {
            what: format!("git tree of {}", meta_schema::repo::redact_url(url)),
            path: rel.clone(),
        })?;
        let dest = ctx.join(&rel_path);
        let werr = |e: io::Error| {
            BuildError::infra(Stage::Source, format!("writing {}", dest.display()), e)
        };
        let mode = entry.mode;
        if mode.is_tree() {
            fs::create_dir_all(&dest).map_err(werr)?;
        } else if mode.is_commit() {
            // A submodule: not fetched; leave an empty directory as git does.
            fs::create_dir_all(&dest).map_err(werr)?;
        } else {
            let blob = repo.find_blob(entry.oid).map_err(|e| {
                BuildError::infra(Stage::Source, format!("reading blob {}", entry.oid), e)
            })?;
            total += blob.data.len() as u64;
            if total > limit {
                return Err(InputError::ContextTooLarge {
                    limit,
                    counted: total,
                }
                .into());
            }
            if mode.is_link() {
                let target =
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&blob.data);
                std::os::unix::fs::symlink(target, &dest).map_err(werr)?;
            } else {
                let mut f = fs::File::create(&dest).map_err(werr)?;
                f.write_all(&blob.data).map_err(werr)?;
                let perm = if mode.is_executable() { 0o755 } else { 0o644 };
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&dest, fs::Permissions::from_mode(perm)).map_err(werr)?;
            }
        }
    }
    let _ = fs::remove_dir_all(&repo_dir);
    check_symlinks_inside(
        &ctx,
        &format!("git tree of {}", meta_schema::repo::redact_url(url)),
    )?;
    Ok((ctx, commit_id, total))
}

/// `p` as a relative path without `..`, `.` or root components.
fn safe_relative(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Every symlink under `root` must resolve inside it. Each one is followed
/// as the kernel would (through the symlinks on its way, `..` of a symlinked
/// directory included), but with `root` as the top: an absolute target, a
/// `..` above `root` or a loop refuses the tree, naming the link. A target
/// that does not exist is judged on the names it would take.
pub fn check_symlinks_inside(root: &Path, what: &str) -> Result<(), BuildError> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = fs::read_dir(&dir).map_err(|e| {
            BuildError::infra(Stage::Source, format!("reading {}", dir.display()), e)
        })?;
        for e in entries {
            let e = e.map_err(|e| {
                BuildError::infra(Stage::Source, format!("reading {}", dir.display()), e)
            })?;
            let ft = e.file_type().map_err(|e| {
                BuildError::infra(Stage::Source, format!("reading {}", dir.display()), e)
            })?;
            let path = rel.join(e.file_name());
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_symlink() {
                let target = fs::read_link(root.join(&path)).unwrap_or_default();
                if resolves_inside(root, &rel, &target).is_none() {
                    return Err(InputError::UnsafeLink {
                        what: what.to_string(),
                        entry: path.display().to_string(),
                        target: target.display().to_string(),
                    }
                    .into());
                }
            }
        }
    }
    Ok(())
}

/// One step of a symlink's text.
enum Step {
    Up,
    Name(std::ffi::OsString),
}

/// The steps of a symlink's text, or `None` when it is absolute or empty.
fn steps(target: &Path) -> Option<Vec<Step>> {
    if target.as_os_str().is_empty() {
        return None;
    }
    target
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Some(Step::Name(n.to_os_string()))),
            Component::ParentDir => Some(Some(Step::Up)),
            Component::CurDir => None,
            Component::RootDir | Component::Prefix(_) => Some(None),
        })
        .collect()
}

/// Where `target`, a symlink's text in directory `dir` (relative to `root`),
/// leads below `root`, or `None` when it leaves it.
fn resolves_inside(root: &Path, dir: &Path, target: &Path) -> Option<PathBuf> {
    const MAX_HOPS: usize = 40;
    let mut resolved: Vec<std::ffi::OsString> = dir.iter().map(|c| c.to_os_string()).collect();
    let mut pending: std::collections::VecDeque<Step> = steps(target)?.into();
    let mut hops = 0;
    while let Some(step) = pending.pop_front() {
        let name = match step {
            Step::Up => {
                resolved.pop()?;
                continue;
            }
            Step::Name(n) => n,
        };
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&name);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return None;
                }
                let next = steps(&fs::read_link(&candidate).ok()?)?;
                for st in next.into_iter().rev() {
                    pending.push_front(st);
                }
            }
            _ => resolved.push(name),
        }
    }
    Some(resolved.iter().collect())
}

/// The octocrab client for `gh` (sync: its builder is not `Send`).
fn github_client(gh: &GitHubSource) -> Result<octocrab::Octocrab, BuildError> {
    // octocrab's TLS stack needs a process-wide rustls crypto provider; if
    // another part of the process installed one first, that one is used.
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let mut builder = octocrab::Octocrab::builder();
    if let Some(base) = &gh.api_base {
        builder = builder.base_uri(base.as_str()).map_err(|e| {
            BuildError::from(InputError::GitHub {
                owner: gh.owner.clone(),
                repo: gh.repo.clone(),
                reference: gh.reference.clone(),
                message: format!("invalid API base URI {base}: {e}"),
            })
        })?;
    }
    if let Some(token) = &gh.token {
        builder = builder.personal_token(token.clone());
    }
    builder
        .build()
        .map_err(|e| BuildError::infra(Stage::Source, "creating the GitHub client", e))
}

async fn fetch_github(
    gh: &GitHubSource,
    work: &Path,
    limit: u64,
    log: &dyn LogSink,
) -> Result<PathBuf, BuildError> {
    let input = |message: String| {
        BuildError::from(InputError::GitHub {
            owner: gh.owner.clone(),
            repo: gh.repo.clone(),
            reference: gh.reference.clone(),
            message,
        })
    };
    let crab = github_client(gh)?;
    log.builder(format!(
        "downloading tarball of {}/{} at {}",
        gh.owner, gh.repo, gh.reference
    ));
    let response = crab
        .repos(&gh.owner, &gh.repo)
        .download_tarball(gh.reference.clone())
        .await
        .map_err(|e| {
            BuildError::infra(
                Stage::Source,
                "GitHub tarball request failed (GitHub unreachable?)",
                e,
            )
        })?;
    let status = response.status();
    if !status.is_success() {
        let code = status.as_u16();
        return Err(match code {
            404 => input("repository or reference not found (or the token cannot read it)".into()),
            401 | 403 => input(format!(
                "GitHub refused access (HTTP {code}): check the token"
            )),
            c if c >= 500 || c == 429 => BuildError::infra(
                Stage::Source,
                format!("GitHub answered HTTP {c}"),
                io::Error::other(status.to_string()),
            ),
            c => input(format!("unexpected HTTP {c} for the tarball")),
        });
    }
    tokio::fs::create_dir_all(work)
        .await
        .map_err(|e| BuildError::infra(Stage::Source, "creating the work directory", e))?;
    let archive = work.join("source.tar.gz");
    let mut file = tokio::fs::File::create(&archive)
        .await
        .map_err(|e| BuildError::infra(Stage::Source, "creating the tarball file", e))?;
    let mut body = response.into_body();
    let mut downloaded = 0u64;
    use tokio::io::AsyncWriteExt;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| BuildError::infra(Stage::Source, "reading the GitHub tarball", e))?;
        if let Ok(data) = frame.into_data() {
            downloaded += data.len() as u64;
            if downloaded > limit {
                return Err(InputError::ContextTooLarge {
                    limit,
                    counted: downloaded,
                }
                .into());
            }
            file.write_all(&data)
                .await
                .map_err(|e| BuildError::infra(Stage::Source, "writing the tarball", e))?;
        }
    }
    file.flush()
        .await
        .map_err(|e| BuildError::infra(Stage::Source, "writing the tarball", e))?;
    drop(file);
    log.builder(format!("downloaded {downloaded} bytes"));
    let ctx = work.join("context");
    let (a2, c2) = (archive.clone(), ctx.clone());
    let what = format!("GitHub tarball of {}/{}", gh.owner, gh.repo);
    tokio::task::spawn_blocking(move || extract_tarball(&a2, &c2, limit, &what))
        .await
        .map_err(|e| BuildError::infra(Stage::Source, "tarball extraction task", e))??;
    let _ = tokio::fs::remove_file(&archive).await;
    Ok(ctx)
}

/// Extract a gzip'd tarball whose entries sit under one top-level directory
/// (as GitHub's do) into `dest`, dropping that directory. Paths cannot leave
/// `dest`; the extracted size is limited to `limit` bytes.
pub fn extract_tarball(
    archive: &Path,
    dest: &Path,
    limit: u64,
    what: &str,
) -> Result<u64, BuildError> {
    let ioe = |e: io::Error| BuildError::infra(Stage::Source, format!("extracting {what}"), e);
    let bad = |e: io::Error| {
        BuildError::from(InputError::GitHub {
            owner: String::new(),
            repo: what.to_string(),
            reference: String::new(),
            message: format!("corrupt tarball: {e}"),
        })
    };
    let _ = fs::remove_dir_all(dest);
    fs::create_dir_all(dest).map_err(ioe)?;
    let file = fs::File::open(archive).map_err(ioe)?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    let mut total = 0u64;
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let path = entry.path().map_err(bad)?.into_owned();
        let shown = path.display().to_string();
        let mut comps = path.components();
        comps.next(); // the top-level "<owner>-<repo>-<sha>/" directory
        let rest: Vec<std::ffi::OsString> = comps
            .map(|c| match c {
                Component::Normal(n) => Ok(n.to_os_string()),
                _ => Err(InputError::UnsafePath {
                    what: what.to_string(),
                    path: shown.clone(),
                }),
            })
            .collect::<Result<_, _>>()?;
        let Some((name, parent)) = rest.split_last() else {
            continue;
        };
        if kind.is_file() {
            total += entry.header().size().unwrap_or(0);
            if total > limit {
                return Err(InputError::ContextTooLarge {
                    limit,
                    counted: total,
                }
                .into());
            }
        }
        let dir = resolve_in_root(dest, parent, true).map_err(ioe)?;
        if kind.is_hard_link() {
            // A hard link names another entry of the archive by its path
            // from the archive's root: that entry must be a regular file
            // already extracted inside the context, reached by plain names
            // (no `..`, no root), never through a symlink.
            let link = entry
                .link_name()
                .map_err(bad)?
                .map(|l| l.into_owned())
                .unwrap_or_default();
            let unsafe_link = || InputError::UnsafeLink {
                what: what.to_string(),
                entry: shown.clone(),
                target: link.display().to_string(),
            };
            let mut target = link.components();
            target.next(); // the same top-level directory
            let target: Vec<std::ffi::OsString> = target
                .map(|c| match c {
                    Component::Normal(n) => Some(n.to_os_string()),
                    _ => None,
                })
                .collect::<Option<_>>()
                .ok_or_else(unsafe_link)?;
            let Some((tname, tparent)) = target.split_last() else {
                return Err(unsafe_link().into());
            };
            let src = resolve_in_root(dest, tparent, false)
                .map_err(|_| unsafe_link())?
                .join(tname);
            match fs::symlink_metadata(&src) {
                Ok(m) if m.file_type().is_file() => {}
                _ => return Err(unsafe_link().into()),
            }
            let to = dir.join(name);
            let _ = fs::remove_file(&to);
            fs::hard_link(&src, &to).map_err(ioe)?;
            continue;
        }
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            continue;
        }
        entry.unpack(dir.join(name)).map_err(ioe)?;
    }
    check_symlinks_inside(dest, what)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_url_detection() {
        assert!(looks_like_git_url("https://github.com/a/b.git"));
        assert!(looks_like_git_url("file:///srv/repo"));
        assert!(looks_like_git_url("git@github.com:a/b.git"));
        assert!(!looks_like_git_url("./app"));
        assert!(!looks_like_git_url("/srv/app"));
    }

    #[test]
    fn safe_relative_rejects_escapes() {
        assert_eq!(safe_relative("a/b"), Some(PathBuf::from("a/b")));
        assert_eq!(safe_relative("../a"), None);
        assert_eq!(safe_relative("/etc/passwd"), None);
    }

    /// A gzip'd tarball of `entries` under `top/`: (path, kind, content or link target).
    fn tarball(dir: &Path, entries: &[(&str, tar::EntryType, &str)]) -> PathBuf {
        let path = dir.join("src.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            // Paths and link names are written as an attacker would, `..`
            // included (the checked setters would refuse them).
            let full = format!("top/{name}");
            h.as_old_mut().name[..full.len()].copy_from_slice(full.as_bytes());
            if kind.is_file() {
                h.set_size(data.len() as u64);
            } else {
                h.set_size(0);
                h.as_old_mut().linkname[..data.len()].copy_from_slice(data.as_bytes());
            }
            h.set_cksum();
            let body: &[u8] = if kind.is_file() { data.as_bytes() } else { &[] };
            b.append(&h, body).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        path
    }

    fn refused(r: Result<u64, BuildError>, entry: &str) {
        match r {
            Err(BuildError::Input(InputError::UnsafeLink { entry: e, .. })) => {
                assert!(e.contains(entry), "names the entry {entry}: {e}")
            }
            other => panic!("expected the archive refused at {entry}, got {other:?}"),
        }
    }

    /// The attack of a hostile upload: a hard link to a file of the host
    /// (the captain's admin token, say) that `COPY` would put in the image.
    #[test]
    fn hard_link_out_of_the_context_is_refused() {
        use tar::EntryType::{Link, Regular};
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("admin.token"), "zwa_secret").unwrap();
        let dest = tmp.path().join("a/b/ctx");
        let ar = tarball(
            tmp.path(),
            &[
                ("Dockerfile", Regular, "FROM scratch\nCOPY leak /leak\n"),
                ("leak", Link, "top/../../../admin.token"),
            ],
        );
        refused(extract_tarball(&ar, &dest, 1 << 20, "the upload"), "leak");
        assert!(!dest.join("leak").exists(), "nothing was linked");

        // Absolute, and through a symlink that leads out.
        let ar = tarball(tmp.path(), &[("leak", Link, "/etc/hostname")]);
        refused(extract_tarball(&ar, &dest, 1 << 20, "the upload"), "leak");
        let ar = tarball(
            tmp.path(),
            &[
                ("out", tar::EntryType::Symlink, "../../../admin.token"),
                ("leak", Link, "top/out"),
            ],
        );
        refused(extract_tarball(&ar, &dest, 1 << 20, "the upload"), "leak");
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("admin.token")).unwrap(),
            "zwa_secret"
        );
    }

    #[test]
    fn symlinks_that_leave_the_context_are_refused() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("ctx");
        for (entries, bad) in [
            (vec![("s", Symlink, "/etc/passwd")], "s"),
            (
                vec![("d", Directory, ""), ("d/s", Symlink, "../../x")],
                "d/s",
            ),
            // Each link alone stays inside; followed as the kernel does,
            // `r/..` is the parent of the context.
            (vec![("r", Symlink, "."), ("e", Symlink, "r/..")], "e"),
            (vec![("l1", Symlink, "l2"), ("l2", Symlink, "l1")], "l"),
        ] {
            refused(
                extract_tarball(&tarball(tmp.path(), &entries), &dest, 1 << 20, "the upload"),
                bad,
            );
        }
        // What real repositories hold is kept: links inside, hard links to
        // files before them, links to files not there.
        let ar = tarball(
            tmp.path(),
            &[
                ("d", Directory, ""),
                ("d/f", Regular, "hello"),
                ("readme", Symlink, "d/f"),
                ("d/up", Symlink, "../readme"),
                ("d/dangling", Symlink, "../nothing/here"),
                ("copy", tar::EntryType::Link, "top/d/f"),
            ],
        );
        extract_tarball(&ar, &dest, 1 << 20, "the upload").unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("d/up")).unwrap(), "hello");
        assert_eq!(std::fs::read_to_string(dest.join("copy")).unwrap(), "hello");
    }

    #[test]
    fn context_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![0u8; 1000]).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b"), vec![0u8; 1000]).unwrap();
        assert_eq!(check_context_size(dir.path(), 5000).unwrap(), 2000);
        let err = check_context_size(dir.path(), 1500).unwrap_err();
        assert!(
            matches!(
                err,
                BuildError::Input(InputError::ContextTooLarge { limit: 1500, .. })
            ),
            "{err}"
        );
    }
}
