//! Validation of a whole meta tree. Every error names the file, the field
//! and the rule it breaks; [`load`] is shared with
//! [`crate::desired::desired_state`] so both see exactly the same rules.

use std::collections::BTreeMap;
use std::fmt;

use prost::Message;

use crate::MetaTree;
use crate::layout::{
    self, MetaPath, is_custom_domain, is_dns_label, is_domain, is_project_id, is_ulid,
};
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
    pub projects: BTreeMap<String, pb::Project>,
    pub envs: BTreeMap<String, pb::Env>,
    /// (env, app) -> the app's `app.pb`.
    pub apps: BTreeMap<(String, String), pb::App>,
    /// (env, app) -> release id -> release, ids ascending (oldest first).
    pub releases: BTreeMap<(String, String), BTreeMap<String, pb::Release>>,
    /// (env, app) -> deployment id -> deployment.
    pub deployments: BTreeMap<(String, String), BTreeMap<String, pb::Deployment>>,
    /// (env, app) of apps that have a secrets file.
    pub secrets: BTreeMap<(String, String), ()>,
    pub channels: BTreeMap<String, pb::Channel>,
    pub nodes: BTreeMap<String, pb::Node>,
    pub fence: Option<pb::LeaderFence>,
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
                "file is not part of the meta layout (expected projects/<id>.pb, envs/<env>/env.pb, \
                 envs/<env>/apps/<app>/app.pb, envs/<env>/apps/<app>/{releases,deployments}/<id>.pb, \
                 envs/<env>/apps/<app>/secrets.sops.yaml, channels/<name>.pb or nodes/<node>.pb)",
            );
            continue;
        };
        match mp {
            MetaPath::Project { id } => {
                if !is_project_id(&id) {
                    errs.push(
                        path,
                        "",
                        format!("file name {id:?} is not a project id (prj- and 1-60 of a-z, 0-9)"),
                    );
                }
                if let Some(m) = decode::<pb::Project>(path, bytes, &mut errs) {
                    check_project(path, &id, &m, &mut errs);
                    out.projects.insert(id, m);
                }
            }
            MetaPath::App { env, app } => {
                check_app_dir(path, &env, &app, &mut errs);
                if let Some(m) = decode::<pb::App>(path, bytes, &mut errs) {
                    check_app(path, &env, &app, &m, &mut errs);
                    out.apps.insert((env, app), m);
                }
            }
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
            MetaPath::Fence => {
                if let Some(m) = decode::<pb::LeaderFence>(path, bytes, &mut errs) {
                    out.fence = Some(m);
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
        .chain(out.apps.keys())
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
    for ((env, app), m) in &out.apps {
        if !m.project.is_empty() && !out.projects.contains_key(&m.project) {
            errs.push(
                &layout::app_path(env, app),
                "project",
                format!(
                    "project {:?} does not exist ({} is missing)",
                    m.project,
                    layout::project_path(&m.project)
                ),
            );
        }
    }
    check_domains(&out, &app_keys, &mut errs);

    if errs.0.is_empty() {
        Ok(out)
    } else {
        errs.0.sort_by(|a, b| a.path.cmp(&b.path));
        errs.0.dedup();
        Err(ValidationErrors(errs.0))
    }
}

/// Every domain is owned by one app: the platform names `<app>.<env
/// domain>` of every app, the custom domains of its `app.pb`, of its
/// newest release and of its newest deployment file (what routes now).
fn check_domains(out: &Loaded, app_keys: &[(String, String)], errs: &mut Errs) {
    let mut owners: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut keys: Vec<&(String, String)> = app_keys.iter().collect();
    keys.sort();
    keys.dedup();
    for (env, app) in &keys {
        let Some(e) = out.envs.get(env) else {
            continue;
        };
        for d in &e.domains {
            let name = format!("{app}.{}", d.to_ascii_lowercase());
            owners
                .entry(name)
                .or_insert_with(|| (env.clone(), app.clone()));
        }
    }
    // Claims are judged oldest first, so a domain stays with the app that
    // had it and the newcomer's file is the one reported.
    let mut claims: Vec<(i64, String, &str, &str, &str, &str)> = Vec::new();
    for ((env, app), m) in &out.apps {
        for d in &m.domains {
            claims.push((
                m.created_at,
                layout::app_path(env, app),
                "domains",
                d,
                env,
                app,
            ));
        }
    }
    for ((env, app), releases) in &out.releases {
        if let Some((id, rel)) = releases.last_key_value() {
            for d in &rel.domains {
                claims.push((
                    rel.created_at,
                    layout::release_path(env, app, id),
                    "domains",
                    d,
                    env,
                    app,
                ));
            }
        }
    }
    for ((env, app), deployments) in &out.deployments {
        if let Some((id, dep)) = deployments.last_key_value() {
            for d in dep.release.iter().flat_map(|r| r.domains.iter()) {
                claims.push((
                    dep.created_at,
                    layout::deployment_path(env, app, id),
                    "release.domains",
                    d,
                    env,
                    app,
                ));
            }
        }
    }
    claims.sort();
    for (_, path, field, d, env, app) in claims {
        if !is_custom_domain(d) {
            errs.push(
                &path,
                field,
                format!("{d:?} is not a custom domain: a lower-case DNS name of at least two labels, no wildcard"),
            );
            continue;
        }
        match owners.get(d) {
            Some((oe, oa)) if (oe.as_str(), oa.as_str()) != (env, app) => errs.push(
                &path,
                field,
                format!("domain {d:?} is already used by app {oa:?} in env {oe:?}; a domain belongs to one app"),
            ),
            Some(_) => {}
            None => {
                owners.insert(d.to_string(), (env.to_string(), app.to_string()));
            }
        }
    }
}

fn check_project(path: &str, id: &str, m: &pb::Project, errs: &mut Errs) {
    if m.id != id {
        errs.push(
            path,
            "id",
            format!("must equal the file name {id:?}, is {:?}", m.id),
        );
    }
    if !is_dns_label(&m.name) {
        errs.push(
            path,
            "name",
            format!("{:?} is not a DNS label (1-63 of a-z, 0-9, '-')", m.name),
        );
    }
    let src = m.source.clone().unwrap_or_default();
    if src.repo.is_empty()
        || src.repo.len() > 2048
        || src
            .repo
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        errs.push(path, "source.repo", "must be a git URL or path");
    }
    if src.branch.is_empty() || src.branch.len() > 255 || src.branch.starts_with('-') {
        errs.push(path, "source.branch", "must be a branch name");
    }
    if let Some(b) = &m.build {
        if b.dockerfile.starts_with('/') || b.dockerfile.split('/').any(|c| c == "..") {
            errs.push(
                path,
                "build.dockerfile",
                format!("{:?} must be a path inside the source", b.dockerfile),
            );
        }
        for k in b.build_args.keys() {
            if k.is_empty() || k.contains('=') {
                errs.push(
                    path,
                    "build.build_args",
                    format!("argument name {k:?} is empty or contains '='"),
                );
            }
        }
    }
}

fn check_app(path: &str, env: &str, app: &str, m: &pb::App, errs: &mut Errs) {
    if m.name != app {
        errs.push(
            path,
            "name",
            format!("must equal the directory name {app:?}, is {:?}", m.name),
        );
    }
    if m.env != env {
        errs.push(
            path,
            "env",
            format!("must equal the directory name {env:?}, is {:?}", m.env),
        );
    }
    if !is_project_id(&m.project) {
        errs.push(
            path,
            "project",
            format!("{:?} is not a project id", m.project),
        );
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
        if !is_custom_domain(d) {
            e(
                "domains",
                format!(
                    "{d:?} is not a custom domain: a lower-case DNS name of at least two labels, no wildcard"
                ),
            );
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
