//! A replica on a real block device, end to end: a loop device over a sparse file, `basalt replica
//! --device /dev/loopN` under a 1-replica volume served by `basalt controller`, written and read
//! over iSCSI, restarted on the same device, refused to a second opener, and exported.
//!
//! Needs root and loop-device support (a host privilege, not something the test can install), so it is
//! `#[ignore]`d: a plain `cargo test` reports it as ignored, with the reason, instead of passing without
//! running. `tests/run.sh` (what CI runs, as root) runs it with `--ignored`, and run that way it fails,
//! saying why, on a host that cannot run it: it never passes without having run.

use std::net::SocketAddr;
use std::time::Duration;

use basalt_tests::host::LoopDevice;
use basalt_tests::volume::{qemu_io, Cluster, Controller, Replica};
use basalt_tests::{basalt_command, ByteSize, Daemon, StopPolicy};

const VOLUME: ByteSize = ByteSize::mib(64);
/// Room for the 64 MiB volume, its index logs and ~10 MiB of metadata (default 1 MiB clusters).
const DEVICE_BYTES: u64 = 128 << 20;

/// Why this host cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (losetup needs it)".into());
    }
    if !std::path::Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (no loop device support)".into());
    }
    None
}

fn start_device_replica(cluster: &Cluster, device: &std::path::Path, addr: SocketAddr) -> Daemon {
    let mut cmd = basalt_command().unwrap();
    cmd.env("RUST_LOG", "info")
        .arg("replica")
        .arg("--device")
        .arg(device)
        .args(["--size", &VOLUME.bytes().to_string()])
        .args(["--listen", &addr.to_string()])
        .args(["--volume-id", &cluster.volume_id]);
    let mut daemon = Daemon::spawn(
        "replica-device",
        cmd,
        cluster.log_dir(),
        StopPolicy::Terminate {
            grace: Duration::from_secs(20),
        },
    )
    .unwrap();
    daemon.wait_for_port(addr, Duration::from_secs(60)).unwrap();
    daemon
}

/// What the volume reads after the writes of the test: written, discarded and never written ranges.
const READ_BACK: &[&str] = &[
    "read -P 0xab 0 512k",
    "read -P 0 512k 512k",
    "read -P 0x11 1M 4k",
    "read -P 0xcd 40M 64k",
    "read -P 0 50M 1M",
];

fn io_ok(controller: &Controller, commands: &[&str]) {
    let (ok, out) = qemu_io(&controller.url, commands).unwrap();
    assert!(ok, "qemu-io {commands:?}: {out}");
}

#[test]
#[ignore = "needs root and loop devices: run as root with `-- --ignored` (tests/run.sh does)"]
fn a_replica_on_a_loop_device_serves_a_volume_and_keeps_it_across_restarts() {
    if let Some(why) = unsupported() {
        panic!(
            "this host cannot run the block-device test: {why}; run it as root on a host with loop devices"
        );
    }
    let mut cluster = Cluster::start(0, VOLUME).unwrap();
    let backing = cluster.log_dir().join("device.img");
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(DEVICE_BYTES))
        .unwrap();
    let loop_device = LoopDevice::attach(&backing).unwrap();
    let device = loop_device.device().to_path_buf();
    let addr = basalt_tests::free_local_addr().unwrap();
    let daemon = start_device_replica(&cluster, &device, addr);
    cluster.replicas.push(Replica {
        addr,
        dir: device.clone(),
        daemon: Some(daemon),
    });

    // A second replica on the same device is refused while the first holds it.
    let second = basalt_command()
        .unwrap()
        .arg("replica")
        .arg("--device")
        .arg(&device)
        .args(["--size", &VOLUME.bytes().to_string()])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && said.contains("in use"), "{said}");

    let controller = cluster.start_controller(&["--min-healthy", "1"]).unwrap();
    io_ok(
        &controller,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 40M 64k",
            "write -P 0x11 1M 4k",
            "discard 512k 512k",
            "flush",
        ],
    );
    io_ok(&controller, READ_BACK);
    controller.daemon.stop().unwrap();

    // Restart the replica on the same device: the store comes back as it was.
    cluster.stop_replica(0).unwrap();
    let daemon = start_device_replica(&cluster, &device, addr);
    cluster.replicas[0].daemon = Some(daemon);
    let controller = cluster.start_controller(&["--min-healthy", "1"]).unwrap();
    io_ok(&controller, READ_BACK);
    controller.daemon.stop().unwrap();
    cluster.stop_replica(0).unwrap();

    // `replica export --device` reads the stopped replica's volume.
    let image = cluster.log_dir().join("export.img");
    let out = basalt_command()
        .unwrap()
        .args(["replica", "export", "--device"])
        .arg(&device)
        .arg("--out")
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len() as u64, VOLUME.bytes());
    assert!(bytes[..512 << 10].iter().all(|&b| b == 0xab));
    assert!(bytes[512 << 10..1 << 20].iter().all(|&b| b == 0));
    assert!(bytes[40 << 20..(40 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0xcd));
    drop(cluster);
    loop_device.detach().unwrap();
}
