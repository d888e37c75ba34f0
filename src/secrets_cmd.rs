//! `zw secrets set|unset|list|rotate`: an app's secrets, through the
//! captain's `PUT`/`GET /v1/apps/{id}/secrets`.
//!
//! The captain holds no age identity: it cannot read the current values, so
//! it cannot merge a change into them. Every write therefore sends the
//! **complete** set, which the captain encrypts with a fresh data key to the
//! env's nodes and releases in one commit. This command builds that set
//! from the command line (`NAME=VALUE`, or `NAME` to take the value from
//! the environment variable of that name, which keeps it out of the process
//! list and the shell history) and `--from-env-file` files, and checks it
//! against the names the captain lists before sending: a current secret
//! that is not given again is an error (the captain refuses it too), never
//! silently dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use api_types::secrets::SecretsView;
use reqwest::Method;
use serde_json::json;

use crate::client::api::{Api, enc};
use crate::client::creds::{self, ConnArgs};
use crate::client::{AppArg, app_name, resolve_app};

const COMPLETE_SET: &str = "The captain cannot decrypt secrets (only the nodes can), so every write \
sends the complete set: give every secret the app should keep, as NAME=VALUE, as NAME (value taken \
from the environment variable $NAME) or in --from-env-file files (KEY=VALUE lines). Values given \
on the command line win over files.";

#[derive(Debug, clap::Subcommand)]
pub enum SecretsCommand {
    /// Set an app's secrets: the complete set (a new release uses them).
    #[command(after_help = COMPLETE_SET)]
    Set(SetArgs),
    /// Remove secrets: give every other secret again (a new release).
    #[command(after_help = COMPLETE_SET)]
    Unset(UnsetArgs),
    /// List an app's secret names and the nodes they are encrypted to (never values).
    List(ListArgs),
    /// Re-encrypt the same secrets with a fresh data key to the env's current
    /// nodes (after a node joined or left): give every value again.
    #[command(after_help = COMPLETE_SET)]
    Rotate(RotateArgs),
}

/// Where values come from.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Values {
    /// KEY=VALUE lines (`#` comments, optional `export `, optional quotes);
    /// may be repeated.
    #[arg(long, value_name = "FILE")]
    pub from_env_file: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// NAME=VALUE, or NAME to read the value from $NAME.
    #[arg(value_name = "NAME[=VALUE]")]
    pub pairs: Vec<String>,
    #[command(flatten)]
    pub values: Values,
    #[command(flatten)]
    pub app: AppArg,
    /// Print the captain's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct UnsetArgs {
    /// Names to remove.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
    /// A secret to keep: NAME=VALUE, or NAME to read the value from $NAME;
    /// may be repeated.
    #[arg(long = "keep", value_name = "NAME[=VALUE]")]
    pub keep: Vec<String>,
    #[command(flatten)]
    pub values: Values,
    #[command(flatten)]
    pub app: AppArg,
    /// Print the captain's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub app: AppArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// NAME=VALUE, or NAME to read the value from $NAME.
    #[arg(value_name = "NAME[=VALUE]")]
    pub pairs: Vec<String>,
    #[command(flatten)]
    pub values: Values,
    #[command(flatten)]
    pub app: AppArg,
    /// Print the captain's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Secret values; `Debug` never shows them.
#[derive(Default)]
struct Set(BTreeMap<String, String>);

impl std::fmt::Debug for Set {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

pub fn run(cmd: SecretsCommand) -> anyhow::Result<()> {
    match cmd {
        SecretsCommand::Set(a) => set(a),
        SecretsCommand::Unset(a) => unset(a),
        SecretsCommand::List(a) => list(a),
        SecretsCommand::Rotate(a) => rotate(a),
    }
}

fn is_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

fn check_name(name: &str, origin: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_name(name),
        "{name:?} ({origin}) is not a secret name: an environment variable name [A-Za-z_][A-Za-z0-9_]*"
    );
    Ok(())
}

/// Parses one dotenv file. Errors name the file and line, never a value.
fn parse_env_file(path: &Path, text: &str, into: &mut Set) -> anyhow::Result<()> {
    for (i, raw) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let (name, value) = line
            .split_once('=')
            .with_context(|| format!("{at}: expected KEY=VALUE"))?;
        let name = name.trim();
        check_name(name, &at)?;
        let value = unquote(value.trim())
            .with_context(|| format!("{at}: the value of {name} has an unterminated quote"))?;
        into.0.insert(name.to_string(), value);
    }
    Ok(())
}

/// `"..."` (with `\n`, `\"`, `\\` escapes), `'...'` (literal), or bare
/// (up to a ` #` comment).
fn unquote(v: &str) -> Option<String> {
    if let Some(rest) = v.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(out),
                '\\' => match chars.next()? {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    other => out.push(other),
                },
                c => out.push(c),
            }
        }
        return None;
    }
    if let Some(rest) = v.strip_prefix('\'') {
        return rest.find('\'').map(|end| rest[..end].to_string());
    }
    let v = match v.find(" #") {
        Some(i) => &v[..i],
        None => v,
    };
    Some(v.trim_end().to_string())
}

/// The set given: files first, then the command line.
fn gather(pairs: &[String], values: &Values) -> anyhow::Result<Set> {
    let mut set = Set::default();
    for f in &values.from_env_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        parse_env_file(f, &text, &mut set)?;
    }
    for p in pairs {
        match p.split_once('=') {
            Some((name, value)) => {
                check_name(name, "command line")?;
                set.0.insert(name.to_string(), value.to_string());
            }
            None => {
                check_name(p, "command line")?;
                let value = std::env::var(p).with_context(|| {
                    format!(
                        "{p} was given without a value and the environment variable ${p} is not set"
                    )
                })?;
                set.0.insert(p.clone(), value);
            }
        }
    }
    Ok(set)
}

fn path_of(app_id: &str) -> String {
    format!("/v1/apps/{}/secrets", enc(app_id))
}

fn current(client: &Api, app_id: &str) -> anyhow::Result<SecretsView> {
    client.get(&path_of(app_id))
}

fn missing_error(app: &str, missing: &[&String], verb: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the captain cannot read the current values, so `zw secrets {verb}` needs every secret of {app} it should keep; \
         also give: {} (NAME=VALUE, NAME from $NAME, or --from-env-file FILE)",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn write(
    client: &Api,
    app_id: &str,
    set: Set,
    unset: &[String],
    json_out: bool,
) -> anyhow::Result<()> {
    let body = json!({"secrets": set.0, "unset": unset});
    drop(set);
    let resp = client.send(Method::PUT, &path_of(app_id), Some(&body))?;
    drop(body);
    let v: SecretsView = resp.json().context("reading the answer of PUT secrets")?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let names = if v.names.is_empty() {
        "none".to_string()
    } else {
        v.names.join(", ")
    };
    println!("secrets of {}.{}: {names}", v.app, v.env);
    println!("encrypted to: {}", v.recipients.join(", "));
    match (&v.release, &v.commit) {
        (Some(r), Some(c)) => println!("release {r} (commit {c}) is rolling out with them"),
        (None, Some(c)) => {
            println!("committed {c}; the app has no release yet: its next deployment uses them")
        }
        _ => {}
    }
    Ok(())
}

fn set(a: SetArgs) -> anyhow::Result<()> {
    let given = gather(&a.pairs, &a.values)?;
    anyhow::ensure!(
        !given.0.is_empty(),
        "no secrets given: NAME=VALUE, NAME (from $NAME) or --from-env-file FILE"
    );
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let cur = current(&client, &app.id)?;
    let missing: Vec<&String> = cur
        .names
        .iter()
        .filter(|n| !given.0.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        return Err(missing_error(&app.id, &missing, "set"));
    }
    write(&client, &app.id, given, &[], a.json)
}

fn unset(a: UnsetArgs) -> anyhow::Result<()> {
    for n in &a.names {
        check_name(n, "command line")?;
    }
    let mut keep = gather(&a.keep, &a.values)?;
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let cur = current(&client, &app.id)?;
    let unknown: Vec<&String> = a.names.iter().filter(|n| !cur.names.contains(n)).collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "not secrets of {}: {} (it has: {})",
        app.id,
        unknown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if cur.names.is_empty() {
            "none".to_string()
        } else {
            cur.names.join(", ")
        }
    );
    // The same env file can serve set and unset: removed names are dropped.
    for n in &a.names {
        keep.0.remove(n);
    }
    let removed: BTreeSet<&String> = a.names.iter().collect();
    let missing: Vec<&String> = cur
        .names
        .iter()
        .filter(|n| !removed.contains(n) && !keep.0.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        return Err(missing_error(&app.id, &missing, "unset"));
    }
    write(&client, &app.id, keep, &a.names, a.json)
}

fn rotate(a: RotateArgs) -> anyhow::Result<()> {
    let given = gather(&a.pairs, &a.values)?;
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let cur = current(&client, &app.id)?;
    anyhow::ensure!(!cur.names.is_empty(), "{} has no secrets to rotate", app.id);
    let missing: Vec<&String> = cur
        .names
        .iter()
        .filter(|n| !given.0.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        return Err(missing_error(&app.id, &missing, "rotate"));
    }
    let extra: Vec<&String> = given.0.keys().filter(|n| !cur.names.contains(n)).collect();
    anyhow::ensure!(
        extra.is_empty(),
        "rotate keeps the names of {}; {} are new: add them with `zw secrets set`",
        app.id,
        extra
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    write(&client, &app.id, given, &[], a.json)
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let client = creds::connect(&a.conn)?;
    let app = resolve_app(&client, &app_name(&a.app)?)?;
    let v = current(&client, &app.id)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if v.names.is_empty() {
        println!(
            "{} has no secrets (set some with `zw secrets set NAME=VALUE`)",
            app.id
        );
        return Ok(());
    }
    for n in &v.names {
        println!("{n}");
    }
    eprintln!("encrypted to: {}", v.recipients.join(", "));
    if v.stale {
        eprintln!(
            "warning: the env's nodes are now {}; run `zw secrets rotate` with every value so that exactly they can read them",
            if v.env_recipients.is_empty() {
                "none".to_string()
            } else {
                v.env_recipients.join(", ")
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files() {
        let mut s = Set::default();
        parse_env_file(
            Path::new("f.env"),
            "# c\n\nexport A=1\nB = \"two\\nlines\"\nC='lit $x'\nD=bare # comment\nE=\n",
            &mut s,
        )
        .unwrap();
        let want: BTreeMap<String, String> = [
            ("A", "1"),
            ("B", "two\nlines"),
            ("C", "lit $x"),
            ("D", "bare"),
            ("E", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(s.0, want);
        let e = parse_env_file(Path::new("f.env"), "X=\"hidden-value", &mut s).unwrap_err();
        assert!(e.to_string().contains("f.env:1"), "{e:#}");
        assert!(!format!("{e:#}").contains("hidden-value"));
        let e = parse_env_file(Path::new("f.env"), "1X=v", &mut s).unwrap_err();
        assert!(e.to_string().contains("not a secret name"), "{e:#}");
        assert_eq!(format!("{s:?}"), r#"["A", "B", "C", "D", "E"]"#);
    }
}
