//! A write that fails part-way (the disk is full) is refused, leaves no partial record behind, and
//! the store carries on once there is room again.
//!
//! The full disk is the kernel's file-size limit (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored): an
//! append that crosses it is written in part and then fails with `EFBIG`, exactly the partial
//! write a full file system gives. The limit applies to a whole process, so the test re-executes
//! its own binary as a child that runs the scenario, and checks that the child succeeded.

use std::path::Path;
use std::process::Command;

use basalt_agent::store::embedded::{EmbeddedStore, LOG_FILE};
use basalt_agent::store::{Expect, Store, StoreError};

const CHILD_DIR_ENV: &str = "BASALT_STORE_FULL_DISK_CHILD_DIR";
const TEST_NAME: &str = "a_failed_append_leaves_nothing_behind_and_the_store_carries_on";
/// The size the log may reach: a few dozen records.
const LIMIT_BYTES: u64 = 64 << 10;
const VALUE_BYTES: usize = 1000;

#[test]
fn a_failed_append_leaves_nothing_behind_and_the_store_carries_on() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
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
    // The child finished with a clean log: it opens here too, with everything the child wrote.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let (kvs, revision) = store.list("/").await.unwrap();
        assert_eq!(kvs.len() as u64, revision);
        assert!(kvs.iter().all(|kv| kv.value.len() == VALUE_BYTES));
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

fn child(dir: &Path) {
    // SAFETY: setting a signal's disposition to "ignore" is async-signal-safe and process-wide.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    set_file_size_limit(LIMIT_BYTES);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(dir).unwrap();
        let mut acked = 0u64;
        let failure = loop {
            match store
                .put(&format!("/k/{acked}"), vec![7; VALUE_BYTES], Expect::Absent, None)
                .await
            {
                Ok(revision) => {
                    acked += 1;
                    assert_eq!(revision, acked);
                    assert!(acked < 1000, "the file-size limit never stopped an append");
                }
                Err(e) => break e,
            }
        };
        match &failure {
            StoreError::Io { context, .. } => assert!(context.contains("appending to"), "{failure}"),
            other => panic!("expected an I/O error naming the append, got {other}"),
        }
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
        drop(store);
        let store = EmbeddedStore::open(dir).unwrap();
        let (kvs, revision) = store.list("/").await.unwrap();
        assert_eq!((kvs.len() as u64, revision), (acked + 1, acked + 1));
    });
}
