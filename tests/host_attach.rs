//! The agent's host module (`basalt_agent::host`) on this machine's user-space path (no kernel iSCSI
//! initiator here): a real Basalt LUN (`basalt serve-file`) attached through qemu-storage-daemon's FUSE
//! export and a loop device, formatted because it is blank, mounted, written; a second `Host` (a restarted
//! agent) finds the attachment working and reuses it, and the daemon outlived the first; unmount and
//! detach leave no mount, loop device or daemon; an attachment whose daemon died is undone at recovery;
//! a device with data is never formatted.

use std::path::Path;
use std::process::Command;

use basalt_agent::host::{AttachMethod, AttachRequest, Filesystem, Host, IscsiTarget};
use basalt_engine::name::VolumeName;
use basalt_tests::{ByteSize, Lun, TargetKind};

const SIZE: u64 = 64 << 20;

fn request(lun: &Lun, volume: &str) -> AttachRequest {
    AttachRequest {
        volume: VolumeName::new(volume).unwrap(),
        target: IscsiTarget::parse_url(&lun.url().to_string()).unwrap(),
        size_bytes: SIZE,
        holder: "test".into(),
    }
}

fn loop_devices_over(file: &Path) -> String {
    let out = Command::new("losetup").arg("-j").arg(file).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whatever the test's outcome, nothing it attached stays: a fresh `Host` undoes every record.
struct Cleanup<'a>(&'a Path);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let Ok(host) = Host::with_method(self.0, AttachMethod::UserSpace) else {
            return;
        };
        for r in host.attachments().unwrap_or_default() {
            for m in &r.mounts {
                let _ = Command::new("umount").arg("-l").arg(&m.target).status();
            }
            if let Err(e) = host.detach(&r.volume) {
                eprintln!("cleanup: detaching {}: {e}", r.volume);
            }
        }
    }
}

#[test]
fn a_lun_is_attached_formatted_mounted_reused_after_a_restart_and_undone_cleanly() {
    let lun = Lun::start(TargetKind::BasaltServeFile, ByteSize::bytes_exact(SIZE)).unwrap();
    let data_dir = lun.scratch_dir().join("agent");
    let _cleanup = Cleanup(&data_dir);
    let req = request(&lun, "hostvol");
    let target = lun.scratch_dir().join("mnt");

    let host = Host::with_method(&data_dir, AttachMethod::UserSpace).unwrap();
    let device = host.attach(&req).unwrap();
    assert!(
        device.to_string_lossy().starts_with("/dev/loop"),
        "{}",
        device.display()
    );
    assert_eq!(host.attach(&req).unwrap(), device, "attach is idempotent");
    host.mount(&req.volume, &target, Filesystem::Ext4, &["noatime".into()], false)
        .unwrap();
    std::fs::write(target.join("hello"), b"written before the restart").unwrap();
    let record = host.attachment(&req.volume).unwrap().unwrap();
    let daemon = record.user_space.as_ref().unwrap().daemon;
    drop(host);

    // A restarted agent: the daemon still runs, the record is found and reused as it is.
    assert!(
        daemon.alive(),
        "qemu-storage-daemon outlives the Host that started it"
    );
    let host = Host::with_method(&data_dir, AttachMethod::UserSpace).unwrap();
    let kept = host.recover().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].mounts.len(), 1, "{kept:?}");
    assert_eq!(host.attach(&req).unwrap(), device, "the same device is reused");
    host.mount(&req.volume, &target, Filesystem::Ext4, &[], false)
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("hello")).unwrap(),
        b"written before the restart"
    );
    let e = host.detach(&req.volume).unwrap_err().to_string();
    assert!(e.contains("still mounted"), "{e}");

    host.unmount(&req.volume, &target).unwrap();
    host.unmount(&req.volume, &target).unwrap();
    host.detach(&req.volume).unwrap();
    host.detach(&req.volume).unwrap();
    assert!(!daemon.alive(), "the daemon is stopped");
    let fuse = record.user_space.as_ref().unwrap().fuse_file.clone();
    assert_eq!(loop_devices_over(&fuse), "", "no loop device is left");
    assert!(host.attachments().unwrap().is_empty());

    // Attached again: the filesystem is there (not formatted again) with its file.
    host.attach(&req).unwrap();
    host.mount(&req.volume, &target, Filesystem::Ext4, &[], true)
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("hello")).unwrap(),
        b"written before the restart"
    );
    host.unmount(&req.volume, &target).unwrap();
    host.detach(&req.volume).unwrap();
}

#[test]
fn an_attachment_whose_daemon_died_is_undone_at_recovery() {
    let lun = Lun::start(TargetKind::BasaltServeFile, ByteSize::bytes_exact(SIZE)).unwrap();
    let data_dir = lun.scratch_dir().join("agent");
    let _cleanup = Cleanup(&data_dir);
    let req = request(&lun, "deadvol");
    let host = Host::with_method(&data_dir, AttachMethod::UserSpace).unwrap();
    host.attach(&req).unwrap();
    let record = host.attachment(&req.volume).unwrap().unwrap();
    let us = record.user_space.clone().unwrap();
    // SAFETY: a plain syscall on the daemon this test started (its start time checked by alive()).
    assert!(us.daemon.alive());
    unsafe { libc::kill(us.daemon.pid as i32, libc::SIGKILL) };
    basalt_tests::wait_for("the daemon to die", std::time::Duration::from_secs(10), || {
        !us.daemon.alive()
    })
    .unwrap();
    drop(host);

    let host = Host::with_method(&data_dir, AttachMethod::UserSpace).unwrap();
    assert!(host.recover().unwrap().is_empty(), "nothing broken is kept");
    assert!(host.attachments().unwrap().is_empty());
    assert_eq!(loop_devices_over(&us.fuse_file), "");
    assert!(!basalt_agent::host::mount::is_mounted(&us.fuse_file));
}

#[test]
fn a_lun_holding_data_is_never_formatted() {
    let lun = Lun::start(TargetKind::BasaltServeFile, ByteSize::bytes_exact(SIZE)).unwrap();
    let data_dir = lun.scratch_dir().join("agent");
    let _cleanup = Cleanup(&data_dir);
    let req = request(&lun, "datavol");
    let host = Host::with_method(&data_dir, AttachMethod::UserSpace).unwrap();
    let device = host.attach(&req).unwrap();
    let marker = b"somebody's database page";
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&device).unwrap();
        f.seek(std::io::SeekFrom::Start(8192)).unwrap();
        f.write_all(marker).unwrap();
        f.sync_all().unwrap();
    }
    let target = lun.scratch_dir().join("mnt");
    let e = host
        .mount(&req.volume, &target, Filesystem::Ext4, &[], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not blank"), "{e}");
    assert!(!basalt_agent::host::mount::is_mounted(&target));
    host.detach(&req.volume).unwrap();
    let mut backing = std::fs::read(lun.backing_file()).unwrap();
    backing.truncate(8192 + marker.len());
    assert_eq!(&backing[8192..], marker, "the data reached the LUN and is intact");
}
