//! Online expansion, end to end (`basalt volume expand`): real replica and controller processes, qemu-io
//! through qemu's iSCSI driver, and the harness initiator keeping a session open across the grow.

use std::process::Output;
use std::time::Duration;

use basalt_tests::fault::{capacity_blocks, CommandOutcome, Session};
use basalt_tests::volume::{qemu_io, replica_mode, volume_info, Cluster, Controller};
use basalt_tests::{basalt_command, read_file, wait_for, ByteSize, Result};

const MIB: u64 = 1 << 20;

/// `basalt volume expand --api ADDR --size SIZE`, whatever its exit status.
fn expand(controller: &Controller, size: &str) -> Result<Output> {
    let mut cmd = basalt_command()?;
    cmd.args([
        "volume",
        "expand",
        "--api",
        &controller.api.to_string(),
        "--size",
        size,
    ]);
    cmd.output().map_err(basalt_tests::io("run basalt volume expand"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn size_of(controller: &Controller) -> Result<u64> {
    Ok(volume_info(controller.api)?["size_bytes"].as_u64().unwrap_or(0))
}

/// Stops the controller and every replica listed cleanly, exports them, and asserts that they hold the same
/// bytes, `size` of them.
fn assert_replicas_identical(cluster: &mut Cluster, controller: Controller, size: u64) -> Result<()> {
    controller.daemon.stop()?;
    let all: Vec<usize> = (0..cluster.replicas.len()).collect();
    for &i in &all {
        cluster.stop_replica(i)?;
    }
    let images: Vec<Vec<u8>> = all
        .iter()
        .map(|&i| cluster.export_replica(i).and_then(|p| read_file(&p)))
        .collect::<Result<_>>()?;
    for (i, image) in images.iter().enumerate() {
        assert_eq!(
            image.len() as u64,
            size,
            "replica r{} holds the grown volume",
            i + 1
        );
        if image != &images[0] {
            let block = image
                .chunks(4096)
                .zip(images[0].chunks(4096))
                .position(|(a, b)| a != b);
            panic!(
                "replica r{} differs from r1 (first differing 4 KiB block: {block:?})",
                i + 1
            );
        }
    }
    Ok(())
}

fn wait_until_all_rw(cluster: &Cluster, controller: &Controller) -> Result<()> {
    wait_for("every replica to be RW", Duration::from_secs(120), || {
        volume_info(controller.api)
            .map(|info| {
                cluster
                    .replicas
                    .iter()
                    .all(|r| replica_mode(&info, r.addr).as_deref() == Some("RW"))
            })
            .unwrap_or(false)
    })
}

/// A session logged in before the grow gets CAPACITY DATA HAS CHANGED on its next command, then the new
/// READ CAPACITY; qemu-io writes past the old end and reads it back; every replica holds the same bytes.
/// The same size again changes nothing (and says so); a shrink or an absurd size is refused.
#[test]
fn a_session_open_across_an_expansion_is_told_and_qemu_writes_past_the_old_end() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(32))?;
    let controller = cluster.start_controller(&[])?;
    let url = controller.url.clone();
    let (ok, out) = qemu_io(&url, &["write -P 0x11 31M 1M", "flush"])?;
    assert!(ok, "{out}");

    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let session = runtime
        .block_on(Session::login(url.portal, &url.iqn))
        .expect("the harness initiator logs in");
    let before = runtime.block_on(session.read_capacity());
    assert_eq!(capacity_blocks(&before), Some(32 * MIB / 512), "{before}");

    let out = expand(&controller, "48M")?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("expanded from"), "{}", text(&out));
    assert_eq!(size_of(&controller)?, 48 * MIB, "volume info shows the new size");

    let told = runtime.block_on(session.read_capacity());
    assert_eq!(
        told,
        CommandOutcome::CheckCondition {
            key: 0x6,
            asc: 0x2a,
            ascq: 0x09
        },
        "the open session is told the capacity changed"
    );
    let after = runtime.block_on(session.read_capacity());
    assert_eq!(capacity_blocks(&after), Some(48 * MIB / 512), "{after}");
    // The same session writes past the old end and reads it back.
    let block = bytes::Bytes::from(vec![0x5a; 4096]);
    let past = 40 * MIB / 512;
    assert!(runtime.block_on(session.write(past, block.clone())).is_good());
    assert_eq!(
        runtime.block_on(session.read(past, 8)),
        CommandOutcome::Good(block)
    );
    drop(session);

    let (ok, out) = qemu_io(
        &url,
        &[
            "write -P 0x22 44M 2M",
            "flush",
            "read -P 0x22 44M 2M",
            "read -P 0x11 31M 1M",
            "read -P 0 32M 4M",
            "read -P 0x5a 40M 4k",
            "read -P 0 47M 1M",
        ],
    )?;
    assert!(ok, "qemu-io past the old end: {out}");

    let same = expand(&controller, "48M")?;
    assert!(same.status.success(), "{}", text(&same));
    assert!(text(&same).contains("nothing to do"), "{}", text(&same));
    let shrink = expand(&controller, "16M")?;
    assert!(!shrink.status.success());
    assert!(text(&shrink).contains("never shrink"), "{}", text(&shrink));
    let absurd = expand(&controller, "2048P")?;
    assert!(!absurd.status.success(), "{}", text(&absurd));
    let absurd = expand(&controller, "2P")?;
    assert!(!absurd.status.success());
    assert!(text(&absurd).contains("largest volume"), "{}", text(&absurd));
    assert_eq!(
        size_of(&controller)?,
        48 * MIB,
        "a refused expansion changes nothing"
    );

    assert_replicas_identical(&mut cluster, controller, 48 * MIB)
}

/// A replica that is down during the grow misses it; when it returns (started with its old --size) it is
/// grown and rebuilt, and every block matches.
#[test]
fn a_replica_down_during_an_expansion_is_grown_and_rebuilt_when_it_returns() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(32))?;
    let controller = cluster.start_controller(&[])?;
    let url = controller.url.clone();
    let (ok, out) = qemu_io(&url, &["write -P 0x11 0 16M", "flush"])?;
    assert!(ok, "{out}");
    cluster.kill_replica(1);
    let victim = cluster.replicas[1].addr;
    wait_for("the killed replica to be ERR", Duration::from_secs(20), || {
        volume_info(controller.api)
            .map(|i| replica_mode(&i, victim).as_deref() == Some("ERR"))
            .unwrap_or(false)
    })?;
    let out = expand(&controller, "64M")?;
    assert!(out.status.success(), "two of three replicas grow: {}", text(&out));
    let (ok, out) = qemu_io(&url, &["write -P 0x33 40M 8M", "write -P 0x44 8M 1M", "flush"])?;
    assert!(ok, "{out}");

    cluster.start_replica(1)?;
    wait_until_all_rw(&cluster, &controller)?;
    let (ok, out) = qemu_io(&url, &["read -P 0x33 40M 8M", "read -P 0x11 0 8M"])?;
    assert!(ok, "{out}");
    assert_replicas_identical(&mut cluster, controller, 64 * MIB)
}

/// A controller started again with the size it was first given serves the grown volume; one started with a
/// larger size than its replicas hold is refused with a pointer to `basalt volume expand`.
#[test]
fn a_controller_restarted_with_its_old_size_serves_the_grown_volume() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(32))?;
    let controller = cluster.start_controller(&[])?;
    assert!(expand(&controller, "48M")?.status.success());
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x66 47M 1M", "flush"])?;
    assert!(ok, "{out}");
    controller.daemon.stop()?;

    // `cluster.size` is still 32 MiB: the controller and the replicas get their old --size.
    for i in 0..3 {
        cluster.stop_replica(i)?;
        cluster.start_replica(i)?;
    }
    let controller = cluster.start_controller(&[])?;
    assert_eq!(size_of(&controller)?, 48 * MIB);
    let (ok, out) = qemu_io(&controller.url, &["read -P 0x66 47M 1M"])?;
    assert!(ok, "{out}");
    controller.daemon.stop()?;

    cluster.size = ByteSize::mib(64);
    let refused = cluster.start_controller(&[]);
    assert!(
        refused.is_err(),
        "a --size above the replicas' is not an expansion"
    );
    let log = std::fs::read_to_string(cluster.log_dir().join("controller-3.log")).unwrap_or_default();
    assert!(
        log.contains("basalt volume expand"),
        "the refusal says what to do: {log}"
    );
    Ok(())
}

/// An expansion while a replica is being rebuilt (write-only) reaches it too, and the rebuild covers the new
/// end: afterwards every replica holds the same bytes.
#[test]
fn an_expansion_during_a_rebuild_reaches_the_rebuilding_replica() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(128))?;
    let controller = cluster.start_controller(&[])?;
    let url = controller.url.clone();
    let (ok, out) = qemu_io(&url, &["write -P 0x11 0 120M", "flush"])?;
    assert!(ok, "{out}");
    // A brand-new, empty replica in its place: a full rebuild, long enough to grow the volume during it.
    cluster.kill_replica(2);
    std::fs::remove_dir_all(&cluster.replicas[2].dir).map_err(basalt_tests::io("wipe a replica"))?;
    let victim = cluster.replicas[2].addr;
    cluster.start_replica(2)?;
    wait_for(
        "the new replica to be rebuilt (WO)",
        Duration::from_secs(60),
        || {
            volume_info(controller.api)
                .map(|i| replica_mode(&i, victim).as_deref() == Some("WO"))
                .unwrap_or(false)
        },
    )?;
    let out = expand(&controller, "192M")?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("on every replica"),
        "the write-only replica grew too, none was dropped: {}",
        text(&out)
    );
    let (ok, out) = qemu_io(&url, &["write -P 0x77 150M 8M", "flush"])?;
    assert!(ok, "{out}");
    wait_until_all_rw(&cluster, &controller)?;
    let (ok, out) = qemu_io(&url, &["read -P 0x77 150M 8M", "read -P 0x11 0 8M"])?;
    assert!(ok, "{out}");
    assert_replicas_identical(&mut cluster, controller, 192 * MIB)
}
