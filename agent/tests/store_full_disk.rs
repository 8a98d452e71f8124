//! A full disk: a write that fails part-way is refused and leaves no partial record behind, a
//! compaction that cannot write its snapshot leaves the store as it was, and the store carries on
//! once there is room again.
//!
//! The full disk is the kernel's file-size limit (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored): a write
//! that crosses it is done in part and then fails with `EFBIG`, exactly the partial write a full
//! file system gives. The limit applies to a whole process, so each test re-executes its own binary
//! as a child that runs the scenario under the limit, and checks that the child succeeded and that
//! the directory it left opens with everything it acknowledged.

use std::path::Path;
use std::process::Command;

use basalt_agent::store::embedded::{EmbeddedStore, Options, LOG_FILE, SNAPSHOT_FILE};
use basalt_agent::store::{Expect, Store, StoreError};

/// Set in the child: the store's directory.
const CHILD_DIR_ENV: &str = "BASALT_STORE_FULL_DISK_CHILD_DIR";
/// The size any file may reach: a few dozen records.
const LIMIT_BYTES: u64 = 64 << 10;
const VALUE_BYTES: usize = 1000;

/// Runs `test` (this binary's test of that name) in a child on a new directory, and checks what
/// it left: `expected_keys` records, all of them intact.
fn run_in_child(test: &str, expected_keys: impl FnOnce(u64) -> bool) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the child failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let (kvs, revision) = store.list("/").await.unwrap();
        assert_eq!(kvs.len() as u64, revision);
        assert!(expected_keys(revision), "{revision} records");
        assert!(kvs.iter().all(|kv| kv.value == [7; VALUE_BYTES]));
    });
}

fn set_file_size_limit(bytes: libc::rlim_t) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = bytes.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

/// In the child: the limit on, a runtime, and the scenario on the directory.
fn under_the_limit<F: std::future::Future<Output = ()>>(
    dir: &Path,
    scenario: impl FnOnce(std::path::PathBuf) -> F,
) {
    // SAFETY: setting a signal's disposition to "ignore" is async-signal-safe and process-wide.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    set_file_size_limit(LIMIT_BYTES);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(scenario(dir.to_path_buf()));
}

/// Puts distinct keys until the store refuses one, which must be for the append; returns how
/// many were acknowledged (each at the next revision).
async fn put_until_full(store: &EmbeddedStore) -> u64 {
    let mut acked = 0u64;
    loop {
        match store
            .put(&format!("/k/{acked}"), vec![7; VALUE_BYTES], Expect::Absent, None)
            .await
        {
            Ok(revision) => {
                acked += 1;
                assert_eq!(revision, acked);
                assert!(acked < 1000, "the file-size limit never stopped an append");
            }
            Err(StoreError::Io { ref context, .. }) if context.contains("appending to") => return acked,
            Err(e) => panic!("expected an I/O error naming the append, got {e}"),
        }
    }
}

#[test]
fn a_failed_append_leaves_nothing_behind_and_the_store_carries_on() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        run_in_child(
            "a_failed_append_leaves_nothing_behind_and_the_store_carries_on",
            |n| n > 10,
        );
        return;
    };
    under_the_limit(Path::new(&dir), |dir| async move {
        let store = EmbeddedStore::open(&dir).unwrap();
        let acked = put_until_full(&store).await;
        // The partial record was cut off: the log ends at the last acknowledged record, and the
        // store still answers (and refuses the same way while the disk is full).
        let log_len = std::fs::metadata(dir.join(LOG_FILE)).unwrap().len();
        assert!(
            log_len <= LIMIT_BYTES && log_len + VALUE_BYTES as u64 > LIMIT_BYTES - 200,
            "{log_len}"
        );
        assert!(store
            .put("/k/again", vec![7; VALUE_BYTES], Expect::Absent, None)
            .await
            .is_err());
        assert_eq!(std::fs::metadata(dir.join(LOG_FILE)).unwrap().len(), log_len);
        assert_eq!(store.list("/").await.unwrap().1, acked);

        // Room again: the next change follows the last acknowledged one.
        set_file_size_limit(libc::RLIM_INFINITY);
        let revision = store
            .put("/k/after", vec![7; VALUE_BYTES], Expect::Absent, None)
            .await
            .unwrap();
        assert_eq!(revision, acked + 1);
    });
}

#[test]
fn a_compaction_that_cannot_write_its_snapshot_changes_nothing() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        // More records than one file of the limit holds: they were compacted at least once.
        run_in_child(
            "a_compaction_that_cannot_write_its_snapshot_changes_nothing",
            |n| n > LIMIT_BYTES / VALUE_BYTES as u64,
        );
        return;
    };
    under_the_limit(Path::new(&dir), |dir| async move {
        // Compactions every 16 KiB of log: the snapshots grow with the state until one no longer
        // fits under the limit while the log still does.
        let options = Options {
            compact_after_bytes: 16 << 10,
            ..Options::default()
        };
        let store = EmbeddedStore::open_with(&dir, options.clone()).unwrap();
        let acked = put_until_full(&store).await;
        let snapshot_len = std::fs::metadata(dir.join(SNAPSHOT_FILE)).unwrap().len();
        assert!(
            snapshot_len < acked * VALUE_BYTES as u64,
            "every compaction succeeded ({snapshot_len} bytes of snapshot for {acked} records)"
        );
        assert!(!dir.join("store.snapshot.tmp").exists());
        // What is on disk now (an older snapshot and a log on top of it) holds every record.
        drop(store);
        let store = EmbeddedStore::open_with(&dir, options).unwrap();
        assert_eq!(store.list("/").await.unwrap().0.len() as u64, acked);
        set_file_size_limit(libc::RLIM_INFINITY);
        assert_eq!(
            store
                .put("/k/after", vec![7; VALUE_BYTES], Expect::Absent, None)
                .await
                .unwrap(),
            acked + 1
        );
    });
}
