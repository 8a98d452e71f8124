//! The store's errors. Each says what was wrong and what the caller can do about it.

use basalt_proto::{Epoch, VolumeId};

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The block's content does not match its persisted CRC32.
    #[error(
        "block {lba} failed its CRC32 check on this replica: read it from another replica and write it \
         back here to repair it"
    )]
    ChecksumMismatch {
        /// The 4 KiB block index.
        lba: u64,
    },
    /// The request reaches past the end of the volume.
    #[error("{len} bytes at offset {offset} reach past the end of the {size}-byte volume")]
    OutOfRange {
        /// Byte offset requested.
        offset: u64,
        /// Length requested.
        len: u64,
        /// Size of the volume in bytes.
        size: u64,
    },
    /// Offset or length is not a multiple of 512 bytes.
    #[error("offset {offset} and length {len} must both be multiples of 512 bytes")]
    Unaligned {
        /// Byte offset requested.
        offset: u64,
        /// Length requested.
        len: u64,
    },
    /// A controller tried to lower the epoch: it is stale and must not be served.
    #[error(
        "{requested} is older than this replica's {current}: a newer controller has taken over, so \
         this one is fenced out"
    )]
    StaleEpoch {
        /// The replica's epoch.
        current: Epoch,
        /// The epoch that was refused.
        requested: Epoch,
    },
    /// No snapshot of that name exists.
    #[error("no snapshot named {0:?} (list them with snapshot_list)")]
    NoSuchSnapshot(String),
    /// A snapshot of that name already exists.
    #[error("a snapshot named {0:?} already exists: pick another name or delete it first")]
    SnapshotExists(String),
    /// The snapshot name cannot be stored.
    #[error("invalid snapshot name {name:?}: {reason}")]
    InvalidSnapshotName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A clone still reads the snapshot: deleting it (or reverting past it) would pull its data away.
    #[error(
        "snapshot {name:?} is held by {} (a clone still copying it): wait until the clone is hydrated \
         (`basalt volume info` on the clone), or release the hold with `basalt snapshot release` if the \
         clone was abandoned",
        holders.join(", ")
    )]
    SnapshotHeld {
        /// The held snapshot.
        name: String,
        /// Who holds it.
        holders: Vec<String>,
    },
    /// The volume is a clone whose base layer is not complete yet, and the request needs it complete.
    #[error("this replica is a clone still hydrating from its source ({detail}); retry once it is hydrated")]
    Hydrating {
        /// Why the request needs the whole base layer.
        detail: String,
    },
    /// A clone needed a block of its source and could not read it.
    #[error(
        "cannot read the clone's source: {detail}; check that a replica of the source volume is \
         reachable and still holds the snapshot"
    )]
    SourceUnavailable {
        /// What failed.
        detail: String,
    },
    /// A rebuild asked to renumber this replica's flushes from a revision it never made.
    #[error("cannot adopt the sync point: {detail}")]
    BadSyncPoint {
        /// What was wrong.
        detail: String,
    },
    /// The volume size cannot be used.
    #[error("invalid volume size {size}: {reason}")]
    InvalidSize {
        /// The size given, in bytes.
        size: u64,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A grow to a size below the volume's: volumes never shrink (the blocks past the new end may
    /// hold data, and every initiator has been told the larger capacity).
    #[error(
        "the volume holds {size} bytes, more than the {requested} bytes asked for: a volume can grow, \
         never shrink"
    )]
    Shrink {
        /// The volume's size.
        size: u64,
        /// The size asked for.
        requested: u64,
    },
    /// A controller tried to record a membership older than the one recorded.
    #[error(
        "membership generation {requested} is older than the recorded generation {current}: a newer \
         controller changed the volume's members since"
    )]
    StaleMembership {
        /// The recorded generation.
        current: u64,
        /// The generation that was refused.
        requested: u64,
    },
    /// A grow to a size the storage under the store cannot hold.
    #[error(
        "a volume of {requested} bytes does not fit on {location}: it holds a volume of at most {max} \
         bytes; give this replica larger storage (a larger device) or grow the volume less"
    )]
    TooLarge {
        /// Where the store lives.
        location: String,
        /// The size asked for.
        requested: u64,
        /// The largest volume the storage holds.
        max: u64,
    },
    /// The directory holds another volume.
    #[error(
        "{dir} holds volume {on_disk}, not {requested}: this replica directory belongs to another volume"
    )]
    VolumeMismatch {
        /// The replica directory.
        dir: String,
        /// Volume id recorded in the metadata.
        on_disk: VolumeId,
        /// Volume id requested.
        requested: VolumeId,
    },
    /// `create` found an existing volume.
    #[error("{dir} already holds a volume: open it, or remove the directory to start afresh")]
    AlreadyExists {
        /// The replica directory.
        dir: String,
    },
    /// Another open store (another process, e.g. a running replica, or another `Store` in this one)
    /// holds the directory's lock.
    #[error(
        "{dir} is in use by another process (e.g. a running basalt replica) that holds the lock on \
         {lock}: stop it first, then retry"
    )]
    InUse {
        /// The replica directory.
        dir: String,
        /// The lock file held.
        lock: String,
    },
    /// `open` found no volume.
    #[error("{dir} holds no volume (no volume.meta): create one first")]
    NotAVolume {
        /// The replica directory.
        dir: String,
    },
    /// An I/O call of the backend failed.
    #[error("{context}: {source}")]
    Io {
        /// What the store was doing, and on which object.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An earlier I/O failure left the in-memory state uncertain; the store refuses further changes.
    #[error(
        "an earlier I/O failure left this store's state uncertain ({detail}): reopen it (recovery \
         re-verifies every unflushed block) or rebuild this replica"
    )]
    Failed {
        /// The failure that poisoned the store.
        detail: String,
    },
    /// Persisted state cannot be understood.
    #[error("{what} is corrupt: {detail}; restore this replica by rebuilding it from a healthy one")]
    Corrupt {
        /// Which object.
        what: String,
        /// What was wrong.
        detail: String,
    },
}

impl StoreError {
    /// Wraps an I/O error with what the store was doing.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}
