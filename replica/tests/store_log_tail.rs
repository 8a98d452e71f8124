//! The head's index log is appended through a shared memory mapping of a file preallocated a window
//! at a time, so after a `kill -9` the log file is longer than its records and ends in zeros. These
//! tests kill a child process that wrote through such a log and check that a reopen finds the log's
//! clean end inside the zeros (no rewrite when the log ended at a flush), keeps every write the child
//! completed, and appends after the old records, inside the same tail.
//!
//! The child is this test binary re-executed with [`CHILD_DIR`] set: it runs the test's workload,
//! prints [`DONE`] and waits to be killed.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use basalt_replica::store::{LayerId, Store, StoreError};

const CHILD_DIR: &str = "BASALT_STORE_LOG_TAIL_CHILD_DIR";
const DONE: &str = "@@ done";
/// 256 blocks: small, so that tens of thousands of writes rewrite the same blocks.
const BLOCKS: u64 = 256;
const SIZE: u64 = BLOCKS * 4096;
/// The store's mapping window and preallocation step (`LOG_WINDOW`).
const WINDOW: u64 = 1 << 20;
const RECORD: u64 = 24;

/// The content of `lba` after its `version`-th write.
fn block(lba: u64, version: u64) -> Vec<u8> {
    let mut out = vec![0u8; 4096];
    out[..8].copy_from_slice(&lba.to_le_bytes());
    out[8..16].copy_from_slice(&version.to_le_bytes());
    out[16..].fill(version as u8 ^ lba as u8);
    out
}

/// Opens the store in `dir` again after this process dropped it. The directory's `flock` belongs to the
/// open file description, and a sibling test that forks a child at that moment shares it until the
/// child's exec closes it (close-on-exec): for that instant the directory still looks in use. Waits that
/// out (a few seconds at most) instead of failing on it; any other error fails at once.
fn reopen(dir: &Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result.unwrap(),
        }
    }
}

/// Runs `workload` in a child process on `dir`, then kills it with SIGKILL once it is done.
fn run_child_and_kill(test_name: &str, dir: &Path) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let done = stdout
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains(DONE));
    assert!(done, "the child ended before finishing its workload");
    // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "the child exited by itself: {status:?}");
}

/// The child's side: runs `workload` on a new store in `dir`, reports, and waits to be killed.
fn child(workload: impl FnOnce(&Store)) -> ! {
    let dir = std::env::var(CHILD_DIR).unwrap();
    let store = Store::create(Path::new(&dir), basalt_proto::VolumeId::random(), SIZE).unwrap();
    workload(&store);
    println!("{DONE}");
    loop {
        std::thread::park();
    }
}

fn head_log(dir: &Path) -> std::fs::Metadata {
    std::fs::metadata(dir.join(LayerId(1).log_object())).unwrap()
}

fn assert_blocks(store: &Store, version_of: impl Fn(u64) -> u64, when: &str) {
    let mut buf = vec![0u8; 4096];
    for lba in 0..BLOCKS {
        store.read(lba * 4096, &mut buf).unwrap();
        assert!(
            buf == block(lba, version_of(lba)),
            "{when}: block {lba} is not its last write"
        );
    }
}

/// Writes every block once per round, with version `r` in round `r`.
fn rewrite_all(store: &Store, rounds: std::ops::Range<u64>) {
    for version in rounds {
        for lba in 0..BLOCKS {
            store.write(lba * 4096, &block(lba, version)).unwrap();
        }
    }
}

#[test]
fn a_log_killed_after_its_flush_reopens_in_place_and_appends_inside_its_preallocated_tail() {
    const NAME: &str =
        "a_log_killed_after_its_flush_reopens_in_place_and_appends_inside_its_preallocated_tail";
    if std::env::var(CHILD_DIR).is_ok() {
        child(|store| {
            rewrite_all(store, 1..3);
            store.flush().unwrap();
        });
    }
    let dir = tempfile::tempdir().unwrap();
    run_child_and_kill(NAME, dir.path());
    let before = head_log(dir.path());
    assert_eq!(
        before.len(),
        WINDOW,
        "the log file is preallocated past its records"
    );

    let store = Store::open(dir.path()).unwrap();
    assert_blocks(&store, |_| 2, "after the kill");
    let reopened = head_log(dir.path());
    assert_eq!(
        (reopened.ino(), reopened.len()),
        (before.ino(), before.len()),
        "a log that ends in zeros after a flush marker has a clean end: it is not rewritten"
    );
    rewrite_all(&store, 3..4);
    store.flush().unwrap();
    drop(store);
    let after = head_log(dir.path());
    assert_eq!(
        (after.ino(), after.len()),
        (before.ino(), before.len()),
        "the new records went into the same file's tail"
    );
    let store = reopen(dir.path());
    assert_blocks(&store, |_| 3, "after the second reopen");
}

#[test]
fn kill_9_after_writes_across_two_log_windows_keeps_every_completed_write() {
    const NAME: &str = "kill_9_after_writes_across_two_log_windows_keeps_every_completed_write";
    // Enough rounds that the records fill the first window, one straddling its end.
    const ROUNDS: u64 = WINDOW / RECORD / BLOCKS + 2;
    if std::env::var(CHILD_DIR).is_ok() {
        child(|store| {
            rewrite_all(store, 1..ROUNDS - 1);
            store.flush().unwrap();
            // Not flushed: still in the page cache, record before data, so a kill -9 keeps them.
            rewrite_all(store, ROUNDS - 1..ROUNDS);
            store.write(0, &block(0, ROUNDS)).unwrap();
        });
    }
    let dir = tempfile::tempdir().unwrap();
    run_child_and_kill(NAME, dir.path());
    assert_eq!(
        head_log(dir.path()).len(),
        2 * WINDOW,
        "the log grew by a second window"
    );

    let last = |lba| if lba == 0 { ROUNDS } else { ROUNDS - 1 };
    let store = Store::open(dir.path()).unwrap();
    assert_blocks(&store, last, "after the kill");
    drop(store);
    let store = reopen(dir.path());
    assert_blocks(&store, last, "after a second reopen");
}

#[test]
fn a_snapshot_of_a_head_whose_log_is_not_mostly_superseded_appends_its_marker_and_trims_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), basalt_proto::VolumeId::random(), SIZE).unwrap();
    for lba in 0..BLOCKS {
        store.write(lba * 4096, &block(lba, 1)).unwrap();
    }
    store.flush().unwrap();
    let name = dir.path().join(LayerId(1).log_object());
    let before = std::fs::read(&name).unwrap();
    store.snapshot_create("s").unwrap();
    let frozen = std::fs::read(&name).unwrap();
    // BLOCKS records and a flush marker, then the snapshot's marker: the old records are left where
    // they were (not rewritten while every I/O waits), and the preallocated zeros are gone.
    assert_eq!(
        frozen.len() as u64,
        (BLOCKS + 2) * RECORD,
        "trimmed to its records"
    );
    assert_eq!(
        frozen[..frozen.len() - RECORD as usize],
        before[..frozen.len() - RECORD as usize]
    );
    assert_eq!(
        frozen[frozen.len() - RECORD as usize],
        3,
        "ends in a flush marker"
    );
    drop(store);
    let store = reopen(dir.path());
    assert_blocks(&store, |_| 1, "after reopening the snapshot's appended log");
}
