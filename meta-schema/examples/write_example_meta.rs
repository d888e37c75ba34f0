//! Writes the example meta repository in `example-meta/` (plain files).
//! Deterministic: fixed ids and times, so regenerating gives the same bytes.
//!
//!     cargo run -p meta-schema --example write_example_meta -- example-meta

use std::path::Path;

use meta_schema::layout::{
    app_path, channel_path, deployment_path, env_path, node_path, project_path, release_path,
};
use meta_schema::pb::{self, health_check::Kind};
use prost::Message;

const T: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn write(root: &Path, rel: &str, bytes: Vec<u8>) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

fn id(ms: i64, n: u128) -> String {
    ulid::Ulid::from_parts(ms as u64, n).to_string()
}

fn release(
    env: &str,
    app: &str,
    rid: &str,
    version: &str,
    digest_byte: char,
    at: i64,
) -> pb::Release {
    pb::Release {
        id: rid.into(),
        app: app.into(),
        env: env.into(),
        image_digest: format!("sha256:{}", digest_byte.to_string().repeat(64)),
        port: if app == "worker" { 0 } else { 8080 },
        env_vars: [("VERSION".to_string(), version.to_string())].into(),
        health_check: Some(pb::HealthCheck {
            kind: Some(if app == "worker" {
                Kind::Tcp(true)
            } else {
                Kind::HttpPath("/healthz".into())
            }),
            interval_ms: 1000,
            timeout_ms: 500,
        }),
        resources: Some(pb::Resources {
            vcpus: 1,
            memory_mb: 256,
            disk_mb: 1024,
        }),
        min_instances: 3,
        domains: if app == "web" && env == "production" {
            vec!["www.example.com".into()]
        } else {
            vec![]
        },
        drain_seconds: None,
        source: Some(pb::Source {
            repo: format!("https://github.com/example/{app}.git"),
            branch: "main".into(),
            commit: format!("{:040x}", at),
        }),
        created_at: at,
        ..Default::default()
    }
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .expect("usage: write_example_meta <dir>");
    let root = Path::new(&root);
    for (env, domain) in [
        ("production", "example.app"),
        ("staging", "staging.example.app"),
    ] {
        write(
            root,
            &env_path(env),
            pb::Env {
                name: env.into(),
                domains: vec![domain.into()],
                regions: vec!["eu-central-1".into()],
                age_recipients: vec![pb::AgeRecipient {
                    name: "node-1".into(),
                    recipient: "age1se5ghfycr4n8kcwc3qwf234ymvmr2lex2a99wh8gpfx97glwt9hqch4569"
                        .into(),
                }],
            }
            .encode_to_vec(),
        );
    }
    for app in ["web", "api", "worker"] {
        let id = format!("prj-{app}");
        write(
            root,
            &project_path(&id),
            pb::Project {
                id: id.clone(),
                name: app.into(),
                source: Some(pb::Source {
                    repo: format!("https://github.com/example/{app}.git"),
                    branch: "main".into(),
                    commit: String::new(),
                }),
                build: Some(pb::BuildSettings {
                    dockerfile: if app == "worker" {
                        "worker/Dockerfile".into()
                    } else {
                        String::new()
                    },
                    build_args: Default::default(),
                }),
                created_at: T,
            }
            .encode_to_vec(),
        );
    }
    for (env, app) in [
        ("production", "web"),
        ("production", "api"),
        ("staging", "web"),
        ("staging", "worker"),
    ] {
        write(
            root,
            &app_path(env, app),
            pb::App {
                name: app.into(),
                env: env.into(),
                project: format!("prj-{app}"),
                domains: if (env, app) == ("production", "api") {
                    vec!["api.example.com".into()]
                } else {
                    vec![]
                },
                created_at: T,
            }
            .encode_to_vec(),
        );
    }
    let mut n = 1u128;
    let mut next = |ms: i64| {
        n += 1;
        id(ms, n)
    };
    let mut last = None;
    for (env, app, versions) in [
        ("production", "web", 3),
        ("production", "api", 2),
        ("staging", "web", 1),
        ("staging", "worker", 2),
    ] {
        for v in 1..=versions {
            let at = T + v * 86_400_000;
            let rid = next(at);
            let digest = char::from(b"0123456789abcdef"[(v as usize * 3 + app.len()) % 16]);
            let r = release(env, app, &rid, &format!("v{v}"), digest, at);
            write(root, &release_path(env, app, &rid), r.encode_to_vec());
            if env == "production" && app == "web" && v == versions {
                last = Some(r);
            }
        }
    }
    // The active production web release, rolled out and promoted.
    let r = last.unwrap();
    let rollout = next(r.created_at + 1000);
    let instances: Vec<pb::Placement> = (0..3)
        .map(|i| pb::Placement {
            instance_id: id(r.created_at + 1000, 1000 + i),
            node: format!("node-{}", i + 1),
        })
        .collect();
    let mk = |did: &str, state: pb::DeploymentState, at: i64| pb::Deployment {
        id: did.into(),
        app: "web".into(),
        env: "production".into(),
        rollout_id: rollout.clone(),
        state: state as i32,
        release: Some(r.clone()),
        instances: instances.clone(),
        created_at: at,
        reason: String::new(),
    };
    write(
        root,
        &deployment_path("production", "web", &rollout),
        mk(
            &rollout,
            pb::DeploymentState::RollingOut,
            r.created_at + 1000,
        )
        .encode_to_vec(),
    );
    let promoted = next(r.created_at + 30_000);
    write(
        root,
        &deployment_path("production", "web", &promoted),
        mk(
            &promoted,
            pb::DeploymentState::Promoted,
            r.created_at + 30_000,
        )
        .encode_to_vec(),
    );
    write(
        root,
        &channel_path("stable"),
        pb::Channel {
            name: "stable".into(),
            platform_commit: "0123456789abcdef0123456789abcdef01234567".into(),
            version: "0.1.0".into(),
            updated_at: T,
        }
        .encode_to_vec(),
    );
    for i in 1..=3 {
        let nid = format!("node-{i}");
        write(
            root,
            &node_path(&nid),
            pb::Node {
                id: nid.clone(),
                address: format!("[fd00::{i}]"),
                region: "eu-central-1".into(),
                cpus: 2,
                memory_bytes: 4 << 30,
                disk_bytes: 40 << 30,
                age_recipient: String::new(),
                registered_at: T,
            }
            .encode_to_vec(),
        );
    }
    std::fs::write(
        root.join("README.md"),
        include_str!("../assets/README.meta.md").replace(
            "# zeitwork meta repository",
            "# Example zeitwork meta repository\n\nGenerated by `cargo run -p meta-schema --example write_example_meta -- example-meta`;\nchecked by the test suite with `zw meta validate example-meta`.",
        ),
    )
    .unwrap();
    std::fs::write(
        root.join(".gitattributes"),
        include_str!("../assets/gitattributes"),
    )
    .unwrap();
}
