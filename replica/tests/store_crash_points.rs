//! Deterministic crash-point enumeration: a scripted workload runs over storage that "crashes" after
//! its k-th mutation (every later one fails and changes nothing), for every k. Because `kill -9`
//! keeps every completed syscall (the page cache survives), this visits every instant at which a
//! process crash can cut the store's sequence of writes, punches, creates, renames and removes --
//! including the microsecond windows a random `kill -9` almost never hits (between a log append and
//! its data write, between a batch's one log append and its data writes, inside a snapshot create,
//! between the steps of a merge, inside a grow of the volume).
//!
//! It runs twice: over the host-directory backend, crashing between backend calls, and over the
//! block-device backend, crashing between any two *device* writes (journal records, checkpoints,
//! cluster zeroing, data), which also covers the backend's own metadata.
//!
//! After each crash the storage is reopened with the real backend and checked: flushed writes are
//! intact, later blocks are old or new with a valid checksum, acknowledged snapshots exist with their
//! exact content, and the volume has its old size or its new one (the new one once the grow
//! returned), with every block of it readable.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use basalt_proto::VolumeId;
use basalt_replica::store::backend::block::{
    BlockBackend, DeviceFile, DeviceOptions, Format, Geometry, Medium,
};
use basalt_replica::store::{Backend, DirBackend, Object, Store, StoreError};

const BLOCKS: u64 = 64;
const SIZE: u64 = BLOCKS * 4096;
/// The volume's size after the script's grow.
const GROWN_BLOCKS: u64 = 96;

/// The stand-in device of the block runs: sparse, far larger than the volume needs, so snapshots,
/// logs and blob copies all fit.
const DEVICE_BYTES: u64 = 4 << 20;

/// Tiny clusters (two blocks) so that discards free whole clusters and most writes allocate; a tiny
/// journal so that the script fills it several times (each time a checkpoint).
const GEOMETRY: Geometry = Geometry {
    cluster_bytes: 8192,
    journal_bytes: 16384,
    max_objects: 16,
};

/// Mutations left before the simulated crash; at or below zero every call fails.
#[derive(Clone)]
struct Budget(Arc<AtomicI64>);

impl Budget {
    fn spend(&self) -> io::Result<()> {
        if self.0.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(io::Error::other("simulated crash"));
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.0.load(Ordering::SeqCst) <= 0 {
            return Err(io::Error::other("simulated crash"));
        }
        Ok(())
    }
}

/// A device whose writes stop at the crash: what the process wrote before it is kept.
struct CrashingMedium {
    inner: DeviceFile,
    budget: Budget,
}

impl Medium for CrashingMedium {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.budget.alive()?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.budget.spend()?;
        self.inner.write_at(buf, offset)
    }
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        self.budget.spend()?;
        self.inner.write_zeros(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        self.budget.alive()?;
        self.inner.sync()
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

struct CrashingBackend {
    inner: DirBackend,
    budget: Budget,
}

struct CrashingObject {
    inner: Box<dyn Object>,
    budget: Budget,
}

impl Object for CrashingObject {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.budget.alive()?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.budget.spend()?;
        self.inner.write_at(buf, offset)
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.budget.spend()?;
        self.inner.punch(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        self.budget.alive()?;
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.budget.alive()?;
        self.inner.len()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.budget.spend()?;
        self.inner.truncate(len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

impl Backend for CrashingBackend {
    fn create(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>> {
        self.budget.spend()?;
        let inner = self.inner.create(name, capacity)?;
        Ok(Box::new(CrashingObject {
            inner,
            budget: self.budget.clone(),
        }))
    }
    fn open(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>> {
        self.budget.alive()?;
        let inner = self.inner.open(name, capacity)?;
        Ok(Box::new(CrashingObject {
            inner,
            budget: self.budget.clone(),
        }))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.budget.spend()?;
        self.inner.remove(name)
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.budget.alive()?;
        self.inner.list()
    }
    fn read_blob(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.budget.alive()?;
        self.inner.read_blob(name)
    }
    fn replace_blob(&self, name: &str, content: &[u8]) -> io::Result<()> {
        self.budget.spend()?;
        self.inner.replace_blob(name, content)
    }
    fn sync_namespace(&self) -> io::Result<()> {
        self.budget.alive()?;
        self.inner.sync_namespace()
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Write {
        lba: u64,
        first_sector: u64,
        sectors: u64,
        value: u8,
    },
    Unmap {
        lba: u64,
        blocks: u64,
    },
    Flush,
    SnapshotCreate(&'static str),
    SnapshotDelete(&'static str),
    /// Grow the volume to this many blocks.
    Grow(u64),
    /// `Write` steps handed to `Store::write_batch` together.
    Batch(&'static [Step]),
}

/// A batch as a replica's ordered lane hands it over: adjacent whole blocks (one vectored write), a
/// block written twice, a sector write that splits the batch in two groups, blocks that live in
/// snapshots.
const BATCH_ACROSS_GROUPS: &[Step] = &[
    Step::Write {
        lba: 9,
        first_sector: 0,
        sectors: 8,
        value: 12,
    },
    Step::Write {
        lba: 10,
        first_sector: 0,
        sectors: 16,
        value: 13,
    },
    Step::Write {
        lba: 9,
        first_sector: 0,
        sectors: 8,
        value: 14,
    },
    Step::Write {
        lba: 4,
        first_sector: 2,
        sectors: 3,
        value: 15,
    },
    Step::Write {
        lba: 11,
        first_sector: 0,
        sectors: 8,
        value: 16,
    },
    Step::Write {
        lba: 13,
        first_sector: 0,
        sectors: 8,
        value: 17,
    },
];

/// A batch over blocks snapshots hold, right before a flush.
const BATCH_OVER_SNAPSHOTS: &[Step] = &[
    Step::Write {
        lba: 14,
        first_sector: 0,
        sectors: 8,
        value: 18,
    },
    Step::Write {
        lba: 0,
        first_sector: 0,
        sectors: 16,
        value: 19,
    },
    Step::Write {
        lba: 15,
        first_sector: 0,
        sectors: 8,
        value: 20,
    },
];

fn sector_bytes(lba: u64, sector: u64, value: u8) -> Vec<u8> {
    (0..512u64)
        .map(|i| (lba as u8).wrapping_mul(7) ^ (sector as u8).wrapping_mul(13) ^ value ^ (i as u8))
        .collect()
}

/// The workload after the base state: every kind of change, two merges (into a snapshot, then into
/// the head) and sector writes over blocks that live in snapshots.
const SCRIPT: &[Step] = &[
    Step::Write {
        lba: 0,
        first_sector: 0,
        sectors: 32,
        value: 2,
    },
    Step::Write {
        lba: 5,
        first_sector: 3,
        sectors: 2,
        value: 3,
    },
    Step::Unmap { lba: 6, blocks: 2 },
    Step::Flush,
    Step::Write {
        lba: 7,
        first_sector: 0,
        sectors: 8,
        value: 4,
    },
    Step::SnapshotCreate("b"),
    Step::Grow(GROWN_BLOCKS),
    Step::Write {
        lba: 70,
        first_sector: 0,
        sectors: 16,
        value: 21,
    },
    Step::Write {
        lba: 95,
        first_sector: 5,
        sectors: 3,
        value: 22,
    },
    Step::Batch(BATCH_ACROSS_GROUPS),
    Step::Write {
        lba: 0,
        first_sector: 0,
        sectors: 8,
        value: 5,
    },
    Step::Unmap { lba: 1, blocks: 2 },
    Step::Write {
        lba: 12,
        first_sector: 1,
        sectors: 1,
        value: 6,
    },
    Step::SnapshotDelete("a"),
    Step::Write {
        lba: 8,
        first_sector: 0,
        sectors: 8,
        value: 7,
    },
    Step::Flush,
    Step::SnapshotDelete("b"),
    Step::Write {
        lba: 2,
        first_sector: 4,
        sectors: 4,
        value: 8,
    },
    Step::Write {
        lba: 2,
        first_sector: 0,
        sectors: 8,
        value: 9,
    },
    Step::Batch(BATCH_OVER_SNAPSHOTS),
    Step::Flush,
    Step::Write {
        lba: 3,
        first_sector: 0,
        sectors: 8,
        value: 10,
    },
];

struct Model {
    durable: Vec<Vec<u8>>,
    latest: Vec<Vec<u8>>,
    since_flush: BTreeMap<u64, Vec<Vec<u8>>>,
    snapshots: BTreeMap<&'static str, Vec<u8>>,
    creating: Option<(&'static str, Vec<u8>)>,
    deleting: Option<&'static str>,
    /// The volume's size in blocks once the last grow returned, and a grow under way.
    size_blocks: u64,
    growing: Option<u64>,
}

impl Model {
    fn new() -> Model {
        Model {
            // Blocks past the volume's end read as zeros once it grows over them.
            durable: vec![vec![0; 4096]; GROWN_BLOCKS as usize],
            latest: vec![vec![0; 4096]; GROWN_BLOCKS as usize],
            since_flush: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            creating: None,
            deleting: None,
            size_blocks: BLOCKS,
            growing: None,
        }
    }

    fn flushed(&mut self) {
        self.durable = self.latest.clone();
        self.since_flush.clear();
    }

    /// Called before the step runs: what it may leave behind.
    fn announce(&mut self, step: Step) {
        match step {
            Step::Write {
                lba,
                first_sector,
                sectors,
                value,
            } => {
                for s in first_sector..first_sector + sectors {
                    let (b, within) = (lba + s / 8, s % 8);
                    let block = &mut self.latest[b as usize];
                    block[(within * 512) as usize..((within + 1) * 512) as usize]
                        .copy_from_slice(&sector_bytes(b, within, value));
                    let snapshot = block.clone();
                    self.since_flush.entry(b).or_default().push(snapshot);
                }
            }
            Step::Unmap { lba, blocks } => {
                for b in lba..lba + blocks {
                    self.latest[b as usize] = vec![0; 4096];
                    self.since_flush.entry(b).or_default().push(vec![0; 4096]);
                }
            }
            Step::Flush => {}
            Step::SnapshotCreate(name) => self.creating = Some((name, self.latest.concat())),
            Step::SnapshotDelete(name) => self.deleting = Some(name),
            Step::Grow(blocks) => self.growing = Some(blocks),
            Step::Batch(writes) => {
                for &write in writes {
                    self.announce(write);
                }
            }
        }
    }

    /// Called after the step succeeded.
    fn acknowledge(&mut self, step: Step) {
        match step {
            Step::Flush => self.flushed(),
            Step::SnapshotCreate(name) => {
                let (_, content) = self.creating.take().unwrap();
                self.snapshots.insert(name, content);
                self.flushed();
            }
            Step::SnapshotDelete(name) => {
                self.deleting = None;
                self.snapshots.remove(name);
            }
            Step::Grow(blocks) => {
                self.growing = None;
                self.size_blocks = blocks;
            }
            _ => {}
        }
    }
}

/// Where a `Write` step goes and its bytes.
fn write_of(step: Step) -> (u64, Vec<u8>) {
    let Step::Write {
        lba,
        first_sector,
        sectors,
        value,
    } = step
    else {
        panic!("{step:?} is not a write");
    };
    let data: Vec<u8> = (first_sector..first_sector + sectors)
        .flat_map(|s| sector_bytes(lba + s / 8, s % 8, value))
        .collect();
    (lba * 4096 + first_sector * 512, data)
}

fn run_step(store: &Store, step: Step) -> Result<(), StoreError> {
    match step {
        Step::Write { .. } => {
            let (offset, data) = write_of(step);
            store.write(offset, &data)
        }
        Step::Batch(writes) => {
            let writes: Vec<(u64, Vec<u8>)> = writes.iter().map(|&w| write_of(w)).collect();
            let batch: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, &d[..])).collect();
            store.write_batch(&batch).into_iter().collect()
        }
        Step::Unmap { lba, blocks } => store.unmap(lba * 4096, blocks * 4096),
        Step::Flush => store.flush().map(|_| ()),
        Step::SnapshotCreate(name) => store.snapshot_create(name).map(|_| ()),
        Step::SnapshotDelete(name) => store.snapshot_delete(name),
        Step::Grow(blocks) => store.grow(blocks * 4096).map(|_| ()),
    }
}

/// Which backend a run uses, and the storage it lives in.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Dir,
    Block,
}

/// One copy of a replica's storage: a store directory, or a device file.
struct Place {
    dir: tempfile::TempDir,
    kind: Kind,
}

impl Place {
    fn new(kind: Kind) -> Place {
        let place = Place {
            dir: tempfile::tempdir().unwrap(),
            kind,
        };
        if let Kind::Block = kind {
            std::fs::File::create(place.device())
                .and_then(|f| f.set_len(DEVICE_BYTES))
                .unwrap();
        }
        place
    }

    fn device(&self) -> PathBuf {
        self.dir.path().join("device")
    }

    fn options() -> DeviceOptions {
        DeviceOptions {
            volume_bytes: Some(SIZE),
            format: Format::IfBlank,
            geometry: GEOMETRY,
        }
    }

    /// The real backend over this storage.
    fn backend(&self) -> Arc<dyn Backend> {
        match self.kind {
            Kind::Dir => Arc::new(DirBackend::new(self.dir.path()).unwrap()),
            Kind::Block => Arc::new(BlockBackend::open(&self.device(), &Place::options()).unwrap()),
        }
    }

    /// A backend that crashes once `budget` is spent (`None` if it crashed while opening).
    fn crashing_backend(&self, budget: &Budget) -> Option<Arc<dyn Backend>> {
        match self.kind {
            Kind::Dir => Some(Arc::new(CrashingBackend {
                inner: DirBackend::new(self.dir.path()).unwrap(),
                budget: budget.clone(),
            })),
            Kind::Block => {
                let medium = CrashingMedium {
                    inner: DeviceFile::open(&self.device()).unwrap(),
                    budget: budget.clone(),
                };
                match BlockBackend::open_medium(Arc::new(medium), &Place::options()) {
                    Ok(backend) => Some(Arc::new(backend)),
                    Err(e) => {
                        assert!(budget.alive().is_err(), "open failed without a crash: {e}");
                        None
                    }
                }
            }
        }
    }

    fn open(&self) -> Result<Store, StoreError> {
        Store::open_with_backend(self.backend())
    }

    fn copy_from(&self, other: &Place) {
        copy_dir(other.dir.path(), self.dir.path());
    }
}

/// The base state every crash run starts from: snapshot "a" with blocks 0..16, head writes on top.
fn prepare_base(place: &Place, model: &mut Model) {
    let store = Store::create_with_backend(place.backend(), VolumeId::random(), SIZE).unwrap();
    for step in [
        Step::Write {
            lba: 0,
            first_sector: 0,
            sectors: 128,
            value: 1,
        },
        Step::SnapshotCreate("a"),
        Step::Write {
            lba: 4,
            first_sector: 0,
            sectors: 16,
            value: 11,
        },
        Step::Flush,
    ] {
        model.announce(step);
        run_step(&store, step).unwrap();
        model.acknowledge(step);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Runs the script with a crash after `budget` mutations (`None`: no crash); returns the model as the
/// crash left it and the number of mutations used.
fn run_until_crash(place: &Place, base_model: &Model, budget: Option<i64>) -> (Model, i64) {
    let limit = budget.unwrap_or(i64::MAX / 2);
    let counter = Budget(Arc::new(AtomicI64::new(limit)));
    let mut model = Model {
        durable: base_model.durable.clone(),
        latest: base_model.latest.clone(),
        since_flush: BTreeMap::new(),
        snapshots: base_model.snapshots.clone(),
        creating: None,
        deleting: None,
        size_blocks: base_model.size_blocks,
        growing: None,
    };
    let store = place
        .crashing_backend(&counter)
        .and_then(|backend| Store::open_with_backend(backend).ok());
    if let Some(store) = store {
        for &step in SCRIPT {
            model.announce(step);
            if run_step(&store, step).is_err() {
                assert!(
                    counter.0.load(Ordering::SeqCst) <= 0,
                    "step {step:?} failed without a crash"
                );
                break;
            }
            model.acknowledge(step);
        }
    }
    (model, limit - counter.0.load(Ordering::SeqCst).max(0))
}

fn verify(place: &Place, model: &Model, k: i64) {
    let store = place
        .open()
        .unwrap_or_else(|e| panic!("crash point {k}: reopen failed: {e}"));
    let blocks = store.size_bytes() / 4096;
    assert!(
        blocks == model.size_blocks || Some(blocks) == model.growing,
        "crash point {k}: the volume has {blocks} blocks, neither its size ({}) nor the one it was growing to ({:?})",
        model.size_blocks,
        model.growing
    );
    for lba in 0..blocks {
        let mut got = vec![0u8; 4096];
        if let Err(e) = store.read(lba * 4096, &mut got) {
            panic!("crash point {k}: block {lba}: {e}");
        }
        let ok = got == model.durable[lba as usize]
            || model.since_flush.get(&lba).is_some_and(|c| c.contains(&got));
        assert!(
            ok,
            "crash point {k}: block {lba} is neither its flushed content nor a later write"
        );
    }
    let listed: Vec<String> = store.snapshot_list().into_iter().map(|s| s.name).collect();
    for name in model.snapshots.keys() {
        assert!(
            listed.iter().any(|l| l == name) || model.deleting == Some(*name),
            "crash point {k}: snapshot {name} lost ({listed:?})"
        );
    }
    for name in listed.iter().rev() {
        let want = match (model.snapshots.get(name.as_str()), &model.creating) {
            (Some(content), _) => content,
            (None, Some((creating, content))) if creating == name => content,
            _ => panic!("crash point {k}: unexpected snapshot {name}"),
        };
        store.snapshot_revert(name).unwrap();
        // A revert keeps the volume's size; past the snapshot's own end it reads zeros, as the
        // model's content does.
        let mut got = vec![0u8; store.size_bytes() as usize];
        store
            .read(0, &mut got)
            .unwrap_or_else(|e| panic!("crash point {k}: snapshot {name}: {e}"));
        assert!(
            got == want[..got.len()],
            "crash point {k}: snapshot {name} changed"
        );
    }
}

/// Every crash point of the script over one backend.
fn crash_at_every_point(kind: Kind) {
    let base = Place::new(kind);
    let mut base_model = Model::new();
    prepare_base(&base, &mut base_model);

    let full = Place::new(kind);
    full.copy_from(&base);
    let (model, total) = run_until_crash(&full, &base_model, None);
    assert!(model.creating.is_none() && model.deleting.is_none());
    verify(&full, &model, -1);
    assert!(total > 30, "the script made only {total} mutations");

    for k in 0..=total {
        let place = Place::new(kind);
        place.copy_from(&base);
        let (model, _) = run_until_crash(&place, &base_model, Some(k));
        verify(&place, &model, k);
        // Recovery itself must be crash-safe: reopen once more and check again.
        verify_reopen_is_stable(&place, k);
    }
    eprintln!("{kind:?}: {} crash points checked", total + 1);
}

#[test]
fn a_crash_after_any_mutation_keeps_flushed_writes_and_snapshots_intact() {
    crash_at_every_point(Kind::Dir);
}

#[test]
fn a_crash_between_any_two_device_writes_keeps_flushed_writes_and_snapshots_intact() {
    crash_at_every_point(Kind::Block);
}

/// A second reopen sees the same volume as the first (recovery converged and made itself durable).
fn verify_reopen_is_stable(place: &Place, k: i64) {
    let read_all = |store: &Store| {
        let mut buf = vec![0u8; store.size_bytes() as usize];
        store
            .read(0, &mut buf)
            .unwrap_or_else(|e| panic!("crash point {k}: {e}"));
        buf
    };
    let first = read_all(&place.open().unwrap());
    let second = read_all(&place.open().unwrap());
    assert!(
        first == second,
        "crash point {k}: the volume changed between two reopens"
    );
}
