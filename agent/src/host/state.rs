//! What this host attached and mounted, on its disk: `DATA_DIR/host/attachments/VOLUME.json`, one file
//! per volume, written whole (temporary file, fsync, rename, fsync of the directory) after every step,
//! so that after a crash at any point the file describes either the state before the step or after it.
//! A process started by an attacher is recorded before anything waits on it, so it is never lost.

use std::io::Write;
use std::path::{Path, PathBuf};

use basalt_engine::name::VolumeName;
use serde::{Deserialize, Serialize};

use super::attach::{AttachMethod, IscsiTarget};
use super::mount::Filesystem;
use super::{HostError, HostResult};

/// One volume attached on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRecord {
    pub volume: VolumeName,
    /// Who attached it (`docker`, `csi`): its clean-up at start is that holder's.
    pub holder: String,
    pub target: IscsiTarget,
    pub size_bytes: u64,
    pub method: AttachMethod,
    /// The block device, once there is one.
    pub device: Option<PathBuf>,
    /// The user-space path's pieces (none for the kernel initiator).
    pub user_space: Option<UserSpaceRecord>,
    /// Where the device is mounted.
    pub mounts: Vec<MountRecord>,
}

/// The qemu-storage-daemon exporting the LUN as a file, and the loop device over that file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSpaceRecord {
    pub daemon: ProcessIdentity,
    pub fuse_file: PathBuf,
    /// Its QMP socket (for an online resize).
    pub qmp_socket: PathBuf,
    pub loop_device: Option<PathBuf>,
}

/// A process told apart from a later one that reuses its pid: the start time from `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessIdentity {
    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        crate::runtime::process::process_start_time(self.pid) == Some(self.start_time)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub target: PathBuf,
    pub fs: Filesystem,
    pub read_only: bool,
}

/// The directory of the records.
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// `host_dir/attachments`, created if absent.
    pub fn open(host_dir: &Path) -> HostResult<StateDir> {
        let dir = host_dir.join("attachments");
        std::fs::create_dir_all(&dir).map_err(HostError::io(format!("creating {}", dir.display())))?;
        Ok(StateDir { dir })
    }

    fn path(&self, volume: &VolumeName) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }

    pub fn load(&self, volume: &VolumeName) -> HostResult<Option<AttachRecord>> {
        read_record(&self.path(volume))
    }

    /// Writes the record durably (see the module docs).
    pub fn save(&self, record: &AttachRecord) -> HostResult<()> {
        let path = self.path(&record.volume);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| {
            HostError::Refused(format!("encoding the attach record of {}: {e}", record.volume))
        })?;
        write_durably(&path, &tmp, &bytes).map_err(HostError::io(format!("writing {}", path.display())))
    }

    pub fn remove(&self, volume: &VolumeName) -> HostResult<()> {
        let path = self.path(volume);
        match std::fs::remove_file(&path) {
            Ok(()) => std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(HostError::io(format!("syncing {}", self.dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HostError::io(format!("removing {}", path.display()))(e)),
        }
    }

    /// Every record. One that cannot be read is an error naming its file: silently skipping it would
    /// forget an attachment, which is the failure this directory exists to prevent.
    pub fn list(&self) -> HostResult<Vec<AttachRecord>> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(HostError::io(format!("reading {}", self.dir.display())))?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(HostError::io(format!("reading {}", self.dir.display())))?
                .path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(record) = read_record(&path)? {
                    out.push(record);
                }
            }
        }
        out.sort_by(|a, b| a.volume.as_str().cmp(b.volume.as_str()));
        Ok(out)
    }
}

/// Writes `bytes` to `path` whole: through `tmp` (same directory), fsynced, renamed, the directory
/// fsynced; after a crash at any point `path` holds the old bytes or the new ones, never a mix.
pub fn write_durably(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

fn read_record(path: &Path) -> HostResult<Option<AttachRecord>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(HostError::io(format!("reading {}", path.display()))(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        HostError::Refused(format!(
            "the attach record {} is unreadable ({e}); check what it describes (mounts, loop devices, \
             qemu-storage-daemon) by hand, undo it, then remove the file",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> AttachRecord {
        AttachRecord {
            volume: VolumeName::new(name).unwrap(),
            holder: "docker".into(),
            target: IscsiTarget::parse_url("iscsi://127.0.0.1:3260/iqn.2026-11.io.basalt:v1/0").unwrap(),
            size_bytes: 1 << 30,
            method: AttachMethod::UserSpace,
            device: Some("/dev/loop3".into()),
            user_space: Some(UserSpaceRecord {
                daemon: ProcessIdentity {
                    pid: 42,
                    start_time: 7,
                },
                fuse_file: "/x/lun".into(),
                qmp_socket: "/x/qmp.sock".into(),
                loop_device: Some("/dev/loop3".into()),
            }),
            mounts: vec![MountRecord {
                target: "/mnt/v1".into(),
                fs: Filesystem::Ext4,
                read_only: false,
            }],
        }
    }

    #[test]
    fn records_survive_a_reopen_and_are_listed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        state.save(&record("b")).unwrap();
        state.save(&record("a")).unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let all = state.list().unwrap();
        assert_eq!(
            all.iter().map(|r| r.volume.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            state.load(&VolumeName::new("a").unwrap()).unwrap(),
            Some(record("a"))
        );
        state.remove(&VolumeName::new("a").unwrap()).unwrap();
        state.remove(&VolumeName::new("a").unwrap()).unwrap();
        assert_eq!(state.list().unwrap().len(), 1);
    }

    #[test]
    fn an_unreadable_record_is_an_error_naming_its_file_not_a_forgotten_attachment() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("attachments/v.json"), b"{not json").unwrap();
        let e = state.list().unwrap_err().to_string();
        assert!(e.contains("v.json") && e.contains("unreadable"), "{e}");
    }

    #[test]
    fn our_own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id();
        let start_time = crate::runtime::process::process_start_time(me).unwrap();
        assert!(ProcessIdentity { pid: me, start_time }.alive());
        assert!(!ProcessIdentity {
            pid: me,
            start_time: start_time + 1
        }
        .alive());
    }
}
