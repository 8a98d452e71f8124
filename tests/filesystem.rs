//! A real filesystem on the LUN: ext4 through qemu's iSCSI driver, a FUSE export and a loop device.
//!
//! Files are written, the filesystem is unmounted and the whole stack torn down (export flushed to the
//! target), the *target itself* is restarted, then the stack is rebuilt: `fsck -n` must find the filesystem
//! clean and every file must read back identical. Nothing can come from a cache above the target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use basalt_tests::host::{FuseExport, LoopDevice, Mount};
use basalt_tests::{random_bytes, read_file, require_tool, run_checked, ByteSize, Lun, TargetKind};

const LUN_SIZE: ByteSize = ByteSize::mib(64);

/// The stack above the target, declared so it drops top-down: mount, loop device, export.
struct Stack {
    mount: Option<Mount>,
    device: LoopDevice,
    export: FuseExport,
}

impl Stack {
    fn up(lun: &Lun, attempt: &str) -> anyhow::Result<(FuseExport, LoopDevice)> {
        let file = lun.scratch_dir().join(format!("export-{attempt}"));
        let export = FuseExport::start(lun.url(), lun.size(), &file, lun.scratch_dir())?;
        let device = LoopDevice::attach(export.file())?;
        Ok((export, device))
    }

    fn mount(lun: &Lun, attempt: &str, mkfs: bool) -> anyhow::Result<Stack> {
        let (export, device) = Stack::up(lun, attempt)?;
        if mkfs {
            run_checked(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(device.device()))?;
        }
        let mount = Mount::new(device.device(), &lun.scratch_dir().join("mnt"))?;
        Ok(Stack {
            mount: Some(mount),
            device,
            export,
        })
    }

    fn dir(&self) -> &Path {
        self.mount.as_ref().map(Mount::dir).expect("mounted")
    }

    /// Unmounts, detaches the loop device and stops the export, in that order, reporting any failure.
    fn down(mut self) -> anyhow::Result<()> {
        if let Some(mount) = self.mount.take() {
            mount.unmount()?;
        }
        let Stack { device, export, .. } = self;
        device.detach()?;
        export.stop()?;
        Ok(())
    }
}

fn fsck_is_clean(lun: &Lun, attempt: &str) -> anyhow::Result<()> {
    let (export, device) = Stack::up(lun, attempt)?;
    run_checked(Command::new("fsck.ext4").args(["-n", "-f"]).arg(device.device()))?;
    device.detach()?;
    export.stop()?;
    Ok(())
}

fn ext4_survives_remount_and_target_restart(kind: TargetKind) -> anyhow::Result<()> {
    for tool in [
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
        "losetup",
        "qemu-storage-daemon",
    ] {
        require_tool(tool)?;
    }
    let mut lun = Lun::start(kind, LUN_SIZE)?;

    let stack = Stack::mount(&lun, "1", true)?;
    let mut written: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    // Sizes from one byte to several MiB, one in a subdirectory: small files live in inode/extent blocks,
    // large ones span many block groups.
    for (i, len) in [1usize, 4096, 10_000, 300_000, 5 << 20].into_iter().enumerate() {
        let rel = if i == 2 {
            PathBuf::from(format!("sub/f{i}"))
        } else {
            PathBuf::from(format!("f{i}"))
        };
        let path = stack.dir().join(&rel);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let data = random_bytes(len);
        std::fs::write(&path, &data)?;
        written.insert(rel, data);
    }
    run_checked(Command::new("sync").arg("-f").arg(stack.dir()))?;
    stack.down()?;

    lun.restart()?;
    fsck_is_clean(&lun, "2").map_err(|e| e.context(format!("target log:\n{}", lun.server_log())))?;

    let stack = Stack::mount(&lun, "3", false)?;
    for (rel, data) in &written {
        let back = read_file(&stack.dir().join(rel))?;
        assert!(
            back == *data,
            "{} differs after remount and target restart ({} vs {} bytes)",
            rel.display(),
            back.len(),
            data.len()
        );
    }
    stack.down()?;
    fsck_is_clean(&lun, "4")?;
    Ok(())
}

#[test]
fn ext4_on_basalt_is_clean_and_identical_after_remount_and_restart() -> anyhow::Result<()> {
    ext4_survives_remount_and_target_restart(TargetKind::BasaltServeFile)
}

#[test]
fn ext4_on_a_3_replica_volume_is_clean_and_identical_after_remount_and_controller_restart(
) -> anyhow::Result<()> {
    // For a volume, "restart" stops the controller and starts a new one on the same replicas (a failover).
    ext4_survives_remount_and_target_restart(TargetKind::BasaltVolume3)
}

#[test]
fn ext4_on_tgt_is_clean_and_identical_after_remount_and_restart() -> anyhow::Result<()> {
    ext4_survives_remount_and_target_restart(TargetKind::Tgt)
}
