//! State on the node's disk, written the way omicron's ledger does: the
//! whole value goes to a temp file, is fsynced, renamed over the old one, and
//! the directory is fsynced; every write carries a generation number one
//! higher than the last. A crash leaves either the old or the new file,
//! never a mix.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("reading ledger {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing ledger {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct OnDisk<T> {
    generation: u64,
    data: T,
}

/// A value of type `T` persisted at one path.
#[derive(Debug)]
pub struct Ledger<T> {
    path: PathBuf,
    generation: u64,
    data: T,
}

impl<T: Serialize + DeserializeOwned + Default> Ledger<T> {
    /// Loads the ledger at `path`, or an empty one (generation 0) if there is
    /// none yet. A corrupt file is an error, never silently replaced.
    pub fn load(path: &Path) -> Result<Self, LedgerError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let d: OnDisk<T> =
                    serde_json::from_slice(&bytes).map_err(|source| LedgerError::Corrupt {
                        path: path.to_path_buf(),
                        source,
                    })?;
                Ok(Ledger {
                    path: path.to_path_buf(),
                    generation: d.generation,
                    data: d.data,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger {
                path: path.to_path_buf(),
                generation: 0,
                data: T::default(),
            }),
            Err(source) => Err(LedgerError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn data(&self) -> &T {
        &self.data
    }

    /// Changes are in memory until [`Ledger::commit`].
    pub fn data_mut(&mut self) -> &mut T {
        &mut self.data
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes the current value durably with the next generation.
    pub fn commit(&mut self) -> Result<(), LedgerError> {
        let generation = self.generation + 1;
        let err = |source| LedgerError::Write {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&OnDisk {
            generation,
            data: &self.data,
        })
        .map_err(|e| err(std::io::Error::other(e)))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&bytes).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        self.generation = generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn commits_survive_a_reload_with_growing_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ledger.json");
        let mut l: Ledger<BTreeMap<String, u32>> = Ledger::load(&path).unwrap();
        assert_eq!(l.generation(), 0);
        l.data_mut().insert("a".into(), 1);
        l.commit().unwrap();
        l.data_mut().insert("b".into(), 2);
        l.commit().unwrap();
        // Uncommitted changes are not on disk.
        l.data_mut().insert("c".into(), 3);
        let again: Ledger<BTreeMap<String, u32>> = Ledger::load(&path).unwrap();
        assert_eq!(again.generation(), 2);
        assert_eq!(again.data().len(), 2);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn a_corrupt_ledger_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        std::fs::write(&path, b"{\"generation\": 3, \"da").unwrap();
        let r: Result<Ledger<BTreeMap<String, u32>>, _> = Ledger::load(&path);
        assert!(matches!(r, Err(LedgerError::Corrupt { .. })));
    }
}
