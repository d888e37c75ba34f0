//! `zw meta ...`: the meta repository from the command line.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use meta_schema::repo::{DEFAULT_BRANCH, LogFilter, MetaRepo};
use meta_schema::text::{self, Kind};
use meta_schema::validate::validate_tree;
use meta_schema::{MetaTree, desired};

#[derive(Subcommand)]
pub enum MetaCommand {
    /// Create a bare meta repository (with README and .gitattributes).
    Init { dir: PathBuf },
    /// Check every file of a meta repository (at a branch) or of a plain
    /// directory. Exits 1 and names each invalid file, field and rule.
    Validate {
        /// A git repository (bare or not) or a plain directory of meta files.
        path: PathBuf,
        /// Branch or commit to check, for a git repository.
        #[arg(long, default_value = DEFAULT_BRANCH)]
        rev: String,
    },
    /// Print a binary meta file (.pb) as readable text; `-` reads stdin.
    /// Also the textconv driver for `git log -p`.
    Decode {
        file: PathBuf,
        /// env, release, deployment, channel or node (default: from the
        /// path, else recognised from the bytes).
        #[arg(long)]
        kind: Option<Kind>,
    },
    /// History of a meta repository, optionally of one app.
    Log {
        repo: PathBuf,
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        env: Option<String>,
        #[arg(long, default_value = DEFAULT_BRANCH)]
        branch: String,
        #[arg(long)]
        json: bool,
    },
    /// Undo a commit with a new commit (as `git revert`, without a worktree).
    Revert {
        repo: PathBuf,
        commit: String,
        #[arg(long, default_value = DEFAULT_BRANCH)]
        branch: String,
    },
}

fn is_git_repo(p: &Path) -> bool {
    p.join(".git").exists() || (p.join("HEAD").is_file() && p.join("objects").is_dir())
}

pub fn run(cmd: MetaCommand) -> Result<ExitCode> {
    match cmd {
        MetaCommand::Init { dir } => {
            if is_git_repo(&dir) {
                anyhow::bail!("{} is already a git repository", dir.display());
            }
            let repo =
                MetaRepo::init_bare(&dir).with_context(|| format!("creating {}", dir.display()))?;
            println!("Initialised meta repository {}", repo.path().display());
            println!("Clone it and run once: git config diff.zwmeta.textconv \"zw meta decode\"");
            Ok(ExitCode::SUCCESS)
        }
        MetaCommand::Validate { path, rev } => {
            let tree = if is_git_repo(&path) {
                let repo = MetaRepo::open(&path)?;
                repo.tree_at(&rev)
                    .with_context(|| format!("reading {rev} of {}", path.display()))?
            } else if path.is_dir() {
                MetaTree::from_dir(&path)?
            } else {
                anyhow::bail!(
                    "{} is neither a git repository nor a directory",
                    path.display()
                );
            };
            match validate_tree(&tree) {
                Ok(()) => {
                    // Validation passed, so desired_state cannot fail on it;
                    // summarise what the tree asks for.
                    let state = desired::desired_state(&tree, meta_schema::now_millis())?;
                    let apps = state.apps().count();
                    let releases: usize = state.apps().map(|a| a.release_ids.len()).sum();
                    println!(
                        "ok: {} files, {} envs, {apps} apps, {releases} releases",
                        tree.len(),
                        state.envs.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        MetaCommand::Decode { file, kind } => {
            let (bytes, kind) = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::stdin().read_to_end(&mut b)?;
                (b, kind)
            } else {
                let b =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                (
                    b,
                    kind.or_else(|| text::kind_of_path(&file.to_string_lossy())),
                )
            };
            let out = text::decode(kind, &bytes)
                .with_context(|| format!("decoding {}", file.display()))?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        MetaCommand::Log {
            repo,
            app,
            env,
            branch,
            json,
        } => {
            let r = MetaRepo::open(&repo)?;
            let entries = r.log(&branch, &LogFilter { env, app })?;
            if json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "commit": e.commit, "parents": e.parents, "time": e.time,
                            "author": e.author, "message": e.message, "paths": e.paths,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in entries {
                    let subject = e.message.lines().next().unwrap_or("");
                    println!("{} {} {}", &e.commit[..12], e.author, subject);
                    for p in e.paths {
                        println!("    {p}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        MetaCommand::Revert {
            repo,
            commit,
            branch,
        } => {
            let r = MetaRepo::open(&repo)?;
            let id = r.revert(&branch, &commit)?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
