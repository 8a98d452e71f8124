//! Host-side plumbing for putting a filesystem on a LUN without the kernel's iSCSI initiator:
//!
//! ```text
//!   LUN --iSCSI--> qemu-storage-daemon (qemu's iSCSI driver) --FUSE export--> a regular file
//!        --> losetup: /dev/loopN --> mkfs.ext4 / mount / fsck
//! ```
//!
//! Each layer is a guard that undoes itself on drop, innermost first when declared in order (mount, loop,
//! export), so a failed assertion leaves no mount, loop device or daemon behind. Teardown errors are printed,
//! never panicked on (a panic while unwinding would abort the whole test binary).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{io, require_tool, run_checked, wait_for, ByteSize, Daemon, IscsiUrl, Result, StopPolicy};

/// Whether `path` is a mount point right now (from /proc/self/mounts).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*want))
}

/// How long qemu-storage-daemon may take to connect to the target and mount its export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// A LUN exposed as a regular file by `qemu-storage-daemon --export type=fuse`.
pub struct FuseExport {
    file: PathBuf,
    daemon: Option<Daemon>,
}

impl FuseExport {
    /// Exports `url` (of `size` bytes) writable at `file` (created if absent); logs go to `log_dir`.
    pub fn start(url: &IscsiUrl, size: ByteSize, file: &Path, log_dir: &Path) -> Result<FuseExport> {
        require_tool("qemu-storage-daemon")?;
        std::fs::write(file, b"").map_err(io(format!("create the FUSE mount point {}", file.display())))?;
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(url.qemu_blockdev("lun"))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=export0,node-name=lun,mountpoint={},writable=on",
                file.display()
            ));
        // SIGTERM makes qemu flush the node (SYNCHRONIZE CACHE to the target) and unmount the export.
        let mut daemon = Daemon::spawn(
            "qemu-storage-daemon",
            cmd,
            log_dir,
            StopPolicy::Terminate {
                grace: Duration::from_secs(15),
            },
        )?;
        daemon.wait_until("its FUSE export", EXPORT_TIMEOUT, || {
            is_mounted(file)
                && std::fs::metadata(file)
                    .map(|m| m.len() == size.bytes())
                    .unwrap_or(false)
        })?;
        Ok(FuseExport {
            file: file.to_path_buf(),
            daemon: Some(daemon),
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Stops the daemon (flushing to the target) and checks the export is gone.
    pub fn stop(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop()?;
        }
        if is_mounted(&self.file) {
            // The daemon was killed before it could unmount: detach the dead FUSE mount.
            run_checked(Command::new("umount").arg("-l").arg(&self.file))?;
        }
        Ok(())
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!(
                "harness: tearing down the FUSE export {}: {e}",
                self.file.display()
            );
        }
    }
}

/// A loop device over a file (`losetup --find --show`), detached on drop.
pub struct LoopDevice {
    device: PathBuf,
    attached: bool,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> Result<LoopDevice> {
        require_tool("losetup")?;
        let out = run_checked(Command::new("losetup").arg("--find").arg("--show").arg(file))?;
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopDevice {
            device,
            attached: true,
        })
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Detaches now (flushing the loop device's dirty pages to the file underneath).
    pub fn detach(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if std::mem::take(&mut self.attached) {
            run_checked(Command::new("losetup").arg("--detach").arg(&self.device))?;
        }
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("harness: detaching {}: {e}", self.device.display());
        }
    }
}

/// A mounted filesystem, unmounted on drop.
pub struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts `device` at `dir` (created if absent).
    pub fn new(device: &Path, dir: &Path) -> Result<Mount> {
        std::fs::create_dir_all(dir).map_err(io(format!("create mount point {}", dir.display())))?;
        run_checked(Command::new("mount").arg(device).arg(dir))?;
        Ok(Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts now; an error (e.g. busy) is reported, not hidden.
    pub fn unmount(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if std::mem::take(&mut self.mounted) {
            // A just-closed file can keep the mount busy for a moment.
            let dir = self.dir.clone();
            let unmounted = wait_for(
                &format!("unmount {}", dir.display()),
                Duration::from_secs(10),
                || {
                    Command::new("umount")
                        .arg(&dir)
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false)
                },
            );
            if unmounted.is_err() {
                run_checked(Command::new("umount").arg("-l").arg(&self.dir))?;
                return unmounted;
            }
        }
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("harness: unmounting {}: {e}", self.dir.display());
        }
    }
}
