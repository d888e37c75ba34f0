//! Following the meta repo: a head that does not descend from the applied
//! commit (a force-pushed older head) is refused, kept out of the desired
//! state, and reported to the captain; following resumes once the branch
//! moves forward from the applied commit again. Also: the node token the
//! captain issued survives a restart; a revoked one leads to a new
//! registration.

mod common;

use std::sync::Arc;
use std::time::Duration;

use follower::image::LocalDirImageSource;
use follower::runtime::RuntimeChoice;
use follower::{Follower, FollowerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_head_pushed_by_force_is_refused_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = common::Meta::new(tmp.path());
    let captain = common::RecordingCaptain::start().await;
    let range = common::random_range();
    let cfg_again = || {
        let mut cfg = FollowerConfig::new(tmp.path().join("node"), meta.url());
        cfg.node_id = Some("node-r".into());
        cfg.runtime = RuntimeChoice::Process;
        cfg.instance_range = Some(range);
        cfg.images = Some(Arc::new(LocalDirImageSource::new(tmp.path().join("store"))));
        cfg.captain_url = Some(captain.url.clone());
        cfg.token = "bootstrap".into();
        cfg.poll_interval = Duration::from_millis(200);
        cfg.heartbeat_interval = Duration::from_millis(200);
        cfg
    };
    let f = Follower::start(cfg_again()).await.unwrap();

    // Releases without deployments: commits that change nothing on the node.
    let digest = format!("sha256:{}", "a".repeat(64));
    let c1 = meta.commit(&[&meta.release("web", &digest, 8080)], &[], &[], "r1");
    let c2 = meta.commit(&[&meta.release("web", &digest, 8080)], &[], &[], "r2");
    f.notify.notify_one();
    let mut follow = f.follow.clone();
    common::wait_for(20, "c2 applied", || {
        (follow.borrow_and_update().applied.as_deref() == Some(&c2)).then_some(())
    })
    .await;

    meta.force_main(&c1);
    f.notify.notify_one();
    let st = common::wait_for(20, "c1 refused", || {
        let s = follow.borrow_and_update().clone();
        (s.refused.as_deref() == Some(&c1)).then_some(s)
    })
    .await;
    assert_eq!(
        st.applied.as_deref(),
        Some(c2.as_str()),
        "the applied commit never moves back"
    );
    assert!(st.refused_reason.unwrap().contains("does not descend"));
    common::wait_for(20, "the refusal in a heartbeat", || {
        captain
            .all()
            .iter()
            .any(|r| {
                r.method == "PUT"
                    && r.body["meta"]["refused_commit"] == c1.as_str()
                    && r.body["meta"]["applied_commit"] == c2.as_str()
            })
            .then_some(())
    })
    .await;
    // The pass reads the applied commit, not the refused one.
    let pass = f.reconciler.status.clone();
    common::wait_for(20, "a pass at c2", || {
        (pass.borrow().commit.as_deref() == Some(&c2)).then_some(())
    })
    .await;
    // The node API shows it too.
    let info: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/v1/node/info", f.api_addr))
        .bearer_auth(&f.node_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["meta"]["refused_commit"], c1.as_str());

    // Forward again from the applied commit: followed, refusal cleared.
    meta.force_main(&c2);
    let c3 = meta.commit(&[&meta.release("web", &digest, 8080)], &[], &[], "r3");
    f.notify.notify_one();
    let st = common::wait_for(20, "c3 applied", || {
        let s = follow.borrow_and_update().clone();
        (s.applied.as_deref() == Some(&c3)).then_some(s)
    })
    .await;
    assert_eq!(st.refused, None);
    f.shutdown().await;

    // A restart on the same data dir registers again (its addresses may
    // have changed; the captain updates the node and rotates its token)
    // and heartbeats with the new token.
    let f = Follower::start(cfg_again()).await.unwrap();
    common::wait_for(20, "the restarted follower registers again", || {
        (captain.count("POST", "/v1/nodes") == 2).then_some(())
    })
    .await;
    common::wait_for(20, "heartbeats with the rotated token", || {
        captain
            .all()
            .iter()
            .any(|r| r.method == "PUT" && r.auth == format!("Bearer {}", common::issued_token(2)))
            .then_some(())
    })
    .await;
    // The captain revokes the token: the follower registers again.
    captain
        .revoked
        .lock()
        .unwrap()
        .push(common::issued_token(2));
    common::wait_for(20, "a third registration", || {
        (captain.count("POST", "/v1/nodes") == 3).then_some(())
    })
    .await;
    common::wait_for(20, "heartbeats with the new token", || {
        captain
            .all()
            .iter()
            .any(|r| r.method == "PUT" && r.auth == format!("Bearer {}", common::issued_token(3)))
            .then_some(())
    })
    .await;
    f.shutdown_and_stop_instances().await;
}

/// `POST /v1/notify` (what the captain calls after each commit) makes the
/// follower fetch at once: with polling an hour apart, only the notify can
/// explain the commit being applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_fetches_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = common::Meta::new(tmp.path());
    let mut cfg = FollowerConfig::new(tmp.path().join("node"), meta.url());
    cfg.node_id = Some("node-n".into());
    cfg.runtime = RuntimeChoice::Process;
    cfg.instance_range = Some(common::random_range());
    cfg.token = "captain-token".into();
    cfg.poll_interval = Duration::from_secs(3600);
    let f = Follower::start(cfg).await.unwrap();
    let mut follow = f.follow.clone();
    // The first fetch happens at start.
    common::wait_for(20, "the first fetch", || {
        (follow.borrow_and_update().fetches >= 1).then_some(())
    })
    .await;

    let digest = format!("sha256:{}", "b".repeat(64));
    let c = meta.commit(&[&meta.release("web", &digest, 8080)], &[], &[], "r");
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/notify", f.api_addr);
    assert_eq!(http.post(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        http.post(&url)
            .bearer_auth("captain-token")
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    common::wait_for(20, "the notified commit applied", || {
        (follow.borrow_and_update().applied.as_deref() == Some(c.as_str())).then_some(())
    })
    .await;
    f.shutdown_and_stop_instances().await;
}
