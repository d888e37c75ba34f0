//! Finding the API and its token: `--api`/`--token` (or `--token-file`),
//! else `ZW_API`/`ZW_TOKEN`, else `zw login`'s saved credentials, else a local `zw up`
//! data dir (`api.url` and `admin.token`). Each is looked up on its own, and
//! its origin is kept for error messages.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::api::{Api, Origin};

/// `--api` and `--token`, accepted by every user command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnArgs {
    /// API base URL (else $ZW_API, `zw login`, or the local `zw up`).
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// API token. A command line is readable by every user of the host:
    /// prefer --token-file or $ZW_TOKEN (else `zw login`, or the local
    /// `zw up`).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// File holding the API token.
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
}

/// How the user commands take their token.
pub const TOKEN_FLAGS: zw_util::SecretFlags = zw_util::SecretFlags {
    what: "API token",
    flag: "--token",
    file_flag: "--token-file",
    env: "ZW_TOKEN",
};

impl ConnArgs {
    /// The token of `--token`, `--token-file` or `$ZW_TOKEN`, warning on
    /// stderr when it came on the command line.
    pub fn given_token(&self) -> anyhow::Result<Option<(String, Origin)>> {
        let found = TOKEN_FLAGS.resolve(self.token.as_deref(), self.token_file.as_deref())?;
        Ok(found.map(|(t, origin)| {
            let origin = match origin {
                zw_util::SecretOrigin::CommandLine(_) => {
                    eprintln!("{}", TOKEN_FLAGS.command_line_warning());
                    Origin::Flag
                }
                zw_util::SecretOrigin::File(p) => Origin::File(p),
                zw_util::SecretOrigin::Env(v) => Origin::Env(v),
            };
            (t, origin)
        }))
    }
}

/// What `zw login` saves.
#[derive(Debug, Serialize, Deserialize)]
pub struct Credentials {
    pub api: String,
    pub token: String,
}

/// `$XDG_CONFIG_HOME/zeitwork/credentials.json`, else
/// `~/.config/zeitwork/credentials.json`.
pub fn credentials_path() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("zeitwork/credentials.json"));
    }
    let home = std::env::var_os("HOME").context("neither $XDG_CONFIG_HOME nor $HOME is set")?;
    Ok(PathBuf::from(home).join(".config/zeitwork/credentials.json"))
}

fn read_credentials() -> anyhow::Result<Option<(Credentials, PathBuf)>> {
    let Ok(path) = credentials_path() else {
        return Ok(None);
    };
    match std::fs::read(&path) {
        Ok(b) => {
            let c: Credentials = serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{} is not valid credentials JSON; run `zw login` again",
                    path.display()
                )
            })?;
            Ok(Some((c, path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Save credentials with mode 0600 (directory 0700), replacing atomically.
pub fn save_credentials(c: &Credentials) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let path = credentials_path()?;
    let dir = path.parent().context("credentials path has no parent")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".credentials.json.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(c)?)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Resolve the API and token for a user command.
pub fn connect(args: &ConnArgs) -> anyhow::Result<Api> {
    let mut token = args.given_token()?;
    let saved = if args.api.is_some() && token.is_some() {
        None
    } else {
        read_credentials()?
    };
    let data = crate::up::default_data_dir();
    let mut api: Option<(String, Origin)> = args.api.clone().map(|a| (a, Origin::Flag));
    if api.is_none() {
        api = env_nonempty("ZW_API").map(|a| (a, Origin::Env("ZW_API")));
    }
    // A saved token goes only to the API it was saved with, so that
    // `--api https://elsewhere` never sends it to another server.
    let same = |a: &Option<(String, Origin)>, b: &str| {
        a.as_ref()
            .is_none_or(|(a, _)| a.trim_end_matches('/') == b.trim_end_matches('/'))
    };
    if let Some((c, path)) = &saved
        && same(&api, &c.api)
    {
        if api.is_none() {
            api = Some((c.api.clone(), Origin::Login(path.clone())));
        }
        if token.is_none() {
            token = Some((c.token.clone(), Origin::Login(path.clone())));
        }
    }
    if let Some(local) = read_trimmed(&data.join("api.url"))
        && same(&api, &local)
    {
        if api.is_none() {
            api = Some((local, Origin::DataDir(data.clone())));
        }
        if token.is_none() {
            token =
                read_trimmed(&data.join("admin.token")).map(|t| (t, Origin::DataDir(data.clone())));
        }
    }
    let (api, api_origin) = api.with_context(|| {
        format!(
            "no API to talk to: give --api URL, set $ZW_API, run `zw login --api URL --token T`, \
             or run `zw up` (looked for {})",
            data.join("api.url").display()
        )
    })?;
    let (token, token_origin) = token.with_context(|| {
        format!(
            "no API token for {api}: give --token-file PATH, set $ZW_TOKEN, or run `zw login --api {api} --token T` \
             (saved and local `zw up` tokens are only sent to their own API)"
        )
    })?;
    Api::new(&api, api_origin, token, token_origin)
}
