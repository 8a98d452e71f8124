//! Domain newtypes and units shared by every Basalt crate.
//!
//! The newtypes exist so that an epoch can never be passed where a revision
//! is expected, and so that their ordering rules live in one place. The
//! units are here because a controller checks them before it asks a replica
//! for anything (a volume size, a growth) and the replica's store enforces
//! them: one definition keeps both ends agreeing.

use std::fmt;

/// A replica store's unit of allocation, checksumming and indexing. A volume
/// is a whole number of blocks, so a controller refuses any other size before
/// it reaches the replicas.
pub const BLOCK_SIZE: u64 = 4096;

/// Largest volume: 1 PiB. Far above the 64 TiB requirement; it bounds the
/// per-layer segment table of the replica's directory backend (1,024 slots of
/// 1 TiB).
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;

/// A controller generation. A replica accepts requests only from the highest
/// epoch it has seen; a controller raises the epoch on its replicas before it
/// serves any I/O, which fences out every older controller.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {}", self.0)
    }
}

/// A replica's durable flush counter: raised by one on every successful flush
/// and persisted with it. Between replicas of one epoch, a higher revision
/// means more flushed history.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "revision {}", self.0)
    }
}

/// The identity of a volume, shared by all its replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VolumeId(pub uuid::Uuid);

impl VolumeId {
    /// A fresh random volume id.
    pub fn random() -> VolumeId {
        VolumeId(uuid::Uuid::new_v4())
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
