//! Benchmark: OCI image -> ext4 with our exporter (apply layers with
//! whiteouts + `mkfs.ext4 -d`) against the reference path (import the same
//! OCI layout with `buildah from`, export its flattened root with `tar`,
//! unpack it, `mkfs.ext4 -d`). Prints one JSON line per measure:
//! {"bench":..,"ours":..,"reference":..,"ratio":..}.
//!
//! Needs root, buildah, e2fsprogs and busybox-static. Run:
//! `cargo bench -p builder --bench export`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use builder::backend::{BackendRequest, BuildBackend, BuildahBackend};
use builder::ext4::{Ext4Options, make_ext4};
use builder::oci::{apply_image, measure_tree, read_layout};

/// Files of the synthetic app: many small, some large, pseudo-random
/// (incompressible-ish) content from a fixed seed.
fn write_payload(dir: &Path) -> u64 {
    let mut state: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut total = 0;
    for d in 0..40 {
        let sub = dir.join(format!("pkg{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            let size = if f == 0 {
                1 << 20
            } else {
                (next() % 16384) as usize
            };
            let data: Vec<u8> = (0..size).map(|_| (next() & 0xff) as u8).collect();
            std::fs::write(sub.join(format!("file{f:03}.bin")), &data).unwrap();
            total += size as u64;
        }
    }
    total
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn buildah(state: &Path) -> Command {
    let mut c = Command::new("buildah");
    c.arg("--root")
        .arg(state.join("storage"))
        .arg("--runroot")
        .arg(state.join("run"))
        .args(["--storage-driver", "vfs"]);
    c
}

#[tokio::main]
async fn main() {
    // buildah derives an image name from the OCI path: keep it lowercase.
    let tmp = tempfile::Builder::new()
        .prefix(&format!("zw-bench-{}", std::process::id()))
        .rand_bytes(0)
        .tempdir()
        .unwrap();
    let base = tmp.path();
    let ctx = base.join("ctx");
    std::fs::create_dir_all(ctx.join("app")).unwrap();
    std::fs::copy("/bin/busybox", ctx.join("busybox")).expect("busybox-static at /bin/busybox");
    let payload = write_payload(&ctx.join("app"));
    // Two layers of app files, then a layer deleting part of them (whiteouts).
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY app /app\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox --install -s /bin && cp -r /app/pkg00 /app/copy && rm -rf /app/pkg01 /app/pkg02\"]\nCMD [\"/bin/sh\"]\n",
    )
    .unwrap();
    let state = base.join("buildah");
    let backend = BuildahBackend::new(&state).expect("buildah");
    let oci = base.join("oci");
    let req = BackendRequest {
        context_dir: ctx.clone(),
        dockerfile: ctx.join("Dockerfile"),
        build_args: vec![],
        tag: "localhost/zw-bench:latest".into(),
        oci_dir: oci.clone(),
    };
    backend
        .build(&req, &builder::NullLog)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let opts = Ext4Options::default();

    // Ours.
    let t = Instant::now();
    let image = read_layout(&oci, Some("latest")).unwrap();
    let ours_root = base.join("ours-root");
    apply_image(&image, &ours_root).unwrap();
    let ours_img = base.join("ours.ext4");
    make_ext4(&ours_root, &ours_img, "bench", &opts).unwrap();
    let ours_secs = t.elapsed().as_secs_f64();
    let ours_tree = measure_tree(&ours_root).unwrap();

    // Reference: buildah from + mount, tar export, untar, mkfs.ext4 -d.
    let t = Instant::now();
    let ctr = run(buildah(&state)
        .args(["from", "--pull-never"])
        .arg(format!("oci:{}:latest", oci.display())));
    let mnt = PathBuf::from(run(buildah(&state).arg("mount").arg(&ctr)));
    let export = base.join("export.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&mnt)
        .arg("--numeric-owner")
        .arg("-cf")
        .arg(&export)
        .arg("."));
    let ref_root = base.join("ref-root");
    std::fs::create_dir_all(&ref_root).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&ref_root)
        .arg("--numeric-owner")
        .arg("-xpf")
        .arg(&export));
    let ref_tree = measure_tree(&ref_root).unwrap();
    let ref_img = base.join("reference.ext4");
    let size = builder::ext4::image_size(ref_tree.blocks, ref_tree.inodes, &opts);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-d"])
        .arg(&ref_root)
        .arg(&ref_img)
        .arg(format!("{}k", size / 1024)));
    let ref_secs = t.elapsed().as_secs_f64();
    let _ = run(buildah(&state).arg("rm").arg(&ctr));

    assert_eq!(
        ours_tree.inodes, ref_tree.inodes,
        "both roots hold the same entries"
    );
    assert_eq!(
        ours_tree.apparent_bytes, ref_tree.apparent_bytes,
        "both roots hold the same bytes"
    );
    let ours_bytes = std::fs::metadata(&ours_img).unwrap().len();
    let ref_bytes = std::fs::metadata(&ref_img).unwrap().len();
    let used = |img: &Path| -> u64 {
        let out = run(Command::new("dumpe2fs").arg("-h").arg(img));
        let field = |name: &str| -> u64 {
            out.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        (field("Block count") - field("Free blocks")) * field("Block size")
    };
    eprintln!(
        "payload {payload} bytes in context; layers {}; root {} inodes, {} bytes; used in image: ours {} reference {}",
        image.manifest.layers.len(),
        ours_tree.inodes,
        ours_tree.apparent_bytes,
        used(&ours_img),
        used(&ref_img)
    );
    println!(
        "{}",
        serde_json::json!({"bench": "oci_to_ext4_seconds", "ours": ours_secs, "reference": ref_secs, "ratio": ours_secs / ref_secs})
    );
    println!(
        "{}",
        serde_json::json!({"bench": "oci_to_ext4_image_bytes", "ours": ours_bytes, "reference": ref_bytes, "ratio": ours_bytes as f64 / ref_bytes as f64})
    );
}
