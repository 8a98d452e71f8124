//! Volume snapshots through the controller, end to end: `basalt snapshot create|ls|rm|revert` on a 3-replica
//! volume, checked against what every replica holds.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use basalt_tests::volume::{qemu_io, volume_info, Cluster};
use basalt_tests::{basalt_command, read_file, require_tool, wait_for, ByteSize, Result};
use serde_json::Value;

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

fn snapshot_names(api: std::net::SocketAddr) -> Result<(Vec<String>, Vec<Value>)> {
    let (ok, out) = snapshot(api, &["ls", "--json"])?;
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.trim()).expect("snapshot ls --json prints JSON");
    let names = v["snapshots"]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["name"].as_str().unwrap().into())
        .collect();
    Ok((names, v["divergent"].as_array().cloned().unwrap_or_default()))
}

#[test]
fn snapshots_are_taken_listed_and_merged_away_on_every_replica() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(32))?;
    let controller = cluster.start_controller(&[])?;
    let api = controller.api;
    assert!(qemu_io(&controller.url, &["write -P 0xaa 0 1M", "flush"])?.0);
    let (ok, out) = snapshot(api, &["create", "before"])?;
    assert!(ok, "{out}");
    assert!(
        qemu_io(
            &controller.url,
            &["write -P 0xbb 0 512k", "write -P 0xcc 4M 1M", "flush"]
        )?
        .0
    );
    let (ok, out) = snapshot(api, &["create", "after"])?;
    assert!(ok, "{out}");

    let (names, divergent) = snapshot_names(api)?;
    assert_eq!(names, ["before", "after"], "the chain, oldest first");
    assert!(
        divergent.is_empty(),
        "every replica holds the same chain: {divergent:?}"
    );
    let (ok, out) = snapshot(api, &["create", "bad name!"])?;
    assert!(!ok && out.contains("invalid snapshot name"), "{out}");
    let (ok, out) = snapshot(api, &["create", "before"])?;
    assert!(!ok, "a name can only be used once: {out}");

    // Delete the older one while writes go on: its blocks merge into `after`.
    let writer = {
        let url = controller.url.clone();
        std::thread::spawn(move || qemu_io(&url, &["write -P 0xdd 8M 2M", "flush"]))
    };
    let (ok, out) = snapshot(api, &["rm", "before"])?;
    assert!(ok, "{out}");
    assert!(
        writer.join().expect("writer").map(|r| r.0)?,
        "writes during the merge succeed"
    );
    let (names, _) = snapshot_names(api)?;
    assert_eq!(names, ["after"]);

    // What each replica holds, as of `after` and now.
    controller.daemon.stop()?;
    for i in 0..3 {
        cluster.stop_replica(i)?;
    }
    for i in 0..3 {
        let dir = &cluster.replicas[i].dir;
        let out = cluster.dir.path().join(format!("after-r{i}.img"));
        let mut export = basalt_command()?;
        export
            .args(["replica", "export", "--snapshot", "after", "--dir"])
            .arg(dir)
            .arg("--out")
            .arg(&out);
        basalt_tests::run_checked(&mut export)?;
        let snap = read_file(&out)?;
        assert!(
            snap[..512 << 10].iter().all(|&b| b == 0xbb),
            "r{i}: `after` holds the second write"
        );
        assert!(
            snap[512 << 10..1 << 20].iter().all(|&b| b == 0xaa),
            "r{i}: and the merged first one"
        );
        assert!(
            snap[8 << 20..10 << 20].iter().all(|&b| b == 0),
            "r{i}: not the write made after it"
        );
        let now = read_file(&cluster.export_replica(i)?)?;
        assert!(
            now[8 << 20..10 << 20].iter().all(|&b| b == 0xdd),
            "r{i}: the live volume has it"
        );
    }
    Ok(())
}

#[test]
fn revert_is_refused_while_an_initiator_is_logged_in_then_applies_everywhere() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(16))?;
    let controller = cluster.start_controller(&[])?;
    let api = controller.api;
    assert!(qemu_io(&controller.url, &["write -P 0x01 0 64k", "flush"])?.0);
    assert!(snapshot(api, &["create", "good"])?.0);
    assert!(qemu_io(&controller.url, &["write -P 0x02 0 64k", "flush"])?.0);

    // An interactive qemu-io holds a session open until its stdin closes.
    let mut cmd = Command::new(require_tool("qemu-io")?);
    cmd.args(["-f", "raw", &controller.url.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut held = Reaped(cmd.spawn().expect("start qemu-io"));
    wait_for("the initiator to log in", Duration::from_secs(20), || {
        volume_info(api)
            .map(|i| i["sessions"].as_u64() == Some(1))
            .unwrap_or(false)
    })?;
    let (ok, out) = snapshot(api, &["revert", "good"])?;
    assert!(
        !ok && out.contains("logged in"),
        "revert must be refused with a reason: {out}"
    );

    let mut stdin = held.0.stdin.take().expect("stdin");
    let _ = stdin.write_all(b"quit\n");
    drop(stdin);
    let _ = held.0.wait();
    wait_for("the initiator to log out", Duration::from_secs(20), || {
        volume_info(api)
            .map(|i| i["sessions"].as_u64() == Some(0))
            .unwrap_or(false)
    })?;
    let (ok, out) = snapshot(api, &["revert", "nonexistent"])?;
    assert!(!ok && out.contains("nothing was reverted"), "{out}");
    let (ok, out) = snapshot(api, &["revert", "good"])?;
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&controller.url, &["read -P 0x01 0 64k"])?;
    assert!(ok, "the volume reads as it was at the snapshot: {out}");
    Ok(())
}

/// A child that is killed and reaped however the test ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
