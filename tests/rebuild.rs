//! Online rebuild, end to end: a replica that missed writes comes back and is rebuilt while I/O goes on,
//! sector-sized writes included; a brand-new replica is added with `basalt replica add`.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_tests::volume::{qemu_io, replica_mode, volume_info, Cluster, Replica};
use basalt_tests::{basalt_binary, free_local_addr, read_file, run_checked, wait_for, ByteSize, Result};

/// Export every listed replica (all stopped) and assert they hold identical bytes.
fn assert_replicas_identical(cluster: &Cluster, which: &[usize]) -> Result<()> {
    let images: Vec<Vec<u8>> =
        which.iter().map(|&i| cluster.export_replica(i).and_then(|p| read_file(&p))).collect::<Result<_>>()?;
    for (k, image) in images.iter().enumerate().skip(1) {
        if image != &images[0] {
            let block = image.chunks(4096).zip(images[0].chunks(4096)).position(|(a, b)| a != b);
            panic!("replica r{} differs from r{} (first differing 4 KiB block: {block:?})", which[k] + 1, which[0] + 1);
        }
    }
    Ok(())
}

/// A replica is killed, misses 16 MiB of writes, and is restarted: the controller notices, rebuilds it (only
/// what it missed travels) while a writer keeps issuing 512-byte writes all over the copied range, and returns
/// it to RW. Afterwards all three replicas hold exactly the same bytes (Longhorn #4354's bug class).
#[test]
fn returning_replica_is_rebuilt_under_sector_writes_and_matches_block_for_block() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(64))?;
    let controller = cluster.start_controller(&[])?;
    let url = controller.url.clone();
    let (ok, out) = qemu_io(&url, &["write -P 0x11 0 32M", "flush"])?;
    assert!(ok, "{out}");

    cluster.kill_replica(1);
    let victim = cluster.replicas[1].addr;
    wait_for("the killed replica to be ERR", Duration::from_secs(10), || {
        volume_info(controller.api).map(|i| replica_mode(&i, victim).as_deref() == Some("ERR")).unwrap_or(false)
    })?;
    let (ok, out) = qemu_io(&url, &["write -P 0x22 8M 16M", "flush"])?;
    assert!(ok, "writes go on with two of three replicas: {out}");

    // Sector writes race the rebuild: 512 bytes at odd sector offsets across the range being copied.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, rounds, url) = (stop.clone(), rounds.clone(), url.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut k: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let cmds: Vec<String> = (0..64)
                    .map(|i| {
                        let off = ((k * 64 + i) * 12_345 * 512) % (24 << 20) + (512 * (1 + (i % 7)));
                        format!("write -P 0x{:02x} {off} 512", 0x30 + (k % 64) as u8)
                    })
                    .collect();
                let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
                let (ok, out) = qemu_io(&url, &refs)?;
                assert!(ok, "sector writes during the rebuild must succeed: {out}");
                rounds.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
            Ok(())
        })
    };
    cluster.start_replica(1)?;
    wait_for("the returning replica to be rebuilt (RW)", Duration::from_secs(120), || {
        volume_info(controller.api).map(|i| replica_mode(&i, victim).as_deref() == Some("RW")).unwrap_or(false)
    })?;
    // Keep writing a little after it turned RW as well.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread")?;
    assert!(rounds.load(Ordering::Relaxed) > 0, "sector writes ran during the rebuild");
    let log = controller.daemon.log();
    assert!(log.contains("rebuild complete"), "the controller logged the rebuild:\n{log}");
    for line in log.lines().filter(|l| l.contains("rebuild")) {
        eprintln!("{line}");
    }
    eprintln!("sector-write rounds during the rebuild: {}", rounds.load(Ordering::Relaxed));

    controller.daemon.stop()?;
    for i in 0..3 {
        cluster.stop_replica(i)?;
    }
    assert_replicas_identical(&cluster, &[0, 1, 2])
}

/// `basalt replica add` of a new, empty replica: it is rebuilt online and becomes RW, holding what the others
/// hold.
#[test]
fn replica_add_rebuilds_a_new_empty_replica() -> Result<()> {
    let mut cluster = Cluster::start(2, ByteSize::mib(32))?;
    let controller = cluster.start_controller(&["--min-healthy", "1"])?;
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x5a 0 4M", "write -P 0xa5 20M 1M", "flush"])?;
    assert!(ok, "{out}");

    // A third replica process for the same volume, on a new address and an empty directory.
    let addr = free_local_addr()?;
    let dir = cluster.dir.path().join("r3");
    cluster.replicas.push(Replica { addr, dir, daemon: None });
    cluster.start_replica(2)?;
    let mut add = Command::new(basalt_binary()?);
    add.args(["replica", "add", "--api", &controller.api.to_string(), &addr.to_string()]);
    let out = run_checked(&mut add)?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("rebuilding"));
    wait_for("the added replica to be RW", Duration::from_secs(60), || {
        volume_info(controller.api).map(|i| replica_mode(&i, addr).as_deref() == Some("RW")).unwrap_or(false)
    })?;
    let info = volume_info(controller.api)?;
    assert_eq!(info["replicas"].as_array().map(Vec::len), Some(3), "{info}");

    controller.daemon.stop()?;
    for i in 0..3 {
        cluster.stop_replica(i)?;
    }
    assert_replicas_identical(&cluster, &[0, 1, 2])
}
