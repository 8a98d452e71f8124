//! The CSI node's own state on this host's disk: which volume is staged where, how (block or a
//! filesystem), and where it is published. One file per volume, `DATA_DIR/csi/node/VOLUME.json`,
//! written whole and durably ([`crate::host::state::write_durably`]).
//!
//! Every step is recorded *before* it is taken (a stage or a publication is added first, then the
//! device attached or the mount made), and forgotten only after it is undone. A node plugin killed at
//! any point therefore finds, once restarted, a record of everything it may have done; NodeUnstage and
//! NodeUnpublish undo each recorded piece that still exists (an unmount of what is not mounted, a
//! detach of what is not attached, are no errors), so they undo exactly what Stage and Publish did.
//! The attachment itself (device, qemu-storage-daemon, loop device) is the host module's record, with
//! holder [`HOLDER`].
//!
//! The decisions (is a second Stage or Publish the same request, which path is the volume's) are pure
//! functions, tested here.

use std::path::{Path, PathBuf};

use basalt_engine::name::VolumeName;
use serde::{Deserialize, Serialize};

use crate::host::state::write_durably;
use crate::host::Filesystem;

/// The holder of the CSI node's attachments in the host module's records.
pub const HOLDER: &str = "csi";

/// How a volume is used: as a raw block device, or through a filesystem mounted with `flags`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Access {
    Block,
    Mount { fs: Filesystem, flags: Vec<String> },
}

impl Access {
    pub fn describe(&self) -> String {
        match self {
            Access::Block => "block access".into(),
            Access::Mount { fs, flags } if flags.is_empty() => format!("a {fs} mount"),
            Access::Mount { fs, flags } => format!("a {fs} mount with flags {}", flags.join(",")),
        }
    }
}

/// One NodePublishVolume: the target path and how it was published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub target: PathBuf,
    pub read_only: bool,
    pub access: Access,
    /// A read-only block publication's own read-only loop device over the volume's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_device: Option<PathBuf>,
}

/// A volume staged on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub volume: VolumeName,
    pub staging_path: PathBuf,
    pub access: Access,
    /// Staged read-only (a reader-only access mode): its filesystem is never made nor grown here.
    pub read_only: bool,
    pub publications: Vec<Publication>,
}

/// Why a second NodeStageVolume of a staged volume is not the same request (`None`: it is, answer OK).
/// At another staging path the volume would be staged twice (FAILED_PRECONDITION: unstage it first); at
/// the same path with another capability it is incompatible (ALREADY_EXISTS), as the spec names them.
pub fn restage(staged: &Staged, staging_path: &Path, access: &Access, read_only: bool) -> Option<Restage> {
    if staged.staging_path != staging_path {
        return Some(Restage::ElsewhereAlready(format!(
            "volume {} is already staged at {}; unstage it there first",
            staged.volume,
            staged.staging_path.display()
        )));
    }
    if staged.access != *access || staged.read_only != read_only {
        return Some(Restage::Incompatible(format!(
            "volume {} is staged at {} with {}{}, not {}{}",
            staged.volume,
            staging_path.display(),
            staged.access.describe(),
            if staged.read_only { " (read-only)" } else { "" },
            access.describe(),
            if read_only { " (read-only)" } else { "" },
        )));
    }
    None
}

/// How a second NodeStageVolume differs from the first.
#[derive(Debug, PartialEq, Eq)]
pub enum Restage {
    ElsewhereAlready(String),
    Incompatible(String),
}

/// Why a publication at `wanted.target` conflicts with the one recorded there (`None`: it is the same,
/// answer OK). Only an existing publication at the same target is compared.
pub fn republish(existing: &Publication, wanted: &Publication) -> Option<String> {
    let same = existing.target == wanted.target
        && existing.read_only == wanted.read_only
        && existing.access == wanted.access;
    (!same).then(|| {
        format!(
            "{} is already published with {}{}, not {}{}; unpublish it first",
            wanted.target.display(),
            existing.access.describe(),
            if existing.read_only {
                " read-only"
            } else {
                " read-write"
            },
            wanted.access.describe(),
            if wanted.read_only {
                " read-only"
            } else {
                " read-write"
            },
        )
    })
}

/// What `path` is to a staged volume: its staging path, one of its publications, or neither.
#[derive(Debug, PartialEq, Eq)]
pub enum VolumePath<'a> {
    Staging,
    Published(&'a Publication),
}

pub fn find_path<'a>(staged: &'a Staged, path: &Path) -> Option<VolumePath<'a>> {
    if staged.staging_path == path {
        return Some(VolumePath::Staging);
    }
    staged
        .publications
        .iter()
        .find(|p| p.target == path)
        .map(VolumePath::Published)
}

/// The records' directory.
pub struct StagedDir {
    dir: PathBuf,
}

impl StagedDir {
    /// `DATA_DIR/csi/node`, created if absent.
    pub fn open(data_dir: &Path) -> anyhow::Result<StagedDir> {
        let dir = std::path::absolute(data_dir.join("csi").join("node"))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating the CSI node's state directory {}: {e}", dir.display()))?;
        Ok(StagedDir { dir })
    }

    fn path(&self, volume: &VolumeName) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }

    pub fn load(&self, volume: &VolumeName) -> Result<Option<Staged>, String> {
        let path = self.path(volume);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "the CSI node record {} is unreadable ({e}); undo what it describes (mounts at its paths, the \
                 volume's attachment) by hand, then remove the file",
                path.display()
            )
        })
    }

    pub fn save(&self, staged: &Staged) -> Result<(), String> {
        let path = self.path(&staged.volume);
        let bytes = serde_json::to_vec_pretty(staged)
            .map_err(|e| format!("encoding the CSI node record of {}: {e}", staged.volume))?;
        write_durably(&path, &path.with_extension("json.tmp"), &bytes)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    pub fn remove(&self, volume: &VolumeName) -> Result<(), String> {
        let path = self.path(volume);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("removing {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount() -> Access {
        Access::Mount {
            fs: Filesystem::Ext4,
            flags: vec![],
        }
    }

    fn staged() -> Staged {
        Staged {
            volume: VolumeName::new("v1").unwrap(),
            staging_path: "/stage/v1".into(),
            access: mount(),
            read_only: false,
            publications: vec![Publication {
                target: "/pods/a/v1".into(),
                read_only: false,
                access: mount(),
                read_only_device: None,
            }],
        }
    }

    #[test]
    fn a_second_stage_is_the_same_only_at_the_same_path_with_the_same_capability() {
        let s = staged();
        assert_eq!(restage(&s, Path::new("/stage/v1"), &mount(), false), None);
        assert!(matches!(
            restage(&s, Path::new("/stage/other"), &mount(), false),
            Some(Restage::ElsewhereAlready(m)) if m.contains("/stage/v1")
        ));
        assert!(matches!(
            restage(&s, Path::new("/stage/v1"), &Access::Block, false),
            Some(Restage::Incompatible(m)) if m.contains("block access")
        ));
        assert!(matches!(
            restage(&s, Path::new("/stage/v1"), &mount(), true),
            Some(Restage::Incompatible(m)) if m.contains("read-only")
        ));
        let xfs = Access::Mount {
            fs: Filesystem::Xfs,
            flags: vec![],
        };
        assert!(restage(&s, Path::new("/stage/v1"), &xfs, false).is_some());
    }

    #[test]
    fn a_second_publish_at_a_target_must_match_it() {
        let s = staged();
        let same = s.publications[0].clone();
        assert_eq!(republish(&s.publications[0], &same), None);
        let ro = Publication {
            read_only: true,
            ..same.clone()
        };
        let why = republish(&s.publications[0], &ro).unwrap();
        assert!(why.contains("read-write") && why.contains("read-only"), "{why}");
        let block = Publication {
            access: Access::Block,
            ..same
        };
        assert!(republish(&s.publications[0], &block).is_some());
    }

    #[test]
    fn a_volume_path_is_its_staging_path_or_a_publication() {
        let s = staged();
        assert_eq!(find_path(&s, Path::new("/stage/v1")), Some(VolumePath::Staging));
        assert_eq!(
            find_path(&s, Path::new("/pods/a/v1")),
            Some(VolumePath::Published(&s.publications[0]))
        );
        assert_eq!(find_path(&s, Path::new("/pods/b/v1")), None);
    }

    #[test]
    fn records_survive_a_reopen_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let d = StagedDir::open(dir.path()).unwrap();
        d.save(&staged()).unwrap();
        let d = StagedDir::open(dir.path()).unwrap();
        let v = VolumeName::new("v1").unwrap();
        assert_eq!(d.load(&v).unwrap(), Some(staged()));
        d.remove(&v).unwrap();
        d.remove(&v).unwrap();
        assert_eq!(d.load(&v).unwrap(), None);
        std::fs::write(dir.path().join("csi/node/v1.json"), b"{").unwrap();
        assert!(d.load(&v).unwrap_err().contains("unreadable"));
    }
}
