//! Images of a node on another machine than the captain: a real captain
//! (SQLite) with a real buildah builder over its local object store builds
//! a `FROM scratch` busybox image, and
//! - `builder::CaptainStore` + `fetch_image` download it over loopback with
//!   the node token of a registration (byte-equal to the captain's store,
//!   cached after the first time, following the token's rotation), give
//!   NotFound for an unknown digest, refuse a corrupted rootfs or config,
//!   and fail transiently when the captain is down;
//! - a follower whose data dir holds no store converges an instance of a
//!   release whose image exists only in the captain's store.
//!
//! Every address is on loopback; every wait is bounded.

#[path = "common/secrets.rs"]
mod secrets_common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use builder::store::{CaptainStore, ObjectStore, StoreError, TokenSource};
use builder::{BuildOptions, Builder, BuilderConfig, FetchError, LocalStore, NullLog, Source};
use follower::captain::{Captain as _, HttpCaptain, NodeRegistration};
use follower::runtime::RuntimeChoice;
use secrets_common::*;
use serde_json::json;

const DOCKERFILE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo built-on-the-captain > /stamp\"]\nCMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\nEXPOSE 8080\n";

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("this test needs a static busybox (apt-get install busybox-static)")
}

struct Remote {
    data: PathBuf,
    captain: captain::Captain,
    api: Api,
    /// The image, built into the captain's store and recorded.
    digest: String,
    hex: String,
}

impl Remote {
    fn stored(&self, file: &str) -> PathBuf {
        self.data
            .join("store")
            .join("images")
            .join(&self.hex)
            .join(file)
    }
}

/// A captain on `root/captain` whose builder (buildah) writes into
/// `<captain data>/store`; the busybox image built there and recorded by
/// `POST /v1/images`.
async fn captain_with_image(root: &Path) -> Remote {
    let data = root.join("captain");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(data.join("store")));
    let mut bcfg = BuilderConfig::new(data.join("builder"));
    bcfg.retry = builder::RetryPolicy::none();
    let backend = builder::BuildahBackend::new(&data.join("builder").join("buildah"))
        .expect("buildah is installed");
    let b = Arc::new(Builder::with_backend(store, Box::new(backend), bcfg));

    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(busybox(), src.join("busybox")).unwrap();
    std::fs::write(src.join("Dockerfile"), DOCKERFILE).unwrap();
    let t = Instant::now();
    let art = b
        .build(Source::Local(src), BuildOptions::default(), &NullLog)
        .await
        .expect("the busybox image builds");
    eprintln!("build: {:?}", t.elapsed());

    let mut cfg = captain::Config::new(&data);
    cfg.builder = Some(b);
    cfg.poll_interval = Duration::from_millis(500);
    cfg.rollout_interval = Duration::from_millis(200);
    cfg.heartbeat_interval = Duration::from_secs(1);
    let captain = captain::Captain::start(cfg).await.unwrap();
    let api = Api {
        base: format!("http://{}", captain.local_addr()),
        token: captain.admin_token().unwrap().to_string(),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    };
    api.ok(
        reqwest::Method::POST,
        "/v1/images",
        Some(json!({"digest": art.digest, "size_bytes": art.config.rootfs_bytes})),
    )
    .await;
    let hex = art.digest.strip_prefix("sha256:").unwrap().to_string();
    Remote {
        data,
        captain,
        api,
        digest: art.digest,
        hex,
    }
}

fn registration(id: &str) -> NodeRegistration {
    NodeRegistration {
        id: id.into(),
        address: "::1".into(),
        region: "local".into(),
        cpus: 1,
        memory_bytes: 1 << 30,
        disk_bytes: 1 << 30,
        age_recipient: String::new(),
        api_url: "http://[::1]:9".into(),
        proxy_addr: String::new(),
    }
}

fn store_error(e: &FetchError) -> &StoreError {
    match e {
        FetchError::Store { source, .. } => source,
        other => panic!("expected a store error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captain_serves_images_to_fetch_image() {
    let tmp = tempfile::tempdir().unwrap();
    let r = captain_with_image(tmp.path()).await;

    // A node registers (as a follower does) and fetches with its token.
    let node = Arc::new(HttpCaptain::new(&r.api.base, &r.api.token));
    node.register(&registration("node-remote")).await.unwrap();
    let token1 = node.token();
    assert_ne!(token1, r.api.token, "registration issued a node token");
    let store = CaptainStore::new(&r.api.base, node.token_source());

    // First fetch: everything over loopback, byte-equal to the store.
    let cache = tmp.path().join("cache");
    let t = Instant::now();
    let (dir, config) = builder::fetch_image(&store, &r.digest, &cache)
        .await
        .unwrap();
    let took = t.elapsed();
    assert_eq!(dir, cache.join(&r.hex));
    for file in ["rootfs.ext4", "config.json"] {
        assert!(
            std::fs::read(dir.join(file)).unwrap() == std::fs::read(r.stored(file)).unwrap(),
            "{file} differs from the captain's store"
        );
    }
    assert_eq!(config.exposed_ports, vec![8080]);
    let size = std::fs::metadata(r.stored("rootfs.ext4")).unwrap().len();
    let t = Instant::now();
    std::fs::copy(r.stored("rootfs.ext4"), tmp.path().join("cp.ext4")).unwrap();
    let cp = t.elapsed();
    eprintln!(
        "fetch of {size} bytes over loopback (download + sha256 + fsync): {took:?}; cp of the same rootfs: {cp:?}"
    );

    // Second fetch: from the cache, the files are not rewritten.
    let before = std::fs::metadata(dir.join("rootfs.ext4")).unwrap();
    let t = Instant::now();
    let (again, _) = builder::fetch_image(&store, &r.digest, &cache)
        .await
        .unwrap();
    eprintln!("cached fetch: {:?}", t.elapsed());
    let after = std::fs::metadata(again.join("rootfs.ext4")).unwrap();
    assert_eq!(again, dir);
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec())
    );

    // The token rotates at the next registration: the store asks with the
    // new one (the old one is refused by now).
    node.register(&registration("node-remote")).await.unwrap();
    assert_ne!(node.token(), token1);
    let stale: TokenSource = Arc::new(move || token1.clone());
    let stale = CaptainStore::new(&r.api.base, stale);
    let e = builder::fetch_image(&stale, &r.digest, &tmp.path().join("stale"))
        .await
        .unwrap_err();
    assert!(store_error(&e).to_string().contains("401"), "{e:?}");
    builder::fetch_image(&store, &r.digest, &tmp.path().join("rotated"))
        .await
        .unwrap();
    // The image row's id names the same download.
    let img = r
        .api
        .ok(
            reqwest::Method::GET,
            &format!("/v1/images/{}", r.digest),
            None,
        )
        .await;
    let by_id = r
        .api
        .http
        .get(format!(
            "{}/v1/images/{}/download?part=config",
            r.api.base,
            img["id"].as_str().unwrap()
        ))
        .bearer_auth(node.token())
        .send()
        .await
        .unwrap();
    assert_eq!(by_id.status(), 200);
    assert_eq!(
        by_id.bytes().await.unwrap().as_ref(),
        std::fs::read(r.stored("config.json")).unwrap().as_slice()
    );

    // An unknown digest is not found, for good.
    let unknown = format!("sha256:{}", "0".repeat(64));
    let e = builder::fetch_image(&store, &unknown, &tmp.path().join("unknown"))
        .await
        .unwrap_err();
    assert!(store_error(&e).is_not_found(), "{e:?}");
    assert!(!e.is_transient());

    // A rootfs corrupted in the captain's store (same size) is refused,
    // and nothing is left in the cache.
    let rootfs = std::fs::read(r.stored("rootfs.ext4")).unwrap();
    let mut bad = rootfs.clone();
    bad[2048] ^= 0xff;
    std::fs::write(r.stored("rootfs.ext4"), &bad).unwrap();
    let corrupt = tmp.path().join("corrupt");
    let e = builder::fetch_image(&store, &r.digest, &corrupt)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FetchError::Corrupt {
                what: "rootfs.ext4 sha256",
                ..
            }
        ),
        "{e:?}"
    );
    // Truncated: the size check.
    std::fs::write(r.stored("rootfs.ext4"), &rootfs[..rootfs.len() / 2]).unwrap();
    let e = builder::fetch_image(&store, &r.digest, &corrupt)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FetchError::Corrupt {
                what: "rootfs.ext4 size",
                ..
            }
        ),
        "{e:?}"
    );
    std::fs::write(r.stored("rootfs.ext4"), &rootfs).unwrap();
    // A config that does not hash to the digest.
    let config = std::fs::read_to_string(r.stored("config.json")).unwrap();
    let tampered = config.replacen("8080", "8081", 1);
    assert_ne!(tampered, config);
    std::fs::write(r.stored("config.json"), &tampered).unwrap();
    let e = builder::fetch_image(&store, &r.digest, &corrupt)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FetchError::Corrupt {
                what: "config.json identity",
                ..
            }
        ),
        "{e:?}"
    );
    std::fs::write(r.stored("config.json"), &config).unwrap();
    let left: Vec<_> = std::fs::read_dir(&corrupt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a refused image left {left:?}");
    builder::fetch_image(&store, &r.digest, &corrupt)
        .await
        .unwrap();

    // The captain is down: a fetch fails transiently; a cached image is
    // still there.
    r.captain.shutdown().await;
    let t = Instant::now();
    let e = builder::fetch_image(&store, &r.digest, &tmp.path().join("down"))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(
        matches!(
            store_error(&e),
            StoreError::Remote {
                transient: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    builder::fetch_image(&store, &r.digest, &cache)
        .await
        .unwrap();

    // Read-only.
    let e = store
        .delete(&format!("images/{}/rootfs.ext4", r.hex))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::ReadOnly { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_store_boots_an_image_of_the_captain() {
    let _logs = log_buffer();
    let tmp = tempfile::tempdir().unwrap();
    let r = captain_with_image(tmp.path()).await;
    let p = r
        .api
        .ok(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"name": "web", "repo": "https://example.invalid/web.git"})),
        )
        .await;
    let app = r
        .api
        .ok(
            reqwest::Method::POST,
            &format!("/v1/projects/{}/apps", p["id"].as_str().unwrap()),
            Some(json!({"name": "web", "env": "production"})),
        )
        .await;

    // A node with nothing but a captain URL and a token: no image store.
    let fdata = tmp.path().join("node");
    let mut fcfg =
        follower::FollowerConfig::new(&fdata, r.data.join("meta.git").display().to_string());
    fcfg.node_id = Some("node-far".into());
    fcfg.captain_url = Some(r.api.base.clone());
    fcfg.token = r.api.token.clone();
    fcfg.runtime = RuntimeChoice::Process;
    fcfg.instance_range = Some(instance_range());
    fcfg.poll_interval = Duration::from_millis(500);
    fcfg.reconcile_interval = Duration::from_millis(200);
    fcfg.heartbeat_interval = Duration::from_secs(1);
    assert!(fcfg.images.is_none());
    let f = follower::Follower::start(fcfg).await.unwrap();

    let d = r
        .api
        .ok(
            reqwest::Method::POST,
            "/v1/deployments",
            Some(json!({"app_id": app["id"], "image_digest": r.digest, "port": 8080, "health_check_path": "/stamp"})),
        )
        .await;
    let release = d["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let rec = wait_for(120, "a healthy instance on the far node", || {
        healthy_of(&f, &release)
    })
    .await;
    eprintln!(
        "deploy -> healthy on a node without a store: {:?}",
        t.elapsed()
    );

    // It serves the file its image's RUN step wrote.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let page = http
        .get(format!("http://[{}]:{}/stamp", rec.ip, rec.port))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page.trim(), "built-on-the-captain");
    // From the node's image cache, downloaded; there is no local store.
    assert_eq!(
        std::fs::read(fdata.join("images").join(&r.hex).join("rootfs.ext4")).unwrap(),
        std::fs::read(r.stored("rootfs.ext4")).unwrap()
    );
    assert!(!fdata.join("store").exists());

    // The captain sees the rollout through (every instance is on this node).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = r
            .api
            .ok(
                reqwest::Method::GET,
                &format!("/v1/deployments/{release}"),
                None,
            )
            .await;
        if v["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "deployment never ran: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    f.shutdown_and_stop_instances().await;
    r.captain.shutdown().await;
}
