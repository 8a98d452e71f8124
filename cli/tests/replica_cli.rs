//! The real `basalt replica` binary: it serves the wire protocol, stops
//! cleanly on SIGTERM with its writes flushed, serves an existing store at
//! its own size whatever `--size` says (and logs it), and refuses a size it
//! cannot use with a message that says so.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use basalt_proto::client::ReplicaClient;
use basalt_proto::{Epoch, VolumeId};
use basalt_replica::store::Store;
use bytes::Bytes;

/// The volume secret these replicas are started with (through the environment, as `volume up` does).
const SECRET: &str = "replica-cli-test-secret";

fn secret() -> basalt_proto::auth::VolumeSecret {
    basalt_proto::auth::VolumeSecret::new(SECRET).unwrap()
}

fn basalt() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_basalt"));
    command.env("BASALT_VOLUME_SECRET", SECRET);
    command
}

/// Starts `basalt replica` on a free port and returns it with its address.
fn start_replica(dir: &Path, size: &str) -> (Child, SocketAddr) {
    let mut child = basalt()
        .args(["replica", "--dir"])
        .arg(dir)
        .args([
            "--size",
            size,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("basalt binary runs");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped stdout"))
        .read_line(&mut line)
        .expect("reads stdout");
    let addr = line
        .strip_prefix("listening ")
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("first line announces the address, got {line:?}"));
    (child, addr)
}

#[test]
fn sigterm_finishes_and_flushes_then_the_store_reopens_with_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_replica(dir.path(), "16M");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let before = runtime.block_on(async {
        let client = ReplicaClient::connect(addr, VolumeId(uuid::Uuid::nil()), Epoch(1), &secret())
            .await
            .unwrap();
        for i in 0..16u8 {
            client
                .write(u64::from(i) * 4096, Bytes::from(vec![i + 1; 4096]), false)
                .await
                .unwrap();
        }
        client.identity()
    });
    assert_eq!(before.size_bytes, 16 << 20);

    // SIGTERM: not a crash; the replica must flush what it acknowledged.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM, got {status}");

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.volume_id(), before.volume);
    assert_eq!(store.epoch(), Epoch(1), "the Hello raised the epoch durably");
    assert_eq!(store.recovered_unflushed(), 0, "the shutdown flushed");
    assert_eq!(
        store.revision(),
        before.revision,
        "with a flush of its own, which takes no revision"
    );
    let mut buf = vec![0u8; 4096];
    store.read(15 * 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 16));
}

#[test]
fn a_store_of_another_size_is_served_at_its_own_size_and_the_log_says_so() {
    // A --size is the size of a new store: after an expansion a replica restarted with its first --size
    // keeps the grown size, and a larger --size never grows it behind its controller's back.
    let dir = tempfile::tempdir().unwrap();
    let id = VolumeId::random();
    Store::create(dir.path(), id, 16 << 20).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (asked, said) in [
        ("8M", "expanded past --size"),
        ("32M", "smaller volume than --size"),
    ] {
        let log_path = dir.path().join(format!("replica-{asked}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = basalt()
            .env("RUST_LOG", "info")
            .args(["replica", "--dir"])
            .arg(dir.path())
            .args(["--size", asked, "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: SocketAddr = line
            .strip_prefix("listening ")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("serves with --size {asked}: {line:?}"));
        let identity = runtime.block_on(async {
            ReplicaClient::connect(addr, id, Epoch(1), &secret())
                .await
                .unwrap()
                .identity()
        });
        assert_eq!(identity.size_bytes, 16 << 20, "--size {asked}");
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
        assert!(child.wait().unwrap().success());
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(log.contains(said), "--size {asked}: {log}");
    }

    let out = basalt()
        .args(["replica", "--dir"])
        .arg(dir.path())
        .args(["--size", "1000", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 4 KiB"));
}

#[test]
fn a_replica_without_a_usable_secret_refuses_to_start_and_says_how_to_give_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = basalt()
        .env_remove("BASALT_VOLUME_SECRET")
        .args(["replica", "--dir"])
        .arg(dir.path())
        .args(["--size", "16M", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--secret-file") && stderr.contains("BASALT_VOLUME_SECRET"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("volume.meta").exists(),
        "nothing was created before the refusal"
    );

    let short = dir.path().join("short-secret");
    std::fs::write(&short, "tooshort\n").unwrap();
    let out = basalt()
        .args(["replica", "--dir"])
        .arg(dir.path().join("store"))
        .args(["--size", "16M", "--listen", "127.0.0.1:0", "--secret-file"])
        .arg(&short)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("at least 16") && !stderr.contains("tooshort"),
        "the refusal says why without showing the secret: {stderr}"
    );
}
