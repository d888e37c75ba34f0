//! The artifact format shared with the follower.
//!
//! An image in the store is two objects under `images/<hex>/`:
//! `rootfs.ext4` (the root filesystem) and `config.json` (a [`StoredConfig`]:
//! the [`ImageConfig`] plus integrity data).
//!
//! # The digest
//!
//! `mkfs.ext4 -d` is not byte-reproducible (inode ctimes come from the
//! unpacked tree, directory order from the host filesystem), so the digest
//! cannot be the hash of `rootfs.ext4`. It is instead the sha256 of a
//! canonical [`ImageIdentity`]: the format version, the exporter version, the
//! OCI manifest digest of the built image (reproducible: the buildah backend
//! builds with `--timestamp 0`) and the runtime config. Building the same
//! source twice gives the same digest, so the second build finds the image in
//! the store and uploads nothing. `config.json` carries the sha256 and size
//! of `rootfs.ext4`, so [`crate::fetch_image`] can check the whole chain:
//! digest -> config.json -> rootfs.ext4.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Version of the artifact layout and of the exporter. Bump when the ext4
/// produced from the same OCI image would differ in meaning.
pub const FORMAT: &str = "zeitwork-image/v1";

/// Store key of an image's root filesystem.
pub fn rootfs_key(hex: &str) -> String {
    format!("images/{hex}/rootfs.ext4")
}

/// Store key of an image's config.
pub fn config_key(hex: &str) -> String {
    format!("images/{hex}/config.json")
}

/// How a VM runs the image (from the Dockerfile's ENTRYPOINT, CMD, ENV,
/// WORKDIR, USER and EXPOSE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `K=V` strings.
    pub env: Vec<String>,
    pub workdir: String,
    pub user: String,
    pub exposed_ports: Vec<u16>,
    /// Size of `rootfs.ext4` in bytes.
    pub rootfs_bytes: u64,
}

/// What `config.json` holds: the [`ImageConfig`] fields at the top level
/// (so it also parses as an `ImageConfig`) plus integrity data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConfig {
    #[serde(flatten)]
    pub config: ImageConfig,
    pub format: String,
    /// `sha256:<hex>` of the OCI manifest the image was exported from.
    pub oci_manifest: String,
    /// `sha256:<hex>` of `rootfs.ext4`.
    pub rootfs_sha256: String,
}

/// The content the digest is computed from (see the module docs).
#[derive(Debug, Serialize)]
pub struct ImageIdentity<'a> {
    pub format: &'a str,
    pub oci_manifest: &'a str,
    pub entrypoint: &'a [String],
    pub cmd: &'a [String],
    pub env: &'a [String],
    pub workdir: &'a str,
    pub user: &'a str,
    pub exposed_ports: &'a [u16],
}

/// The digest (`sha256:<hex>`) of an image built from the OCI manifest
/// `oci_manifest` with runtime config `config` (its `rootfs_bytes` is not
/// part of the identity).
pub fn image_digest(format: &str, oci_manifest: &str, config: &ImageConfig) -> String {
    let identity = ImageIdentity {
        format,
        oci_manifest,
        entrypoint: &config.entrypoint,
        cmd: &config.cmd,
        env: &config.env,
        workdir: &config.workdir,
        user: &config.user,
        exposed_ports: &config.exposed_ports,
    };
    // serde_json writes struct fields in declaration order: canonical.
    let bytes = serde_json::to_vec(&identity).expect("identity serializes");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

impl StoredConfig {
    /// The digest this config belongs to.
    pub fn digest(&self) -> String {
        image_digest(&self.format, &self.oci_manifest, &self.config)
    }
}

/// The hex part of a `sha256:<64 hex>` digest, or `None` if malformed.
pub fn digest_hex(digest: &str) -> Option<&str> {
    digest.parse::<zw_util::Sha256Digest>().ok()?;
    digest.strip_prefix("sha256:")
}

/// A built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    /// `sha256:<64 hex>`.
    pub digest: String,
    pub config: ImageConfig,
    /// `sha256:<hex>` of `rootfs.ext4`.
    pub rootfs_sha256: String,
    pub oci_manifest: String,
    /// Store keys of the two objects.
    pub rootfs_key: String,
    pub config_key: String,
    /// False when the image was already in the store (nothing uploaded).
    pub uploaded: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec!["-c".into(), "echo".into()],
            env: vec!["A=1".into()],
            workdir: "/".into(),
            user: "".into(),
            exposed_ports: vec![8080],
            rootfs_bytes: 1,
        }
    }

    #[test]
    fn digest_ignores_rootfs_size_but_not_config() {
        let a = image_digest(FORMAT, "sha256:aa", &cfg());
        let mut c = cfg();
        c.rootfs_bytes = 999;
        assert_eq!(a, image_digest(FORMAT, "sha256:aa", &c));
        c.env.push("B=2".into());
        assert_ne!(a, image_digest(FORMAT, "sha256:aa", &c));
        assert_ne!(a, image_digest(FORMAT, "sha256:ab", &cfg()));
        assert!(digest_hex(&a).is_some());
    }

    #[test]
    fn stored_config_parses_as_image_config() {
        let stored = StoredConfig {
            config: cfg(),
            format: FORMAT.into(),
            oci_manifest: "sha256:aa".into(),
            rootfs_sha256: "sha256:bb".into(),
        };
        let json = serde_json::to_string(&stored).unwrap();
        let plain: ImageConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(plain, cfg());
        let back: StoredConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, stored);
    }

    #[test]
    fn digest_hex_rejects_malformed() {
        assert!(digest_hex("sha256:abc").is_none());
        assert!(digest_hex(&format!("sha512:{}", "a".repeat(64))).is_none());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_none());
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_some());
    }
}
