//! Real buildah builds of `FROM scratch` + busybox images, checked in the
//! produced ext4 with debugfs.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use builder::image::{config_key, digest_hex, rootfs_key};
use builder::{
    BuildError, BuildOptions, FaultKind, InputError, LocalStore, MemoryLog, ObjectStore, Source,
    fetch_image,
};
use common::*;

const APP_DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
ARG GREETING=default
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /etc /data /tmp/gone && echo \"$GREETING\" > /data/hello.txt && echo bye > /tmp/gone/x && /bin/busybox ln -s /bin/busybox /bin/sh"]
RUN ["/bin/busybox", "rm", "-rf", "/tmp/gone"]
ENV FOO=bar
WORKDIR /data
USER 1000:1000
EXPOSE 8080 9090/udp
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo hi"]
"#;

#[tokio::test]
async fn scratch_busybox_build_to_ext4_matches_dockerfile() {
    require_tools(&["buildah", "mkfs.ext4", "debugfs"]);
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(&tmp.path().join("src"), "FROM scratch\nRUN false\n");
    // The real Dockerfile lives at a non-default path (--dockerfile).
    std::fs::create_dir_all(ctx.join("deploy")).unwrap();
    std::fs::write(ctx.join("deploy/App.dockerfile"), APP_DOCKERFILE).unwrap();
    let store = Arc::new(LocalStore::new(tmp.path().join("store")));
    let (builder, calls) = buildah_builder(store.clone(), &tmp.path().join("data"));
    let log = MemoryLog::new();
    let opts = BuildOptions {
        app: Some("Hello App".into()),
        dockerfile: PathBuf::from("deploy/App.dockerfile"),
        build_args: vec![("GREETING".into(), "from-build-arg".into())],
    };
    let artifact = builder
        .build(Source::Local(ctx.clone()), opts, &log)
        .await
        .unwrap_or_else(|e| panic!("build failed: {e}"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(artifact.uploaded);
    let hex = digest_hex(&artifact.digest)
        .expect("sha256:<64 hex>")
        .to_string();
    assert_eq!(artifact.rootfs_key, rootfs_key(&hex));
    assert_eq!(artifact.config_key, config_key(&hex));

    // The config keeps what the Dockerfile says.
    let c = &artifact.config;
    assert_eq!(c.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(c.cmd, vec!["echo hi"]);
    assert!(c.env.contains(&"FOO=bar".to_string()), "{:?}", c.env);
    assert_eq!(c.workdir, "/data");
    assert_eq!(c.user, "1000:1000");
    assert_eq!(c.exposed_ports, vec![8080, 9090]);
    assert!(c.rootfs_bytes > 0);

    // The stored objects and fetch_image agree with the artifact.
    assert_eq!(
        store.list(&format!("images/{hex}/")).await.unwrap(),
        vec![config_key(&hex), rootfs_key(&hex)]
    );
    let (dir, fetched) = fetch_image(store.as_ref(), &artifact.digest, &tmp.path().join("cache"))
        .await
        .unwrap();
    assert_eq!(&fetched, c);
    let img = dir.join("rootfs.ext4");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), c.rootfs_bytes);

    // The filesystem holds what the RUN steps made.
    let root = debugfs(&img, "ls -l /");
    for name in ["bin", "data", "etc", "tmp"] {
        assert!(
            root.split_whitespace().any(|w| w == name),
            "{name} missing in /: {root}"
        );
    }
    assert_eq!(
        debugfs(&img, "cat /data/hello.txt").trim(),
        "from-build-arg"
    );
    let bin = debugfs(&img, "ls -l /bin");
    assert!(bin.contains("busybox") && bin.contains("sh"), "{bin}");
    let stat = debugfs(&img, "stat /bin/busybox");
    assert!(
        stat.contains("Mode:  0755") || stat.contains("Mode: 0755"),
        "{stat}"
    );
    assert_eq!(
        std::fs::metadata(busybox()).unwrap().len().to_string(),
        stat.split("Size: ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_default()
    );
    // /tmp/gone was deleted by a later layer: applied as a whiteout.
    assert!(debugfs_exists(&img, "/tmp"));
    assert!(!debugfs_exists(&img, "/tmp/gone"), "whiteout not applied");
    assert!(
        log.contains("whiteouts"),
        "exporter stats missing from the log"
    );
    assert!(
        log.lines().iter().any(|l| l.text.contains("STEP")),
        "backend output not in the log"
    );

    // A second fetch is served from the verified cache.
    let (dir2, _) = fetch_image(store.as_ref(), &artifact.digest, &tmp.path().join("cache"))
        .await
        .unwrap();
    assert_eq!(dir, dir2);
}

#[tokio::test]
async fn same_build_twice_uploads_once_with_a_stable_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(
        &tmp.path().join("src"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo stamp > /stamp\"]\nCMD [\"/bin/busybox\", \"cat\", \"/stamp\"]\n",
    );
    let store = Arc::new(CountingStore::new(LocalStore::new(
        tmp.path().join("store"),
    )));
    let (first_builder, _) = buildah_builder(store.clone(), &tmp.path().join("data1"));
    let first = first_builder
        .build(
            Source::Local(ctx.clone()),
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap();
    assert!(first.uploaded);
    assert_eq!(store.puts(), 2, "rootfs.ext4 and config.json");

    // A second builder with fresh backend storage (no layer cache): the
    // image is rebuilt from scratch and must come out with the same digest.
    let (second_builder, calls) = buildah_builder(store.clone(), &tmp.path().join("data2"));
    let log = MemoryLog::new();
    let second = second_builder
        .build(Source::Local(ctx), BuildOptions::default(), &log)
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the image is built again");
    assert_eq!(
        second.digest, first.digest,
        "digest is stable across builds"
    );
    assert!(!second.uploaded);
    assert_eq!(store.puts(), 2, "nothing uploaded the second time");
    assert_eq!(second.rootfs_sha256, first.rootfs_sha256);
    assert!(log.contains("nothing to upload"));
}

#[tokio::test]
async fn failing_run_fails_once_with_its_log_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(
        &tmp.path().join("src"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo compiling-user-code; echo user-code-broke >&2; exit 7\"]\n",
    );
    let store = Arc::new(CountingStore::new(LocalStore::new(
        tmp.path().join("store"),
    )));
    let (builder, calls) = buildah_builder(store.clone(), &tmp.path().join("data"));
    let log = MemoryLog::new();
    let err = builder
        .build(Source::Local(ctx), BuildOptions::default(), &log)
        .await
        .unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a user fault is not retried"
    );
    assert_eq!(err.fault(), FaultKind::User);
    assert!(!err.is_retryable());
    let BuildError::User { message, log_tail } = &err else {
        panic!("expected a user fault, got {err}")
    };
    assert!(message.contains("exit status 7"), "{message}");
    assert!(
        log_tail.iter().any(|l| l.contains("user-code-broke")),
        "{log_tail:?}"
    );
    assert!(
        err.to_string().contains("user-code-broke"),
        "the error shows the log tail: {err}"
    );
    assert!(!log.contains("retrying"));
    assert_eq!(store.puts(), 0);
}

#[tokio::test]
async fn dockerfile_syntax_error_is_a_user_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(
        &tmp.path().join("src"),
        "FROM scratch\nFROBNICATE everything\n",
    );
    let store = Arc::new(LocalStore::new(tmp.path().join("store")));
    let (builder, calls) = buildah_builder(store, &tmp.path().join("data"));
    let err = builder
        .build(
            Source::Local(ctx),
            BuildOptions::default(),
            &MemoryLog::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.fault(), FaultKind::User, "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(err.to_string().contains("FROBNICATE"), "{err}");
}

#[tokio::test]
async fn bad_inputs_fail_before_building_with_the_cause_named() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::new(tmp.path().join("store")));
    let (mut builder, calls) = buildah_builder(store.clone(), &tmp.path().join("data"));
    let log = MemoryLog::new();

    // No Dockerfile.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("main.go"), "package main").unwrap();
    let err = builder
        .build(Source::Local(empty.clone()), BuildOptions::default(), &log)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BuildError::Input(InputError::NoDockerfile { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("no Dockerfile"), "{err}");

    // A Dockerfile path escaping the source directory.
    std::fs::write(tmp.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let opts = BuildOptions {
        dockerfile: PathBuf::from("../Dockerfile"),
        ..Default::default()
    };
    let err = builder
        .build(Source::Local(empty.clone()), opts, &log)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Input(InputError::DockerfileEscapesContext { .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("escapes the build context"),
        "{err}"
    );

    // A missing source directory.
    let err = builder
        .build(
            Source::Local(tmp.path().join("nope")),
            BuildOptions::default(),
            &log,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, BuildError::Input(InputError::SourceNotFound(_))),
        "{err}"
    );

    // Unreachable git URLs: a closed loopback port and a missing path.
    let url = format!("http://127.0.0.1:{}/app.git", free_port());
    let err = builder
        .build(
            Source::Git {
                url: url.clone(),
                rev: Default::default(),
            },
            BuildOptions::default(),
            &log,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::Input(InputError::GitUnreachable { url: u, .. }) if *u == url),
        "{err}"
    );
    assert!(err.to_string().contains("unreachable"), "{err}");
    let url = format!("file://{}/no-such-repo", tmp.path().display());
    let err = builder
        .build(
            Source::Git {
                url,
                rev: Default::default(),
            },
            BuildOptions::default(),
            &log,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, BuildError::Input(InputError::GitUnreachable { .. })),
        "{err}"
    );

    // A context above the configured limit.
    let big = busybox_context(
        &tmp.path().join("big"),
        "FROM scratch\nCOPY busybox /bin/busybox\n",
    );
    let mut cfg = builder.config().clone();
    cfg.max_context_bytes = 64 * 1024;
    let backend = CountingBackend {
        inner: builder::BuildahBackend::new(&tmp.path().join("data/buildah")).unwrap(),
        calls: calls.clone(),
    };
    builder = builder::Builder::with_backend(store, Box::new(backend), cfg);
    let err = builder
        .build(Source::Local(big), BuildOptions::default(), &log)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Input(InputError::ContextTooLarge { limit: 65536, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("too large"), "{err}");

    assert_eq!(err.fault(), FaultKind::User);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "no bad input reached the backend"
    );
}
