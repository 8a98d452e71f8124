//! The write-intent record, as the store keeps it: which 64 KiB regions were written after a given
//! flush, across reopen and crashes, sparse, and "unknown" whenever it cannot answer safely.

use basalt_proto::frame::{BlockRun, SyncPoint, WrittenAnswer};
use basalt_proto::{Epoch, Revision, VolumeId};
use basalt_replica::store::Store;

const BLOCK: u64 = 4096;
const REGION: u64 = 16;

fn block(byte: u8) -> Vec<u8> {
    vec![byte; BLOCK as usize]
}

fn regions(store: &Store, since: Option<SyncPoint>) -> Vec<BlockRun> {
    match store.written_since(since, 0) {
        (WrittenAnswer::Regions(runs), _) => runs,
        (WrittenAnswer::Unknown(why), _) => panic!("the record should answer: {why}"),
    }
}

fn unknown(store: &Store, since: SyncPoint) -> String {
    match store.written_since(Some(since), 0) {
        (WrittenAnswer::Unknown(why), _) => why,
        (WrittenAnswer::Regions(runs), _) => panic!("the record must not answer, but listed {runs:?}"),
    }
}

fn run(region: u64) -> BlockRun {
    BlockRun {
        lba: region * REGION,
        blocks: REGION,
    }
}

#[test]
fn regions_written_after_a_flush_are_listed_including_the_unflushed_tail_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 64 << 20).unwrap();
    store.write(0, &block(1)).unwrap();
    store.flush().unwrap();
    store.flush().unwrap();
    let point = store.sync_point();
    assert_eq!(point.revision, Revision(2));
    store.write(10 * REGION * BLOCK, &block(2)).unwrap();
    store.unmap(20 * REGION * BLOCK, BLOCK).unwrap();
    store.flush().unwrap();
    // Written after the last flush: only in memory and in the head log's unflushed tail.
    store.write(30 * REGION * BLOCK + 5 * BLOCK, &block(3)).unwrap();
    let expected = vec![run(10), run(30)];
    assert_eq!(
        regions(&store, Some(point)),
        expected,
        "region 0 was flushed at the point"
    );

    // Dropped without a flush: what a `kill -9` leaves (the page cache survives). The first reopen
    // recovers its own unflushed tail from the head log; that recovery rewrites the head log without
    // the tail, so after the second only the record itself can still say region 30 was written.
    let mut store = store;
    for crash in ["first", "second"] {
        drop(store);
        store = Store::open(dir.path()).unwrap();
        let in_log_tail = if crash == "first" { 1 } else { 0 };
        assert_eq!(
            store.recovered_unflushed(),
            in_log_tail,
            "after the {crash} crash"
        );
        assert_eq!(regions(&store, Some(point)), expected, "after the {crash} crash");
        assert_eq!(
            regions(&store, None),
            vec![run(30)],
            "pending after the {crash} crash"
        );
    }

    // A flush stamps it; pending is empty from then on, across reopen too.
    store.flush().unwrap();
    assert_eq!(regions(&store, None), vec![]);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(regions(&store, None), vec![]);
    assert_eq!(regions(&store, Some(point)), expected);
}

#[test]
fn the_record_is_sparse_one_run_per_written_region_of_a_large_volume() {
    let dir = tempfile::tempdir().unwrap();
    // 1 TiB: a dense bitmap of 64 KiB regions would already be 2 MiB; the record holds three entries.
    let store = Store::create(dir.path(), VolumeId::random(), 1 << 40).unwrap();
    let point = store.sync_point();
    for lba in [7u64, 1 << 20, (1 << 28) - 1] {
        store.write(lba * BLOCK, &block(9)).unwrap();
    }
    store.flush().unwrap();
    let runs = regions(&store, Some(point));
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs.iter().all(|r| r.blocks == REGION));
    let size = std::fs::metadata(dir.path().join("intent.log")).unwrap().len();
    assert!(
        size < 4096,
        "the record on disk follows what was written: {size} bytes"
    );
}

#[test]
fn points_of_another_lineage_ahead_of_the_replica_or_of_a_split_history_get_no_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 << 20).unwrap();
    store.write(0, &block(1)).unwrap();
    store.flush().unwrap();
    let here = store.sync_point();
    let other = SyncPoint {
        lineage: here.lineage ^ 1,
        ..here
    };
    assert!(unknown(&store, other).contains("numbering"));
    let ahead = SyncPoint {
        revision: Revision(here.revision.0 + 5),
        ..here
    };
    assert!(unknown(&store, ahead).contains("ahead"));
    let split = SyncPoint {
        epoch: Epoch(here.epoch.0 + 1),
        ..here
    };
    assert!(unknown(&store, split).contains("split"));
}

#[test]
fn a_record_that_lost_flushes_on_disk_answers_only_for_later_points() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 << 20).unwrap();
    let point = store.sync_point();
    store.write(0, &block(1)).unwrap();
    store.flush().unwrap();
    drop(store);
    // Power loss took the appended frames: only the base written at create remains.
    let path = dir.path().join("intent.log");
    let bytes = std::fs::read(&path).unwrap();
    let base_len = 4 + 1 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize + 4;
    std::fs::write(&path, &bytes[..base_len]).unwrap();

    let store = Store::open(dir.path()).unwrap();
    assert!(unknown(&store, point).contains("starts at revision"));
    // It does answer from the reopen on: what a point there needs is flushes after it.
    let later = store.sync_point();
    store.write(BLOCK * REGION * 3, &block(2)).unwrap();
    store.flush().unwrap();
    assert_eq!(regions(&store, Some(later)), vec![run(3)]);
    assert_eq!(
        regions(&store, Some(store.sync_point())),
        vec![],
        "nothing after the last flush"
    );
}

#[test]
fn a_rebuilt_replica_adopts_the_sources_numbering_durably_and_is_answered_for_afterwards() {
    let (sdir, tdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let volume = VolumeId::random();
    let source = Store::create(sdir.path(), volume, 16 << 20).unwrap();
    let target = Store::create(tdir.path(), volume, 16 << 20).unwrap();
    for _ in 0..7 {
        source.flush().unwrap();
    }
    target.flush().unwrap();
    // One drain flush reaches both: 8 on the source, 2 on the target.
    let (s, t) = (source.flush().unwrap(), target.flush().unwrap());
    let position = target.adopt_sync_point(Some(source.sync_point()), t).unwrap();
    assert_eq!(position, source.sync_point());
    assert_eq!((s, target.revision()), (Revision(8), Revision(8)));

    // In step from here on, and still after a reopen.
    source.write(0, &block(1)).unwrap();
    target.write(0, &block(1)).unwrap();
    assert_eq!(source.flush().unwrap(), target.flush().unwrap());
    drop(target);
    let target = Store::open(tdir.path()).unwrap();
    assert_eq!(target.sync_point(), source.sync_point());

    // The target goes away at 9; the source writes on; the source's record answers for it.
    let away = target.sync_point();
    source.write(REGION * BLOCK * 2, &block(2)).unwrap();
    source.flush().unwrap();
    assert_eq!(
        regions(&source, Some(away)),
        vec![run(2)],
        "region 0 was written before flush 9, which both made"
    );

    // Taken off the numbering (a rebuild starts copying onto it): nobody answers for it any more.
    target.adopt_sync_point(None, Revision(0)).unwrap();
    assert!(unknown(&source, target.sync_point()).contains("numbering"));
    // And a revision it never made cannot be adopted.
    assert!(target
        .adopt_sync_point(Some(source.sync_point()), Revision(99))
        .is_err());
}

#[test]
fn a_revert_or_a_reset_ends_what_the_record_can_answer_for() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 << 20).unwrap();
    store.write(0, &block(1)).unwrap();
    store.snapshot_create("s").unwrap();
    let before = store.sync_point();
    store.write(BLOCK, &block(2)).unwrap();
    store.flush().unwrap();
    store.snapshot_revert("s").unwrap();
    assert!(unknown(&store, before).contains("starts at revision"));

    let lineage = store.sync_point().lineage;
    store.reset().unwrap();
    let after = store.sync_point();
    assert_eq!(after.revision, Revision(0));
    assert_ne!(
        after.lineage, lineage,
        "an emptied replica is in sync with nobody"
    );
}

#[test]
fn a_snapshot_merge_flushes_without_a_revision_and_its_pending_regions_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 << 20).unwrap();
    store.write(REGION * BLOCK, &block(1)).unwrap();
    store.snapshot_create("s").unwrap();
    let point = store.sync_point();
    store.write(2 * REGION * BLOCK, &block(2)).unwrap();
    // The merge into the head ends with a flush of the replica's own, not one of the stream's: the
    // other replicas make theirs elsewhere among the writes, so it must not shift the numbering.
    store.snapshot_delete("s").unwrap();
    assert_eq!(store.sync_point(), point, "no revision taken");
    // Killed before the next numbered flush: the merge's marker ended the log's unflushed tail.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.sync_point(), point);
    assert_eq!(regions(&store, None), vec![run(2)], "region 2 is still pending");
    store.flush().unwrap();
    assert_eq!(regions(&store, Some(point)), vec![run(2)]);
}

#[test]
fn an_intact_record_is_reopened_in_place_and_one_with_an_unflushed_tail_is_rewritten() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let inode = || std::fs::metadata(dir.path().join("intent.log")).unwrap().ino();
    let store = Store::create(dir.path(), VolumeId::random(), 16 << 20).unwrap();
    let point = store.sync_point();
    store.write(REGION * BLOCK, &block(1)).unwrap();
    store.flush().unwrap();
    let written = inode();
    // Killed with nothing unflushed: the record on disk is exactly what a rewrite would write.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        inode(),
        written,
        "not replaced (a rewrite costs three fsyncs at every start)"
    );
    assert_eq!(regions(&store, Some(point)), vec![run(1)]);
    // It goes on appending after what it found, and a later open reads both.
    store.write(3 * REGION * BLOCK, &block(2)).unwrap();
    store.flush().unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(inode(), written);
    assert_eq!(regions(&store, Some(point)), vec![run(1), run(3)]);
    // An unflushed tail must reach the record itself (see the double-crash test above): rewritten.
    store.write(5 * REGION * BLOCK, &block(3)).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_ne!(inode(), written, "rewritten with the tail's regions");
    assert_eq!(regions(&store, Some(point)), vec![run(1), run(3), run(5)]);
}
