//! Reading an OCI image layout and applying its layers to a directory.
//!
//! Layers are applied in order with the OCI whiteout rules: a `.wh.<name>`
//! entry deletes `<name>` from the lower layers, a `.wh..wh..opq` entry
//! empties its directory of everything the lower layers put there. Paths are
//! resolved inside the root (symlinks included, as a chroot would), so a
//! layer can never write outside it.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::image::ImageConfig;

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// Bound on symlinks followed while resolving one path.
const MAX_SYMLINK_HOPS: u32 = 40;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid OCI layout in {dir}: {message}")]
    Layout { dir: PathBuf, message: String },
    #[error("blob {expected} is corrupt: its content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("unsupported layer media type {0} (supported: tar, tar+gzip)")]
    UnsupportedMediaType(String),
    #[error("layer {layer}: unsafe path {path:?}: {reason}")]
    UnsafePath {
        layer: String,
        path: String,
        reason: &'static str,
    },
    #[error("layer {layer}: {path:?}")]
    Layer {
        layer: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("required tool {tool} was not found on PATH or in /usr/sbin, /sbin ({package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        status: String,
        stderr: String,
    },
}

impl ExportError {
    /// Whether the fault may go away on a retry (I/O such as a full disk).
    pub fn is_transient(&self) -> bool {
        match self {
            ExportError::Io { .. } | ExportError::Layer { .. } => true,
            ExportError::Tool { stderr, .. } => stderr.contains("No space left"),
            _ => false,
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ExportError + use<> {
    let path = path.to_path_buf();
    move |source| ExportError::Io { what, path, source }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
struct OciConfigFile {
    #[serde(default)]
    config: Option<OciRunConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct OciRunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

/// An image in an OCI layout directory.
#[derive(Debug, Clone)]
pub struct OciImage {
    pub dir: PathBuf,
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    pub manifest: Manifest,
    /// The runtime config (`rootfs_bytes` is 0 until the filesystem is made).
    pub config: ImageConfig,
}

fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, ExportError> {
    match digest.parse::<zw_util::Sha256Digest>() {
        Ok(d) => Ok(dir.join("blobs").join("sha256").join(d.hex())),
        Err(_) => Err(ExportError::Layout {
            dir: dir.to_path_buf(),
            message: format!("unsupported digest {digest:?}"),
        }),
    }
}

fn read_verified_blob(dir: &Path, desc: &Descriptor) -> Result<Vec<u8>, ExportError> {
    let path = blob_path(dir, &desc.digest)?;
    let data = fs::read(&path).map_err(io_err("read blob", &path))?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    if actual != desc.digest {
        return Err(ExportError::DigestMismatch {
            expected: desc.digest.clone(),
            actual,
        });
    }
    Ok(data)
}

/// Read the image of an OCI layout: the manifest tagged `tag` if given,
/// else the only (or first) manifest of `index.json`.
pub fn read_layout(dir: &Path, tag: Option<&str>) -> Result<OciImage, ExportError> {
    let index_path = dir.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(io_err("read", &index_path))?;
    let layout_err = |message: String| ExportError::Layout {
        dir: dir.to_path_buf(),
        message,
    };
    let index: Index =
        serde_json::from_slice(&index_bytes).map_err(|e| layout_err(format!("index.json: {e}")))?;
    let desc = match tag {
        Some(tag) => index.manifests.iter().find(|m| {
            m.annotations
                .as_ref()
                .and_then(|a| a.get("org.opencontainers.image.ref.name"))
                .map(String::as_str)
                == Some(tag)
        }),
        None => index.manifests.first(),
    }
    .ok_or_else(|| {
        layout_err(format!(
            "no manifest{} in index.json",
            tag.map(|t| format!(" tagged {t:?}")).unwrap_or_default()
        ))
    })?;
    let manifest_bytes = read_verified_blob(dir, desc)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| layout_err(format!("manifest {}: {e}", desc.digest)))?;
    let config_bytes = read_verified_blob(dir, &manifest.config)?;
    let config: OciConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| layout_err(format!("config {}: {e}", manifest.config.digest)))?;
    Ok(OciImage {
        dir: dir.to_path_buf(),
        manifest_digest: desc.digest.clone(),
        config: image_config(config.config.unwrap_or_default()),
        manifest,
    })
}

fn image_config(c: OciRunConfig) -> ImageConfig {
    let mut ports: Vec<u16> = c
        .exposed_ports
        .unwrap_or_default()
        .keys()
        .filter_map(|k| k.split('/').next().and_then(|p| p.parse().ok()))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        workdir: c
            .working_dir
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: c.user.unwrap_or_default(),
        exposed_ports: ports,
        rootfs_bytes: 0,
    }
}

/// Counts of what applying layers did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    pub layers: usize,
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub file_bytes: u64,
}

/// Apply all layers of `image` in order to the directory `root` (created if missing).
pub fn apply_image(image: &OciImage, root: &Path) -> Result<ApplyStats, ExportError> {
    fs::create_dir_all(root).map_err(io_err("create", root))?;
    let mut stats = ApplyStats::default();
    for layer in &image.manifest.layers {
        let path = blob_path(&image.dir, &layer.digest)?;
        let file = fs::File::open(&path).map_err(io_err("open layer", &path))?;
        let mut hashing = HashingReader {
            inner: io::BufReader::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
        };
        let mt = layer.media_type.as_str();
        if mt.ends_with("+zstd") || mt.ends_with(".zstd") {
            return Err(ExportError::UnsupportedMediaType(mt.to_string()));
        }
        {
            // Detect compression by content, not only by media type (docker
            // save writes uncompressed layers).
            let mut peek = PeekReader::new(&mut hashing);
            let magic = peek.peek(2).map_err(io_err("read layer", &path))?;
            if magic == [0x1f, 0x8b] {
                apply_layer(
                    flate2::read::GzDecoder::new(&mut peek),
                    root,
                    &layer.digest,
                    &mut stats,
                )?;
            } else {
                apply_layer(&mut peek, root, &layer.digest, &mut stats)?;
            }
            // Drain what the tar reader left (padding), for the digest.
            io::copy(&mut peek, &mut io::sink()).map_err(io_err("read layer", &path))?;
        }
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if actual != layer.digest {
            return Err(ExportError::DigestMismatch {
                expected: layer.digest.clone(),
                actual,
            });
        }
        stats.layers += 1;
    }
    Ok(stats)
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct PeekReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> PeekReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }
    fn peek(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            let mut b = [0u8; 64];
            let got = self.inner.read(&mut b[..n - self.buf.len()])?;
            if got == 0 {
                break;
            }
            self.buf.extend_from_slice(&b[..got]);
        }
        Ok(self.buf.clone())
    }
}

impl<R: Read> Read for PeekReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.buf.is_empty() {
            let n = out.len().min(self.buf.len());
            out[..n].copy_from_slice(&self.buf[..n]);
            self.buf.drain(..n);
            return Ok(n);
        }
        self.inner.read(out)
    }
}

/// Normalise a path from a tar entry to components relative to the root.
/// `None` for the root itself.
fn normalize(layer: &str, raw: &Path) -> Result<Option<Vec<OsString>>, ExportError> {
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_os_string()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                return Err(ExportError::UnsafePath {
                    layer: layer.into(),
                    path: raw.display().to_string(),
                    reason: "contains '..'",
                });
            }
            Component::Prefix(_) => {
                return Err(ExportError::UnsafePath {
                    layer: layer.into(),
                    path: raw.display().to_string(),
                    reason: "has a prefix",
                });
            }
        }
    }
    Ok(if parts.is_empty() { None } else { Some(parts) })
}

/// Resolve `parts` (a directory path relative to `root`) to a real path
/// inside `root`, following symlinks as if `root` were `/`. Missing
/// directories are created when `create` is set.
pub fn resolve_in_root(root: &Path, parts: &[OsString], create: bool) -> io::Result<PathBuf> {
    let mut pending: std::collections::VecDeque<OsString> = parts.iter().cloned().collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c == "." || c.is_empty() {
            continue;
        }
        if c == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&c);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(io::Error::other(format!(
                        "too many levels of symlinks at {}",
                        candidate.display()
                    )));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let comps: Vec<OsString> = target
                    .components()
                    .filter_map(|tc| match tc {
                        Component::Normal(p) => Some(p.to_os_string()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    })
                    .collect();
                for tc in comps.into_iter().rev() {
                    pending.push_front(tc);
                }
            }
            Ok(m) if m.is_dir() => resolved.push(c),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", candidate.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&candidate)?;
                fs::set_permissions(&candidate, fs::Permissions::from_mode(0o755))?;
                resolved.push(c);
            }
            Err(e) => return Err(e),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Apply one uncompressed layer tar stream to `root`.
pub fn apply_layer(
    reader: impl Read,
    root: &Path,
    layer: &str,
    stats: &mut ApplyStats,
) -> Result<(), ExportError> {
    let mut archive = tar::Archive::new(reader);
    let root_user = is_root();
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(root_user);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(root_user);
    archive.set_overwrite(true);
    // Paths (relative to root) written by this layer: an opaque whiteout only
    // hides what lower layers put in its directory.
    let mut written: HashSet<Vec<OsString>> = HashSet::new();
    let entries = archive.entries().map_err(|e| ExportError::Layer {
        layer: layer.into(),
        path: String::new(),
        source: e,
    })?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ExportError::Layer {
            layer: layer.into(),
            path: String::new(),
            source: e,
        })?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        }
        let raw = entry
            .path()
            .map_err(|e| ExportError::Layer {
                layer: layer.into(),
                path: String::new(),
                source: e,
            })?
            .into_owned();
        let shown = raw.display().to_string();
        let lerr = |source: io::Error| ExportError::Layer {
            layer: layer.to_string(),
            path: shown.clone(),
            source,
        };
        stats.entries += 1;
        let Some(parts) = normalize(layer, &raw)? else {
            continue; // the root directory itself
        };
        let (name, parent) = parts.split_last().expect("non-empty");
        let name_bytes = name.as_bytes();

        if name_bytes == WHITEOUT_OPAQUE.as_bytes() {
            stats.opaque_dirs += 1;
            let dir = resolve_in_root(root, parent, true).map_err(lerr)?;
            for child in fs::read_dir(&dir).map_err(lerr)? {
                let child = child.map_err(lerr)?;
                let mut rel = parent.to_vec();
                rel.push(child.file_name());
                if !written.contains(&rel) {
                    remove_any(&child.path()).map_err(lerr)?;
                }
            }
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            stats.whiteouts += 1;
            match resolve_in_root(root, parent, false) {
                Ok(dir) => {
                    remove_any(&dir.join(std::ffi::OsStr::from_bytes(hidden))).map_err(lerr)?
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(lerr(e)),
            }
            continue;
        }

        for i in 1..=parts.len() {
            written.insert(parts[..i].to_vec());
        }
        let dir = resolve_in_root(root, parent, true).map_err(lerr)?;
        let target = dir.join(name);
        if let Ok(existing) = fs::symlink_metadata(&target) {
            let keep = existing.is_dir() && kind.is_dir();
            if !keep {
                remove_any(&target).map_err(lerr)?;
            }
        }
        if kind.is_hard_link() {
            let link = entry.link_name().map_err(lerr)?.ok_or_else(|| {
                lerr(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "hard link without target",
                ))
            })?;
            let Some(link_parts) = normalize(layer, &link)? else {
                return Err(lerr(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "hard link to the root directory",
                )));
            };
            let (lname, lparent) = link_parts.split_last().expect("non-empty");
            let src = resolve_in_root(root, lparent, false)
                .map_err(lerr)?
                .join(lname);
            fs::hard_link(&src, &target).map_err(lerr)?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            make_node(&entry, &target, kind, root_user).map_err(lerr)?;
        } else {
            if kind.is_file() {
                stats.file_bytes += entry.header().size().unwrap_or(0);
            }
            entry.unpack(&target).map_err(lerr)?;
        }
    }
    Ok(())
}

fn make_node<R: Read>(
    entry: &tar::Entry<'_, R>,
    target: &Path,
    kind: tar::EntryType,
    root_user: bool,
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let h = entry.header();
    let mode = h.mode()? & 0o7777;
    let (fmt, dev) = if kind.is_fifo() {
        (libc::S_IFIFO, 0)
    } else {
        let major = h.device_major()?.unwrap_or(0);
        let minor = h.device_minor()?.unwrap_or(0);
        let fmt = if kind.is_character_special() {
            libc::S_IFCHR
        } else {
            libc::S_IFBLK
        };
        (fmt, libc::makedev(major, minor))
    };
    let c = std::ffi::CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path; mknod has no memory effects.
    if unsafe { libc::mknod(c.as_ptr(), fmt | mode, dev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if root_user {
        // SAFETY: as above; lchown does not follow symlinks.
        if unsafe { libc::lchown(c.as_ptr(), h.uid()? as libc::uid_t, h.gid()? as libc::gid_t) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    fs::set_permissions(target, fs::Permissions::from_mode(mode))
}

/// Sizes of a directory tree, for sizing a filesystem.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeSize {
    pub inodes: u64,
    /// Data blocks of 4 KiB needed by files, directories and long symlinks.
    pub blocks: u64,
    pub apparent_bytes: u64,
}

/// Measure `root` without following symlinks.
pub fn measure_tree(root: &Path) -> io::Result<TreeSize> {
    let mut size = TreeSize::default();
    let mut seen_inodes = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        size.inodes += 1;
        size.blocks += 1;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let m = entry.metadata()?;
            if m.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if m.nlink() > 1 && !seen_inodes.insert((m.dev(), m.ino())) {
                continue; // another name of a hard-linked file
            }
            size.inodes += 1;
            size.apparent_bytes += m.len();
            if m.file_type().is_symlink() {
                if m.len() >= 60 {
                    size.blocks += 1;
                }
            } else if m.is_file() {
                size.blocks += m.len().div_ceil(4096);
            }
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
    }

    fn layer(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::File(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Symlink(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::Hardlink(p, target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_mode(0o644);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, entries: &[E<'_>]) -> Result<ApplyStats, ExportError> {
        let mut stats = ApplyStats::default();
        apply_layer(&layer(entries)[..], root, "test", &mut stats)?;
        Ok(stats)
    }

    #[test]
    fn whiteouts_and_opaque_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        apply(
            &root,
            &[
                E::Dir("a/"),
                E::File("a/keep", b"keep"),
                E::File("a/drop", b"drop"),
                E::Dir("o/"),
                E::File("o/old", b"old"),
                E::Dir("o/sub/"),
                E::File("o/sub/deep", b"deep"),
                E::Hardlink("a/keep-link", "a/keep"),
                E::Dir("gone/"),
                E::File("gone/x", b"x"),
            ],
        )
        .unwrap();
        let stats = apply(
            &root,
            &[
                E::File("a/.wh.drop", b""),
                E::File("o/early", b"early"),
                E::File("o/.wh..wh..opq", b""),
                E::File("o/late", b"late"),
                E::File(".wh.gone", b""),
                E::File("a/.wh.never-existed", b""),
            ],
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 3);
        assert_eq!(stats.opaque_dirs, 1);
        assert!(root.join("a/keep").exists());
        assert!(!root.join("a/drop").exists());
        assert!(!root.join("gone").exists());
        let mut o: Vec<_> = fs::read_dir(root.join("o"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        o.sort();
        assert_eq!(
            o,
            vec!["early", "late"],
            "opaque dir keeps only this layer's entries"
        );
        let keep = fs::metadata(root.join("a/keep")).unwrap();
        assert_eq!(keep.nlink(), 2, "hard link kept");
        assert!(!root.join("a/.wh.drop").exists() && !root.join("o/.wh..wh..opq").exists());
    }

    #[test]
    fn replacing_types_and_writing_through_symlinks_stays_inside_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        // An absolute symlink to a host path and a relative one escaping upwards.
        let abs_target = outside.to_str().unwrap().to_string();
        apply(
            &root,
            &[
                E::Symlink("abs", &abs_target),
                E::Symlink("rel", "../../outside"),
                E::File("f", b"file"),
            ],
        )
        .unwrap();
        apply(
            &root,
            &[
                E::File("abs/x", b"1"),
                E::File("rel/y", b"2"),
                E::Dir("f/"),
                E::File("f/inner", b"3"),
            ],
        )
        .unwrap();
        assert!(
            fs::read_dir(&outside).unwrap().next().is_none(),
            "nothing written outside the root"
        );
        assert_eq!(
            fs::read(root.join(outside.strip_prefix("/").unwrap()).join("x")).unwrap(),
            b"1"
        );
        assert_eq!(fs::read(root.join("outside/y")).unwrap(), b"2");
        assert!(root.join("f").is_dir(), "a directory replaced the file");
        assert_eq!(fs::read(root.join("f/inner")).unwrap(), b"3");
    }

    #[test]
    fn parent_components_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        // tar::Builder refuses '..' itself; write the name into the header by hand.
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(&[b'x'; 512]);
        data.extend_from_slice(&[0; 1024]);
        let err =
            apply_layer(&data[..], tmp.path(), "evil", &mut ApplyStats::default()).unwrap_err();
        assert!(matches!(err, ExportError::UnsafePath { .. }), "{err}");
    }

    #[test]
    fn corrupt_blobs_are_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let d = format!("sha256:{}", hex::encode(Sha256::digest(data)));
            fs::write(blobs.join(&d[7..]), data).unwrap();
            d
        };
        let layer_bytes = layer(&[E::File("hello", b"hi")]);
        let layer_digest = put(&layer_bytes);
        let config = put(br#"{"config":{"Cmd":["/hello"],"ExposedPorts":{"80/tcp":{}}}}"#);
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
            layer_bytes.len()
        );
        let manifest_digest = put(manifest.as_bytes());
        fs::write(
            dir.join("index.json"),
            format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":1,"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#),
        )
        .unwrap();
        let image = read_layout(dir, Some("latest")).unwrap();
        assert_eq!(image.manifest_digest, manifest_digest);
        assert_eq!(image.config.cmd, vec!["/hello"]);
        assert_eq!(image.config.exposed_ports, vec![80]);
        assert_eq!(image.config.workdir, "/");
        let root = dir.join("root");
        apply_image(&image, &root).unwrap();
        assert_eq!(fs::read(root.join("hello")).unwrap(), b"hi");

        // Flip a byte in the layer: the apply fails on the digest.
        let mut bad = layer_bytes.clone();
        bad[600] ^= 1;
        fs::write(blobs.join(&layer_digest[7..]), &bad).unwrap();
        let err = apply_image(&image, &dir.join("root2")).unwrap_err();
        assert!(matches!(err, ExportError::DigestMismatch { .. }), "{err}");
        assert!(matches!(
            read_layout(dir, Some("other")),
            Err(ExportError::Layout { .. })
        ));
    }
}
