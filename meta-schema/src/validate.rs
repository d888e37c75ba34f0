//! Validation of a whole meta tree. Every error names the file, the field
//! and the rule it breaks; [`load`] is shared with
//! [`crate::desired::desired_state`] so both see exactly the same rules.

use std::collections::BTreeMap;
use std::fmt;

use prost::Message;

use crate::MetaTree;
use crate::layout::{self, MetaPath, is_dns_label, is_domain, is_ulid};
use crate::pb;

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub path: String,
    pub field: String,
    pub rule: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.path, self.rule)
        } else {
            write!(f, "{}: field `{}`: {}", self.path, self.field, self.rule)
        }
    }
}

/// All broken rules of a tree (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} invalid meta file{}:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// The decoded, validated files of a tree.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub envs: BTreeMap<String, pb::Env>,
    /// (env, app) -> release id -> release, ids ascending (oldest first).
    pub releases: BTreeMap<(String, String), BTreeMap<String, pb::Release>>,
    /// (env, app) -> deployment id -> deployment.
    pub deployments: BTreeMap<(String, String), BTreeMap<String, pb::Deployment>>,
    /// (env, app) of apps that have a secrets file.
    pub secrets: BTreeMap<(String, String), ()>,
    pub channels: BTreeMap<String, pb::Channel>,
    pub nodes: BTreeMap<String, pb::Node>,
}

/// Validate every meta file of a tree.
pub fn validate_tree(tree: &MetaTree) -> Result<(), ValidationErrors> {
    load(tree).map(|_| ())
}

struct Errs(Vec<ValidationError>);

impl Errs {
    fn push(&mut self, path: &str, field: &str, rule: impl Into<String>) {
        self.0.push(ValidationError {
            path: path.to_string(),
            field: field.to_string(),
            rule: rule.into(),
        });
    }
}

fn decode<M: Message + Default>(path: &str, bytes: &[u8], errs: &mut Errs) -> Option<M> {
    match M::decode(bytes) {
        Ok(m) => Some(m),
        Err(e) => {
            errs.push(path, "", format!("not a valid protobuf message: {e}"));
            None
        }
    }
}

fn is_digest(s: &str) -> bool {
    s.parse::<zw_util::Sha256Digest>().is_ok()
}

fn is_env_var_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Decode and check every file; the shared first half of validation and
/// `desired_state`.
pub fn load(tree: &MetaTree) -> Result<Loaded, ValidationErrors> {
    let mut errs = Errs(Vec::new());
    let mut out = Loaded::default();

    for (path, bytes) in tree.iter() {
        if !layout::is_meta_area(path) {
            continue;
        }
        let Some(mp) = MetaPath::parse(path) else {
            errs.push(
                path,
                "",
                "file is not part of the meta layout (expected envs/<env>/env.pb, \
                 envs/<env>/apps/<app>/{releases,deployments}/<id>.pb, \
                 envs/<env>/apps/<app>/secrets.sops.yaml, channels/<name>.pb or nodes/<node>.pb)",
            );
            continue;
        };
        match mp {
            MetaPath::Env { env } => {
                if !is_dns_label(&env) {
                    errs.push(
                        path,
                        "",
                        format!("env directory name {env:?} is not a DNS label"),
                    );
                }
                if let Some(m) = decode::<pb::Env>(path, bytes, &mut errs) {
                    check_env(path, &env, &m, &mut errs);
                    out.envs.insert(env, m);
                }
            }
            MetaPath::Release { env, app, id } => {
                check_app_dir(path, &env, &app, &mut errs);
                if !is_ulid(&id) {
                    errs.push(
                        path,
                        "",
                        format!("file name {id:?} is not a ULID (ids must sort by time)"),
                    );
                }
                if let Some(m) = decode::<pb::Release>(path, bytes, &mut errs) {
                    check_release(path, &env, &app, Some(&id), &m, &mut errs);
                    out.releases.entry((env, app)).or_default().insert(id, m);
                }
            }
            MetaPath::Deployment { env, app, id } => {
                check_app_dir(path, &env, &app, &mut errs);
                if !is_ulid(&id) {
                    errs.push(
                        path,
                        "",
                        format!("file name {id:?} is not a ULID (ids must sort by time)"),
                    );
                }
                if let Some(m) = decode::<pb::Deployment>(path, bytes, &mut errs) {
                    check_deployment(path, &env, &app, &id, &m, &mut errs);
                    out.deployments.entry((env, app)).or_default().insert(id, m);
                }
            }
            MetaPath::Secrets { env, app } => {
                check_app_dir(path, &env, &app, &mut errs);
                match std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|s| serde_yaml::from_str::<serde_yaml::Value>(s).ok())
                {
                    Some(serde_yaml::Value::Mapping(m)) if m.contains_key("sops") => {
                        out.secrets.insert((env, app), ());
                    }
                    _ => errs.push(
                        path,
                        "sops",
                        "not a sops-encrypted YAML file (no `sops` metadata map)",
                    ),
                }
            }
            MetaPath::Channel { name } => {
                if let Some(m) = decode::<pb::Channel>(path, bytes, &mut errs) {
                    if m.name != name {
                        errs.push(
                            path,
                            "name",
                            format!("must equal the file name {name:?}, is {:?}", m.name),
                        );
                    }
                    out.channels.insert(name, m);
                }
            }
            MetaPath::Node { id } => {
                if let Some(m) = decode::<pb::Node>(path, bytes, &mut errs) {
                    if m.id != id {
                        errs.push(
                            path,
                            "id",
                            format!("must equal the file name {id:?}, is {:?}", m.id),
                        );
                    }
                    out.nodes.insert(id, m);
                }
            }
        }
    }

    // Cross-file rules.
    let app_keys: Vec<(String, String)> = out
        .releases
        .keys()
        .chain(out.deployments.keys())
        .chain(out.secrets.keys())
        .cloned()
        .collect();
    for (env, app) in &app_keys {
        if !out.envs.contains_key(env) {
            errs.push(
                &layout::app_dir(env, app),
                "",
                format!("env {env:?} has no {}", layout::env_path(env)),
            );
        }
    }
    // A domain belongs to one app: check the active (newest) release of
    // every app, plus the platform names <app>.<env domain>.
    let mut owners: BTreeMap<String, (String, String)> = BTreeMap::new();
    for ((env, app), releases) in &out.releases {
        let Some((id, rel)) = releases.last_key_value() else {
            continue;
        };
        for d in &rel.domains {
            let d = d.to_ascii_lowercase();
            if let Some((oe, oa)) = owners.get(&d) {
                if (oe, oa) != (env, app) {
                    errs.push(
                        &layout::release_path(env, app, id),
                        "domains",
                        format!("domain {d:?} is already used by app {oa:?} in env {oe:?}; a domain belongs to one app"),
                    );
                }
            } else {
                owners.insert(d, (env.clone(), app.clone()));
            }
        }
    }

    if errs.0.is_empty() {
        Ok(out)
    } else {
        errs.0.sort_by(|a, b| a.path.cmp(&b.path));
        errs.0.dedup();
        Err(ValidationErrors(errs.0))
    }
}

fn check_app_dir(path: &str, env: &str, app: &str, errs: &mut Errs) {
    if !is_dns_label(env) {
        errs.push(
            path,
            "",
            format!("env directory name {env:?} is not a DNS label"),
        );
    }
    if !is_dns_label(app) {
        errs.push(
            path,
            "",
            format!("app directory name {app:?} is not a DNS label (1-63 of a-z, 0-9, '-')"),
        );
    }
}

fn check_env(path: &str, env: &str, m: &pb::Env, errs: &mut Errs) {
    if m.name != env {
        errs.push(
            path,
            "name",
            format!("must equal the directory name {env:?}, is {:?}", m.name),
        );
    }
    for d in &m.domains {
        if !is_domain(d) {
            errs.push(path, "domains", format!("{d:?} is not a domain name"));
        }
    }
    for r in &m.age_recipients {
        if !r.recipient.starts_with("age1") {
            errs.push(
                path,
                "age_recipients",
                format!(
                    "recipient of {:?} is not an age X25519 recipient (age1...)",
                    r.name
                ),
            );
        }
    }
}

/// Release rules; `id` is the file's id (None when checking an embedded
/// release whose id was checked elsewhere).
pub(crate) fn check_release_fields(m: &pb::Release) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let mut e = |f: &str, r: String| v.push((f.to_string(), r));
    if m.image_digest.is_empty() && m.source.as_ref().is_none_or(|s| s.commit.is_empty()) {
        e(
            "image_digest",
            "a release needs an image digest (or a source commit to build)".into(),
        );
    }
    if !m.image_digest.is_empty() && !is_digest(&m.image_digest) {
        e(
            "image_digest",
            format!("{:?} is not sha256:<64 lowercase hex>", m.image_digest),
        );
    }
    if m.port > 65535 {
        e(
            "port",
            format!("{} is not a port: must be 1-65535, or 0 for $PORT", m.port),
        );
    }
    for k in m.env_vars.keys() {
        if !is_env_var_name(k) {
            e(
                "env_vars",
                format!("{k:?} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"),
            );
        }
    }
    for k in &m.secret_refs {
        if !is_env_var_name(k) {
            e(
                "secret_refs",
                format!("{k:?} is not an environment variable name"),
            );
        }
    }
    if let Some(hc) = &m.health_check
        && let Some(pb::health_check::Kind::HttpPath(p)) = &hc.kind
        && !p.starts_with('/')
    {
        e(
            "health_check.http_path",
            format!("{p:?} must start with '/'"),
        );
    }
    if m.min_instances > 1000 {
        e(
            "min_instances",
            format!("{} is more than 1000", m.min_instances),
        );
    }
    for d in &m.domains {
        if !is_domain(d) {
            e("domains", format!("{d:?} is not a domain name"));
        }
    }
    if m.created_at <= 0 {
        e("created_at", "must be set (unix milliseconds)".into());
    }
    if !m.rollback_of.is_empty() && !is_ulid(&m.rollback_of) {
        e(
            "rollback_of",
            format!("{:?} is not a release id", m.rollback_of),
        );
    }
    v
}

fn check_release(
    path: &str,
    env: &str,
    app: &str,
    id: Option<&str>,
    m: &pb::Release,
    errs: &mut Errs,
) {
    check_identity(path, errs, (id, &m.id), (app, &m.app), (env, &m.env));
    for (f, r) in check_release_fields(m) {
        errs.push(path, &f, r);
    }
}

/// The id, app and env a file states must match its path: (from the path,
/// from the message) pairs; an id of `None` is not checked.
fn check_identity(
    path: &str,
    errs: &mut Errs,
    id: (Option<&str>, &str),
    app: (&str, &str),
    env: (&str, &str),
) {
    if let (Some(want), got) = id
        && got != want
    {
        errs.push(
            path,
            "id",
            format!("must equal the file name {want:?}, is {got:?}"),
        );
    }
    if app.1 != app.0 {
        let (want, got) = app;
        errs.push(
            path,
            "app",
            format!("must equal the directory name {want:?}, is {got:?}"),
        );
    }
    if env.1 != env.0 {
        let (want, got) = env;
        errs.push(
            path,
            "env",
            format!("must equal the env directory {want:?}, is {got:?}"),
        );
    }
}

fn check_deployment(
    path: &str,
    env: &str,
    app: &str,
    id: &str,
    m: &pb::Deployment,
    errs: &mut Errs,
) {
    check_identity(path, errs, (Some(id), &m.id), (app, &m.app), (env, &m.env));
    if !is_ulid(&m.rollout_id) {
        errs.push(
            path,
            "rollout_id",
            format!("{:?} is not a deployment id", m.rollout_id),
        );
    } else if m.rollout_id.as_str() > id {
        errs.push(
            path,
            "rollout_id",
            "must not be newer than the deployment itself",
        );
    }
    let state = pb::DeploymentState::try_from(m.state).unwrap_or(pb::DeploymentState::Unspecified);
    if state == pb::DeploymentState::Unspecified {
        errs.push(path, "state", "must be ROLLING_OUT, PROMOTED or FAILED");
    }
    if state == pb::DeploymentState::RollingOut && m.rollout_id != m.id {
        errs.push(
            path,
            "rollout_id",
            "a ROLLING_OUT deployment starts its rollout: rollout_id must equal id",
        );
    }
    match &m.release {
        None => errs.push(
            path,
            "release",
            "a deployment embeds the release it deploys",
        ),
        Some(r) => {
            if r.app != app || r.env != env {
                errs.push(
                    path,
                    "release",
                    format!(
                        "embedded release is of {}/{}, not {env}/{app}",
                        r.env, r.app
                    ),
                );
            }
            if !is_ulid(&r.id) {
                errs.push(
                    path,
                    "release.id",
                    format!("{:?} is not a release id", r.id),
                );
            }
            for (f, rule) in check_release_fields(r) {
                errs.push(path, &format!("release.{f}"), rule);
            }
        }
    }
    if state != pb::DeploymentState::Failed && m.instances.is_empty() {
        errs.push(
            path,
            "instances",
            "a deployment places at least one instance",
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &m.instances {
        if !is_ulid(&p.instance_id) {
            errs.push(
                path,
                "instances.instance_id",
                format!("{:?} is not an instance id (ULID)", p.instance_id),
            );
        }
        if !seen.insert(&p.instance_id) {
            errs.push(
                path,
                "instances.instance_id",
                format!("{:?} appears twice", p.instance_id),
            );
        }
        if p.node.is_empty() {
            errs.push(
                path,
                "instances.node",
                format!("instance {} has no node", p.instance_id),
            );
        }
    }
    if m.created_at <= 0 {
        errs.push(path, "created_at", "must be set (unix milliseconds)");
    }
}
