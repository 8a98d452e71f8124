//! Who holds each Docker-mounted volume: the caller IDs of `VolumeDriver.Mount` not yet unmounted, on
//! this host's disk (`DATA_DIR/docker/mounts.json`, written whole and fsynced), so that a restarted
//! agent knows which volumes containers still use (keep mounted) and which nobody does (undo).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Mount references by volume name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountRefs {
    path: PathBuf,
    refs: BTreeMap<String, BTreeSet<String>>,
}

impl MountRefs {
    /// The references recorded at `path` (none if it does not exist).
    pub fn load(path: &Path) -> anyhow::Result<MountRefs> {
        let refs = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is unreadable: it records which containers use which volume; fix or remove it",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(MountRefs {
            path: path.to_path_buf(),
            refs,
        })
    }

    pub fn holders(&self, volume: &str) -> usize {
        self.refs.get(volume).map_or(0, BTreeSet::len)
    }

    pub fn volumes(&self) -> impl Iterator<Item = &str> {
        self.refs.keys().map(String::as_str)
    }

    /// Adds `id` to `volume` and saves; answers whether it was new.
    pub fn add(&mut self, volume: &str, id: &str) -> anyhow::Result<bool> {
        let new = self
            .refs
            .entry(volume.to_string())
            .or_default()
            .insert(id.to_string());
        if new {
            self.save()?;
        }
        Ok(new)
    }

    /// Drops `id` from `volume` and saves; answers how many holders remain.
    pub fn remove(&mut self, volume: &str, id: &str) -> anyhow::Result<usize> {
        let Some(ids) = self.refs.get_mut(volume) else {
            return Ok(0);
        };
        if ids.remove(id) {
            if ids.is_empty() {
                self.refs.remove(volume);
            }
            self.save()?;
        }
        Ok(self.holders(volume))
    }

    fn save(&self) -> anyhow::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.refs).context("encoding the mount references")?;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("renaming {}", tmp.display()))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_count_by_caller_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker/mounts.json");
        let mut refs = MountRefs::load(&path).unwrap();
        assert!(refs.add("v1", "c1").unwrap());
        assert!(!refs.add("v1", "c1").unwrap(), "the same caller counts once");
        assert!(refs.add("v1", "c2").unwrap());
        let mut refs = MountRefs::load(&path).unwrap();
        assert_eq!(refs.holders("v1"), 2);
        assert_eq!(refs.remove("v1", "c1").unwrap(), 1);
        assert_eq!(refs.remove("v1", "unknown").unwrap(), 1);
        assert_eq!(refs.remove("v1", "c2").unwrap(), 0);
        assert_eq!(MountRefs::load(&path).unwrap().volumes().count(), 0);
        std::fs::write(&path, b"[").unwrap();
        assert!(MountRefs::load(&path).is_err());
    }
}
