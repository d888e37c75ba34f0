//! Build helpers of the captain tests: busybox `FROM scratch` sources and
//! a real buildah builder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use builder::store::ObjectStore;
use builder::{Builder, BuilderConfig, RetryPolicy};

pub fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("this test needs a static busybox (apt-get install busybox-static)")
}

/// A source directory with busybox and `dockerfile`, as a .tar.gz whose
/// entries sit under `src/` (what `zw deploy` uploads).
pub fn source_tarball(dir: &Path, dockerfile: &str) -> Vec<u8> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(busybox(), src.join("busybox")).unwrap();
    std::fs::write(src.join("Dockerfile"), dockerfile).unwrap();
    let out = dir.join("src.tar.gz");
    let st = std::process::Command::new("tar")
        .arg("czf")
        .arg(&out)
        .arg("-C")
        .arg(dir)
        .arg("src")
        .status()
        .expect("tar runs");
    assert!(st.success());
    std::fs::read(out).unwrap()
}

/// A buildah builder over `store`, with no per-step retries so that an
/// infrastructure fault reaches the queue.
pub fn make_builder(data: &Path, store: Arc<dyn ObjectStore>) -> Arc<Builder> {
    let mut cfg = BuilderConfig::new(data.join("builder"));
    cfg.retry = RetryPolicy::none();
    let backend =
        builder::BuildahBackend::new(&data.join("builder").join("buildah")).expect("buildah");
    Arc::new(Builder::with_backend(store, Box::new(backend), cfg))
}
