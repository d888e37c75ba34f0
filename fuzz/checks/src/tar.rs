//! Source tarballs: `builder::source::extract_tarball` (uploads and GitHub
//! tarballs) must write nothing outside its destination, whatever the
//! archive says: no path, no symlink followed out, no hard link to a file
//! outside.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a directory holds: relative path -> (inode, content or link target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            let what = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .map(|t| t.into_os_string().into_encoded_bytes())
                    .unwrap_or_default()
            } else if meta.is_dir() {
                stack.push(path.clone());
                Vec::new()
            } else {
                std::fs::read(&path).unwrap_or_default()
            };
            out.insert(rel, (meta.ino(), what));
        }
    }
    out
}

/// Where the destination sits in the sandbox: deep enough that a few
/// `..` still land inside the sandbox, where the check sees them.
const DEST: &str = "s1/s2/s3/ctx";

/// The fuzzer's bytes are the tar stream (gzip'd here, as uploads are). A
/// sandbox holds `outside/` (a file and a directory an escape would touch),
/// the archive, and the destination [`DEST`]: after extraction, refused or
/// not, nothing but the destination has changed, and no file in it is a
/// hard link to a file outside it.
pub fn extract(data: &[u8]) {
    let sandbox = tempfile::tempdir().expect("temp dir");
    let root = sandbox.path();
    let outside = root.join("outside");
    std::fs::create_dir_all(outside.join("dir")).expect("outside dir");
    std::fs::write(outside.join("secret"), b"the captain's admin token").expect("outside file");
    let archive = root.join("src.tar.gz");
    {
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&archive).expect("archive"),
            flate2::Compression::none(),
        );
        gz.write_all(data).expect("gzip");
        gz.finish().expect("gzip");
    }
    let ctx = root.join(DEST);
    std::fs::create_dir_all(ctx.parent().expect("parent")).expect("sandbox dirs");
    let before = snapshot(root);

    let result = builder::source::extract_tarball(&archive, &ctx, 1 << 20, "fuzz");

    let mut after = snapshot(root);
    after.retain(|rel, _| !rel.starts_with(DEST));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "paths outside the destination (result: {result:?})"
    );
    assert_eq!(
        before, after,
        "files outside the destination changed (result: {result:?})"
    );
    let outside_inodes: Vec<u64> = after.values().map(|(ino, _)| *ino).collect();
    for (rel, (ino, _)) in snapshot(&ctx) {
        assert!(
            !outside_inodes.contains(&ino),
            "{DEST}/{} is a hard link to a file outside (result: {result:?})",
            rel.display()
        );
    }
    // An accepted context is copied by the build (`COPY`): each symlink in
    // it, followed by the kernel, must stay inside.
    if result.is_ok() {
        let top = std::fs::canonicalize(&ctx).expect("ctx exists");
        for (rel, _) in snapshot(&ctx) {
            let path = ctx.join(&rel);
            let is_link =
                std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
            if let (true, Ok(real)) = (is_link, std::fs::canonicalize(&path)) {
                assert!(
                    real.starts_with(&top),
                    "{DEST}/{} leads to {} outside the context",
                    rel.display(),
                    real.display()
                );
            }
        }
    }
}
