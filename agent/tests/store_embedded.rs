//! The embedded cluster store beyond the contract both stores share (agent/tests/store_contract.rs):
//! revisions exactly, concurrent watchers, reopening, its bounded history, the directory lock and damaged files. The store is the
//! real one on a real directory; waits have deadlines and no assertion depends on timing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use basalt_agent::store::embedded::{EmbeddedStore, Options, LOG_FILE, SNAPSHOT_FILE};
use basalt_agent::store::{Event, Expect, KeyValue, LeaseId, Store, StoreError, Watch};
use futures::StreamExt;

/// Long enough for anything to happen on a loaded machine; only ever a bound on a wait.
const DEADLINE: Duration = Duration::from_secs(60);

fn open(dir: &Path) -> Arc<EmbeddedStore> {
    EmbeddedStore::open(dir).unwrap()
}

async fn next(watch: &mut Watch) -> Event {
    tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("no event before the deadline")
        .expect("the watch ended")
        .expect("the watch failed")
}

/// A put that must succeed.
async fn put(
    store: &EmbeddedStore,
    key: &str,
    value: Vec<u8>,
    expect: Expect,
    lease: Option<LeaseId>,
) -> u64 {
    store.put(key, value, expect, lease).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_watchers_miss_nothing_and_see_no_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    const PREFIXES: [&str; 3] = ["/x/", "/y/", "/"];
    let mut watches = Vec::new();
    for prefix in PREFIXES {
        watches.push(store.watch(prefix, 1).await.unwrap());
    }
    // Each writer reports the revision and key of every change it made.
    let mut writers = Vec::new();
    for w in 0..3u32 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for i in 0..30u32 {
                let key = format!("/{}/{w}-{}", ["x", "y"][(i % 2) as usize], i % 4);
                let revision = if i % 5 == 4 {
                    store.delete(&key, Expect::Any).await.unwrap()
                } else {
                    store
                        .put(&key, i.to_le_bytes().to_vec(), Expect::Any, None)
                        .await
                        .unwrap()
                };
                made.push((revision, key));
            }
            made
        }));
    }
    let mut made = Vec::new();
    for w in writers {
        made.extend(w.await.unwrap());
    }
    // Every change (each delete finds its key) got a revision of its own: 1, 2, 3, ...
    made.sort();
    let revisions: Vec<u64> = made.iter().map(|(r, _)| *r).collect();
    assert_eq!(revisions, (1..=90).collect::<Vec<u64>>());
    for (prefix, mut watch) in PREFIXES.into_iter().zip(watches) {
        let expected: Vec<u64> = made
            .iter()
            .filter(|(_, key)| key.starts_with(prefix))
            .map(|(r, _)| *r)
            .collect();
        let mut seen = Vec::new();
        while seen.len() < expected.len() {
            let event = next(&mut watch).await;
            assert!(event.key().starts_with(prefix));
            seen.push(event.revision());
        }
        assert_eq!(seen, expected, "watch of {prefix}");
    }
}

#[tokio::test]
async fn a_watch_from_before_the_history_is_refused_and_one_that_falls_behind_ends() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        history_events: 4,
        ..Options::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
    let mut behind = store.watch("/", 1).await.unwrap();
    for i in 0..10u8 {
        store.put("/k", vec![i], Expect::Any, None).await.unwrap();
    }
    match store.watch("/", 2).await {
        Err(StoreError::Compacted { requested, compacted }) => assert_eq!((requested, compacted), (2, 7)),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a watch from a dropped revision was served"),
    }
    assert!(store.watch("/", 7).await.is_ok());
    // The early watcher never read: its first poll finds what it needs gone.
    let ended = tokio::time::timeout(DEADLINE, behind.next()).await.unwrap();
    match ended {
        Some(Err(StoreError::Compacted { compacted: 7, .. })) => {}
        other => panic!("expected the watch to end with Compacted, got {other:?}"),
    }
    assert!(behind.next().await.is_none());
}

#[tokio::test]
async fn a_watch_ends_when_the_store_closes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut watch = store.watch("/", 1).await.unwrap();
    drop(store);
    let ended = tokio::time::timeout(DEADLINE, watch.next()).await.unwrap();
    assert!(
        matches!(ended, Some(Err(StoreError::Unavailable(_)))),
        "{ended:?}"
    );
    // And the directory is free again.
    open(dir.path());
}

#[tokio::test]
async fn reopening_keeps_every_key_revision_and_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (before, lease) = {
        let store = open(dir.path());
        let lease = store.grant_lease(Duration::from_secs(3600)).await.unwrap();
        put(&store, "/a", b"1".to_vec(), Expect::Absent, None).await;
        put(&store, "/a", b"2".to_vec(), Expect::Revision(1), None).await;
        put(&store, "/b", b"b".to_vec(), Expect::Absent, Some(lease)).await;
        put(&store, "/c", b"c".to_vec(), Expect::Absent, None).await;
        store.delete("/c", Expect::Any).await.unwrap();
        (store.list("").await.unwrap(), lease)
    };
    let store = open(dir.path());
    assert_eq!(store.list("").await.unwrap(), before);
    // The next change continues the revisions; the lease is still there, ids are not reused.
    assert_eq!(store.put("/d", vec![], Expect::Absent, None).await.unwrap(), 6);
    store.keep_alive(lease).await.unwrap();
    assert!(store.grant_lease(Duration::from_secs(1)).await.unwrap().0 > lease.0);
    // The history replayed from the log serves watches from before the restart.
    let mut watch = store.watch("/a", 1).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), 1);
    assert_eq!(next(&mut watch).await.revision(), 2);
    store.revoke(lease).await.unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.get("/b").await.unwrap(), None);
    assert!(store.keep_alive(lease).await.is_err());
}

#[tokio::test]
async fn a_lease_of_the_previous_process_expires_one_length_after_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let lease = {
        let store = open(dir.path());
        let lease = store.grant_lease(Duration::from_millis(200)).await.unwrap();
        put(&store, "/alive/n1", vec![], Expect::Absent, Some(lease)).await;
        lease
    };
    let store = open(dir.path());
    let mut watch = store.watch("/alive/", 1).await.unwrap();
    assert_eq!(next(&mut watch).await.key(), "/alive/n1");
    match next(&mut watch).await {
        Event::Delete { key, .. } => assert_eq!(key, "/alive/n1"),
        other => panic!("{other:?}"),
    }
    assert!(store.keep_alive(lease).await.is_err());
}

#[tokio::test]
async fn compaction_keeps_everything_and_bounds_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        compact_after_bytes: 4096,
        ..Options::default()
    };
    let before = {
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        let lease = store.grant_lease(Duration::from_secs(3600)).await.unwrap();
        for i in 0..300u32 {
            let key = format!("/k/{}", i % 37);
            let lease = (i % 3 == 0).then_some(lease);
            store
                .put(&key, vec![i as u8; 100], Expect::Any, lease)
                .await
                .unwrap();
            if i % 7 == 0 {
                store.delete(&key, Expect::Any).await.unwrap();
            }
        }
        store.list("").await.unwrap()
    };
    assert!(dir.path().join(SNAPSHOT_FILE).exists());
    let log_len = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
    assert!(
        log_len < 2 * 4096 + 1024,
        "the log was not compacted: {log_len} bytes"
    );
    let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
    assert_eq!(store.list("").await.unwrap(), before);
}

#[tokio::test]
async fn a_second_opener_is_told_who_holds_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    let err = EmbeddedStore::open(dir.path())
        .err()
        .expect("a second open succeeded");
    let message = err.to_string();
    assert!(message.contains(&dir.path().display().to_string()), "{message}");
    assert!(
        message.contains(&format!("process {}", std::process::id())),
        "{message}"
    );
    assert!(message.contains("another data directory"), "{message}");
}

#[test]
fn opening_outside_a_runtime_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let err = EmbeddedStore::open(dir.path())
        .err()
        .expect("opened without a runtime");
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

async fn fill(dir: &Path) -> (Vec<KeyValue>, u64) {
    let store = open(dir);
    for i in 0..5u8 {
        store
            .put(&format!("/k{i}"), vec![i; 10], Expect::Absent, None)
            .await
            .unwrap();
    }
    store.list("").await.unwrap()
}

fn open_error(dir: &Path) -> String {
    match EmbeddedStore::open(dir) {
        Err(e @ StoreError::Corrupt { .. }) => e.to_string(),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a damaged store opened"),
    }
}

#[tokio::test]
async fn a_torn_last_record_is_dropped_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (before, _) = fill(dir.path()).await;
    let log = dir.path().join(LOG_FILE);
    let len = std::fs::metadata(&log).unwrap().len();
    // A sixth put torn in the middle: its frame is cut short.
    let file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    use std::io::Write;
    (&file).write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 5, 6]).unwrap();
    drop(file);
    let store = open(dir.path());
    assert_eq!(store.list("").await.unwrap(), (before, 5));
    assert_eq!(std::fs::metadata(&log).unwrap().len(), len);
    assert_eq!(store.put("/k9", vec![], Expect::Absent, None).await.unwrap(), 6);
}

#[tokio::test]
async fn damage_in_the_middle_of_the_log_is_reported_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path()).await;
    let log = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[20] ^= 0x10;
    std::fs::write(&log, &bytes).unwrap();
    let message = open_error(dir.path());
    assert!(message.contains(&log.display().to_string()), "{message}");
    assert!(message.contains("checksum"), "{message}");
    assert!(message.contains("restore it from a backup"), "{message}");
}

#[tokio::test]
async fn a_damaged_or_missing_snapshot_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        compact_after_bytes: 64,
        ..Options::default()
    };
    {
        let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
        for i in 0..5u8 {
            store
                .put(&format!("/k{i}"), vec![i; 100], Expect::Absent, None)
                .await
                .unwrap();
        }
        // One more after the last compaction, so that the log needs the snapshot.
        store.put("/last", vec![], Expect::Absent, None).await.unwrap();
    }
    let snapshot = dir.path().join(SNAPSHOT_FILE);
    let good = std::fs::read(&snapshot).unwrap();
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&snapshot, &bytes).unwrap();
    let message = open_error(dir.path());
    assert!(message.contains(&snapshot.display().to_string()), "{message}");

    std::fs::write(&snapshot, b"not a snapshot at all").unwrap();
    assert!(open_error(dir.path()).contains("not a Basalt store snapshot"));

    std::fs::remove_file(&snapshot).unwrap();
    assert!(open_error(dir.path()).contains("snapshot is missing"));

    std::fs::write(&snapshot, &good).unwrap();
    let store = open(dir.path());
    assert_eq!(store.list("").await.unwrap().0.len(), 6);
}

#[tokio::test]
async fn a_log_that_is_not_ours_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(LOG_FILE), b"some other program's file").unwrap();
    assert!(open_error(dir.path()).contains("not a Basalt store log"));
}

#[tokio::test]
async fn a_failed_create_says_the_key_exists() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    put(&store, "/k", b"1".to_vec(), Expect::Absent, None).await;
    let create = store
        .put("/k", b"2".to_vec(), Expect::Absent, None)
        .await
        .unwrap_err();
    assert_eq!(
        create.to_string(),
        "/k already exists (revision 1); read it and update it with its revision, or use another key"
    );
    let update = store
        .put("/k", b"2".to_vec(), Expect::Revision(7), None)
        .await
        .unwrap_err();
    assert!(
        update.to_string().contains("read at revision 7, now revision 1"),
        "{update}"
    );
}

/// Finding: a compaction used to hold the state's read lock while it wrote and synced the
/// snapshot, so a lease renewal (a writer) waited for the whole write, and new readers queued
/// behind the renewal.
#[test]
fn a_compaction_being_written_holds_back_neither_renewals_nor_reads() {
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let options = Options {
        compact_after_bytes: 1,
        compaction_barrier: Some(barrier.clone()),
        ..Options::default()
    };
    let store = runtime
        .block_on(async { EmbeddedStore::open_with(dir.path(), options) })
        .unwrap();
    // The grant is the first change: it compacts, and the compaction stops at the barrier.
    let granting = {
        let (store, runtime) = (store.clone(), runtime.clone());
        std::thread::spawn(move || runtime.block_on(store.grant_lease(Duration::from_secs(3600))))
    };
    barrier.wait();
    let (done, during) = std::sync::mpsc::channel();
    {
        let (store, runtime) = (store.clone(), runtime.clone());
        std::thread::spawn(move || {
            let renewed = runtime.block_on(store.keep_alive(LeaseId(1)));
            let read = runtime.block_on(store.get("/absent"));
            let _ = done.send((renewed.is_ok(), read.is_ok()));
        });
    }
    let while_writing = during.recv_timeout(DEADLINE);
    barrier.wait();
    assert_eq!(granting.join().unwrap().unwrap(), LeaseId(1));
    assert_eq!(
        while_writing.ok(),
        Some((true, true)),
        "a renewal and a read finish while the snapshot is written"
    );
}
