//! Readable text of binary meta files, for `zw meta decode` and the git
//! textconv driver (which passes a temporary file whose name says nothing,
//! so the kind is recognised from the bytes when the path does not tell).

use prost::Message;

use crate::layout::{MetaPath, is_ulid};
use crate::pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Project,
    Env,
    App,
    Release,
    Deployment,
    Channel,
    Node,
    Fence,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "project" => Kind::Project,
            "env" => Kind::Env,
            "app" => Kind::App,
            "release" => Kind::Release,
            "deployment" => Kind::Deployment,
            "channel" => Kind::Channel,
            "node" => Kind::Node,
            "fence" => Kind::Fence,
            _ => {
                return Err(format!(
                    "unknown kind {s:?} (project, env, app, release, deployment, channel, node)"
                ));
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a valid {kind:?} message: {source}")]
    Invalid {
        kind: Kind,
        #[source]
        source: prost::DecodeError,
    },
    #[error(
        "not a zeitwork meta file (it decodes as none of project, env, app, release, deployment, channel, node)"
    )]
    Unrecognised,
}

/// Kind of a meta file from its repository path.
pub fn kind_of_path(path: &str) -> Option<Kind> {
    // Accept absolute or nested paths: look at the tail.
    let tail: Vec<&str> = path
        .rsplit('/')
        .take(6)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    for start in 0..tail.len() {
        if let Some(mp) = MetaPath::parse(&tail[start..].join("/")) {
            return Some(match mp {
                MetaPath::Project { .. } => Kind::Project,
                MetaPath::Env { .. } => Kind::Env,
                MetaPath::App { .. } => Kind::App,
                MetaPath::Release { .. } => Kind::Release,
                MetaPath::Deployment { .. } => Kind::Deployment,
                MetaPath::Channel { .. } => Kind::Channel,
                MetaPath::Node { .. } => Kind::Node,
                MetaPath::Fence => Kind::Fence,
                MetaPath::Secrets { .. } => return None,
            });
        }
    }
    None
}

fn strict<M: Message + Default>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    // Unknown fields are dropped by prost: a message of another type will
    // not re-encode to the same bytes.
    (m.encode_to_vec() == bytes).then_some(m)
}

/// Guess the kind of a meta file from its bytes.
pub fn sniff(bytes: &[u8]) -> Option<Kind> {
    if let Some(d) = strict::<pb::Deployment>(bytes)
        && is_ulid(&d.id)
        && d.release.is_some()
    {
        return Some(Kind::Deployment);
    }
    if let Some(r) = strict::<pb::Release>(bytes)
        && is_ulid(&r.id)
        && !r.app.is_empty()
    {
        return Some(Kind::Release);
    }
    if let Some(n) = strict::<pb::Node>(bytes)
        && !n.id.is_empty()
        && (n.registered_at > 0 || !n.address.is_empty())
    {
        return Some(Kind::Node);
    }
    if let Some(c) = strict::<pb::Channel>(bytes)
        && !c.name.is_empty()
        && !c.platform_commit.is_empty()
    {
        return Some(Kind::Channel);
    }
    if let Some(p) = strict::<pb::Project>(bytes)
        && crate::layout::is_project_id(&p.id)
    {
        return Some(Kind::Project);
    }
    if let Some(a) = strict::<pb::App>(bytes)
        && !a.name.is_empty()
        && !a.env.is_empty()
        && crate::layout::is_project_id(&a.project)
    {
        return Some(Kind::App);
    }
    if let Some(e) = strict::<pb::Env>(bytes)
        && !e.name.is_empty()
    {
        return Some(Kind::Env);
    }
    None
}

/// Readable, stable text of a meta file.
pub fn decode(kind: Option<Kind>, bytes: &[u8]) -> Result<String, DecodeError> {
    let kind = kind
        .or_else(|| sniff(bytes))
        .ok_or(DecodeError::Unrecognised)?;
    let inv = |source| DecodeError::Invalid { kind, source };
    Ok(match kind {
        Kind::Project => format!("{:#?}\n", pb::Project::decode(bytes).map_err(inv)?),
        Kind::Env => format!("{:#?}\n", pb::Env::decode(bytes).map_err(inv)?),
        Kind::App => format!("{:#?}\n", pb::App::decode(bytes).map_err(inv)?),
        Kind::Release => format!("{:#?}\n", pb::Release::decode(bytes).map_err(inv)?),
        Kind::Deployment => format!("{:#?}\n", pb::Deployment::decode(bytes).map_err(inv)?),
        Kind::Channel => format!("{:#?}\n", pb::Channel::decode(bytes).map_err(inv)?),
        Kind::Node => format!("{:#?}\n", pb::Node::decode(bytes).map_err(inv)?),
        Kind::Fence => format!("{:#?}\n", pb::LeaderFence::decode(bytes).map_err(inv)?),
    })
}
