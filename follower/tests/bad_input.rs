//! Bad input fails one instance, with its reason, and nothing else: an
//! unknown image digest, a corrupt rootfs, an entrypoint that exits at once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use follower::image::{ImageConfig, LocalDirImageSource};
use follower::reconciler::{Phase, START_RETRIES};
use follower::runtime::RuntimeChoice;
use follower::{Follower, FollowerConfig};
use meta_schema::pb::DeploymentState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_fail_alone_with_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let good = common::busybox_image(&store, &common::httpd_config(8080));
    let exits = common::busybox_image(
        &store,
        &ImageConfig {
            entrypoint: vec![
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                "echo going away; exit 7".into(),
            ],
            ..common::httpd_config(8080)
        },
    );
    // Same layout, rootfs overwritten with garbage.
    let corrupt = common::busybox_image(
        &store,
        &ImageConfig {
            user: "root".into(),
            ..common::httpd_config(8080)
        },
    );
    std::fs::write(
        common::image_dir(&store, &corrupt).join("rootfs.ext4"),
        vec![0x42u8; 4 << 20],
    )
    .unwrap();
    let unknown = format!("sha256:{}", "0".repeat(64));

    let meta = common::Meta::new(tmp.path());
    let captain = common::RecordingCaptain::start().await;
    let mut cfg = FollowerConfig::new(tmp.path().join("node"), meta.url());
    cfg.node_id = Some("node-b".into());
    cfg.runtime = RuntimeChoice::Process;
    cfg.instance_range = Some(common::random_range());
    cfg.images = Some(Arc::new(LocalDirImageSource::new(&store)));
    cfg.captain_url = Some(captain.url.clone());
    cfg.reconcile_interval = Duration::from_millis(200);
    let f = Follower::start(cfg).await.unwrap();

    let mut releases = Vec::new();
    let mut deployments = Vec::new();
    for (app, digest) in [
        ("good", &good),
        ("exits", &exits),
        ("corrupt", &corrupt),
        ("unknown", &unknown),
    ] {
        let r = meta.release(app, digest, 8080);
        deployments.push(meta.deployment(&r, DeploymentState::RollingOut, None, "node-b", 1));
        releases.push(r);
    }
    meta.commit(
        &releases.iter().collect::<Vec<_>>(),
        &deployments.iter().collect::<Vec<_>>(),
        &[],
        "four apps",
    );
    f.notify.notify_one();

    let by_app = common::wait_for(90, "3 failed and 1 healthy", || {
        let s = f.reconciler.instances.borrow().clone();
        let by_app: std::collections::BTreeMap<String, _> =
            s.into_values().map(|r| (r.app.clone(), r)).collect();
        let done = by_app.len() == 4
            && by_app.iter().all(|(app, r)| {
                if app == "good" {
                    r.phase == Phase::Healthy
                } else {
                    r.phase == Phase::Failed
                }
            });
        done.then_some(by_app)
    })
    .await;
    assert!(
        by_app["unknown"].reason.contains("not in the store"),
        "{}",
        by_app["unknown"].reason
    );
    assert!(
        by_app["corrupt"].reason.contains("not an ext4"),
        "{}",
        by_app["corrupt"].reason
    );
    assert!(
        by_app["exits"].reason.contains("status 7"),
        "{}",
        by_app["exits"].reason
    );
    for app in ["unknown", "corrupt", "exits"] {
        assert_eq!(
            by_app[app].attempts,
            START_RETRIES + 1,
            "{app}: first try and {START_RETRIES} retries"
        );
        assert!(by_app[app].handle.is_none());
    }
    let g = &by_app["good"];
    assert_eq!(g.attempts, 1, "the good instance was never disturbed");
    let addr = std::net::SocketAddr::new(g.ip.into(), g.port);
    assert_eq!(common::http_get(addr, "/").await.unwrap().0, 200);

    // The captain heard each failure with its reason.
    common::wait_for(10, "failed reports", || {
        let reqs = captain.all();
        let failed: Vec<_> = reqs
            .iter()
            .filter(|r| r.path == "/v1/instances" && r.body["state"] == "failed")
            .collect();
        (failed.len() == 3).then_some(())
    })
    .await;
    for r in captain
        .all()
        .iter()
        .filter(|r| r.path == "/v1/instances" && r.body["state"] == "failed")
    {
        let app = r.body["app"].as_str().unwrap();
        assert_eq!(r.body["reason"], by_app[app].reason.as_str());
        assert_eq!(r.body["attempts"], START_RETRIES + 1);
    }
    f.shutdown_and_stop_instances().await;
}
