//! Online rebuild, end to end: a replica that missed writes comes back and is rebuilt while I/O goes on,
//! sector-sized writes included; a brand-new replica is added with `basalt replica add`.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_tests::volume::{qemu_io, replica_mode, volume_info, Cluster, Replica};
use basalt_tests::{basalt_command, free_local_addr, read_file, run_checked, wait_for, ByteSize, Result};

/// Export every listed replica (all stopped) and assert they hold identical bytes.
fn assert_replicas_identical(cluster: &Cluster, which: &[usize]) -> Result<()> {
    let images: Vec<Vec<u8>> = which
        .iter()
        .map(|&i| cluster.export_replica(i).and_then(|p| read_file(&p)))
        .collect::<Result<_>>()?;
    for (k, image) in images.iter().enumerate().skip(1) {
        if image != &images[0] {
            let block = image
                .chunks(4096)
                .zip(images[0].chunks(4096))
                .position(|(a, b)| a != b);
            panic!(
                "replica r{} differs from r{} (first differing 4 KiB block: {block:?})",
                which[k] + 1,
                which[0] + 1
            );
        }
    }
    Ok(())
}

/// Sector writes per qemu-io run in the rebuild race below.
const SECTOR_WRITES_PER_RUN: u64 = 512;

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
        volume_info(controller.api)
            .map(|i| replica_mode(&i, victim).as_deref() == Some("ERR"))
            .unwrap_or(false)
    })?;
    let (ok, out) = qemu_io(&url, &["write -P 0x22 8M 16M", "flush"])?;
    assert!(ok, "writes go on with two of three replicas: {out}");

    // Sector writes race the rebuild: 512 bytes at odd sector offsets across the range being copied, many
    // to a qemu-io run, so that a run spends most of its time writing rather than starting up and logging
    // in: a delta rebuild of this size takes tens of milliseconds.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, rounds, url) = (stop.clone(), rounds.clone(), url.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut k: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let cmds: Vec<String> = (0..SECTOR_WRITES_PER_RUN)
                    .map(|i| {
                        let n = k * SECTOR_WRITES_PER_RUN + i;
                        let off = (n * 12_345 * 512) % (24 << 20) + (512 * (1 + (i % 7)));
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
    wait_for(
        "the returning replica to be rebuilt (RW)",
        Duration::from_secs(120),
        || {
            volume_info(controller.api)
                .map(|i| replica_mode(&i, victim).as_deref() == Some("RW"))
                .unwrap_or(false)
        },
    )?;
    // Keep writing a little after it turned RW as well.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread")?;
    assert!(
        rounds.load(Ordering::Relaxed) > 0,
        "sector writes ran during the rebuild"
    );
    let log = controller.daemon.log();
    assert!(
        log.contains("rebuild complete"),
        "the controller logged the rebuild:\n{log}"
    );
    for line in log.lines().filter(|l| l.contains("rebuild")) {
        eprintln!("{line}");
    }
    eprintln!(
        "sector-write rounds during the rebuild: {}",
        rounds.load(Ordering::Relaxed)
    );

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
    let (ok, out) = qemu_io(
        &controller.url,
        &["write -P 0x5a 0 4M", "write -P 0xa5 20M 1M", "flush"],
    )?;
    assert!(ok, "{out}");

    // A third replica process for the same volume, on a new address and an empty directory.
    let addr = free_local_addr()?;
    let dir = cluster.dir.path().join("r3");
    cluster.replicas.push(Replica {
        addr,
        dir,
        daemon: None,
    });
    cluster.start_replica(2)?;
    let mut add = basalt_command()?;
    add.args([
        "replica",
        "add",
        "--api",
        &controller.api.to_string(),
        &addr.to_string(),
    ]);
    let out = run_checked(&mut add)?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("rebuilding"));
    wait_for("the added replica to be RW", Duration::from_secs(60), || {
        volume_info(controller.api)
            .map(|i| replica_mode(&i, addr).as_deref() == Some("RW"))
            .unwrap_or(false)
    })?;
    let info = volume_info(controller.api)?;
    assert_eq!(info["replicas"].as_array().map(Vec::len), Some(3), "{info}");

    controller.daemon.stop()?;
    for i in 0..3 {
        cluster.stop_replica(i)?;
    }
    assert_replicas_identical(&cluster, &[0, 1, 2])
}

/// `basalt snapshot ARGS... --api API`, returning (success, stdout + stderr).
fn snapshot(api: std::net::SocketAddr, args: &[&str]) -> Result<(bool, String)> {
    let out = basalt_command()?
        .arg("snapshot")
        .args(args)
        .args(["--api", &api.to_string()])
        .output()
        .expect("run basalt snapshot");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Discards through the initiator (qemu-io with `--discard unmap`, so it sends SCSI UNMAP): the head gets
/// tombstones, which a later snapshot keeps.
fn discard(url: &basalt_tests::IscsiUrl, offset: &str, len: &str) -> Result<()> {
    let mut cmd = Command::new(basalt_tests::require_tool("qemu-io")?);
    cmd.args([
        "-f",
        "raw",
        "--cache",
        "none",
        "--discard",
        "unmap",
        "-c",
        &format!("discard {offset} {len}"),
    ])
    .arg(url.to_string());
    run_checked(&mut cmd).map(drop)
}

/// Every listed replica's export of snapshot `name` (all stopped) holds identical bytes; returns them.
fn assert_snapshot_identical(cluster: &Cluster, which: &[usize], name: &str) -> Result<Vec<u8>> {
    let mut images = Vec::new();
    for &i in which {
        let out = cluster.dir.path().join(format!("{name}-r{}.img", i + 1));
        let mut export = basalt_command()?;
        export
            .args(["replica", "export", "--snapshot", name, "--dir"])
            .arg(&cluster.replicas[i].dir);
        export.arg("--out").arg(&out);
        run_checked(&mut export)?;
        images.push(read_file(&out)?);
    }
    for (k, image) in images.iter().enumerate().skip(1) {
        if image != &images[0] {
            let block = image
                .chunks(4096)
                .zip(images[0].chunks(4096))
                .position(|(a, b)| a != b);
            panic!(
                "snapshot {name}: replica r{} differs from r{} (first differing 4 KiB block: {block:?})",
                which[k] + 1,
                which[0] + 1
            );
        }
    }
    Ok(images.swap_remove(0))
}

/// A 3-replica volume with two snapshots and writes (and discards) between them. One replica misses the second
/// snapshot (it was down: its chain is stale), another loses its whole directory (it comes back empty). Both are
/// rebuilt from the survivor: each ends up with exactly the source's chain -- same names, same order, the same
/// content per snapshot -- and no extra snapshot; the live images match too.
#[test]
fn rebuilt_replicas_hold_the_sources_snapshot_chain() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(32))?;
    let controller = cluster.start_controller(&["--min-healthy", "1"])?;
    let (url, api) = (controller.url.clone(), controller.api);
    let (ok, out) = qemu_io(&url, &["write -P 0x11 0 4M", "write -P 0x12 12M 1M", "flush"])?;
    assert!(ok, "{out}");
    let (ok, out) = snapshot(api, &["create", "first"])?;
    assert!(ok, "{out}");

    // r3 goes down now and misses `second`: it comes back with the chain [first].
    cluster.kill_replica(2);
    let stale = cluster.replicas[2].addr;
    wait_for("r3 to be ERR", Duration::from_secs(10), || {
        volume_info(api)
            .map(|i| replica_mode(&i, stale).as_deref() == Some("ERR"))
            .unwrap_or(false)
    })?;
    let (ok, out) = qemu_io(&url, &["write -P 0x22 2M 4M", "write -P 0x23 20M 512k", "flush"])?;
    assert!(ok, "{out}");
    discard(&url, "12M", "512k")?;
    let (ok, out) = snapshot(api, &["create", "second"])?;
    assert!(ok, "{out}");

    // r2 loses its directory: it comes back empty.
    cluster.kill_replica(1);
    let empty = cluster.replicas[1].addr;
    wait_for("r2 to be ERR", Duration::from_secs(10), || {
        volume_info(api)
            .map(|i| replica_mode(&i, empty).as_deref() == Some("ERR"))
            .unwrap_or(false)
    })?;
    std::fs::remove_dir_all(&cluster.replicas[1].dir).expect("remove r2's directory");
    let (ok, out) = qemu_io(&url, &["write -P 0x33 5M 1M", "write -P 0x34 30M 64k", "flush"])?;
    assert!(ok, "{out}");

    cluster.start_replica(1)?;
    cluster.start_replica(2)?;
    for addr in [empty, stale] {
        wait_for(
            "the returning replicas to be rebuilt (RW)",
            Duration::from_secs(120),
            || {
                volume_info(api)
                    .map(|i| replica_mode(&i, addr).as_deref() == Some("RW"))
                    .unwrap_or(false)
            },
        )?;
    }
    let (ok, out) = snapshot(api, &["ls", "--json"])?;
    assert!(ok, "{out}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).expect("snapshot ls --json prints JSON");
    let names: Vec<&str> = listed["snapshots"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["first", "second"],
        "the chain, and no system snapshot: {out}"
    );
    assert_eq!(
        listed["divergent"].as_array().map(Vec::len).unwrap_or(0),
        0,
        "no divergent replica: {out}"
    );
    let log = controller.daemon.log();
    assert!(
        log.contains("replaying the source's snapshot chain"),
        "the controller replayed the chain:\n{log}"
    );
    for line in log.lines().filter(|l| l.contains("rebuild")) {
        eprintln!("{line}");
    }

    controller.daemon.stop()?;
    for i in 0..3 {
        cluster.stop_replica(i)?;
    }
    let first = assert_snapshot_identical(&cluster, &[0, 1, 2], "first")?;
    assert!(
        first[..4 << 20].iter().all(|&b| b == 0x11) && first[12 << 20..13 << 20].iter().all(|&b| b == 0x12)
    );
    assert!(
        first[20 << 20..].iter().all(|&b| b == 0),
        "`first` does not hold later writes"
    );
    let second = assert_snapshot_identical(&cluster, &[0, 1, 2], "second")?;
    assert!(second[2 << 20..6 << 20].iter().all(|&b| b == 0x22));
    assert!(
        second[12 << 20..(12 << 20) + (512 << 10)].iter().all(|&b| b == 0),
        "the discard is in `second`"
    );
    assert!(second[(12 << 20) + (512 << 10)..13 << 20]
        .iter()
        .all(|&b| b == 0x12));
    assert!(
        second[5 << 20..6 << 20].iter().all(|&b| b == 0x22),
        "not the head's later write"
    );
    assert_replicas_identical(&cluster, &[0, 1, 2])
}

/// What the controller logged when replica `addr` turned RW after its last rebuild: the bytes copied
/// (the rebuild's own counter) and whether the source's write-intent record said where to look.
fn last_rebuild(log: &str, addr: std::net::SocketAddr) -> Option<(u64, bool)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("rebuild complete") && l.contains(&format!("replica={addr}")))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
    };
    Some((field("bytes")?.parse().ok()?, field("from_record")? == "true"))
}

fn wait_mode(api: std::net::SocketAddr, addr: std::net::SocketAddr, mode: &str) -> Result<()> {
    wait_for(&format!("{addr} to be {mode}"), Duration::from_secs(120), || {
        volume_info(api)
            .map(|i| replica_mode(&i, addr).as_deref() == Some(mode))
            .unwrap_or(false)
    })
}

/// 1% of the 64 MiB volume, in 64 KiB pieces spread over it.
const CHANGED: &[&str] = &[
    "write -P 0x77 1M 64k",
    "write -P 0x77 7M 64k",
    "write -P 0x77 13M 64k",
    "write -P 0x77 19M 64k",
    "write -P 0x77 25M 64k",
    "write -P 0x77 31M 64k",
    "write -P 0x77 37M 64k",
    "write -P 0x77 43M 64k",
    "write -P 0x77 49M 64k",
    "write -P 0x77 55M 64k",
    "flush",
];
const CHANGED_BYTES: u64 = 10 * 64 * 1024;

/// Kills r2, changes 1% of a 48 MiB-written volume, optionally replaces the controller meanwhile
/// (SIGKILL, then a new one over the same replicas), and restarts r2. Returns the bytes its rebuild
/// copied and whether the write-intent record named the regions; checks all replicas agree.
fn away_while_one_percent_changes(restart_controller: bool) -> Result<(u64, bool)> {
    let mut cluster = Cluster::start(3, ByteSize::mib(64))?;
    let mut controller = cluster.start_controller(&[])?;
    for r in &cluster.replicas {
        // Every replica but the reference is reconciled at start: wait for all three.
        wait_mode(controller.api, r.addr, "RW")?;
    }
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x11 0 48M", "flush"])?;
    assert!(ok, "{out}");

    cluster.kill_replica(1);
    let victim = cluster.replicas[1].addr;
    wait_mode(controller.api, victim, "ERR")?;
    let (ok, out) = qemu_io(&controller.url, CHANGED)?;
    assert!(ok, "{out}");

    if restart_controller {
        let pid = controller.daemon.pid().to_string();
        run_checked(Command::new("kill").args(["-9", &pid]))?;
        let _ = controller.daemon.stop();
        controller = cluster.start_controller(&[])?;
        for i in [0, 2] {
            wait_mode(controller.api, cluster.replicas[i].addr, "RW")?;
        }
    }
    cluster.start_replica(1)?;
    wait_mode(controller.api, victim, "RW")?;
    let log = controller.daemon.plain_log();
    for line in log.lines().filter(|l| l.contains("rebuild")) {
        eprintln!("{line}");
    }
    let outcome = last_rebuild(&log, victim).expect("the controller logged the rebuild of r2");

    controller.daemon.stop()?;
    for i in 0..3 {
        cluster.stop_replica(i)?;
    }
    assert_replicas_identical(&cluster, &[0, 1, 2])?;
    Ok(outcome)
}

/// A replica killed while 1% of the volume is written comes back with only about that much copied --
/// the source's write-intent record named the regions, no whole-volume checksum comparison -- and all
/// replicas end block-for-block identical.
#[test]
fn a_returning_replica_gets_only_the_regions_the_write_intent_record_names() -> Result<()> {
    let (bytes, from_record) = away_while_one_percent_changes(false)?;
    assert!(from_record, "the write-intent record answered");
    assert!(
        (CHANGED_BYTES..=CHANGED_BYTES + (256 << 10)).contains(&bytes),
        "copied {bytes} bytes for {CHANGED_BYTES} changed"
    );
    Ok(())
}

/// The same across a controller failover while the replica was away: the record lives in the
/// replicas, so the new controller uses it too.
#[test]
fn the_write_intent_record_survives_a_controller_restart_while_the_replica_is_away() -> Result<()> {
    let (bytes, from_record) = away_while_one_percent_changes(true)?;
    assert!(from_record, "the new controller used the write-intent record");
    assert!(
        (CHANGED_BYTES..=CHANGED_BYTES + (256 << 10)).contains(&bytes),
        "copied {bytes} bytes for {CHANGED_BYTES} changed"
    );
    Ok(())
}

/// Established TCP connections to `addr` on this machine, seen from the connecting side: every connection
/// the controller holds to that replica (`/proc/net/tcp`, state 01; the replicas listen on 127.0.0.1).
fn connections_to(addr: std::net::SocketAddr) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!("0100007F:{:04X}", addr.port());
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == remote && f[3] == "01"
        })
        .count()
}

/// Every rebuild opens connections of its own to its source and its target, on top of the volume's one
/// link per replica; none of them may outlive the rebuild. After three kill/restart/rebuild cycles the
/// controller holds exactly one connection to each replica (the bug: one more to the source and one more
/// to the target per rebuild).
#[test]
fn rebuilds_leave_exactly_one_connection_per_replica() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(32))?;
    let controller = cluster.start_controller(&[])?;
    for r in &cluster.replicas {
        wait_mode(controller.api, r.addr, "RW")?;
    }
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x11 0 8M", "flush"])?;
    assert!(ok, "{out}");
    for cycle in 0..3 {
        cluster.kill_replica(1);
        let victim = cluster.replicas[1].addr;
        wait_mode(controller.api, victim, "ERR")?;
        let (ok, out) = qemu_io(
            &controller.url,
            &[&format!("write -P 0x{:02x} 1M 64k", 0x20 + cycle), "flush"],
        )?;
        assert!(ok, "{out}");
        cluster.start_replica(1)?;
        wait_mode(controller.api, victim, "RW")?;
    }
    let settled = wait_for(
        "the controller to hold one connection per replica",
        Duration::from_secs(10),
        || cluster.replicas.iter().all(|r| connections_to(r.addr) == 1),
    );
    let held: Vec<usize> = cluster.replicas.iter().map(|r| connections_to(r.addr)).collect();
    assert!(
        settled.is_ok(),
        "connections held to r1, r2, r3 after three rebuilds of r2: {held:?} (one each expected)"
    );
    Ok(())
}

/// r2 goes away first; then r1 is wiped and rebuilt in full, so r1's write-intent record starts at its
/// rebuild, after r2's last flush. When r2 returns, r1 -- the first read-write replica -- cannot say what
/// r2 missed, but r3 can: the rebuild takes r3 as its source and copies only what changed, instead of
/// comparing the whole volume.
#[test]
fn a_rebuild_takes_its_source_among_the_replicas_whose_record_can_answer() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(64))?;
    let controller = cluster.start_controller(&[])?;
    for r in &cluster.replicas {
        wait_mode(controller.api, r.addr, "RW")?;
    }
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x11 0 48M", "flush"])?;
    assert!(ok, "{out}");
    let (first, returning, answering) = (
        cluster.replicas[0].addr,
        cluster.replicas[1].addr,
        cluster.replicas[2].addr,
    );

    cluster.kill_replica(1);
    wait_mode(controller.api, returning, "ERR")?;
    let (ok, out) = qemu_io(&controller.url, CHANGED)?;
    assert!(ok, "{out}");

    cluster.kill_replica(0);
    wait_mode(controller.api, first, "ERR")?;
    std::fs::remove_dir_all(&cluster.replicas[0].dir).expect("wipe r1");
    cluster.start_replica(0)?;
    wait_mode(controller.api, first, "RW")?;

    cluster.start_replica(1)?;
    wait_mode(controller.api, returning, "RW")?;
    let log = controller.daemon.plain_log();
    for line in log.lines().filter(|l| l.contains("rebuild")) {
        eprintln!("{line}");
    }
    let (bytes, from_record) =
        last_rebuild(&log, returning).expect("the controller logged the rebuild of r2");
    assert!(
        from_record,
        "a replica whose record answers was taken as the source"
    );
    assert!(
        log.lines().any(|l| l
            .contains("taking the first read-write replica whose write-intent record answers")
            && l.contains(&format!("source={answering}"))),
        "the rebuild says it passed r1 over for r3"
    );
    assert!(
        (CHANGED_BYTES..=CHANGED_BYTES + (256 << 10)).contains(&bytes),
        "copied {bytes} bytes for {CHANGED_BYTES} changed"
    );

    controller.daemon.stop()?;
    for i in 0..3 {
        cluster.stop_replica(i)?;
    }
    assert_replicas_identical(&cluster, &[0, 1, 2])
}
