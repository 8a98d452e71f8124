//! # The controller <-> replica data-path protocol
//!
//! One TCP connection carries everything a controller says to a replica: the
//! handshake, reads and writes, flushes, and the control operations (info,
//! snapshots, epoch). Every frame is a fixed 52-byte header followed by an
//! optional payload:
//!
//! ```text
//!  0       4     6    7     8               16              24              32              40    42    44          48          52
//!  +-------+-----+----+-----+---------------+---------------+---------------+---------------+-----+-----+-----------+-----------+------------
//!  | magic | ver | op |flags| request id    | epoch         | offset|detail | length        |statu|rsvd | payload   | crc32     | payload ...
//!  | BSLT  | u16 | u8 | u8  | u64           | u64           | u64           | u64           | u16 | u16 | len u32   |           |
//!  +-------+-----+----+-----+---------------+---------------+---------------+---------------+-----+-----+-----------+-----------+------------
//! ```
//!
//! All integers are little-endian. `payload len` is the length prefix: the
//! decoder reads the header, rejects a bad magic, an unsupported version or a
//! payload longer than [`MAX_PAYLOAD`] *before* it allocates anything, then
//! waits for the payload and checks the CRC32 (IEEE) computed over header
//! bytes `0..48` followed by the payload. A frame that fails any check closes
//! the connection: after a corrupt header the stream cannot be re-synchronised.
//!
//! Requests have op codes `0x01..`; the reply to a request has the same code
//! with the high bit set. A failed request is answered with the reply op code,
//! a non-zero status code ([`ReplyError`]), its detail (e.g. the current epoch)
//! in the `offset|detail` field and a human-readable UTF-8 message as payload.
//!
//! ## Why control operations travel on the data path
//!
//! Info, snapshot create/list/delete/revert, SetEpoch and Resize are ops of this same
//! frame enum, with prost-encoded payloads from `protos/basalt/replica.proto`,
//! rather than a separate gRPC service: one address to configure, one
//! connection to authenticate and monitor, one epoch check for everything a
//! controller does, and a snapshot is ordered *exactly* with respect to the
//! writes sent before and after it on the same stream. A controller can drain
//! and snapshot without a second channel racing the data path.
//!
//! The rebuild's ops ride the same stream: `BlockCrcs` (a range) and
//! `RunCrcs` (many runs in one request) compare merged views, `ReadV` and
//! `WriteV` copy many scattered extents in one round trip each, and `Reset`, `LayerBlocks` and `ReadLayer` let a rebuild copy a
//! source's snapshot chain layer by layer onto a replica whose chain differs.
//! `WrittenSince` asks a replica's persistent write-intent record which
//! regions may differ from a replica last in sync at a [`SyncPoint`], and
//! `AdoptSyncPoint` puts a freshly rebuilt replica on the source's flush
//! numbering (or takes it off any numbering while it is being rebuilt).
//!
//! A clone of a snapshot (another volume, whose replicas may live anywhere)
//! reads its source over this same protocol: `SnapshotRuns` and
//! `ReadSnapshot` list and read a snapshot's view of the volume, and
//! `SnapshotHold` / `SnapshotRelease` / `HoldList` keep the snapshot from
//! being deleted while a clone still needs it. A clone connects as a
//! non-writer at epoch 0 (a survey) and these ops are not fenced by the
//! epoch: the source's controller may change epochs meanwhile, and a
//! snapshot's content never changes. It authenticates like every other
//! client, with the source volume's secret.
//!
//! ## Authentication
//!
//! Hello carries the client's nonce; HelloOk the replica's nonce and its
//! proof that it knows the volume's secret; the client answers with `Auth`,
//! its own proof. Only a connection whose Auth was valid is served, and
//! nothing a Hello asks for that changes the replica (raising the epoch,
//! taking the writer role) happens before it: see [`crate::auth`].
//!
//! ## Pipelining
//!
//! Requests are pipelined: a sender does not wait for a reply before sending
//! the next request, and replies may come back in any order. They are matched
//! by [`RequestId`], which the sender chooses and the replica echoes.
//!
//! ## Zero copy
//!
//! Payloads are [`Bytes`]. [`Frame::encode`] renders only the 52-byte header
//! and keeps the payload as a reference-counted `Bytes`, so a controller can
//! send one write buffer to three replicas without copying it; the
//! [`FrameBatchWriter`] hands headers and payloads of many frames to one
//! vectored `write`. The decoder splits payloads off its read buffer with
//! [`bytes::BytesMut::split_to`], which does not copy either. For fan-out,
//! [`payload_crc`] lets the sender checksum a payload once and reuse the CRC
//! for every replica with [`Frame::encode_with_payload_crc`].

mod codec;
mod header;
mod io;

#[cfg(test)]
mod tests;

use bytes::Bytes;

use crate::auth::{Nonce, Proof};
use crate::pb::replica as pb;
use crate::{Epoch, Revision, VolumeId};

pub use codec::{decode_all, DecodeError, EncodeError, FrameCodec};
pub use header::{payload_crc, EncodedFrame, HEADER_LEN, MAGIC};
pub use io::{frame_sender, FrameBatchWriter, FrameFlusher, FrameSender, SendError};

/// Largest payload one frame may carry: 16 MiB.
///
/// Large enough for the biggest I/O a SCSI initiator sends in one command
/// (Linux caps `max_sectors_kb` at a few MiB; we offer bursts up to 16 MiB),
/// small enough that a corrupt or hostile length field cannot make a peer
/// allocate more than this per connection. Reads are limited to the same size.
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// Largest error message a replica puts in a failed reply; longer ones are
/// cut (at a character boundary). An error message is for a log line, not a
/// transport for data.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Most runs one [`Message::RunCrcs`] request may name (1 MiB of runs): a
/// replica lists them under one hold of its block map, so a request must not
/// be able to hold it for long; a rebuild with more regions sends several.
pub const MAX_CRC_RUNS: usize = 1 << 16;

/// Most extents one [`Message::ReadV`] or [`Message::WriteV`] may name: a
/// rebuild's copy of 256 scattered 4 KiB blocks is [`MAX_VECTORED_BYTES`],
/// and the list (3 KiB) stays small next to the data it describes.
pub const MAX_EXTENTS: usize = 256;

/// Most bytes one [`Message::ReadV`] or [`Message::WriteV`] may move: 1 MiB,
/// a rebuild's largest copy. A replica answers a vectored read in one buffer
/// and writes a vectored write as one batch, so each must stay a bounded
/// piece of work that other requests do not wait long behind.
pub const MAX_VECTORED_BYTES: u32 = 1 << 20;

/// Identifies one request on one connection. Chosen by the sender, echoed in
/// the reply; the replica does not interpret it. A [`RequestId`] of zero is
/// used by a replica for replies that answer no particular request (a frame
/// it could not decode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request {}", self.0)
    }
}

/// A protocol version. Every frame carries the version it is encoded in; the
/// decoder accepts [`ProtocolVersion::MIN_SUPPORTED`]..=[`ProtocolVersion::CURRENT`],
/// and the Hello exchange picks the highest version both sides speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion(pub u16);

impl ProtocolVersion {
    /// The version this build speaks best.
    ///
    /// v3 added the day-two operations: growing a replica online (`Resize`), authenticating both
    /// sides of every connection (`Auth`, nonces and proofs in Hello), recording the volume's
    /// membership on its replicas (`SetMembership`) and cloning from a snapshot (`SnapshotRuns`,
    /// `ReadSnapshot`, `SnapshotHold`, `SnapshotRelease` and `HoldList`). A v2 replica would refuse
    /// an expansion or a clone's reads as unknown ops and would neither prove itself nor check the
    /// other side, so the two sides must disagree at the first frame instead.
    ///
    /// v2 added vectored I/O (`ReadV`, `WriteV`) and checksums of many runs (`RunCrcs`), which a
    /// rebuild relies on. Without the bump, a v1 replica would have passed the Hello and then refused
    /// the first copy of a rebuild as an unknown operation; now the two sides disagree at the first
    /// frame, with a message that says to upgrade the older one.
    pub const CURRENT: ProtocolVersion = ProtocolVersion(3);
    /// The oldest version this build still understands: a v2 peer neither proves itself nor asks the
    /// other side to (accepting one would leave open the door that v3 closes), nor knows what a
    /// controller sends on day two (an expansion, a clone's reads of its source).
    pub const MIN_SUPPORTED: ProtocolVersion = ProtocolVersion(3);

    /// Whether this build can decode frames of this version.
    pub fn is_supported(self) -> bool {
        (Self::MIN_SUPPORTED..=Self::CURRENT).contains(&self)
    }

    /// The highest version in both `[min, max]` and what this build supports.
    pub fn negotiate(min: ProtocolVersion, max: ProtocolVersion) -> Option<ProtocolVersion> {
        let best = max.min(Self::CURRENT);
        (best >= min && best >= Self::MIN_SUPPORTED).then_some(best)
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// Who a replica is and how far it has got: what a controller needs to
/// choose its replicas (same volume, highest epoch, then highest revision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaIdentity {
    pub volume: VolumeId,
    pub size_bytes: u64,
    pub epoch: Epoch,
    pub revision: Revision,
}

/// The operation of a request. A reply uses the same code with the high bit
/// set (see [`REPLY_BIT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    Hello = 0x01,
    Read = 0x02,
    Write = 0x03,
    Flush = 0x04,
    Unmap = 0x05,
    Ping = 0x06,
    Info = 0x07,
    SnapshotCreate = 0x08,
    SnapshotList = 0x09,
    SnapshotDelete = 0x0a,
    SnapshotRevert = 0x0b,
    SetEpoch = 0x0c,
    BlockCrcs = 0x0d,
    Reset = 0x0e,
    LayerBlocks = 0x0f,
    ReadLayer = 0x10,
    WrittenSince = 0x11,
    AdoptSyncPoint = 0x12,
    RunCrcs = 0x13,
    ReadV = 0x14,
    WriteV = 0x15,
    Resize = 0x16,
    Auth = 0x17,
    SetMembership = 0x18,
    SnapshotRuns = 0x19,
    ReadSnapshot = 0x1a,
    SnapshotHold = 0x1b,
    SnapshotRelease = 0x1c,
    HoldList = 0x1d,
}

/// Set in the op byte of every reply.
pub const REPLY_BIT: u8 = 0x80;

impl Op {
    /// All ops, in code order.
    pub const ALL: [Op; 29] = [
        Op::Hello,
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Unmap,
        Op::Ping,
        Op::Info,
        Op::SnapshotCreate,
        Op::SnapshotList,
        Op::SnapshotDelete,
        Op::SnapshotRevert,
        Op::SetEpoch,
        Op::BlockCrcs,
        Op::Reset,
        Op::LayerBlocks,
        Op::ReadLayer,
        Op::WrittenSince,
        Op::AdoptSyncPoint,
        Op::RunCrcs,
        Op::ReadV,
        Op::WriteV,
        Op::Resize,
        Op::Auth,
        Op::SetMembership,
        Op::SnapshotRuns,
        Op::ReadSnapshot,
        Op::SnapshotHold,
        Op::SnapshotRelease,
        Op::HoldList,
    ];

    /// The op with this request code (the reply bit cleared).
    pub fn from_code(code: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u8 == code)
    }

    /// A stable lower-case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Unmap => "unmap",
            Op::Ping => "ping",
            Op::Info => "info",
            Op::SnapshotCreate => "snapshot_create",
            Op::SnapshotList => "snapshot_list",
            Op::SnapshotDelete => "snapshot_delete",
            Op::SnapshotRevert => "snapshot_revert",
            Op::SetEpoch => "set_epoch",
            Op::BlockCrcs => "block_crcs",
            Op::Reset => "reset",
            Op::LayerBlocks => "layer_blocks",
            Op::ReadLayer => "read_layer",
            Op::WrittenSince => "written_since",
            Op::AdoptSyncPoint => "adopt_sync_point",
            Op::RunCrcs => "run_crcs",
            Op::ReadV => "read_v",
            Op::WriteV => "write_v",
            Op::Resize => "resize",
            Op::Auth => "auth",
            Op::SetMembership => "set_membership",
            Op::SnapshotRuns => "snapshot_runs",
            Op::ReadSnapshot => "read_snapshot",
            Op::SnapshotHold => "snapshot_hold",
            Op::SnapshotRelease => "snapshot_release",
            Op::HoldList => "hold_list",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a replica refused or failed a request. On the wire: a non-zero status
/// code (0 means Ok and is implied by the `*Ok` messages) plus one `u64` of
/// detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("the data of block {lba} failed its checksum on the replica; read it from another replica")]
    ChecksumMismatch { lba: u64 },
    #[error("the request carries an older epoch than the replica's ({current}); a newer controller owns the volume")]
    StaleEpoch { current: Epoch },
    #[error(
        "the request carries a newer epoch than the replica's ({current}); raise it with Hello or SetEpoch first"
    )]
    EpochNotRaised { current: Epoch },
    #[error("the range is outside the volume (size {size_bytes} bytes)")]
    OutOfRange { size_bytes: u64 },
    #[error("offset and length must be multiples of {alignment} bytes")]
    Unaligned { alignment: u64 },
    #[error("no such snapshot")]
    NoSuchSnapshot,
    #[error("a snapshot with that name already exists")]
    SnapshotExists,
    #[error("the replica serves another volume")]
    VolumeMismatch,
    #[error("no common protocol version; the replica speaks up to v{newest}")]
    VersionMismatch { newest: u16 },
    #[error("the replica failed an I/O on its disk")]
    Io,
    #[error("the request is not valid here")]
    BadRequest,
    #[error("the replica is shutting down; reconnect later or use another replica")]
    ShuttingDown,
    #[error(
        "a newer writer connection has taken over this replica; this connection may no longer change it"
    )]
    Superseded,
    #[error("the replica holds {size_bytes} bytes; a volume can grow, never shrink")]
    ShrinkRefused { size_bytes: u64 },
    #[error("the replica cannot hold that size: its storage holds a volume of at most {max_bytes} bytes")]
    TooLarge { max_bytes: u64 },
    #[error(
        "the client could not prove it knows the volume's secret: check --secret-file (or \
         BASALT_VOLUME_SECRET) on both sides"
    )]
    AuthFailed,
    #[error("the connection has not authenticated: send Hello, then Auth with a valid proof, first")]
    NotAuthenticated,
    #[error("the membership is older than the one the replica recorded ({current}); a newer controller changed it")]
    StaleMembership { current: u64 },
    #[error("the snapshot is held by a clone that still reads from it; wait until the clone is hydrated or release the hold")]
    SnapshotHeld,
    #[error(
        "the replica is a clone still hydrating from its source; this request must wait until it is hydrated"
    )]
    Hydrating,
    #[error("the clone's source cannot be read (unreachable, or it no longer holds the snapshot)")]
    SourceUnavailable,
}

impl ReplyError {
    /// The status code on the wire.
    pub fn code(&self) -> u16 {
        match self {
            ReplyError::ChecksumMismatch { .. } => 1,
            ReplyError::StaleEpoch { .. } => 2,
            ReplyError::EpochNotRaised { .. } => 3,
            ReplyError::OutOfRange { .. } => 4,
            ReplyError::Unaligned { .. } => 5,
            ReplyError::NoSuchSnapshot => 6,
            ReplyError::SnapshotExists => 7,
            ReplyError::VolumeMismatch => 8,
            ReplyError::VersionMismatch { .. } => 9,
            ReplyError::Io => 10,
            ReplyError::BadRequest => 11,
            ReplyError::ShuttingDown => 12,
            ReplyError::Superseded => 13,
            ReplyError::ShrinkRefused { .. } => 14,
            ReplyError::TooLarge { .. } => 15,
            ReplyError::AuthFailed => 16,
            ReplyError::NotAuthenticated => 17,
            ReplyError::StaleMembership { .. } => 18,
            ReplyError::SnapshotHeld => 20,
            ReplyError::Hydrating => 21,
            ReplyError::SourceUnavailable => 22,
        }
    }

    /// The `u64` detail carried next to the code.
    pub fn detail(&self) -> u64 {
        match *self {
            ReplyError::ChecksumMismatch { lba } => lba,
            ReplyError::StaleEpoch { current } | ReplyError::EpochNotRaised { current } => current.0,
            ReplyError::OutOfRange { size_bytes } => size_bytes,
            ReplyError::Unaligned { alignment } => alignment,
            ReplyError::VersionMismatch { newest } => u64::from(newest),
            ReplyError::ShrinkRefused { size_bytes } => size_bytes,
            ReplyError::TooLarge { max_bytes } => max_bytes,
            ReplyError::StaleMembership { current } => current,
            _ => 0,
        }
    }

    /// The error for a status code and its detail; `None` for 0 (Ok) and
    /// codes this build does not know.
    pub fn from_wire(code: u16, detail: u64) -> Option<ReplyError> {
        Some(match code {
            1 => ReplyError::ChecksumMismatch { lba: detail },
            2 => ReplyError::StaleEpoch {
                current: Epoch(detail),
            },
            3 => ReplyError::EpochNotRaised {
                current: Epoch(detail),
            },
            4 => ReplyError::OutOfRange { size_bytes: detail },
            5 => ReplyError::Unaligned { alignment: detail },
            6 => ReplyError::NoSuchSnapshot,
            7 => ReplyError::SnapshotExists,
            8 => ReplyError::VolumeMismatch,
            9 => ReplyError::VersionMismatch {
                newest: u16::try_from(detail).unwrap_or(u16::MAX),
            },
            10 => ReplyError::Io,
            11 => ReplyError::BadRequest,
            12 => ReplyError::ShuttingDown,
            13 => ReplyError::Superseded,
            14 => ReplyError::ShrinkRefused { size_bytes: detail },
            15 => ReplyError::TooLarge { max_bytes: detail },
            16 => ReplyError::AuthFailed,
            17 => ReplyError::NotAuthenticated,
            18 => ReplyError::StaleMembership { current: detail },
            20 => ReplyError::SnapshotHeld,
            21 => ReplyError::Hydrating,
            22 => ReplyError::SourceUnavailable,
            _ => return None,
        })
    }

    /// A short stable name, for metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            ReplyError::ChecksumMismatch { .. } => "checksum_mismatch",
            ReplyError::StaleEpoch { .. } => "stale_epoch",
            ReplyError::EpochNotRaised { .. } => "epoch_not_raised",
            ReplyError::OutOfRange { .. } => "out_of_range",
            ReplyError::Unaligned { .. } => "unaligned",
            ReplyError::NoSuchSnapshot => "no_such_snapshot",
            ReplyError::SnapshotExists => "snapshot_exists",
            ReplyError::VolumeMismatch => "volume_mismatch",
            ReplyError::VersionMismatch { .. } => "version_mismatch",
            ReplyError::Io => "io",
            ReplyError::BadRequest => "bad_request",
            ReplyError::ShuttingDown => "shutting_down",
            ReplyError::Superseded => "superseded",
            ReplyError::ShrinkRefused { .. } => "shrink_refused",
            ReplyError::TooLarge { .. } => "too_large",
            ReplyError::AuthFailed => "auth_failed",
            ReplyError::NotAuthenticated => "not_authenticated",
            ReplyError::StaleMembership { .. } => "stale_membership",
            ReplyError::SnapshotHeld => "snapshot_held",
            ReplyError::Hydrating => "hydrating",
            ReplyError::SourceUnavailable => "source_unavailable",
        }
    }
}

/// Everything the protocol can say, requests first, each followed by its
/// successful reply. A failed request of any kind is answered by [`Message::Failed`].
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Handshake; must be the first request on a connection. `volume` is the
    /// volume the controller expects, or the nil UUID to ask "who are you?"
    /// (discovery; the volume is not checked, the secret still is). The
    /// frame's epoch, if higher than the replica's, raises it durably once
    /// the connection has authenticated (that is how a new controller fences
    /// the old one); a lower epoch changes nothing and the reply reports the
    /// replica's epoch, so a controller can survey replicas before choosing
    /// its epoch.
    Hello {
        volume: VolumeId,
        min_version: ProtocolVersion,
        max_version: ProtocolVersion,
        /// Make this connection the replica's only writer (see
        /// `replica.proto`); probes and metadata connections say `false`.
        writer: bool,
        /// The client's challenge for this connection.
        nonce: Nonce,
    },
    /// The replica says which volume it serves (what its proof covers), but
    /// not how far it has got: that only to an authenticated client, in
    /// `AuthOk`.
    HelloOk {
        version: ProtocolVersion,
        volume: VolumeId,
        /// The replica's challenge for this connection.
        nonce: Nonce,
        /// The replica's proof over both nonces (see [`crate::auth`]).
        proof: Proof,
    },

    /// The client's proof over both nonces of the connection; answered
    /// `AuthOk` once the Hello's epoch raise and writer role took effect, or
    /// `AuthFailed` (and the connection is closed).
    Auth {
        proof: Proof,
    },
    /// `replica` as it is after the Hello took effect.
    AuthOk {
        replica: ReplicaIdentity,
        /// The membership the replica last recorded, if any.
        membership: Option<pb::Membership>,
    },

    /// Record the volume's membership durably (written before the reply).
    /// Refused from a connection that is not the replica's writer, and for a
    /// generation older than the one recorded.
    SetMembership(pb::Membership),
    SetMembershipOk,

    /// Read `len` bytes at byte `offset`.
    Read {
        offset: u64,
        len: u32,
    },
    ReadOk {
        data: Bytes,
    },

    /// Read many extents in one request: the reply carries their bytes
    /// concatenated in request order. A delta rebuild copies thousands of
    /// single blocks scattered over the volume; one `Read` each made it pay
    /// a round trip (two frames through both sides' I/O loops) per block.
    /// The extents must form a valid list (see [`Extent::check_list`]: at
    /// most [`MAX_EXTENTS`], each non-empty, in order without overlap, at
    /// most [`MAX_VECTORED_BYTES`] together), or the frame does not decode;
    /// each must lie inside the volume, like a `Read`'s range, or the
    /// request is refused. Served like a `Read`: beside the ordered write
    /// lane, and a block that fails its checksum fails the whole request
    /// with that block's LBA.
    ReadV {
        extents: Vec<Extent>,
    },
    ReadVOk {
        data: Bytes,
    },

    /// Write `data`, the bytes of `extents` concatenated in order, as one
    /// batch ordered like a `Write` (the rebuild sends a [`Message::ReadV`]'s
    /// answer on to its target unchanged). The same limits as `ReadV`; every
    /// extent is checked against the volume before any is written.
    WriteV {
        extents: Vec<Extent>,
        data: Bytes,
    },
    WriteVOk,

    /// Write `data` at byte `offset`. With `fua`, the reply means the data
    /// is durable (write + flush).
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    WriteOk,

    /// Make every write that arrived before this flush durable.
    Flush,
    FlushOk {
        revision: Revision,
    },

    /// Deallocate `len` bytes at `offset`; they read back as zeros.
    Unmap {
        offset: u64,
        len: u64,
    },
    UnmapOk,

    /// Liveness probe; answered at once, without touching the disk.
    Ping,
    Pong,

    Info,
    InfoOk(pb::ReplicaInfo),

    /// Freeze the current head as a named snapshot (ordered after the writes
    /// sent before it on this connection).
    SnapshotCreate {
        name: String,
    },
    SnapshotCreateOk(pb::SnapshotInfo),
    SnapshotList,
    SnapshotListOk(Vec<pb::SnapshotInfo>),
    SnapshotDelete {
        name: String,
    },
    SnapshotDeleteOk,
    SnapshotRevert {
        name: String,
    },
    SnapshotRevertOk,

    /// Raise the replica's epoch durably to the frame's epoch.
    SetEpoch,
    SetEpochOk,

    /// The CRC32 of every block holding data in blocks
    /// `start_lba..start_lba + count` of the merged view (a rebuild compares
    /// replicas with it, so only blocks that differ travel). The replica may
    /// answer fewer blocks' worth than asked (at most 2^20 per request).
    BlockCrcs {
        start_lba: u64,
        count: u64,
    },
    BlockCrcsOk(Vec<BlockCrc>),

    /// [`Message::BlockCrcs`] over many runs at once: the CRC32 of every
    /// block holding data in `runs` (in block order, not overlapping), in
    /// one request. A rebuild guided by a write-intent record compares
    /// thousands of small regions scattered over the volume; one request per
    /// region made the listing cost thousands of round trips through the
    /// replica's ordered lane, more than copying what differs. The replica
    /// may stop early (at most 2^20 entries per answer): `end_lba` says up
    /// to where the listing is complete, and the next request asks for the
    /// rest of the runs from there. At most [`MAX_CRC_RUNS`] runs, each
    /// non-empty and inside the volume; anything else is refused.
    RunCrcs {
        runs: Vec<BlockRun>,
    },
    RunCrcsOk {
        crcs: Vec<BlockCrc>,
        end_lba: u64,
    },

    /// Drop every snapshot and the head, and start over with one empty head
    /// (same volume id, size and epoch; the revision starts again at 0, since
    /// the replica now holds nothing). A rebuild sends it to a replica whose
    /// chain differs from the source's before it replays the source's chain.
    Reset,
    ResetOk,

    /// The blocks snapshot `snapshot` holds *itself* (not what it inherits
    /// from older snapshots) in blocks `start_lba..start_lba + count`, in
    /// block order, with their CRC32 or as tombstones. The replica may stop
    /// early (at most 2^16 entries per answer): `end_lba` says up to where
    /// the listing is complete, and the next request starts there.
    LayerBlocks {
        snapshot: String,
        start_lba: u64,
        count: u64,
    },
    LayerBlocksOk {
        blocks: Vec<LayerBlock>,
        end_lba: u64,
    },

    /// Read `len` bytes at byte `offset` from snapshot `snapshot`'s own
    /// layer: blocks the layer holds as data (CRC-checked like any read),
    /// zeros everywhere else.
    ReadLayer {
        snapshot: String,
        offset: u64,
        len: u32,
    },
    ReadLayerOk {
        data: Bytes,
    },

    /// Which regions of the volume may differ between this replica and one
    /// that was last in sync with it at `since` (its last durable flush): a
    /// superset of every block written here after that point, including
    /// writes not yet flushed. With `since: None`, the same question about
    /// this replica's own last durable flush (what it may hold that was
    /// never flushed). Listed in block order from `start_lba`; the replica
    /// may stop early, `end_lba` says up to where the answer is complete.
    WrittenSince {
        since: Option<SyncPoint>,
        start_lba: u64,
    },
    /// `position` is the answering replica's own sync point (its lineage,
    /// its last durable flush, and the epoch that flush was made under).
    WrittenSinceOk {
        position: SyncPoint,
        answer: WrittenAnswer,
        end_lba: u64,
    },

    /// Put this replica on another flush numbering, durably: its flush
    /// `own_revision` is the same flush as `point.revision` of lineage
    /// `point.lineage` (a rebuild sends it with the two revisions one drain
    /// flush got on source and target). With `point: None`, leave any
    /// numbering: the replica takes a fresh lineage nobody shares, so no
    /// record answers for it until it is rebuilt and adopts one again.
    AdoptSyncPoint {
        point: Option<SyncPoint>,
        own_revision: Revision,
    },
    AdoptSyncPointOk {
        position: SyncPoint,
    },

    /// Grow the volume to `size_bytes` (a multiple of 4096), durably, before
    /// answering: the new blocks read as zeros. The same size is a no-op, so
    /// a retried expansion succeeds; a smaller one is refused with
    /// [`ReplyError::ShrinkRefused`], one the replica's storage cannot hold
    /// with [`ReplyError::TooLarge`]. With `check_only`, nothing changes: the
    /// replica only says whether it could (a controller asks every replica
    /// before it expands any, so that one that cannot refuses the whole
    /// expansion instead of being dropped from the volume). The reply
    /// carries the replica's size (after the grow, or unchanged for a check).
    Resize {
        size_bytes: u64,
        check_only: bool,
    },
    ResizeOk {
        size_bytes: u64,
    },

    /// The runs of blocks holding data in snapshot `snapshot`'s view of the volume (what the volume
    /// read when it was taken: the snapshot's own blocks over everything older), in blocks
    /// `start_lba..start_lba + count`, in block order. A clone hydrating from this snapshot copies
    /// exactly these. The replica may stop early: `end_lba` says up to where the listing is
    /// complete. Not fenced by the epoch: a clone of the volume asks, not its controller, and a
    /// snapshot never changes.
    SnapshotRuns {
        snapshot: String,
        start_lba: u64,
        count: u64,
    },
    SnapshotRunsOk {
        runs: Vec<BlockRun>,
        end_lba: u64,
    },

    /// Read `len` bytes at byte `offset` of snapshot `snapshot`'s view (see
    /// [`Message::SnapshotRuns`]), every block CRC-checked; not fenced by the epoch either.
    ReadSnapshot {
        snapshot: String,
        offset: u64,
        len: u32,
    },
    ReadSnapshotOk {
        data: Bytes,
    },

    /// Hold snapshot `snapshot` for `holder` (a clone replica), durably: the replica refuses to
    /// delete it, or to revert past it, until every hold on it is released. Idempotent.
    SnapshotHold {
        snapshot: String,
        holder: String,
    },
    SnapshotHoldOk,

    /// Release `holder`'s hold on `snapshot`, durably. Releasing a hold that does not exist
    /// succeeds (a retried release, or one already done by hand).
    SnapshotRelease {
        snapshot: String,
        holder: String,
    },
    SnapshotReleaseOk,

    /// Every hold on this replica's snapshots.
    HoldList,
    HoldListOk(Vec<pb::SnapshotHold>),

    /// The request `op` failed; `message` says why in words.
    Failed {
        op: Op,
        error: ReplyError,
        message: String,
    },
}

impl Message {
    /// The op this message is (or answers), and whether it is a reply.
    pub fn op(&self) -> (Op, bool) {
        use Message as M;
        match self {
            M::Hello { .. } => (Op::Hello, false),
            M::HelloOk { .. } => (Op::Hello, true),
            M::Read { .. } => (Op::Read, false),
            M::ReadOk { .. } => (Op::Read, true),
            M::Write { .. } => (Op::Write, false),
            M::WriteOk => (Op::Write, true),
            M::Flush => (Op::Flush, false),
            M::FlushOk { .. } => (Op::Flush, true),
            M::Unmap { .. } => (Op::Unmap, false),
            M::UnmapOk => (Op::Unmap, true),
            M::Ping => (Op::Ping, false),
            M::Pong => (Op::Ping, true),
            M::Info => (Op::Info, false),
            M::InfoOk(_) => (Op::Info, true),
            M::SnapshotCreate { .. } => (Op::SnapshotCreate, false),
            M::SnapshotCreateOk(_) => (Op::SnapshotCreate, true),
            M::SnapshotList => (Op::SnapshotList, false),
            M::SnapshotListOk(_) => (Op::SnapshotList, true),
            M::SnapshotDelete { .. } => (Op::SnapshotDelete, false),
            M::SnapshotDeleteOk => (Op::SnapshotDelete, true),
            M::SnapshotRevert { .. } => (Op::SnapshotRevert, false),
            M::SnapshotRevertOk => (Op::SnapshotRevert, true),
            M::SetEpoch => (Op::SetEpoch, false),
            M::SetEpochOk => (Op::SetEpoch, true),
            M::BlockCrcs { .. } => (Op::BlockCrcs, false),
            M::BlockCrcsOk(_) => (Op::BlockCrcs, true),
            M::Reset => (Op::Reset, false),
            M::ResetOk => (Op::Reset, true),
            M::LayerBlocks { .. } => (Op::LayerBlocks, false),
            M::LayerBlocksOk { .. } => (Op::LayerBlocks, true),
            M::ReadLayer { .. } => (Op::ReadLayer, false),
            M::ReadLayerOk { .. } => (Op::ReadLayer, true),
            M::WrittenSince { .. } => (Op::WrittenSince, false),
            M::WrittenSinceOk { .. } => (Op::WrittenSince, true),
            M::AdoptSyncPoint { .. } => (Op::AdoptSyncPoint, false),
            M::AdoptSyncPointOk { .. } => (Op::AdoptSyncPoint, true),
            M::RunCrcs { .. } => (Op::RunCrcs, false),
            M::RunCrcsOk { .. } => (Op::RunCrcs, true),
            M::ReadV { .. } => (Op::ReadV, false),
            M::ReadVOk { .. } => (Op::ReadV, true),
            M::WriteV { .. } => (Op::WriteV, false),
            M::WriteVOk => (Op::WriteV, true),
            M::Resize { .. } => (Op::Resize, false),
            M::ResizeOk { .. } => (Op::Resize, true),
            M::Auth { .. } => (Op::Auth, false),
            M::AuthOk { .. } => (Op::Auth, true),
            M::SetMembership(_) => (Op::SetMembership, false),
            M::SetMembershipOk => (Op::SetMembership, true),
            M::SnapshotRuns { .. } => (Op::SnapshotRuns, false),
            M::SnapshotRunsOk { .. } => (Op::SnapshotRuns, true),
            M::ReadSnapshot { .. } => (Op::ReadSnapshot, false),
            M::ReadSnapshotOk { .. } => (Op::ReadSnapshot, true),
            M::SnapshotHold { .. } => (Op::SnapshotHold, false),
            M::SnapshotHoldOk => (Op::SnapshotHold, true),
            M::SnapshotRelease { .. } => (Op::SnapshotRelease, false),
            M::SnapshotReleaseOk => (Op::SnapshotRelease, true),
            M::HoldList => (Op::HoldList, false),
            M::HoldListOk(_) => (Op::HoldList, true),
            M::Failed { op, .. } => (*op, true),
        }
    }

    /// Whether this is a reply (as opposed to a request).
    pub fn is_reply(&self) -> bool {
        self.op().1
    }

    /// A failed reply to `op`, with the error's own text as message.
    pub fn failed(op: Op, error: ReplyError) -> Message {
        Message::Failed {
            op,
            error,
            message: error.to_string(),
        }
    }
}

/// One allocated block and the CRC32 of its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCrc {
    pub lba: u64,
    pub crc: u32,
}

impl BlockCrc {
    /// Wire size: lba (u64 LE) then crc (u32 LE).
    pub const WIRE_LEN: usize = 12;
}

/// What one snapshot layer says about one block (see [`Message::LayerBlocks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerBlockState {
    /// The layer holds the block's data; its content has this CRC32.
    Data { crc: u32 },
    /// The block was discarded in this layer: it reads as zeros whatever
    /// older layers hold.
    Tombstone,
}

/// One block a snapshot layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerBlock {
    pub lba: u64,
    pub state: LayerBlockState,
}

impl LayerBlock {
    /// Wire size: lba (u64 LE), kind (u8: 1 data, 2 tombstone), crc (u32 LE,
    /// zero for a tombstone).
    pub const WIRE_LEN: usize = 13;
    pub(crate) const KIND_DATA: u8 = 1;
    pub(crate) const KIND_TOMBSTONE: u8 = 2;
}

/// A point in one flush history: flush `revision` of the numbering
/// `lineage`, made under `epoch`. Replicas in the same active set flush in
/// lockstep (every flush and snapshot operation fans out to all of them, and
/// a replica places each flush marker in the order the flush arrived), so
/// after a rebuild has aligned them they share a lineage and number the same
/// flush alike. The epoch tells two histories apart that continued the same
/// numbering under different controllers (a split): the same revision made
/// under different epochs is not the same flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncPoint {
    pub lineage: u64,
    pub revision: Revision,
    pub epoch: Epoch,
}

impl SyncPoint {
    /// Wire size: lineage, revision, epoch (u64 LE each).
    pub const WIRE_LEN: usize = 24;
}

/// A run of `blocks` blocks from block `lba`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRun {
    pub lba: u64,
    pub blocks: u64,
}

impl BlockRun {
    /// Wire size: lba then blocks (u64 LE each).
    pub const WIRE_LEN: usize = 16;
}

/// `len` bytes at byte `offset` of the volume: one piece of a
/// [`Message::ReadV`] or [`Message::WriteV`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u32,
}

impl Extent {
    /// Wire size: offset (u64 LE) then len (u32 LE).
    pub const WIRE_LEN: usize = 12;

    /// Where the extent ends (exclusive), `None` past `u64::MAX`.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }

    /// The bytes `extents` name together, if they can be one vectored
    /// request: between 1 and [`MAX_EXTENTS`] of them, each non-empty, in
    /// order without overlap, and at most [`MAX_VECTORED_BYTES`] in all.
    /// The decoder refuses any other list, and a sender can check its own
    /// list with the same rules before it sends it.
    pub fn check_list(extents: &[Extent]) -> Result<u32, ExtentsError> {
        if extents.is_empty() {
            return Err(ExtentsError::Empty);
        }
        if extents.len() > MAX_EXTENTS {
            return Err(ExtentsError::TooMany { count: extents.len() });
        }
        let mut total = 0u64;
        let mut previous_end = 0u64;
        for (index, extent) in extents.iter().enumerate() {
            if extent.len == 0 {
                return Err(ExtentsError::EmptyExtent { index });
            }
            let end = extent.end().ok_or(ExtentsError::PastTheEnd { index })?;
            if index > 0 && extent.offset < previous_end {
                return Err(ExtentsError::OutOfOrder { index });
            }
            previous_end = end;
            total += u64::from(extent.len);
        }
        u32::try_from(total)
            .ok()
            .filter(|&total| total <= MAX_VECTORED_BYTES)
            .ok_or(ExtentsError::TooLarge { total })
    }
}

/// Why a list of extents cannot be one vectored request (see
/// [`Extent::check_list`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExtentsError {
    #[error("no extents; a vectored request names at least one")]
    Empty,
    #[error("{count} extents; at most {MAX_EXTENTS} per request")]
    TooMany { count: usize },
    #[error("extent {index} is empty")]
    EmptyExtent { index: usize },
    #[error("extent {index} ends past the largest byte offset")]
    PastTheEnd { index: usize },
    #[error("extent {index} starts before the previous one ends; extents must be in order without overlap")]
    OutOfOrder { index: usize },
    #[error("the extents hold {total} bytes; at most {MAX_VECTORED_BYTES} per request")]
    TooLarge { total: u64 },
}

/// What a write-intent record can say (see [`Message::WrittenSince`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WrittenAnswer {
    /// Every block that may differ lies in these runs (in block order).
    Regions(Vec<BlockRun>),
    /// The record cannot answer safely (why, in words): compare checksums
    /// of the whole volume instead.
    Unknown(String),
}

impl WrittenAnswer {
    pub(crate) const KIND_REGIONS: u8 = 1;
    pub(crate) const KIND_UNKNOWN: u8 = 2;
}

/// One frame: a message plus the envelope every frame carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// Chosen by the requester, echoed by the reply.
    pub id: RequestId,
    /// In a request, the sender's epoch (checked by the replica); in a reply,
    /// the replica's epoch when it answered.
    pub epoch: Epoch,
    pub message: Message,
}

impl Frame {
    pub fn new(id: RequestId, epoch: Epoch, message: Message) -> Frame {
        Frame { id, epoch, message }
    }
}
