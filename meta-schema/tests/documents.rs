//! Projects and apps as documents of the meta repository, and who owns a
//! domain: each rule checked on a tree that breaks it, with the error
//! naming the file and field.

use meta_schema::desired::desired_state;
use meta_schema::layout::{app_path, deployment_path, env_path, project_path, release_path};
use meta_schema::validate::validate_tree;
use meta_schema::{MetaTree, new_id, pb};
use prost::Message;

const T0: i64 = 1_700_000_000_000;

/// What a case is about, how it breaks the base tree, the error expected.
type Case = (&'static str, Box<dyn Fn(&mut MetaTree)>, &'static str);

fn env(tree: &mut MetaTree, name: &str, domain: &str) {
    tree.insert(
        env_path(name),
        pb::Env {
            name: name.into(),
            domains: vec![domain.into()],
            ..Default::default()
        }
        .encode_to_vec(),
    );
}

fn project(tree: &mut MetaTree, id: &str) {
    tree.insert(
        project_path(id),
        pb::Project {
            id: id.into(),
            name: "shop".into(),
            source: Some(pb::Source {
                repo: "https://git.example.com/acme/shop.git".into(),
                branch: "main".into(),
                commit: String::new(),
            }),
            build: None,
            created_at: T0,
        }
        .encode_to_vec(),
    );
}

fn app(tree: &mut MetaTree, env: &str, name: &str, project: &str, domains: &[&str]) {
    tree.insert(
        app_path(env, name),
        pb::App {
            name: name.into(),
            env: env.into(),
            project: project.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            created_at: T0,
        }
        .encode_to_vec(),
    );
}

fn release(env: &str, app: &str, domains: &[&str]) -> pb::Release {
    pb::Release {
        id: new_id(),
        app: app.into(),
        env: env.into(),
        image_digest: format!("sha256:{}", "c".repeat(64)),
        created_at: T0,
        domains: domains.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    }
}

fn base() -> MetaTree {
    let mut t = MetaTree::new();
    env(&mut t, "prod", "zeitwork.app");
    env(&mut t, "staging", "staging.zeitwork.app");
    project(&mut t, "prj-01jshop");
    app(&mut t, "prod", "web", "prj-01jshop", &["shop.example.com"]);
    t
}

/// The errors of `tree`, as text; empty when valid.
fn errors(tree: &MetaTree) -> String {
    validate_tree(tree)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

#[test]
fn declared_apps_are_part_of_desired_state() {
    let mut t = base();
    app(&mut t, "staging", "cron", "prj-01jshop", &[]);
    assert_eq!(errors(&t), "");
    let s = desired_state(&t, T0).unwrap();
    let web = s.app("prod", "web").unwrap();
    assert_eq!(web.project.as_deref(), Some("prj-01jshop"));
    assert_eq!(web.domains, vec!["shop.example.com".to_string()]);
    assert!(
        web.active_release.is_none(),
        "nothing runs without a release"
    );
    assert!(s.app("staging", "cron").is_some());
}

#[test]
fn documents_must_match_their_paths_and_each_other() {
    let cases: Vec<Case> = vec![
        (
            "an app of a project that does not exist",
            Box::new(|t| app(t, "prod", "api", "prj-nope", &[])),
            "envs/prod/apps/api/app.pb: field `project`: project \"prj-nope\" does not exist",
        ),
        (
            "a project document under another id",
            Box::new(|t| {
                let bytes = t.get(&project_path("prj-01jshop")).unwrap().to_vec();
                t.insert(project_path("prj-other"), bytes);
            }),
            "projects/prj-other.pb: field `id`: must equal the file name",
        ),
        (
            "a project id that is not one",
            Box::new(|t| {
                let bytes = t.get(&project_path("prj-01jshop")).unwrap().to_vec();
                t.insert("projects/Shop.pb".to_string(), bytes);
            }),
            "projects/Shop.pb: file name \"Shop\" is not a project id",
        ),
        (
            "an app document in another app's directory",
            Box::new(|t| {
                let bytes = t.get(&app_path("prod", "web")).unwrap().to_vec();
                t.insert(app_path("prod", "api"), bytes);
            }),
            "envs/prod/apps/api/app.pb: field `name`: must equal the directory name \"api\"",
        ),
        (
            "an app in an env that does not exist",
            Box::new(|t| app(t, "qa", "web", "prj-01jshop", &[])),
            "envs/qa/apps/web: env \"qa\" has no envs/qa/env.pb",
        ),
        (
            "a project whose Dockerfile leaves the source",
            Box::new(|t| {
                t.insert(
                    project_path("prj-02"),
                    pb::Project {
                        id: "prj-02".into(),
                        name: "x".into(),
                        source: Some(pb::Source {
                            repo: "https://git.example.com/x.git".into(),
                            branch: "main".into(),
                            commit: String::new(),
                        }),
                        build: Some(pb::BuildSettings {
                            dockerfile: "../../etc/Dockerfile".into(),
                            build_args: Default::default(),
                        }),
                        created_at: T0,
                    }
                    .encode_to_vec(),
                );
            }),
            "projects/prj-02.pb: field `build.dockerfile`",
        ),
    ];
    for (what, break_it, want) in cases {
        let mut t = base();
        break_it(&mut t);
        let got = errors(&t);
        assert!(got.contains(want), "{what}: expected {want:?} in\n{got}");
    }
}

/// A domain belongs to one app: a tenant cannot take another app's
/// platform name or custom domain, in any env, through any file.
#[test]
fn a_domain_belongs_to_one_app() {
    let cases: Vec<Case> = vec![
        (
            "another app's platform name as a custom domain",
            Box::new(|t| app(t, "staging", "evil", "prj-01jshop", &["web.zeitwork.app"])),
            "envs/staging/apps/evil/app.pb: field `domains`: domain \"web.zeitwork.app\" is already used by app \"web\" in env \"prod\"",
        ),
        (
            "another app's custom domain, from another env",
            Box::new(|t| app(t, "staging", "evil", "prj-01jshop", &["shop.example.com"])),
            "domain \"shop.example.com\" is already used by app",
        ),
        (
            "a wildcard, which would take every name under it",
            Box::new(|t| app(t, "staging", "evil", "prj-01jshop", &["*.example.com"])),
            "envs/staging/apps/evil/app.pb: field `domains`: \"*.example.com\" is not a custom domain",
        ),
        (
            "a single label",
            Box::new(|t| app(t, "staging", "evil", "prj-01jshop", &["localhost"])),
            "\"localhost\" is not a custom domain",
        ),
        (
            "another app's domain in a release",
            Box::new(|t| {
                let r = release("staging", "evil", &["shop.example.com"]);
                t.insert(release_path("staging", "evil", &r.id), r.encode_to_vec());
            }),
            "field `domains`: domain \"shop.example.com\" is already used by app",
        ),
        (
            "another app's domain embedded in a deployment file",
            Box::new(|t| {
                let r = release("staging", "evil", &[]);
                t.insert(release_path("staging", "evil", &r.id), r.encode_to_vec());
                let mut embedded = r.clone();
                embedded.domains = vec!["shop.example.com".into()];
                let id = new_id();
                t.insert(
                    deployment_path("staging", "evil", &id),
                    pb::Deployment {
                        id: id.clone(),
                        app: "evil".into(),
                        env: "staging".into(),
                        rollout_id: id.clone(),
                        state: pb::DeploymentState::Promoted as i32,
                        release: Some(embedded),
                        instances: vec![],
                        created_at: T0,
                        reason: String::new(),
                    }
                    .encode_to_vec(),
                );
            }),
            "field `release.domains`: domain \"shop.example.com\" is already used by app",
        ),
    ];
    for (what, break_it, want) in cases {
        let mut t = base();
        assert_eq!(errors(&t), "", "the base tree is valid");
        break_it(&mut t);
        let got = errors(&t);
        assert!(got.contains(want), "{what}: expected {want:?} in\n{got}");
    }
    // The same custom domain in two files of one app is fine.
    let mut t = base();
    let r = release("prod", "web", &["shop.example.com"]);
    t.insert(release_path("prod", "web", &r.id), r.encode_to_vec());
    assert_eq!(errors(&t), "");
}
