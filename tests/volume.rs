//! A replicated volume, end to end: real replica and controller processes, real initiators (fio's libiscsi
//! engine, qemu-io through qemu's iSCSI driver), real SIGKILLs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use basalt_tests::fio::{Extent, FioJob, Pattern, Verify};
use basalt_tests::volume::{qemu_io, replica_mode, volume_info, Cluster};
use basalt_tests::{fio_libiscsi, read_file, ByteSize, Result};

/// fio writes (random 4 KiB, QD16, crc32c in every block) while one of three replicas is SIGKILLed half-way;
/// fio must see no error, read everything back intact, the volume must report that replica ERR, and the two
/// survivors must hold exactly the same bytes.
#[test]
fn replica_killed_during_fio_verify_loses_nothing() -> Result<()> {
    let fio = fio_libiscsi()?;
    let mut cluster = Cluster::start(3, ByteSize::mib(256))?;
    let controller = cluster.start_controller(&[])?;
    let victim = cluster.replicas[1].addr;

    let job = FioJob {
        name: "kill-a-replica".into(),
        pattern: Pattern::RandWrite,
        block_size: ByteSize::kib(4),
        iodepth: 16,
        extent: Extent::Bytes(ByteSize::mib(96)),
        verify: Verify::WriteThenVerify,
    };
    let url = controller.url.clone();
    let log_dir = cluster.log_dir().to_path_buf();
    // The kill lands once fio has written a sixth of its extent, whatever the machine's speed: a fixed
    // delay found fio already done on a fast one, or not yet writing on a slow one.
    let survivor = cluster.replicas[0].dir.clone();
    let before = allocated_bytes(&survivor)?;
    let fio_run = std::thread::spawn(move || job.run(&fio, &url, &log_dir));
    let deadline = Instant::now() + Duration::from_secs(60);
    while allocated_bytes(&survivor)? < before + ByteSize::mib(16).bytes() {
        assert!(
            !fio_run.is_finished(),
            "fio ended before writing 16 MiB: {:?}",
            fio_run.join()
        );
        assert!(Instant::now() < deadline, "fio wrote less than 16 MiB in 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !fio_run.is_finished(),
        "fio must still be writing when the replica dies; make the job bigger"
    );
    cluster.kill_replica(1);
    let result = fio_run.join().expect("fio thread")?;
    assert_eq!(result.error, 0, "fio reported an error while a replica died");
    assert!(
        result.write.io_bytes > 0 && result.read.io_bytes > 0,
        "fio wrote and verified data"
    );

    let info = volume_info(controller.api)?;
    assert_eq!(
        replica_mode(&info, victim).as_deref(),
        Some("ERR"),
        "the killed replica is ERR: {info}"
    );
    assert_eq!(info["state"], "serving");

    // Stop cleanly (the controller flushes), then compare the survivors byte for byte.
    controller.daemon.stop()?;
    cluster.stop_replica(0)?;
    cluster.stop_replica(2)?;
    let a = read_file(&cluster.export_replica(0)?)?;
    let b = read_file(&cluster.export_replica(2)?)?;
    assert_eq!(a.len() as u64, cluster.size.bytes());
    assert!(a == b, "the surviving replicas differ");
    assert!(a.iter().any(|&x| x != 0), "the replicas hold fio's data");
    Ok(())
}

/// With two of three replicas gone, the volume has no majority: writes fail with an error (never a silent
/// success) and the controller says why.
#[test]
fn two_of_three_replicas_lost_fails_io_loudly() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(64))?;
    let controller = cluster.start_controller(&[])?;
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x11 0 64k", "flush"])?;
    assert!(ok, "a healthy volume accepts writes: {out}");

    cluster.kill_replica(1);
    cluster.kill_replica(2);
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x22 0 64k", "flush"])?;
    assert!(!ok, "a write without a majority must fail, qemu-io said: {out}");

    let info = volume_info(controller.api)?;
    assert_eq!(info["state"], "degraded", "{info}");
    let log = controller.daemon.log();
    assert!(
        log.contains("volume degraded"),
        "the controller logs why it fails I/O:\n{log}"
    );

    // The surviving replica never saw the refused write acknowledged... and the old data is still there.
    controller.daemon.stop()?;
    cluster.stop_replica(0)?;
    let image = read_file(&cluster.export_replica(0)?)?;
    for block in image[..64 << 10].chunks(4096) {
        assert!(
            block.iter().all(|&x| x == 0x11) || block.iter().all(|&x| x == 0x22),
            "each block holds its old content or the attempted one, never garbage"
        );
    }
    Ok(())
}

/// A second controller on the same replicas fences the first: the old one's writes are refused, the new
/// one's data is intact.
#[test]
fn second_controller_fences_the_first() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(64))?;
    let old = cluster.start_controller(&[])?;
    let (ok, out) = qemu_io(&old.url, &["write -P 0xaa 0 64k", "flush"])?;
    assert!(ok, "{out}");
    let old_epoch = volume_info(old.api)?["epoch"].as_u64().expect("epoch");

    let new = cluster.start_controller(&[])?;
    let new_epoch = volume_info(new.api)?["epoch"].as_u64().expect("epoch");
    assert!(
        new_epoch > old_epoch,
        "the new controller raised the epoch ({old_epoch} -> {new_epoch})"
    );
    let (ok, out) = qemu_io(&new.url, &["write -P 0xbb 64k 64k", "flush"])?;
    assert!(ok, "{out}");

    let (ok, out) = qemu_io(&old.url, &["write -P 0xcc 0 64k", "flush"])?;
    assert!(!ok, "the fenced controller's write must fail: {out}");
    assert!(
        old.daemon.log().contains("fenced"),
        "the old controller logs that it was fenced"
    );

    let (ok, out) = qemu_io(&new.url, &["read -P 0xaa 0 64k", "read -P 0xbb 64k 64k"])?;
    assert!(ok, "data written through both controllers is intact: {out}");
    Ok(())
}

/// Bytes the files in `dir` take on disk: a write shows here as soon as it reaches the page cache (ext4
/// counts delayed allocations), so it tells how far a writer got without waiting for writeback.
fn allocated_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(basalt_tests::io(format!("list {}", dir.display())))? {
        let entry = entry.map_err(basalt_tests::io(format!("list {}", dir.display())))?;
        let meta = entry
            .metadata()
            .map_err(basalt_tests::io(format!("stat {}", entry.path().display())))?;
        total += meta.blocks() * 512;
    }
    Ok(total)
}

/// GET LBA STATUS answers from the replicas' allocation: `qemu-img map` through qemu's iSCSI driver shows a
/// thin 3-replica volume as data exactly where it was written, and as holes (reading as zeros) where nothing
/// was written or a range was discarded.
#[test]
fn qemu_img_map_shows_data_where_written_and_holes_elsewhere() -> Result<()> {
    const MIB: u64 = 1 << 20;
    let mut cluster = Cluster::start(3, ByteSize::mib(64))?;
    let controller = cluster.start_controller(&[])?;
    let (ok, out) = qemu_io(
        &controller.url,
        &[
            "write -P 0x11 1M 64k",
            "write -P 0x22 8M 4M",
            "write -P 0x33 20M 4k",
            "discard 9M 1M",
            "flush",
        ],
    )?;
    assert!(ok, "qemu-io: {out}");
    let url = controller.url.to_string();
    let map = basalt_tests::run_checked(std::process::Command::new("qemu-img").args([
        "map",
        "--output=json",
        &url,
    ]))?;
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("qemu-img map prints JSON");
    // Adjacent entries with data, merged: (start, length) in bytes.
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut covered = 0;
    for entry in map.as_array().expect("a list of extents") {
        let (start, length) = (
            entry["start"].as_u64().unwrap(),
            entry["length"].as_u64().unwrap(),
        );
        assert_eq!(start, covered, "extents cover the volume in order: {map}");
        covered += length;
        if entry["data"] == true {
            match data.last_mut() {
                Some((s, l)) if *s + *l == start => *l += length,
                _ => data.push((start, length)),
            }
        } else {
            assert_eq!(entry["zero"], true, "a hole reads as zeros: {entry}");
        }
    }
    assert_eq!(covered, 64 * MIB);
    assert_eq!(
        data,
        vec![
            (MIB, 64 << 10),
            (8 * MIB, MIB),
            (10 * MIB, 2 * MIB),
            (20 * MIB, 4 << 10)
        ],
        "data exactly where written and not discarded: {map}"
    );
    Ok(())
}
