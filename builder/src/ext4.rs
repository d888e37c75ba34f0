//! Making an ext4 image of a directory with `mkfs.ext4 -d` (no mount, no root
//! needed for the filesystem itself).

use std::path::Path;
use std::process::Command;

use sha2::{Digest as _, Sha256};

use crate::oci::{ExportError, measure_tree};
use crate::tools::find_tool;

/// How to size and label the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Options {
    /// Free space added on top of the content, in percent of it.
    pub headroom_percent: u64,
    /// Free space added on top of the content and the percentage.
    pub min_free_bytes: u64,
    pub label: String,
}

impl Default for Ext4Options {
    fn default() -> Self {
        Self {
            headroom_percent: 25,
            min_free_bytes: 64 << 20,
            label: "zw-rootfs".into(),
        }
    }
}

/// What was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Ext4Stats {
    pub image_bytes: u64,
    pub content_bytes: u64,
    pub inodes: u64,
}

/// A filesystem UUID derived from `seed` (for stable metadata across rebuilds).
pub fn uuid_from_seed(seed: &str) -> String {
    let h = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40; // version 4 layout
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// The image size for content of `blocks` 4 KiB blocks and `inodes` inodes.
pub fn image_size(blocks: u64, inodes: u64, opts: &Ext4Options) -> u64 {
    let content = blocks * 4096 + inodes * 256;
    let size = content + content * opts.headroom_percent / 100 + opts.min_free_bytes;
    size.div_ceil(1 << 20) * (1 << 20)
}

/// Make `out` (a new file) an ext4 filesystem holding the tree at `root`.
/// `seed` makes UUID and directory hash seed stable (pass the image digest).
pub fn make_ext4(
    root: &Path,
    out: &Path,
    seed: &str,
    opts: &Ext4Options,
) -> Result<Ext4Stats, ExportError> {
    let mkfs = find_tool("mkfs.ext4").ok_or(ExportError::ToolMissing {
        tool: "mkfs.ext4",
        package: "Debian: apt-get install e2fsprogs",
    })?;
    let tree = measure_tree(root).map_err(|source| ExportError::Io {
        what: "measure",
        path: root.to_path_buf(),
        source,
    })?;
    let uuid = uuid_from_seed(seed);
    let inodes = tree.inodes + tree.inodes / 4 + 1024;
    let mut size = image_size(tree.blocks, tree.inodes, opts);
    // The estimate may fall short for trees of many large directories: grow
    // and try again, a bounded number of times.
    let mut last_err = None;
    for _ in 0..3 {
        let _ = std::fs::remove_file(out);
        let output = Command::new(&mkfs)
            .arg("-q")
            .arg("-F")
            .args(["-b", "4096", "-m", "0", "-I", "256"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-L")
            .arg(&opts.label)
            .arg("-U")
            .arg(&uuid)
            .arg("-E")
            .arg(format!("hash_seed={uuid},root_owner=0:0"))
            .arg("-d")
            .arg(root)
            .arg(out)
            .arg(format!("{}k", size / 1024))
            .env("LC_ALL", "C")
            .output()
            .map_err(|source| ExportError::Io {
                what: "run",
                path: mkfs.clone(),
                source,
            })?;
        if output.status.success() {
            return Ok(Ext4Stats {
                image_bytes: size,
                content_bytes: tree.apparent_bytes,
                inodes: tree.inodes,
            });
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let out_of_space = stderr.contains("Could not allocate block")
            || stderr.contains("Could not allocate inode")
            || stderr.contains("No free space in the filesystem");
        last_err = Some(ExportError::Tool {
            tool: "mkfs.ext4",
            status: output.status.to_string(),
            stderr,
        });
        if !out_of_space {
            break;
        }
        size *= 2;
    }
    let _ = std::fs::remove_file(out);
    Err(last_err.expect("loop ran at least once"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_stable_and_well_formed() {
        let a = uuid_from_seed("sha256:abc");
        assert_eq!(a, uuid_from_seed("sha256:abc"));
        assert_ne!(a, uuid_from_seed("sha256:abd"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn size_has_headroom() {
        let opts = Ext4Options::default();
        let s = image_size(1000, 100, &opts);
        assert!(s >= 1000 * 4096 + (64 << 20));
        assert_eq!(s % (1 << 20), 0);
    }
}
