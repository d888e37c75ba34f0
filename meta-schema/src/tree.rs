//! The files of one meta repository commit, in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Path (slash-separated, relative to the repository root) -> file bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaTree {
    files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
#[error("reading {path}")]
pub struct FromDirError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl MetaTree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, path: impl Into<String>, bytes: Vec<u8>) -> Option<Vec<u8>> {
        self.files.insert(path.into(), bytes)
    }

    pub fn remove(&mut self, path: &str) -> Option<Vec<u8>> {
        self.files.remove(path)
    }

    pub fn get(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(Vec::as_slice)
    }

    pub fn contains(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Read plain files from a directory (e.g. `example-meta/`), skipping
    /// `.git`.
    pub fn from_dir(dir: &Path) -> Result<MetaTree, FromDirError> {
        let mut tree = MetaTree::new();
        walk(dir, dir, &mut tree)?;
        Ok(tree)
    }
}

impl FromIterator<(String, Vec<u8>)> for MetaTree {
    fn from_iter<I: IntoIterator<Item = (String, Vec<u8>)>>(iter: I) -> Self {
        MetaTree {
            files: iter.into_iter().collect(),
        }
    }
}

fn walk(root: &Path, dir: &Path, tree: &mut MetaTree) -> Result<(), FromDirError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FromDirError { path, source }
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(err(dir))?
        .collect::<Result<_, _>>()
        .map_err(err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if entry.file_name() == ".git" {
            continue;
        }
        let ft = entry.file_type().map_err(err(&path))?;
        if ft.is_dir() {
            walk(root, &path, tree)?;
        } else if ft.is_file() {
            let rel = path
                .strip_prefix(root)
                .expect("walked path is under root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            let bytes = std::fs::read(&path).map_err(err(&path))?;
            tree.insert(rel, bytes);
        }
    }
    Ok(())
}
