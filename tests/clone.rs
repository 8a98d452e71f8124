//! Clones from a snapshot, end to end: a 3-replica clone of a snapshot of a 3-replica volume, each with
//! its own controller, checked through qemu-io; the source snapshot held until the clone is hydrated;
//! a clone replica killed mid-hydration; bad input refused with nothing created. The clone is a volume
//! with a secret of its own, and reads its source with the source volume's (a wrong one is refused).

use std::net::SocketAddr;
use std::time::Duration;

use basalt_tests::volume::CLONE_VOLUME_SECRET;
use basalt_tests::volume::{qemu_io, replica_mode, snapshot_cli, volume_info, Cluster};
use basalt_tests::{basalt_command, wait_for, ByteSize, Result, TEST_VOLUME_SECRET};
use serde_json::Value;

/// How long a clone may take to hydrate its source's 12 MiB at 2 MiB/s, on a loaded 2-core machine,
/// plus a failed rebuild's back-off (up to 30 s) before the killed replica is brought back.
const HYDRATE_TIMEOUT: Duration = Duration::from_secs(180);

/// `basalt snapshot ARGS... --api API`: (success, stdout + stderr).
fn snapshot(api: SocketAddr, args: &[&str]) -> (bool, String) {
    snapshot_cli(api, args).expect("run basalt snapshot")
}

fn holds(api: SocketAddr) -> Vec<Value> {
    let (ok, out) = snapshot(api, &["holds", "--json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.trim()).expect("snapshot holds --json prints JSON");
    v["holds"].as_array().cloned().unwrap_or_default()
}

fn all_rw(info: &Value, cluster: &Cluster) -> bool {
    cluster
        .replicas
        .iter()
        .all(|r| replica_mode(info, r.addr).as_deref() == Some("RW"))
}

/// The clone's data as it must read after the steps of the test below.
const CLONE_VIEW: &[&str] = &[
    "read -P 0xaa 0 1M",
    "read -P 0xcc 1M 1M",
    "read -P 0xaa 2M 6M",
    "read -P 0 8M 8M",
    "read -P 0xab 16M 4M",
    "read -P 0 20M 28M",
];

#[test]
fn a_clone_serves_its_snapshot_at_once_hydrates_in_the_background_and_outlives_its_source() -> Result<()> {
    // The source: 12 MiB written before the snapshot, overwritten in part after it.
    let mut source = Cluster::start(3, ByteSize::mib(32))?;
    let src = source.start_controller(&[])?;
    assert!(qemu_io(&src.url, &["write -P 0xaa 0 8M", "write -P 0xab 16M 4M", "flush"])?.0);
    let (ok, out) = snapshot(src.api, &["create", "gold"]);
    assert!(ok, "{out}");
    assert!(qemu_io(&src.url, &["write -P 0xee 0 1M", "flush"])?.0);

    // The clone: larger than its source, its copy paced so that it is still running below.
    let mut clone = Cluster::start_clone(3, ByteSize::mib(48), &source, "gold", &["--hydrate-rate", "2M"])?;
    assert_ne!(clone.secret, source.secret, "the clone has a secret of its own");
    let cln = clone.start_controller(&[])?;

    // Usable at once: the snapshot's data, not what the source wrote after it.
    let (ok, out) = qemu_io(
        &cln.url,
        &[
            "read -P 0xaa 0 8M",
            "read -P 0xab 16M 4M",
            "read -P 0 8M 8M",
            "read -P 0 32M 16M",
        ],
    )?;
    assert!(
        ok,
        "the clone reads its source snapshot's view: {out}\n--- clone replica 1:\n{}\n--- clone controller:\n{}",
        clone.replicas[0].daemon.as_ref().map(|d| d.plain_log()).unwrap_or_default(),
        cln.daemon.plain_log()
    );
    // Written on both sides independently.
    assert!(qemu_io(&cln.url, &["write -P 0xcc 1M 1M", "flush"])?.0);
    assert!(qemu_io(&src.url, &["write -P 0xdd 2M 1M", "flush"])?.0);
    let (ok, out) = qemu_io(&cln.url, CLONE_VIEW)?;
    assert!(ok, "the clone: {out}");
    let (ok, out) = qemu_io(
        &src.url,
        &[
            "read -P 0xee 0 1M",
            "read -P 0xaa 1M 1M",
            "read -P 0xdd 2M 1M",
            "read -P 0xaa 3M 5M",
        ],
    )?;
    assert!(ok, "the source: {out}");

    // Not hydrated yet: the snapshot is held, its delete refused, and no source replica dropped.
    let info = volume_info(cln.api)?;
    assert_eq!(info["hydrated"], false, "{info}");
    assert!(
        info["clone_of"].as_str().is_some_and(|c| c.contains("gold")),
        "{info}"
    );
    let held = holds(src.api);
    assert_eq!(held.len(), 3, "one hold per clone replica: {held:?}");
    assert!(held
        .iter()
        .all(|h| h["replicas"].as_array().map(Vec::len) == Some(3)));
    let (ok, out) = snapshot(src.api, &["rm", "gold"]);
    assert!(!ok, "deleting a held snapshot must be refused: {out}");
    assert!(
        out.contains("clone") && out.contains("gold"),
        "the refusal names the clone: {out}"
    );
    let (names_ok, names) = snapshot(src.api, &["ls"]);
    assert!(names_ok && names.contains("gold"), "nothing changed: {names}");
    assert!(
        all_rw(&volume_info(src.api)?, &source),
        "no source replica dropped"
    );

    // A clone replica killed mid-hydration, restarted: it resumes from its durable cursor.
    let progress = |info: &Value, i: usize| info["replicas"][i]["hydration"]["done_bytes"].as_u64();
    let total = 32u64 << 20;
    assert!(
        progress(&info, 1).is_some_and(|done| done < total),
        "replica 2 is still hydrating: {info}"
    );
    clone.kill_replica(1);
    assert!(
        qemu_io(&cln.url, &["write -P 0xcc 1M 1M", "flush"])?.0,
        "2 of 3 replicas serve"
    );
    clone.start_replica(1)?;
    wait_for("the clone to hydrate, every replica RW", HYDRATE_TIMEOUT, || {
        volume_info(cln.api).is_ok_and(|i| i["hydrated"] == true && all_rw(&i, &clone))
    })?;
    let (ok, out) = qemu_io(&cln.url, CLONE_VIEW)?;
    assert!(ok, "the clone after hydration: {out}");

    // Hydrated: every hold is released, and the source snapshot (then the whole source) may go.
    wait_for("the clone's holds to be released", HYDRATE_TIMEOUT, || {
        holds(src.api).is_empty()
    })?;
    let (ok, out) = snapshot(src.api, &["rm", "gold"]);
    assert!(ok, "{out}");
    drop(src);
    for i in 0..3 {
        source.kill_replica(i);
    }
    drop(source);
    let (ok, out) = qemu_io(&cln.url, CLONE_VIEW)?;
    assert!(ok, "the clone without its source: {out}");
    let (ok, out) = snapshot(cln.api, &["ls"]);
    assert!(
        ok && out.contains("gold"),
        "the base is the clone's oldest snapshot: {out}"
    );

    // Every clone replica holds the same volume, block for block.
    drop(cln);
    for i in 0..3 {
        clone.stop_replica(i)?;
    }
    let images: Vec<Vec<u8>> = (0..3)
        .map(|i| std::fs::read(clone.export_replica(i)?).map_err(basalt_tests::io("read an export")))
        .collect::<Result<_>>()?;
    assert!(
        images[0] == images[1] && images[1] == images[2],
        "the clone's replicas differ"
    );
    Ok(())
}

/// `basalt replica` as a clone with `args`, expected to fail: its stderr. The clone's own secret is
/// [`CLONE_VOLUME_SECRET`]; `source_secret` goes in `BASALT_CLONE_SOURCE_SECRET` (none if `None`).
fn clone_refused(dir: &std::path::Path, source_secret: Option<&str>, args: &[&str]) -> Result<String> {
    let listen = basalt_tests::free_local_addr()?;
    let mut cmd = basalt_command()?;
    cmd.env("BASALT_VOLUME_SECRET", CLONE_VOLUME_SECRET);
    match source_secret {
        Some(secret) => cmd.env("BASALT_CLONE_SOURCE_SECRET", secret),
        None => cmd.env_remove("BASALT_CLONE_SOURCE_SECRET"),
    };
    let out = cmd
        .arg("replica")
        .arg("--dir")
        .arg(dir)
        .args(["--listen", &listen.to_string()])
        .args(["--volume-id", "7d1c2a4e-5b0f-4c1e-9a51-7b0e3c9d2f10"])
        .args(args)
        .output()
        .expect("run basalt replica");
    assert!(!out.status.success(), "a bad clone must be refused");
    assert!(
        !dir.join("volume.meta").exists(),
        "nothing is created for a refused clone"
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_clone_of_a_missing_source_an_unknown_snapshot_too_small_or_with_a_wrong_source_secret_is_refused_and_nothing_changes(
) -> Result<()> {
    let mut source = Cluster::start(1, ByteSize::mib(16))?;
    let src = source.start_controller(&["--min-healthy", "1"])?;
    let (ok, out) = snapshot(src.api, &["create", "gold"]);
    assert!(ok, "{out}");
    let from = source.replica_addrs()[0].clone();
    let scratch = tempfile::tempdir().map_err(basalt_tests::io("create a temp dir"))?;
    let dir = scratch.path().join("c");

    let err = clone_refused(
        &dir,
        Some(TEST_VOLUME_SECRET),
        &["--size", "16M", "--clone-from", &from, "--clone-snapshot", "nope"],
    )?;
    assert!(err.contains("no snapshot") && err.contains("nope"), "{err}");
    let err = clone_refused(
        &dir,
        Some(TEST_VOLUME_SECRET),
        &["--size", "8M", "--clone-from", &from, "--clone-snapshot", "gold"],
    )?;
    assert!(err.contains("smaller than its source"), "{err}");
    let unreachable = basalt_tests::free_local_addr()?.to_string();
    let err = clone_refused(
        &dir,
        Some(TEST_VOLUME_SECRET),
        &[
            "--size",
            "16M",
            "--clone-from",
            &unreachable,
            "--clone-snapshot",
            "gold",
        ],
    )?;
    assert!(err.contains(&unreachable), "{err}");
    let other = "0b0b0b0b-0b0b-4b0b-8b0b-0b0b0b0b0b0b";
    let err = clone_refused(
        &dir,
        Some(TEST_VOLUME_SECRET),
        &[
            "--size",
            "16M",
            "--clone-from",
            &from,
            "--clone-snapshot",
            "gold",
            "--clone-source-volume",
            other,
        ],
    )?;
    assert!(err.contains(other), "{err}");
    // A clone of two sources, one of them down: the reachable one is not left holding anything.
    let err = clone_refused(
        &dir,
        Some(TEST_VOLUME_SECRET),
        &[
            "--size",
            "16M",
            "--clone-from",
            &from,
            "--clone-from",
            &unreachable,
            "--clone-snapshot",
            "gold",
        ],
    )?;
    assert!(err.contains(&unreachable), "{err}");
    // The source's secret: missing, or not the source volume's (the clone's own, the likely
    // confusion; or a file that overrides the right one in the environment).
    let clone_args = ["--size", "16M", "--clone-from", &from, "--clone-snapshot", "gold"];
    let err = clone_refused(&dir, None, &clone_args)?;
    assert!(
        err.contains("--clone-source-secret-file") && err.contains("BASALT_CLONE_SOURCE_SECRET"),
        "{err}"
    );
    let err = clone_refused(&dir, Some(CLONE_VOLUME_SECRET), &clone_args)?;
    assert!(
        err.contains(&from) && err.contains("source volume's secret"),
        "{err}"
    );
    assert!(
        !err.contains(CLONE_VOLUME_SECRET),
        "a secret is never shown: {err}"
    );
    let wrong = scratch.path().join("wrong-source-secret");
    std::fs::write(&wrong, "not-the-source-volume-secret\n")
        .map_err(basalt_tests::io("write a secret file"))?;
    let wrong_flag = wrong.to_string_lossy().into_owned();
    let mut with_file = clone_args.to_vec();
    with_file.extend(["--clone-source-secret-file", &wrong_flag]);
    let err = clone_refused(&dir, Some(TEST_VOLUME_SECRET), &with_file)?;
    assert!(
        err.contains(&from) && err.contains("source volume's secret"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-source-volume-secret"),
        "a secret is never shown: {err}"
    );
    assert!(holds(src.api).is_empty(), "a refused clone leaves no hold behind");
    let (ok, out) = snapshot(src.api, &["release", "gold", "--holder", "nobody"]);
    assert!(!ok && out.contains("no hold"), "{out}");
    let (ok, out) = snapshot(src.api, &["rm", "gold"]);
    assert!(ok, "{out}");
    Ok(())
}
