//! The clone model of the parent module, on real stores: a source store, and clones of one of its
//! snapshots reading it through a [`SnapshotSource`] that calls the source's
//! [`Store::read_snapshot`] (the replica server does the same over the wire).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use basalt_proto::VolumeId;

use super::*;
use crate::store::{DirBackend, SnapshotInfo};

const MIB: u64 = 1 << 20;
const SOURCE_BYTES: u64 = 4 * MIB;

fn block(byte: u8) -> Vec<u8> {
    vec![byte; BLOCK]
}

/// The source snapshot's view through the store API, counting the blocks it was asked for.
struct Direct {
    source: Arc<Store>,
    snapshot: String,
    blocks_read: AtomicU64,
}

impl SnapshotSource for Direct {
    fn read(&self, first: u64, count: u32) -> Result<Vec<u8>, String> {
        self.blocks_read.fetch_add(u64::from(count), Ordering::Relaxed);
        let mut buf = vec![0u8; count as usize * BLOCK];
        self.source
            .read_snapshot(&self.snapshot, first * BLOCK_SIZE, &mut buf)
            .map_err(|e| e.to_string())?;
        Ok(buf)
    }
}

/// A source volume whose snapshot `gold` reads 0xa0+i at block i for i in 0..8 (block 2 from an
/// older snapshot `old`, block 3 discarded after it), zeros elsewhere; the head then overwrites
/// blocks 0..8 with 0xee, so that only the snapshot's view has the 0xa0 data.
fn source(dir: &std::path::Path) -> Arc<Store> {
    let store = Store::create(dir, VolumeId::random(), SOURCE_BYTES).unwrap();
    store.write(2 * BLOCK_SIZE, &block(0xa2)).unwrap();
    store.write(3 * BLOCK_SIZE, &block(0x33)).unwrap();
    store.snapshot_create("old").unwrap();
    for i in [0u64, 1, 4, 5, 6, 7] {
        store.write(i * BLOCK_SIZE, &block(0xa0 + i as u8)).unwrap();
    }
    store.unmap(3 * BLOCK_SIZE, BLOCK_SIZE).unwrap();
    store.snapshot_create("gold").unwrap();
    for i in 0..8u64 {
        store.write(i * BLOCK_SIZE, &block(0xee)).unwrap();
    }
    Arc::new(store)
}

fn gold_view(lba: u64) -> Vec<u8> {
    match lba {
        0..=2 | 4..=7 => block(0xa0 + lba as u8),
        _ => block(0),
    }
}

fn origin(source: &Store, holder: &str) -> CloneOrigin {
    CloneOrigin {
        source_volume: source.volume_id(),
        snapshot: "gold".into(),
        source_size_bytes: source.size_bytes(),
        holder: holder.into(),
        sources: vec!["127.0.0.1:1".into()],
    }
}

fn clone_of(source: &Arc<Store>, dir: &std::path::Path, size: u64) -> (Store, Arc<Direct>) {
    let backend = Arc::new(DirBackend::new(dir).unwrap());
    let clone = Store::create_clone(backend, VolumeId::random(), size, origin(source, "c1")).unwrap();
    (clone, attach(source))
}

fn attach(source: &Arc<Store>) -> Arc<Direct> {
    Arc::new(Direct {
        source: source.clone(),
        snapshot: "gold".into(),
        blocks_read: AtomicU64::new(0),
    })
}

fn read_block(store: &Store, lba: u64) -> Vec<u8> {
    let mut buf = block(0x55);
    store.read(lba * BLOCK_SIZE, &mut buf).unwrap();
    buf
}

/// What the background copy does, in steps of `step` blocks: the source's runs, filled, then the
/// cursor moved.
fn hydrate(clone: &Store, source: &Store, step: u64, steps: usize) -> bool {
    for _ in 0..steps {
        let Some(status) = clone.clone_status() else {
            return true;
        };
        if status.hydrated {
            return true;
        }
        let cursor = status.hydrated_bytes / BLOCK_SIZE;
        let (runs, end) = source.snapshot_runs("gold", cursor..cursor + step, step).unwrap();
        for run in runs {
            let mut buf = vec![0u8; ((run.end - run.start) * BLOCK_SIZE) as usize];
            source
                .read_snapshot("gold", run.start * BLOCK_SIZE, &mut buf)
                .unwrap();
            clone.fill_base(run.start, &buf).unwrap();
        }
        if clone.advance_hydration(end).unwrap() {
            return true;
        }
    }
    clone.clone_status().is_some_and(|s| s.hydrated)
}

#[test]
fn a_snapshots_view_is_what_the_volume_read_when_it_was_taken() {
    let dir = tempfile::tempdir().unwrap();
    let source = source(dir.path());
    let mut buf = vec![0u8; 10 * BLOCK];
    source.read_snapshot("gold", 0, &mut buf).unwrap();
    for lba in 0..10 {
        assert_eq!(
            &buf[lba * BLOCK..(lba + 1) * BLOCK],
            &gold_view(lba as u64)[..],
            "block {lba}"
        );
    }
    let (runs, end) = source.snapshot_runs("gold", 0..u64::MAX, 1 << 16).unwrap();
    assert_eq!(runs, vec![0..3, 4..8], "block 3 was discarded: no data");
    assert_eq!(end, SOURCE_BYTES / BLOCK_SIZE);
    let (_, end) = source.snapshot_runs("gold", 0..u64::MAX, 5).unwrap();
    assert_eq!(end, 5, "a listing stops after the blocks it may look at");

    // Deleting the older snapshot merges it into gold: gold's view does not change.
    source.snapshot_delete("old").unwrap();
    source.read_snapshot("gold", 0, &mut buf).unwrap();
    assert_eq!(&buf[2 * BLOCK..3 * BLOCK], &gold_view(2)[..]);
    assert!(matches!(
        source.read_snapshot("nope", 0, &mut buf),
        Err(StoreError::NoSuchSnapshot(_))
    ));
    assert!(matches!(
        source.read_snapshot("gold", 512, &mut buf[..512]),
        Err(StoreError::Unaligned { .. })
    ));
}

#[test]
fn a_clone_reads_its_source_until_hydrated_and_its_own_writes_always() {
    let (src_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = source(src_dir.path());
    let (clone, direct) = clone_of(&source, dir.path(), 8 * MIB);
    assert!(clone.is_hydrating());
    // No source attached yet: an absent block cannot be read, and says why.
    let mut buf = block(0);
    assert!(matches!(
        clone.read(0, &mut buf),
        Err(StoreError::SourceUnavailable { .. })
    ));
    clone.attach_source(direct.clone());
    clone.write(BLOCK_SIZE, &block(0xc1)).unwrap();
    assert_eq!(read_block(&clone, 0), gold_view(0), "fetched from the source");
    assert_eq!(read_block(&clone, 1), block(0xc1), "the clone's own write");
    assert_eq!(read_block(&clone, 5), gold_view(5));
    assert_eq!(
        read_block(&clone, 1500),
        block(0),
        "past the source's end: zeros, never fetched"
    );
    let fetched = direct.blocks_read.load(Ordering::Relaxed);
    assert_eq!(read_block(&clone, 0), gold_view(0));
    assert_eq!(
        direct.blocks_read.load(Ordering::Relaxed),
        fetched,
        "a block is fetched once, then read from the base"
    );
    // A read that must not wait does not fetch.
    let mut buf = block(0);
    assert!(!clone.read_cached(6 * BLOCK_SIZE, &mut buf).unwrap());
    assert!(matches!(clone.reset(), Err(StoreError::Hydrating { .. })));

    // Writes to the source after the snapshot never reach the clone, and the other way round.
    source.write(7 * BLOCK_SIZE, &block(0x77)).unwrap();
    assert_eq!(read_block(&clone, 7), gold_view(7));
    assert_eq!(read_block(&source, 1), block(0xee));
}

#[test]
fn a_sector_write_and_a_discard_of_an_absent_block_start_from_the_source() {
    let (src_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = source(src_dir.path());
    let (clone, direct) = clone_of(&source, dir.path(), SOURCE_BYTES);
    clone.attach_source(direct);
    clone.write(4 * BLOCK_SIZE + 512, &[0x11; 512]).unwrap();
    let mut expected = gold_view(4);
    expected[512..1024].fill(0x11);
    assert_eq!(
        read_block(&clone, 4),
        expected,
        "the rest of the block is the source's"
    );
    clone.unmap(5 * BLOCK_SIZE, 2 * BLOCK_SIZE).unwrap();
    clone.unmap(BLOCK_SIZE, 1024).unwrap();
    let mut expected = gold_view(1);
    expected[..1024].fill(0);
    assert!(hydrate(&clone, &source, 2, 1000));
    assert_eq!(
        read_block(&clone, 5),
        block(0),
        "a discard is not undone by the copy"
    );
    assert_eq!(read_block(&clone, 6), block(0));
    assert_eq!(read_block(&clone, 1), expected);
    assert_eq!(read_block(&clone, 7), gold_view(7));
}

#[test]
fn a_hydrated_clones_base_becomes_its_oldest_snapshot_and_needs_no_source() {
    let (src_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = source(src_dir.path());
    let (clone, direct) = clone_of(&source, dir.path(), SOURCE_BYTES);
    clone.attach_source(direct);
    clone.write(0, &block(0xc0)).unwrap();
    // A snapshot of the clone taken during hydration, under the source snapshot's name.
    clone.snapshot_create("gold").unwrap();
    assert!(!hydrate(&clone, &source, 3, 1), "one step is not all of it");
    assert!(hydrate(&clone, &source, 3, 1000));
    let status = clone.clone_status().unwrap();
    assert!(status.hydrated && !status.released);
    assert_eq!(status.hydrated_bytes, SOURCE_BYTES);
    let names: Vec<String> = clone
        .snapshot_list()
        .into_iter()
        .map(|s: SnapshotInfo| s.name)
        .collect();
    assert_eq!(names, ["gold-origin", "gold"]);
    clone.mark_source_released().unwrap();
    assert!(clone.clone_status().unwrap().released);
    drop(clone);
    drop(source);

    // Without its source: everything is on the clone, across a reopen.
    drop(src_dir);
    let clone = Store::open(dir.path()).unwrap();
    assert!(!clone.is_hydrating());
    assert_eq!(read_block(&clone, 0), block(0xc0));
    for lba in 1..10 {
        assert_eq!(read_block(&clone, lba), gold_view(lba), "block {lba}");
    }
    // An ordinary snapshot now: it can be deleted, and the view stays.
    clone.snapshot_delete("gold-origin").unwrap();
    assert_eq!(read_block(&clone, 4), gold_view(4));
    let mut buf = vec![0u8; BLOCK];
    clone.read_snapshot("gold", 4 * BLOCK_SIZE, &mut buf).unwrap();
    assert_eq!(buf, gold_view(4));
}

#[test]
fn a_clone_reopened_mid_hydration_resumes_at_its_durable_cursor() {
    let (src_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = source(src_dir.path());
    let (clone, direct) = clone_of(&source, dir.path(), SOURCE_BYTES);
    clone.attach_source(direct);
    assert!(!hydrate(&clone, &source, 4, 1));
    // Fetched on demand above the cursor, then the process dies.
    assert_eq!(read_block(&clone, 6), gold_view(6));
    clone.write(7 * BLOCK_SIZE, &block(0xc7)).unwrap();
    clone.flush().unwrap();
    drop(clone);
    let clone = Store::open(dir.path()).unwrap();
    assert!(clone.is_hydrating());
    assert_eq!(clone.clone_status().unwrap().hydrated_bytes, 4 * BLOCK_SIZE);
    let direct = attach(&source);
    clone.attach_source(direct.clone());
    assert_eq!(
        read_block(&clone, 7),
        block(0xc7),
        "the clone's own flushed write"
    );
    for lba in 0..4 {
        assert_eq!(
            read_block(&clone, lba),
            gold_view(lba),
            "below the cursor: on disk"
        );
    }
    assert_eq!(
        direct.blocks_read.load(Ordering::Relaxed),
        0,
        "nothing below the cursor is fetched"
    );
    assert!(hydrate(&clone, &source, 4, 1000));
    for lba in 0..7 {
        assert_eq!(read_block(&clone, lba), gold_view(lba), "block {lba}");
    }
    assert_eq!(read_block(&clone, 7), block(0xc7));
}

#[test]
fn a_held_snapshot_is_neither_deleted_nor_reverted_past_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let source = source(dir.path());
    assert!(matches!(
        source.snapshot_hold("nope", "c1"),
        Err(StoreError::NoSuchSnapshot(_))
    ));
    source.snapshot_hold("gold", "c1").unwrap();
    source.snapshot_hold("gold", "c1").unwrap();
    source.snapshot_hold("gold", "c2").unwrap();
    assert_eq!(source.holds().len(), 2, "a hold is placed once per holder");
    let refused = source.snapshot_delete("gold").unwrap_err();
    assert!(
        matches!(&refused, StoreError::SnapshotHeld { holders, .. } if holders == &["c1", "c2"]),
        "{refused}"
    );
    assert!(refused.to_string().contains("c1, c2"), "{refused}");
    assert!(matches!(
        source.snapshot_revert("old"),
        Err(StoreError::SnapshotHeld { .. })
    ));
    source.snapshot_revert("gold").unwrap();
    // Holds are durable, and survive a reset (a rebuild replays the snapshot under its name).
    drop(source);
    let source = Store::open(dir.path()).unwrap();
    assert_eq!(source.holds().len(), 2);
    assert!(source.snapshot_release("gold", "c1").unwrap());
    assert!(
        !source.snapshot_release("gold", "c1").unwrap(),
        "released twice: no-op"
    );
    source.reset().unwrap();
    assert_eq!(source.holds().len(), 1);
    assert!(source.snapshot_release("gold", "c2").unwrap());
    source.write(0, &block(1)).unwrap();
    source.snapshot_create("gold").unwrap();
    source.snapshot_delete("gold").unwrap();
}

#[test]
fn a_clone_smaller_than_its_source_is_refused_and_nothing_is_created() {
    let (src_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = source(src_dir.path());
    let backend = Arc::new(DirBackend::new(dir.path()).unwrap());
    let refused = Store::create_clone(backend, VolumeId::random(), MIB, origin(&source, "c1"));
    assert!(matches!(refused, Err(StoreError::InvalidSize { .. })));
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::NotAVolume { .. })
    ));
}

#[test]
fn a_clone_grows_while_it_hydrates_and_after() {
    let (src_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = source(src_dir.path());
    let (clone, direct) = clone_of(&source, dir.path(), SOURCE_BYTES);
    clone.attach_source(direct.clone());
    assert!(!hydrate(&clone, &source, 2, 1), "one step is not all of it");

    // Grown mid-hydration: the blocks past the old end are the clone's own, never fetched.
    clone.grow(2 * SOURCE_BYTES).unwrap();
    assert!(clone.is_hydrating());
    let past = SOURCE_BYTES / BLOCK_SIZE + 3;
    let fetched = direct.blocks_read.load(Ordering::Relaxed);
    assert_eq!(read_block(&clone, past), block(0), "new blocks read as zeros");
    assert_eq!(
        direct.blocks_read.load(Ordering::Relaxed),
        fetched,
        "past the source's end: never fetched"
    );
    clone.write(past * BLOCK_SIZE, &block(0xd3)).unwrap();
    assert_eq!(read_block(&clone, 6), gold_view(6), "above the cursor: fetched");
    assert!(hydrate(&clone, &source, 2, 1000));
    assert_eq!(
        clone.clone_status().unwrap().hydrated_bytes,
        SOURCE_BYTES,
        "hydration covers the source, not the grown size"
    );
    clone.flush().unwrap();
    drop(clone);

    // Reopened at its grown size without its source, then grown again as an ordinary volume.
    let clone = Store::open(dir.path()).unwrap();
    assert_eq!(clone.size_bytes(), 2 * SOURCE_BYTES);
    assert!(!clone.is_hydrating());
    for lba in 0..10 {
        assert_eq!(read_block(&clone, lba), gold_view(lba), "block {lba}");
    }
    assert_eq!(read_block(&clone, past), block(0xd3));
    clone.grow(3 * SOURCE_BYTES).unwrap();
    assert_eq!(read_block(&clone, past), block(0xd3));
    assert_eq!(read_block(&clone, 2 * SOURCE_BYTES / BLOCK_SIZE + 1), block(0));
}
