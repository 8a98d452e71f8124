//! Creating and opening a store: the chain named by `volume.meta`, each layer's log replayed against
//! its data, the volume map merged, an interrupted merge finished.
//!
//! Recovery is opening: whatever a crash left (an unflushed log tail, a merge half done, orphaned
//! layer objects) is checked or finished here, before the store serves anything.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use basalt_proto::{Epoch, Revision, VolumeId};

use super::stripes::STRIPES;
use super::{
    clone, install_log, intent, lock, log, meta, Backend, Chain, CloneOrigin, DirBackend, Layer, LayerId,
    LayerIndex, LogAppender, MapBuilder, Store, StoreError, VolumeMeta, BLOCK_SIZE, MAX_VOLUME_BYTES,
};

/// Raises the soft open-file limit to the hard one: a 1,000-snapshot chain keeps 1,000+ files open.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Reads a layer's log and replays it against its data.
pub(super) fn load_index(
    backend: &dyn Backend,
    layer: &Layer,
    volume_blocks: u64,
) -> Result<LayerIndex, StoreError> {
    load_index_and_tail(backend, layer, volume_blocks).map(|(index, _)| index)
}

/// [`load_index`], with the blocks the log names after its last flush marker (the unflushed tail,
/// whatever of it survived): the write-intent record counts them as written since that flush.
fn load_index_and_tail(
    backend: &dyn Backend,
    layer: &Layer,
    volume_blocks: u64,
) -> Result<(LayerIndex, Vec<u64>), StoreError> {
    let name = layer.id.log_object();
    let what = format!("{}/{name}", backend.location());
    let bytes = backend
        .read_whole(&name)
        .map_err(StoreError::io(format!("reading {what}")))?
        .ok_or_else(|| StoreError::Corrupt {
            what: what.clone(),
            detail: "the index log is missing".into(),
        })?;
    let parsed = log::parse(&bytes, &what, volume_blocks)?;
    let tail = parsed.unverified.iter().map(|(lba, _)| lba.0).collect();
    Ok((log::resolve(parsed, &*layer.data, &what)?, tail))
}

impl Store {
    /// Creates a new volume of `size_bytes` (a multiple of 4 KiB, at most [`MAX_VOLUME_BYTES`]) in
    /// `dir` (created if missing). Refuses a directory that already holds a volume.
    pub fn create(dir: &Path, volume: VolumeId, size_bytes: u64) -> Result<Store, StoreError> {
        Store::create_with_backend(Self::dir_backend(dir)?, volume, size_bytes)
    }

    /// Opens the volume in `dir`, recovering from any crash (see the module documentation).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_backend(Self::dir_backend(dir)?)
    }

    /// Opens the volume in `dir`, or creates it of `size_bytes` if there is none. An existing volume
    /// of another id (when `volume` is given) is refused; one of another size opens at its own size,
    /// whatever `size_bytes` says: a volume changes size only by [`Store::grow`] (an expansion through
    /// its controller), so a replica restarted with the size it was first given after an expansion
    /// keeps the larger size, and a larger `size_bytes` never grows it behind its controller's back
    /// (its controller grows it when it rejoins a larger volume). The caller logs the difference.
    pub fn open_or_create(
        dir: &Path,
        size_bytes: u64,
        volume: Option<VolumeId>,
    ) -> Result<Store, StoreError> {
        let backend = Self::dir_backend(dir)?;
        match VolumeMeta::load(&*backend)? {
            Some(meta) => {
                if let Some(v) = volume.filter(|&v| v != meta.volume) {
                    return Err(StoreError::VolumeMismatch {
                        dir: backend.location(),
                        on_disk: meta.volume,
                        requested: v,
                    });
                }
                Store::open_with_backend(backend)
            }
            None => Store::create_with_backend(backend, volume.unwrap_or_else(VolumeId::random), size_bytes),
        }
    }

    fn dir_backend(dir: &Path) -> Result<Arc<dyn Backend>, StoreError> {
        Ok(Arc::new(DirBackend::new(dir)?))
    }

    /// [`Store::create`] on any backend.
    pub fn create_with_backend(
        backend: Arc<dyn Backend>,
        volume: VolumeId,
        size_bytes: u64,
    ) -> Result<Store, StoreError> {
        Store::create_volume(backend, volume, size_bytes, None)
    }

    /// Creates a new volume that is a clone of `origin` (see [`clone`]): usable at once, its blocks
    /// read from the source until they are copied. Its size must be at least the source's.
    pub fn create_clone(
        backend: Arc<dyn Backend>,
        volume: VolumeId,
        size_bytes: u64,
        origin: CloneOrigin,
    ) -> Result<Store, StoreError> {
        Store::create_volume(backend, volume, size_bytes, Some(origin))
    }

    fn create_volume(
        backend: Arc<dyn Backend>,
        volume: VolumeId,
        size_bytes: u64,
        origin: Option<CloneOrigin>,
    ) -> Result<Store, StoreError> {
        let invalid = |reason| {
            Err(StoreError::InvalidSize {
                size: size_bytes,
                reason,
            })
        };
        if size_bytes == 0 {
            return invalid("a volume cannot be empty");
        }
        if !size_bytes.is_multiple_of(BLOCK_SIZE) {
            return invalid("it must be a multiple of 4096 bytes");
        }
        if size_bytes > MAX_VOLUME_BYTES {
            return invalid("it is larger than the 1 PiB maximum");
        }
        if origin.as_ref().is_some_and(|o| o.source_size_bytes > size_bytes) {
            return invalid("a clone cannot be smaller than the volume it is cloned from");
        }
        if VolumeMeta::load(&*backend)?.is_some() {
            return Err(StoreError::AlreadyExists {
                dir: backend.location(),
            });
        }
        let listing = backend
            .list()
            .map_err(StoreError::io(format!("listing {}", backend.location())))?;
        for name in listing.iter().filter(|n| LayerId::of_object(n).is_some()) {
            // Left by a create that crashed before its meta was written.
            backend
                .remove(name)
                .map_err(StoreError::io(format!("removing stale {name}")))?;
        }
        // A clone's base layer is the bottom of its chain, so it takes the lowest id.
        let base = origin.as_ref().map(|_| LayerId(1));
        let head = LayerId(if base.is_some() { 2 } else { 1 });
        for id in base.into_iter().chain([head]) {
            Self::create_layer_objects(&*backend, id, size_bytes)?;
        }
        let clone = origin.zip(base).map(|(origin, base)| meta::CloneMeta {
            source_volume: origin.source_volume,
            snapshot: origin.snapshot,
            source_size_bytes: origin.source_size_bytes,
            holder: origin.holder,
            sources: origin.sources,
            hydration: meta::Hydration::Filling {
                base,
                hydrated_below: 0,
            },
        });
        let meta = VolumeMeta {
            format: meta::FORMAT_VERSION,
            volume,
            size_bytes,
            epoch: Epoch::default(),
            revision: Revision::default(),
            snapshots: Vec::new(),
            head,
            next_layer: head.0 + 1,
            pending_merge: None,
            clone,
            holds: Vec::new(),
            membership: None,
        };
        intent::IntentRecord::create(backend.clone())?;
        meta.store(&*backend)?;
        Store::open_with_backend(backend)
    }

    /// Creates a layer's empty data object and log, durably.
    pub(super) fn create_layer_objects(
        backend: &dyn Backend,
        id: LayerId,
        size_bytes: u64,
    ) -> Result<(), StoreError> {
        for (name, capacity) in [(id.data_object(), size_bytes), (id.log_object(), 0)] {
            let object = backend
                .create(&name, capacity)
                .map_err(StoreError::io(format!("creating {name}")))?;
            object.sync().map_err(StoreError::io(format!("syncing {name}")))?;
        }
        backend
            .sync_namespace()
            .map_err(StoreError::io(format!("syncing {}", backend.location())))
    }

    pub(super) fn open_layer(
        backend: &dyn Backend,
        id: LayerId,
        size_bytes: u64,
    ) -> Result<Layer, StoreError> {
        let name = id.data_object();
        let data = backend.open(&name, size_bytes).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::Corrupt {
                what: format!("{}/{name}", backend.location()),
                detail: "the data object of a layer in the chain is missing".into(),
            },
            _ => StoreError::Io {
                context: format!("opening {name}"),
                source: e,
            },
        })?;
        Ok(Layer {
            id,
            data,
            log: Mutex::new(None),
            data_blocks: AtomicU64::new(0),
            tombstones: AtomicU64::new(0),
        })
    }

    /// [`Store::open`] on any backend.
    pub fn open_with_backend(backend: Arc<dyn Backend>) -> Result<Store, StoreError> {
        raise_open_file_limit();
        let meta = VolumeMeta::load(&*backend)?.ok_or_else(|| StoreError::NotAVolume {
            dir: backend.location(),
        })?;
        let volume_blocks = meta.size_bytes / BLOCK_SIZE;

        // Objects of layers no longer in the chain: left by a delete, revert or snapshot create that
        // crashed around its meta commit.
        let live: HashSet<LayerId> = meta.layers().into_iter().collect();
        let listing = backend
            .list()
            .map_err(StoreError::io(format!("listing {}", backend.location())))?;
        for name in listing {
            if LayerId::of_object(&name).is_some_and(|id| !live.contains(&id)) {
                backend
                    .remove(&name)
                    .map_err(StoreError::io(format!("removing orphan {name}")))?;
            }
        }

        let mut map = MapBuilder::default();
        let mut layers = BTreeMap::new();
        let mut revision = meta.revision;
        let mut tail = Vec::new();
        // Logs to rewrite, each with its recovered blocks, revision and whether it stays open.
        let mut rewrites = Vec::new();
        for id in meta.layers() {
            let layer = Self::open_layer(&*backend, id, meta.size_bytes)?;
            let index = if id == meta.head {
                let (index, unflushed) = load_index_and_tail(&*backend, &layer, volume_blocks)?;
                tail = unflushed;
                index
            } else {
                load_index(&*backend, &layer, volume_blocks)?
            };
            if id == meta.head {
                revision = revision.max(index.last_revision.unwrap_or_default());
            }
            // A clone's base layer is appended to until it is complete.
            let keep_open = id == meta.head || meta.filling_base() == Some(id);
            layer.data_blocks.store(index.data_blocks(), Ordering::Relaxed);
            layer.tombstones.store(index.tombstones(), Ordering::Relaxed);
            if index.needs_rewrite {
                let at = revision.max(index.last_revision.unwrap_or_default());
                // Rare (a crash left an unflushed or torn tail): the copy costs nothing worth saving.
                rewrites.push((id, index.blocks.as_slice().to_vec(), at, keep_open));
            }
            map.add_layer(id, index.blocks);
            if !index.needs_rewrite && keep_open {
                *lock(&layer.log) = Some(LogAppender::open_at_end(&*backend, &id.log_object(), true)?);
            }
            layers.insert(id, Arc::new(layer));
        }
        // The map is built while the logs and the intent record are written and synced: the one is
        // CPU, the others mostly fsync waits, of about the same length for a large head.
        let (map, intent) = std::thread::scope(|scope| {
            let map = scope.spawn(|| map.build());
            let durable = rewrites
                .iter()
                .try_for_each(|(id, blocks, at, keep_open)| {
                    // Make the recovered state the durable one before anything new is appended.
                    let blocks = blocks.iter().copied();
                    install_log(&*backend, &layers[id], blocks, *at, *keep_open)
                })
                .and_then(|()| intent::IntentRecord::open(backend.clone(), revision, tail.iter().copied()));
            let map = map
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            durable.map(|intent| (map, intent))
        })?;
        let head = layers[&meta.head].clone();
        let pending = meta.pending_merge;
        let clone = clone::CloneState::from_meta(meta.clone.as_ref());
        let store = Store {
            volume: meta.volume,
            size_bytes: AtomicU64::new(meta.size_bytes),
            chain: RwLock::new(Chain { layers, head }),
            map: RwLock::new(map),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            epoch: AtomicU64::new(meta.epoch.0),
            revision: AtomicU64::new(revision.0),
            next_revision: AtomicU64::new(revision.0),
            meta: Mutex::new(meta),
            ops: Mutex::new(()),
            failed: Mutex::new(None),
            failed_flag: AtomicBool::new(false),
            layer_indexes: Default::default(),
            intent,
            revision_shift: Default::default(),
            recovered_unflushed: tail.len() as u64,
            clone,
            views: Default::default(),
            backend,
        };
        if let Some(merge) = pending {
            let _ops = lock(&store.ops);
            store.run_merge(merge)?;
        }
        Ok(store)
    }
}
