//! The block-device backend's contract, on plain files standing in for devices: thin objects, holes
//! and punches reading as zeros, clusters going back to the allocator, atomic blob replacement,
//! reopening, exclusive use, refusing foreign or too-small devices -- and what survives a power
//! loss that keeps any subset of the writes made since the last sync.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use basalt_replica::store::backend::block::{
    wipe, BlockBackend, DeviceError, DeviceOptions, Format, Geometry, Medium, SIGNATURE_BYTES,
};
use basalt_replica::store::Backend;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn small_geometry() -> Geometry {
    Geometry {
        cluster_bytes: 64 << 10,
        journal_bytes: 64 << 10,
        max_objects: 32,
    }
}

fn options() -> DeviceOptions {
    DeviceOptions {
        geometry: small_geometry(),
        ..DeviceOptions::default()
    }
}

/// A sparse file of `bytes` standing in for a device.
fn device(dir: &Path, bytes: u64) -> PathBuf {
    let path = dir.join("device");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(bytes))
        .unwrap();
    path
}

fn read(object: &dyn basalt_replica::store::Object, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xa5u8; len];
    object.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn a_data_object_is_thin_and_reads_zeros_where_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let backend = BlockBackend::open(&device(dir.path(), 16 * MIB), &options()).unwrap();
    // Capacity far beyond the device: only written clusters take space.
    let object = backend.create("layer-00000001.data", 1 << 40).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let straddle = (64 << 10) * 1000 - 4096;
    object.write_at(&data, straddle).unwrap();
    assert_eq!(read(&*object, straddle, 8192), data);
    assert_eq!(object.allocated_bytes().unwrap(), 2 * (64 << 10), "two clusters");
    assert_eq!(object.len().unwrap(), straddle + 8192);
    assert!(read(&*object, straddle - 8192, 8192).iter().all(|&b| b == 0));
    assert!(read(&*object, 1 << 39, 4096).iter().all(|&b| b == 0));
    assert!(
        object.write_at(&data, (1 << 40) - 4096).is_err(),
        "past the capacity"
    );
}

#[test]
fn punch_reads_zeros_and_gives_whole_clusters_back_to_the_allocator() {
    let dir = tempfile::tempdir().unwrap();
    let backend = BlockBackend::open(&device(dir.path(), 16 * MIB), &options()).unwrap();
    let free_at_start = backend.free_clusters();
    let object = backend.create("data", 1 << 30).unwrap();
    object.write_at(&vec![7u8; 4 << 16], 0).unwrap();
    assert_eq!(backend.free_clusters(), free_at_start - 4);
    // Part of cluster 0 and all of cluster 1.
    object.punch(4096, (64 << 10) * 2 - 4096).unwrap();
    let back = read(&*object, 0, 4 << 16);
    assert!(back[..4096].iter().all(|&b| b == 7));
    assert!(back[4096..2 << 16].iter().all(|&b| b == 0));
    assert!(back[2 << 16..].iter().all(|&b| b == 7));
    assert_eq!(object.allocated_bytes().unwrap(), 3 * (64 << 10));
    assert_eq!(
        backend.free_clusters(),
        free_at_start - 3,
        "cluster 1 is free again"
    );
    // Writing into the freed cluster again allocates a clean one: the rest of it reads zeros.
    object.write_at(&[9u8; 512], (64 << 10) + 512).unwrap();
    let again = read(&*object, 64 << 10, 64 << 10);
    assert!(again[..512].iter().all(|&b| b == 0) && again[512..1024].iter().all(|&b| b == 9));
    assert!(again[1024..].iter().all(|&b| b == 0));
}

#[test]
fn a_freed_cluster_is_reused_only_after_a_sync_and_never_shows_old_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // Room for exactly a handful of clusters: reuse must happen.
    let backend = BlockBackend::open(&device(dir.path(), 2 * MIB), &options()).unwrap();
    let total = backend.total_clusters();
    assert!(total >= 4, "{total} clusters");
    let a = backend.create("a", 1 << 30).unwrap();
    for i in 0..total {
        a.write_at(&[0xeeu8; 4096], i * (64 << 10)).unwrap();
    }
    let b = backend.create("b", 1 << 30).unwrap();
    let full = b.write_at(&[1u8; 4096], 0).unwrap_err();
    assert_eq!(full.kind(), io::ErrorKind::StorageFull, "{full}");
    a.punch(0, 64 << 10).unwrap();
    // The release is not durable yet; taking the cluster syncs first, then hands it out zeroed.
    b.write_at(&[1u8; 4096], 8192).unwrap();
    let got = read(&*b, 0, 64 << 10);
    assert!(got[..8192].iter().all(|&x| x == 0) && got[8192..12288].iter().all(|&x| x == 1));
    assert!(got[12288..].iter().all(|&x| x == 0));
}

#[test]
fn replace_blob_is_all_or_nothing_and_everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = device(dir.path(), 16 * MIB);
    let uuid;
    {
        let backend = BlockBackend::open(&path, &options()).unwrap();
        uuid = backend.uuid();
        assert_eq!(backend.read_blob("volume.meta").unwrap(), None);
        backend.replace_blob("volume.meta", b"one").unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        backend.replace_blob("volume.meta", &big).unwrap();
        backend.replace_blob("volume.meta", b"two").unwrap();
        let log = backend.create("log", 0).unwrap();
        // Enough appends to fill the 64 KiB journal several times over (checkpoints on the way).
        for i in 0..3000u32 {
            log.write_at(&i.to_le_bytes(), u64::from(i) * 4).unwrap();
        }
        log.truncate(4000).unwrap();
        let data = backend.create("data", 1 << 30).unwrap();
        data.write_at(&[3u8; 4096], 5 << 20).unwrap();
        data.sync().unwrap();
        log.sync().unwrap();
    }
    let backend = BlockBackend::open(&path, &options()).unwrap();
    assert_eq!(backend.uuid(), uuid);
    assert_eq!(backend.list().unwrap(), vec!["data", "log", "volume.meta"]);
    assert_eq!(
        backend.read_blob("volume.meta").unwrap().as_deref(),
        Some(&b"two"[..])
    );
    let log = backend.read_blob("log").unwrap().unwrap();
    assert_eq!(log.len(), 4000);
    assert!(log
        .chunks(4)
        .enumerate()
        .all(|(i, c)| c == (i as u32).to_le_bytes()));
    let data = backend.open("data", 1 << 30).unwrap();
    assert_eq!(read(&*data, 5 << 20, 4096), vec![3u8; 4096]);
    backend.remove("data").unwrap();
    backend.remove("data").unwrap();
    assert!(backend.open("data", 1 << 30).is_err());
    assert!(
        data.write_at(&[1], 0).is_err(),
        "a handle of a removed object is refused"
    );
}

#[test]
fn a_second_open_of_one_device_is_refused_until_the_first_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = device(dir.path(), 16 * MIB);
    let first = BlockBackend::open(&path, &options()).unwrap();
    let second = BlockBackend::open(&path, &options());
    assert!(
        matches!(second, Err(DeviceError::InUse { .. })),
        "{:?}",
        second.err()
    );
    drop(first);
    BlockBackend::open(&path, &options()).unwrap();
}

#[test]
fn a_device_holding_something_else_is_refused_unless_format_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = device(dir.path(), 16 * MIB);
    // An ext4 superblock magic at its usual place.
    std::fs::write(
        &path,
        [0u8; 1080]
            .iter()
            .chain(&[0x53, 0xef])
            .copied()
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(16 * MIB))
        .unwrap();
    let refused = BlockBackend::open(&path, &options()).err().unwrap();
    assert!(
        matches!(refused, DeviceError::ForeignSignature { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("--format"), "{refused}");
    let before = std::fs::read(&path).unwrap();
    assert_eq!(before[1080..1082], [0x53, 0xef], "nothing was written");

    let wipe = DeviceOptions {
        format: Format::WipeForeign,
        ..options()
    };
    let backend = BlockBackend::open(&path, &wipe).unwrap();
    backend.replace_blob("volume.meta", b"kept").unwrap();
    drop(backend);
    // A Basalt device is never reformatted, even when wiping is allowed.
    let backend = BlockBackend::open(&path, &wipe).unwrap();
    assert_eq!(
        backend.read_blob("volume.meta").unwrap().as_deref(),
        Some(&b"kept"[..])
    );
}

#[test]
fn a_blank_device_is_formatted_and_only_its_first_64_kib_are_looked_at() {
    let dir = tempfile::tempdir().unwrap();
    let path = device(dir.path(), 16 * MIB);
    // Bytes after the signature area do not make a device foreign.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"junk", SIGNATURE_BYTES + 10))
        .unwrap();
    let never = DeviceOptions {
        format: Format::Never,
        ..options()
    };
    let before = BlockBackend::open(&path, &never).err().unwrap();
    assert!(
        matches!(before, DeviceError::NotFormatted { .. }),
        "blank before: {before}"
    );

    let backend = BlockBackend::open(&path, &options()).unwrap();
    let (uuid, clusters) = (backend.uuid(), backend.total_clusters());
    let cluster_bytes = u64::from(small_geometry().cluster_bytes);
    assert_eq!(
        backend.cluster_bytes(),
        cluster_bytes,
        "formatted with the geometry asked for"
    );
    assert!(clusters > 0 && clusters * cluster_bytes < 16 * MIB);
    assert_eq!(backend.free_clusters(), clusters, "a fresh format holds nothing");
    drop(backend);
    let head = std::fs::read(&path).unwrap();
    assert_eq!(&head[..8], b"BASALTBD", "a Basalt superblock at the start");

    // Formatted for good: it opens where only a Basalt device may, as the same store.
    let again = BlockBackend::open(&path, &never).unwrap();
    assert_eq!(
        (again.uuid(), again.total_clusters()),
        (uuid, clusters),
        "the same store, not a new format"
    );
}

#[test]
fn a_device_too_small_for_the_volume_is_refused_naming_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = device(dir.path(), 16 * MIB);
    let wanted = DeviceOptions {
        volume_bytes: Some(64 * MIB),
        ..options()
    };
    let err = BlockBackend::open(&path, &wanted).err().unwrap();
    let DeviceError::TooSmall {
        device_bytes,
        needed_bytes,
        ..
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!(device_bytes, 16 * MIB);
    assert!(needed_bytes > 64 * MIB);
    let message = err.to_string();
    assert!(message.contains(&(16 * MIB).to_string()) && message.contains(&needed_bytes.to_string()));
    assert!(
        std::fs::read(&path).unwrap().iter().all(|&b| b == 0),
        "nothing was written"
    );
    let fits = DeviceOptions {
        volume_bytes: Some(8 * MIB),
        ..options()
    };
    BlockBackend::open(&path, &fits).unwrap();
}

/// A device in memory that models a volatile write cache: writes since the last sync are pending,
/// and a power cut keeps any subset of them (chosen by a seeded RNG).
struct CachedMedium {
    size: u64,
    state: Mutex<Cached>,
}

#[derive(Clone, Default)]
struct Cached {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    /// Writes left before the power cut; the cut makes every later call fail.
    budget: i64,
}

impl CachedMedium {
    fn new(size: u64) -> CachedMedium {
        CachedMedium {
            size,
            state: Mutex::new(Cached {
                durable: vec![0; size as usize],
                budget: i64::MAX,
                ..Cached::default()
            }),
        }
    }

    /// The device after a power cut: durable bytes plus a random subset of the pending writes
    /// (each 512-byte sector of a write lands or not on its own).
    fn after_power_cut(&self, rng: &mut impl Rng) -> CachedMedium {
        let state = self.state.lock().unwrap();
        let mut durable = state.durable.clone();
        for (offset, bytes) in &state.pending {
            for (i, sector) in bytes.chunks(512).enumerate() {
                if rng.random_bool(0.5) {
                    let at = *offset as usize + i * 512;
                    durable[at..at + sector.len()].copy_from_slice(sector);
                }
            }
        }
        CachedMedium {
            size: self.size,
            state: Mutex::new(Cached {
                durable,
                pending: Vec::new(),
                budget: i64::MAX,
            }),
        }
    }

    fn cut_after(&self, writes: i64) {
        self.state.lock().unwrap().budget = writes;
    }
}

impl Medium for CachedMedium {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.state.lock().unwrap();
        let (start, end) = (offset as usize, offset as usize + buf.len());
        buf.copy_from_slice(&state.durable[start..end]);
        for (at, bytes) in &state.pending {
            let (from, to) = (*at as usize, *at as usize + bytes.len());
            let (lo, hi) = (from.max(start), to.min(end));
            if lo < hi {
                buf[lo - start..hi - start].copy_from_slice(&bytes[lo - from..hi - from]);
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if state.budget <= 0 {
            return Err(io::Error::other("power cut"));
        }
        state.budget -= 1;
        state.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if state.budget <= 0 {
            return Err(io::Error::other("power cut"));
        }
        for (offset, bytes) in std::mem::take(&mut state.pending) {
            state.durable[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(())
    }
    fn location(&self) -> String {
        "memory".into()
    }
}

/// What a power cut may leave: the objects as of their last sync (except ranges changed since),
/// and the versions of `volume.meta` that may be found (`None`: absent).
#[derive(Default)]
struct Expect {
    log: Option<Vec<u8>>,
    data: Option<Vec<u8>>,
    touched: Vec<Range<usize>>,
    blob: Vec<Option<Vec<u8>>>,
}

/// The workload of the power-cut test: blob replacements (which free and reuse clusters), appends
/// to a log, data writes and whole-cluster punches, with syncs between.
fn power_cut_workload(backend: &BlockBackend, expect: &mut Expect) -> io::Result<()> {
    expect.blob = vec![None];
    let log = backend.create("log", 0)?;
    let data = backend.create("data", 1 << 30)?;
    let mut log_content = Vec::new();
    let mut data_content = vec![0u8; 8 * 65536];
    for round in 0..6u8 {
        let version: Vec<u8> = vec![round; 1000 + 70_000 * (round as usize % 3)];
        expect.blob.push(Some(version.clone()));
        backend.replace_blob("volume.meta", &version)?;
        expect.blob = vec![Some(version)];
        for i in 0..40u32 {
            let record = [round, i as u8, 0xab, 0xcd];
            log.write_at(&record, log_content.len() as u64)?;
            log_content.extend_from_slice(&record);
        }
        let at = (round as usize % 5) * 65536 + 4096;
        expect.touched.push(at..at + 8192);
        data.write_at(&[round + 1; 8192], at as u64)?;
        data_content[at..at + 8192].fill(round + 1);
        let p = ((round as usize + 2) % 8) * 65536;
        expect.touched.push(p..p + 65536);
        data.punch(p as u64, 65536)?;
        data_content[p..p + 65536].fill(0);
        log.sync()?;
        expect.log = Some(log_content.clone());
        expect.data = Some(data_content.clone());
        expect.touched.clear();
    }
    Ok(())
}

fn read_object(backend: &BlockBackend, name: &str, len: usize) -> Vec<u8> {
    let object = backend.open(name, 0).unwrap();
    let mut got = vec![0u8; len];
    object.read_at(&mut got, 0).unwrap();
    got
}

#[test]
fn after_a_power_cut_at_any_write_synced_objects_are_intact_and_blobs_old_or_new() {
    let options = DeviceOptions {
        geometry: Geometry {
            cluster_bytes: 65536,
            journal_bytes: 8192,
            max_objects: 8,
        },
        ..DeviceOptions::default()
    };
    // How many writes the whole workload makes (opening and formatting included).
    let total = {
        let medium = Arc::new(CachedMedium::new(4 * MIB));
        medium.cut_after(i64::MAX);
        let backend = BlockBackend::open_medium(medium.clone(), &options).unwrap();
        power_cut_workload(&backend, &mut Expect::default()).unwrap();
        let left = medium.state.lock().unwrap().budget;
        i64::MAX - left
    };
    assert!(total > 50, "{total} writes");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xba5a17);
    for cut in 0..total {
        let medium = Arc::new(CachedMedium::new(4 * MIB));
        medium.cut_after(cut);
        let mut expect = Expect::default();
        if let Ok(backend) = BlockBackend::open_medium(medium.clone(), &options) {
            let _ = power_cut_workload(&backend, &mut expect);
        }
        for trial in 0..3 {
            let after = Arc::new(medium.after_power_cut(&mut rng));
            let backend = match BlockBackend::open_medium(after, &options) {
                Ok(backend) => backend,
                // Cut before the format committed: the device is still blank.
                Err(e) if expect.blob.is_empty() => {
                    assert!(matches!(e, DeviceError::Io { .. }), "cut {cut}: {e}");
                    continue;
                }
                Err(e) => panic!("cut {cut}/{trial}: reopen failed: {e}"),
            };
            if let Some(log) = &expect.log {
                assert!(
                    read_object(&backend, "log", log.len()) == *log,
                    "cut {cut}/{trial}: synced log changed"
                );
            }
            if let Some(data) = &expect.data {
                let got = read_object(&backend, "data", data.len());
                let outside = |i: &usize| !expect.touched.iter().any(|r| r.contains(i));
                assert!(
                    (0..data.len()).filter(outside).all(|i| got[i] == data[i]),
                    "cut {cut}/{trial}: synced data changed"
                );
            }
            let found = backend.read_blob("volume.meta").unwrap();
            assert!(
                expect.blob.is_empty() || expect.blob.contains(&found),
                "cut {cut}/{trial}: volume.meta is neither its old nor its new content"
            );
        }
    }
}

#[test]
fn a_wiped_device_reads_as_blank_and_keeps_nothing_of_the_old_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = device(dir.path(), 16 * MIB);
    let secret = vec![0x5au8; 64 << 10];
    {
        let backend = BlockBackend::open(&path, &options()).unwrap();
        let object = backend.create("layer-00000001.data", 8 * MIB).unwrap();
        object.write_at(&secret, 0).unwrap();
        object.sync().unwrap();
        // Served: the wipe cannot take the device from under a replica.
        assert!(matches!(wipe(&path).unwrap_err(), DeviceError::InUse { .. }));
    }
    assert!(wipe(&path).unwrap(), "a Basalt store was there");
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        bytes[..SIGNATURE_BYTES as usize].iter().all(|&b| b == 0),
        "the signature region is zero"
    );
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
        "the old data is still on the device"
    );
    let never = DeviceOptions {
        format: Format::Never,
        ..options()
    };
    assert!(matches!(
        BlockBackend::open(&path, &never).err().unwrap(),
        DeviceError::NotFormatted { .. }
    ));
    assert!(!wipe(&path).unwrap(), "nothing left to wipe");
    // A new store formats it afresh and finds no object of the old one.
    let backend = BlockBackend::open(&path, &options()).unwrap();
    assert!(backend.list().unwrap().is_empty());
}

#[test]
fn a_wipe_leaves_foreign_data_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = device(dir.path(), 4 * MIB);
    std::fs::write(&path, b"not a basalt store").unwrap();
    assert!(!wipe(&path).unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), b"not a basalt store");
}
