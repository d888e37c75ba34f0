//! The same artifact through the local store and a real S3-compatible server
//! (moto_server on loopback), and retries while the store is down.

mod common;

use std::sync::Arc;
use std::time::Duration;

use builder::image::{config_key, digest_hex, rootfs_key};
use builder::{
    BuildOptions, ChannelLog, LocalStore, LogEvent, MemoryLog, ObjectStore, S3Store, Source,
    fetch_image,
};
use common::*;

const DOCKERFILE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo stored > /stored.txt\"]\nENTRYPOINT [\"/bin/busybox\"]\n";

fn sha256(path: &std::path::Path) -> String {
    builder::build::sha256_file(path).unwrap().0
}

#[tokio::test]
async fn artifact_round_trips_through_local_store_and_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(&tmp.path().join("src"), DOCKERFILE);
    let local = Arc::new(LocalStore::new(tmp.path().join("store")));
    let (builder, _) = buildah_builder(local.clone(), &tmp.path().join("data"));
    let artifact = builder
        .build(
            Source::Local(ctx),
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap();
    let hex = digest_hex(&artifact.digest).unwrap().to_string();

    // Local round trip.
    let (local_dir, local_cfg) = fetch_image(
        local.as_ref(),
        &artifact.digest,
        &tmp.path().join("cache-local"),
    )
    .await
    .unwrap();
    assert_eq!(local_cfg, artifact.config);
    assert_eq!(
        sha256(&local_dir.join("rootfs.ext4")),
        artifact.rootfs_sha256
    );
    assert_eq!(
        debugfs(&local_dir.join("rootfs.ext4"), "cat /stored.txt").trim(),
        "stored"
    );

    // S3 round trip of the same objects.
    let moto = MotoServer::start();
    let s3 = S3Store::new(moto.s3_config("images")).unwrap();
    s3.create_bucket_if_missing().await.unwrap();
    assert!(!s3.exists(&config_key(&hex)).await.unwrap());
    s3.put_file(&rootfs_key(&hex), &local.root().join(rootfs_key(&hex)))
        .await
        .unwrap();
    s3.put(
        &config_key(&hex),
        local.get(&config_key(&hex)).await.unwrap(),
    )
    .await
    .unwrap();
    assert!(s3.exists(&config_key(&hex)).await.unwrap());
    assert_eq!(
        s3.list("images/").await.unwrap(),
        vec![config_key(&hex), rootfs_key(&hex)]
    );
    let (s3_dir, s3_cfg) = fetch_image(&s3, &artifact.digest, &tmp.path().join("cache-s3"))
        .await
        .unwrap();
    assert_eq!(s3_cfg, local_cfg);
    assert_eq!(sha256(&s3_dir.join("rootfs.ext4")), artifact.rootfs_sha256);
    assert_eq!(
        std::fs::read(s3_dir.join("config.json")).unwrap(),
        std::fs::read(local_dir.join("config.json")).unwrap()
    );

    // A corrupted object is refused, not cached.
    s3.put(
        &rootfs_key(&hex),
        bytes::Bytes::from_static(b"not an ext4 image"),
    )
    .await
    .unwrap();
    let err = fetch_image(&s3, &artifact.digest, &tmp.path().join("cache-corrupt"))
        .await
        .unwrap_err();
    assert!(matches!(err, builder::FetchError::Corrupt { .. }), "{err}");
    assert!(!tmp.path().join("cache-corrupt").join(&hex).exists());

    // Missing objects and deletes.
    s3.delete(&rootfs_key(&hex)).await.unwrap();
    s3.delete(&rootfs_key(&hex)).await.unwrap();
    assert!(s3.get(&rootfs_key(&hex)).await.unwrap_err().is_not_found());
    assert_eq!(s3.list("images/").await.unwrap(), vec![config_key(&hex)]);
}

#[tokio::test]
async fn s3_outage_is_retried_then_the_build_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(&tmp.path().join("src"), DOCKERFILE);
    let mut moto = MotoServer::start();
    let s3 = Arc::new(S3Store::new(moto.s3_config("outage")).unwrap());
    s3.create_bucket_if_missing().await.unwrap();
    // The store goes down before the build talks to it.
    moto.stop();

    let (builder, calls) = buildah_builder(s3.clone(), &tmp.path().join("data"));
    let mut cfg = builder.config().clone();
    cfg.retry = fast_retry(30);
    let builder = builder::Builder::with_backend(
        s3.clone(),
        Box::new(CountingBackend {
            inner: builder::BuildahBackend::new(&tmp.path().join("data/buildah")).unwrap(),
            calls: calls.clone(),
        }),
        cfg,
    );
    let (log, mut events) = ChannelLog::new();
    let build = tokio::spawn(async move {
        builder
            .build(Source::Local(ctx), BuildOptions::default(), &log)
            .await
    });

    // Wait (bounded) until the builder reports a retry against the dead store.
    let mut lines = Vec::new();
    let saw_retry = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(ev) = events.recv().await {
            if let LogEvent::Line(l) = ev {
                lines.push(l.text.clone());
                if l.text.starts_with("retrying store lookup") {
                    return true;
                }
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(saw_retry, "no retry reported; log: {lines:#?}");

    // Bring the store back (fresh state: recreate the bucket).
    moto.restart();
    s3.create_bucket_if_missing().await.unwrap();
    let artifact = tokio::time::timeout(Duration::from_secs(120), build)
        .await
        .expect("build finishes")
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(artifact.uploaded);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the image build itself ran once"
    );
    let (dir, cfg) = fetch_image(s3.as_ref(), &artifact.digest, &tmp.path().join("cache"))
        .await
        .unwrap();
    assert_eq!(cfg, artifact.config);
    assert_eq!(
        debugfs(&dir.join("rootfs.ext4"), "cat /stored.txt").trim(),
        "stored"
    );
}

#[tokio::test]
async fn store_fault_exhausting_retries_is_an_infrastructure_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(&tmp.path().join("src"), DOCKERFILE);
    // Nothing listens on this port: the store is unreachable for good.
    let mut cfg = builder::S3Config::from_env("never");
    cfg.endpoint = Some(format!("http://127.0.0.1:{}", free_port()));
    cfg.access_key_id = Some("k".into());
    cfg.secret_access_key = Some("s".into());
    cfg.connect_timeout = Duration::from_secs(1);
    let s3 = Arc::new(S3Store::new(cfg).unwrap());
    let (builder, _) = buildah_builder(s3, &tmp.path().join("data"));
    let log = MemoryLog::new();
    let err = builder
        .build(Source::Local(ctx), BuildOptions::default(), &log)
        .await
        .unwrap_err();
    assert_eq!(err.fault(), builder::FaultKind::Infrastructure, "{err}");
    assert!(err.is_retryable());
    // fast_retry(4): three retries were reported, then it gave up.
    assert_eq!(
        log.lines()
            .iter()
            .filter(|l| l.text.starts_with("retrying store lookup"))
            .count(),
        3
    );
    assert!(err.to_string().contains("s3://never"), "{err}");
}

#[tokio::test]
async fn local_store_fault_is_retried_until_the_directory_is_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(&tmp.path().join("src"), DOCKERFILE);
    // The store's directory is unusable: a regular file sits where it should be.
    let store_dir = tmp.path().join("store");
    std::fs::write(&store_dir, b"in the way").unwrap();
    let store = Arc::new(LocalStore::new(&store_dir));
    let (builder, _) = buildah_builder(store.clone(), &tmp.path().join("data"));
    let mut cfg = builder.config().clone();
    cfg.retry = fast_retry(30);
    let builder = builder::Builder::with_backend(
        store.clone(),
        Box::new(builder::BuildahBackend::new(&tmp.path().join("data/buildah")).unwrap()),
        cfg,
    );
    let (log, mut events) = ChannelLog::new();
    let build = tokio::spawn(async move {
        builder
            .build(Source::Local(ctx), BuildOptions::default(), &log)
            .await
    });

    let saw_retry = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(ev) = events.recv().await {
            if matches!(&ev, LogEvent::Line(l) if l.text.starts_with("retrying store")) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(saw_retry, "the store fault was not retried");
    // Fix the store.
    std::fs::remove_file(&store_dir).unwrap();
    let artifact = tokio::time::timeout(Duration::from_secs(120), build)
        .await
        .expect("build finishes")
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(artifact.uploaded);
    let (_, cfg) = fetch_image(store.as_ref(), &artifact.digest, &tmp.path().join("cache"))
        .await
        .unwrap();
    assert_eq!(cfg, artifact.config);
}
