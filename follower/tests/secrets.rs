//! Secrets: encrypted in the meta repo to the node's age recipient, given to
//! the app as environment variables, and never written by the follower
//! (ledger, logs, API). A missing secret fails the instance with its name.

mod common;

use std::sync::Arc;
use std::time::Duration;

use follower::image::{ImageConfig, LocalDirImageSource};
use follower::reconciler::Phase;
use follower::runtime::RuntimeChoice;
use follower::{Follower, FollowerConfig};
use meta_schema::pb::DeploymentState;

const SECRET: &str = "s3cr3t-value-7f1c2e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_app_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let digest = common::busybox_image(
        &store,
        &ImageConfig {
            entrypoint: vec!["/bin/busybox".into(), "sh".into(), "-c".into()],
            cmd: vec![
                "echo \"$API_KEY\" > /www/secret.txt && exec /bin/busybox httpd -f -p 8080 -h /www"
                    .into(),
            ],
            user: "root".into(),
            ..common::httpd_config(8080)
        },
    );
    let meta = common::Meta::new(tmp.path());
    let mut cfg = FollowerConfig::new(tmp.path().join("node"), meta.url());
    cfg.node_id = Some("node-s".into());
    cfg.runtime = RuntimeChoice::Process;
    cfg.instance_range = Some(common::random_range());
    cfg.images = Some(Arc::new(LocalDirImageSource::new(&store)));
    cfg.reconcile_interval = Duration::from_millis(200);
    let f = Follower::start(cfg).await.unwrap();
    assert!(f.age_recipient.starts_with("age1"));

    let recipient: age::x25519::Recipient = f.age_recipient.parse().unwrap();
    let mut secrets = meta_schema::sops::Secrets::new();
    secrets.insert("API_KEY", meta_schema::sops::Secret::new(SECRET));
    let yaml =
        meta_schema::sops::encrypt(&secrets, &[recipient], meta_schema::now_millis()).unwrap();
    assert!(!yaml.contains(SECRET));
    let mut cs = meta_schema::repo::ChangeSet::new();
    for app in ["web", "other"] {
        cs = cs.add(
            meta_schema::layout::secrets_path("prod", app),
            yaml.clone().into_bytes(),
        );
    }
    meta.repo.commit("main", &cs, "secrets").unwrap();

    let mut web = meta.release("web", &digest, 8080);
    web.secret_refs = vec!["API_KEY".into()];
    let mut other = meta.release("other", &digest, 8080);
    other.secret_refs = vec!["MISSING".into()];
    let dw = meta.deployment(&web, DeploymentState::RollingOut, None, "node-s", 1);
    let dother = meta.deployment(&other, DeploymentState::RollingOut, None, "node-s", 1);
    meta.commit(&[&web, &other], &[&dw, &dother], &[], "deploy");
    f.notify.notify_one();

    let recs = common::wait_for(60, "web healthy, other failed", || {
        let s = f.reconciler.instances.borrow().clone();
        let by_app: std::collections::BTreeMap<String, _> =
            s.into_values().map(|r| (r.app.clone(), r)).collect();
        (by_app.get("web")?.phase == Phase::Healthy && by_app.get("other")?.phase == Phase::Failed)
            .then_some(by_app)
    })
    .await;
    let w = &recs["web"];
    let addr = std::net::SocketAddr::new(w.ip.into(), w.port);
    assert_eq!(
        common::http_get(addr, "/secret.txt").await.unwrap(),
        (200, format!("{SECRET}\n"))
    );
    assert!(
        recs["other"]
            .reason
            .contains("secret MISSING is not in the secrets file"),
        "{}",
        recs["other"].reason
    );

    // The follower wrote the value nowhere.
    let api = reqwest::Client::new()
        .get(format!("http://{}/v1/instances", f.api_addr))
        .bearer_auth(&f.node_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!api.contains(SECRET));
    let out = std::process::Command::new("grep")
        .args(["-r", "-l", SECRET])
        .arg(tmp.path().join("node"))
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "secret on disk in {}",
        String::from_utf8_lossy(&out.stdout)
    );
    f.shutdown_and_stop_instances().await;
}
