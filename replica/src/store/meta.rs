//! `volume.meta`: the volume's identity and the shape of its chain, replaced atomically.
//!
//! It changes only on rare events (create, snapshot operations, epoch changes), never per write or per
//! flush: the revision lives in the head's index log flush markers and is copied here whenever the meta
//! is rewritten anyway. Every change goes through [`Backend::replace_blob`] (write, fsync, rename, fsync
//! the directory), so a crash leaves either the old or the new chain, never a mix.
//!
//! It also holds the volume's membership as the controller last recorded it (`replica add` / `rm`), so that
//! a controller started later with a stale replica list can follow the newest one.

use basalt_proto::{Epoch, Revision, VolumeId};

use super::backend::Backend;
use super::types::LayerId;
use super::StoreError;

/// Name of the metadata object.
pub(crate) const META_OBJECT: &str = "volume.meta";

/// Version of the on-disk format; a replica refuses a format it does not know.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// The persisted description of a volume.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct VolumeMeta {
    pub format: u32,
    pub volume: VolumeId,
    pub size_bytes: u64,
    pub epoch: Epoch,
    /// Highest revision known when the meta was last written (the head log may know a higher one).
    pub revision: Revision,
    /// Snapshots, oldest first; each one's parent is the one before it.
    pub snapshots: Vec<SnapshotRecord>,
    /// The live, writable layer on top of the last snapshot.
    pub head: LayerId,
    /// The id the next new layer gets.
    pub next_layer: u32,
    /// A snapshot delete that was journaled but not finished: it is re-run at open.
    pub pending_merge: Option<PendingMerge>,
    /// Set when this volume is a clone of another volume's snapshot (see [`super::clone`]).
    #[serde(default)]
    pub clone: Option<CloneMeta>,
    /// Clones of this volume that still read one of its snapshots: such a snapshot is neither
    /// deleted nor reverted past until its holds are released.
    #[serde(default)]
    pub holds: Vec<HoldRecord>,
    /// The volume's members as a controller last recorded them; `None` until one does (a meta written
    /// before memberships existed reads as `None`).
    #[serde(default)]
    pub membership: Option<Membership>,
}

/// Where a clone comes from and how far it has copied it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CloneMeta {
    pub source_volume: VolumeId,
    pub snapshot: String,
    pub source_size_bytes: u64,
    /// The name this replica's holds on the source carry.
    pub holder: String,
    /// The source replicas' addresses, as given when the clone was made.
    pub sources: Vec<String>,
    pub hydration: Hydration,
}

/// A clone's progress: filling its base layer, or done with its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Hydration {
    /// The base layer `base` (the bottom of the chain, listed in no snapshot) holds every block of
    /// the source's view below block `hydrated_below`, and some above it.
    Filling { base: LayerId, hydrated_below: u64 },
    /// The base layer is complete and is the oldest snapshot now; `released` once the holds on
    /// the source are all released.
    Hydrated { released: bool },
}

/// One hold on a snapshot (see [`VolumeMeta::holds`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct HoldRecord {
    pub snapshot: String,
    pub holder: String,
    pub since_unix_ms: u64,
}

/// Which replicas make up the volume, as its controller decided (see `Store::set_membership`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    /// Raised by one at every change: the highest is the newest.
    pub generation: u64,
    /// The members' data-path addresses, as the controller dials them.
    pub members: Vec<String>,
    /// The epoch of the controller that wrote it.
    pub epoch: Epoch,
}

/// One snapshot in the chain.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct SnapshotRecord {
    pub layer: LayerId,
    pub name: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

/// "Merging snapshot `from` into its child `into`": the journal of a snapshot delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PendingMerge {
    pub from: LayerId,
    pub into: LayerId,
}

impl VolumeMeta {
    /// Every layer of the chain, oldest first, the head last: a clone's base layer, while it is
    /// filled, first of all.
    pub fn layers(&self) -> Vec<LayerId> {
        self.filling_base()
            .into_iter()
            .chain(self.snapshots.iter().map(|s| s.layer))
            .chain(std::iter::once(self.head))
            .collect()
    }

    /// The base layer of a clone that is still being hydrated.
    pub fn filling_base(&self) -> Option<LayerId> {
        match self.clone.as_ref().map(|c| c.hydration) {
            Some(Hydration::Filling { base, .. }) => Some(base),
            _ => None,
        }
    }

    /// The holders of snapshot `name`.
    pub fn holders_of(&self, name: &str) -> Vec<String> {
        self.holds
            .iter()
            .filter(|h| h.snapshot == name)
            .map(|h| h.holder.clone())
            .collect()
    }

    pub fn snapshot_index(&self, name: &str) -> Option<usize> {
        self.snapshots.iter().position(|s| s.name == name)
    }

    /// Loads and validates the meta, `None` if there is none.
    pub fn load(backend: &dyn Backend) -> Result<Option<VolumeMeta>, StoreError> {
        let where_ = || format!("{}/{META_OBJECT}", backend.location());
        let Some(bytes) = backend
            .read_blob(META_OBJECT)
            .map_err(StoreError::io(format!("reading {}", where_())))?
        else {
            return Ok(None);
        };
        let meta: VolumeMeta = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            what: where_(),
            detail: e.to_string(),
        })?;
        let corrupt = |detail: String| StoreError::Corrupt {
            what: where_(),
            detail,
        };
        if meta.format != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                meta.format
            )));
        }
        let layers = meta.layers();
        if layers.windows(2).any(|w| w[0] >= w[1]) || meta.head.0 >= meta.next_layer {
            return Err(corrupt(format!(
                "layer ids out of order: {layers:?}, next {}",
                meta.next_layer
            )));
        }
        if let Some(m) = meta.pending_merge {
            let from = layers.iter().position(|&l| l == m.from);
            let into = layers.iter().position(|&l| l == m.into);
            if !matches!((from, into), (Some(f), Some(i)) if i == f + 1) {
                return Err(corrupt(format!(
                    "pending merge {m:?} does not name a snapshot and its child"
                )));
            }
        }
        Ok(Some(meta))
    }

    /// Atomically replaces the persisted meta with `self`.
    pub fn store(&self, backend: &dyn Backend) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| StoreError::Corrupt {
            what: META_OBJECT.to_string(),
            detail: format!("cannot encode: {e}"),
        })?;
        backend
            .replace_blob(META_OBJECT, &bytes)
            .map_err(StoreError::io(format!(
                "replacing {}/{META_OBJECT}",
                backend.location()
            )))
    }
}
