//! Where each kind of file lives in the meta repository.
//!
//! ```text
//! projects/<id>.pb
//! envs/<env>/env.pb
//! envs/<env>/apps/<app>/app.pb
//! envs/<env>/apps/<app>/releases/<id>.pb
//! envs/<env>/apps/<app>/deployments/<id>.pb
//! envs/<env>/apps/<app>/secrets.sops.yaml
//! channels/<name>.pb
//! nodes/<node>.pb
//! cluster/leader.pb
//! ```
//!
//! Releases and deployments are immutable: once committed, a file at such a
//! path is never changed or replaced. Projects, `env.pb`, `app.pb`, nodes,
//! channels and the secrets file are documents that a later commit may
//! replace whole; their history is the git history.

/// A path of the meta repository, parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum MetaPath {
    Project {
        id: String,
    },
    Env {
        env: String,
    },
    App {
        env: String,
        app: String,
    },
    Release {
        env: String,
        app: String,
        id: String,
    },
    Deployment {
        env: String,
        app: String,
        id: String,
    },
    Secrets {
        env: String,
        app: String,
    },
    Channel {
        name: String,
    },
    Node {
        id: String,
    },
    /// `cluster/leader.pb`: the leader's fence.
    Fence,
}

impl MetaPath {
    /// Parse a repository path. `None` for paths that are not meta files
    /// (README.md, .gitattributes, anything outside the layout).
    pub fn parse(path: &str) -> Option<MetaPath> {
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["projects", file] => file
                .strip_suffix(".pb")
                .map(|id| MetaPath::Project { id: id.to_string() }),
            ["envs", env, "env.pb"] => Some(MetaPath::Env {
                env: env.to_string(),
            }),
            ["envs", env, "apps", app, "app.pb"] => Some(MetaPath::App {
                env: env.to_string(),
                app: app.to_string(),
            }),
            ["envs", env, "apps", app, "releases", file] => {
                file.strip_suffix(".pb").map(|id| MetaPath::Release {
                    env: env.to_string(),
                    app: app.to_string(),
                    id: id.to_string(),
                })
            }
            ["envs", env, "apps", app, "deployments", file] => {
                file.strip_suffix(".pb").map(|id| MetaPath::Deployment {
                    env: env.to_string(),
                    app: app.to_string(),
                    id: id.to_string(),
                })
            }
            ["envs", env, "apps", app, "secrets.sops.yaml"] => Some(MetaPath::Secrets {
                env: env.to_string(),
                app: app.to_string(),
            }),
            ["channels", file] => file.strip_suffix(".pb").map(|name| MetaPath::Channel {
                name: name.to_string(),
            }),
            ["nodes", file] => file
                .strip_suffix(".pb")
                .map(|id| MetaPath::Node { id: id.to_string() }),
            ["cluster", "leader.pb"] => Some(MetaPath::Fence),
            _ => None,
        }
    }

    /// Files that may never change once committed.
    pub fn is_immutable(&self) -> bool {
        matches!(self, MetaPath::Release { .. } | MetaPath::Deployment { .. })
    }

    pub fn to_path(&self) -> String {
        match self {
            MetaPath::Project { id } => project_path(id),
            MetaPath::Env { env } => env_path(env),
            MetaPath::App { env, app } => app_path(env, app),
            MetaPath::Release { env, app, id } => release_path(env, app, id),
            MetaPath::Deployment { env, app, id } => deployment_path(env, app, id),
            MetaPath::Secrets { env, app } => secrets_path(env, app),
            MetaPath::Channel { name } => channel_path(name),
            MetaPath::Node { id } => node_path(id),
            MetaPath::Fence => FENCE_PATH.to_string(),
        }
    }
}

/// Does this path belong to the meta layout at all (anything under
/// `projects/`, `envs/`, `channels/` or `nodes/`)? Such files must parse as
/// a [`MetaPath`]; others (README.md, .gitattributes) are ignored here.
pub fn is_meta_area(path: &str) -> bool {
    ["projects/", "envs/", "channels/", "nodes/", "cluster/"]
        .iter()
        .any(|p| path.starts_with(p))
}

/// The leader's fence.
pub const FENCE_PATH: &str = "cluster/leader.pb";

/// Files outside the meta areas a meta repository may hold.
pub const OTHER_FILES: [&str; 2] = ["README.md", ".gitattributes"];

pub fn project_path(id: &str) -> String {
    format!("projects/{id}.pb")
}
pub fn app_path(env: &str, app: &str) -> String {
    format!("envs/{env}/apps/{app}/app.pb")
}

/// A project id: `prj-` and 1-60 of `a-z0-9`.
pub fn is_project_id(s: &str) -> bool {
    s.strip_prefix("prj-").is_some_and(|r| {
        !r.is_empty()
            && r.len() <= 60
            && r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// A custom domain of an app: a DNS name of at least two labels, lower
/// case, no wildcard (a wildcard would take every name under it).
pub fn is_custom_domain(s: &str) -> bool {
    !s.starts_with("*.") && is_domain(s) && s.contains('.')
}

pub fn env_path(env: &str) -> String {
    format!("envs/{env}/env.pb")
}
pub fn app_dir(env: &str, app: &str) -> String {
    format!("envs/{env}/apps/{app}")
}
pub fn release_path(env: &str, app: &str, id: &str) -> String {
    format!("envs/{env}/apps/{app}/releases/{id}.pb")
}
pub fn deployment_path(env: &str, app: &str, id: &str) -> String {
    format!("envs/{env}/apps/{app}/deployments/{id}.pb")
}
pub fn secrets_path(env: &str, app: &str) -> String {
    format!("envs/{env}/apps/{app}/secrets.sops.yaml")
}
pub fn channel_path(name: &str) -> String {
    format!("channels/{name}.pb")
}
pub fn node_path(id: &str) -> String {
    format!("nodes/{id}.pb")
}

/// RFC 1123 DNS label: 1-63 of `a-z0-9-`, not starting or ending with `-`.
/// Lower case only, so a name is also a valid host name part as written.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A domain name: dot-separated DNS labels, at most 253 characters; a
/// leading `*.` wildcard is allowed.
pub fn is_domain(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A ULID in canonical form (26 Crockford base32 characters, upper case).
pub fn is_ulid(s: &str) -> bool {
    s.len() == 26 && s.parse::<ulid::Ulid>().is_ok() && s.bytes().all(|b| !b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for p in [
            "projects/prj-01jaaaaaaaaaaaaaaaaaaaaaaa.pb",
            "envs/prod/env.pb",
            "envs/prod/apps/web/app.pb",
            "envs/prod/apps/web/releases/01JAAAAAAAAAAAAAAAAAAAAAAA.pb",
            "envs/prod/apps/web/deployments/01JAAAAAAAAAAAAAAAAAAAAAAA.pb",
            "envs/prod/apps/web/secrets.sops.yaml",
            "channels/stable.pb",
            "nodes/n1.pb",
            "cluster/leader.pb",
        ] {
            assert_eq!(MetaPath::parse(p).unwrap().to_path(), p);
        }
        assert_eq!(MetaPath::parse("README.md"), None);
        assert_eq!(MetaPath::parse("envs/prod/apps/web/releases/x.txt"), None);
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("web-1"));
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_domain("*.example.com"));
        assert!(!is_domain("exa mple.com"));
        assert!(is_custom_domain("shop.example.com"));
        for bad in ["*.example.com", "localhost", "Shop.example.com", "a..b", ""] {
            assert!(!is_custom_domain(bad), "{bad}");
        }
        assert!(is_project_id("prj-01jaaaaaaaaaaaaaaaaaaaaaaa"));
        for bad in ["prj-", "prj-A", "web", "prj-a/b"] {
            assert!(!is_project_id(bad), "{bad}");
        }
    }
}
