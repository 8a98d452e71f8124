//! The raw block-device backend: the store's objects kept inside one device (or a fixed-size file
//! standing in for one), a blobstore in miniature.
//!
//! ```text
//!  0        64 KiB          +slot             +slot          +journal   (cluster aligned)
//!  | super  | checkpoint A  | checkpoint B     | journal      | cluster 0 | cluster 1 | ...
//!  | block  | (gen g)       | (gen g+1)        | records of   |  objects' data, 1 MiB each
//!  |        |               |                  | the newest   |
//!  |        |               |                  | checkpoint   |
//! ```
//!
//! * **Superblock** (written once, at format): magic, format version, device size, cluster size, a
//!   UUID, and the sizes of the regions after it.
//! * **Objects are thin**: an object is a name, a length and a map `cluster of the object -> cluster
//!   of the device`. A cluster is allocated on the first write into it; a range never written, or
//!   punched, reads as zeros; a punch that covers a whole cluster gives the cluster back.
//! * **Metadata** is copy-on-write with an A/B root: a *checkpoint* (the whole object table) is
//!   written to the slot not holding the newest one, and every change after it is a *journal record*
//!   appended behind it. A record carries the checkpoint's generation, a sequence number and a CRC
//!   (seeded with the device UUID, so records of an earlier format of the same device never count);
//!   replay stops at the first record that fails any check, so a torn tail is simply not there. When
//!   the journal is full, and at every open, a new checkpoint with the next generation is written to
//!   the other slot and synced before any record of that generation: the newest valid checkpoint and
//!   its records always describe a state the store left behind.
//!
//! ## Crash safety
//!
//! The store relies on two things a host directory gives it (see `log.rs`): after `kill -9` every
//! completed write is there (the page cache survives), and after [`Object::sync`] everything is there
//! even after power loss. So every metadata change is `pwrite`n to the journal *before* the call that
//! makes it returns (an index log's new length must survive `kill -9` together with the in-place
//! data write that follows it), and `sync` is one `fdatasync` of the device: it covers data, journal
//! and checkpoints alike. Three rules keep clusters from being shared or exposing stale bytes:
//!
//! 1. **A cluster is reused only when no durable metadata points at it.** A cluster released by a
//!    punch, a remove or a blob replacement waits in `pending_free` until a device sync has made the
//!    record that released it durable.
//! 2. **A cluster is handed out only once it is durably zero.** Allocation takes clusters from a
//!    *clean pool*, refilled in batches: free clusters are zeroed and the device synced, then they
//!    enter the pool. So a record mapping a cluster can never become durable before the cluster's
//!    zeros do: after power loss an object never shows another object's old bytes (an old index log
//!    resurfacing inside a new one would be taken for valid records).
//! 3. **`replace_blob` is copy-on-write**: the new content goes to fresh clusters, the device is
//!    synced, then one journal record (new object, its clusters, its length) commits it, and a second
//!    sync makes the commit durable before the call returns. A crash leaves the old or the new blob.
//!
//! ## Why 1 MiB clusters
//!
//! The cluster is the unit of allocation, of the metadata maps (12 bytes per allocated cluster on
//! disk, one map entry in memory: memory follows what is written, 12 MiB of checkpoint per TiB), and
//! of space given back by a discard. 1 MiB is SPDK blobstore's default for the same trade-off: large
//! enough that metadata stays small and a sequential stream allocates rarely, small enough that a
//! thin volume written at random does not balloon and that a snapshot's index log (24 bytes per
//! block) wastes little. [`Geometry`] lets a format choose otherwise (tests use tiny clusters so that
//! whole-cluster frees happen in small volumes).
//!
//! ## Exclusive use
//!
//! The device is opened with `O_EXCL` when it is a block device (the kernel then refuses a second
//! exclusive opener and a mounted device), and held with an exclusive `flock` in every case, so two
//! replicas can never serve one device. A device without a Basalt superblock is formatted only if it
//! is blank (its first 64 KiB are zeros) or the caller explicitly allows wiping a foreign one; a
//! device that holds a valid Basalt superblock is never reformatted.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Backend, Object};

/// Bytes at the start of the device reserved for the superblock; also how much of a device must be
/// zero for it to count as blank (partition tables, filesystem and LVM signatures all live there).
pub const SIGNATURE_BYTES: u64 = 64 << 10;

const SUPER_MAGIC: &[u8; 8] = b"BASALTBD";
/// Version of the on-device format; a device of another version is refused, never rewritten.
pub const FORMAT_VERSION: u32 = 1;
const SUPER_LEN: usize = 68;

const CHECKPOINT_MAGIC: &[u8; 8] = b"BSLTCKPT";
const CHECKPOINT_HEADER: usize = 32;

const RECORD_MAGIC: u32 = 0x4a52_4e4c;
const RECORD_HEADER: usize = 24;

/// Longest object name: the store's names are ~20 bytes; the bound sizes the checkpoint slots.
pub const MAX_NAME: usize = 64;
/// Checkpoint bytes per object besides its clusters: id, name length, name, length, cluster count.
const OBJECT_OVERHEAD: u64 = 8 + 2 + MAX_NAME as u64 + 8 + 8;
/// Checkpoint bytes per mapped cluster: the object's cluster index and the device cluster.
const CLUSTER_ENTRY: u64 = 12;

/// Clusters zeroed (and synced) at once to refill the clean pool: one device sync per 32 first
/// writes into fresh clusters, instead of one per cluster.
const CLEAN_BATCH: usize = 32;

/// How a device is laid out when it is formatted. Only used at format; an existing device keeps the
/// geometry its superblock records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Allocation unit (a power of two, 4 KiB to 64 MiB); see the module documentation.
    pub cluster_bytes: u32,
    /// Size of the metadata journal: a full journal costs a checkpoint (the whole object table
    /// written and synced), so 8 MiB (~150,000 records) makes that rare.
    pub journal_bytes: u64,
    /// Most objects the device can hold: a store uses two per layer, so 8,192 allows 4,000 snapshots.
    pub max_objects: u32,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            cluster_bytes: 1 << 20,
            journal_bytes: 8 << 20,
            max_objects: 8192,
        }
    }
}

/// When [`BlockBackend::open`] may format a device that holds no Basalt superblock. A device that
/// holds a valid one is never reformatted, whatever this says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Never: only a device already formatted for Basalt opens (offline tools such as export).
    Never,
    /// Only if it is blank (its first [`SIGNATURE_BYTES`] are zeros): a new disk or volume.
    #[default]
    IfBlank,
    /// Also if it holds something else, which is wiped (`--format`).
    WipeForeign,
}

/// What [`BlockBackend::open`] may do to a device.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// The volume the device is meant to hold: a device too small for it (plus metadata) is refused
    /// before anything is written.
    pub volume_bytes: Option<u64>,
    /// Whether a device without a Basalt superblock may be formatted.
    pub format: Format,
    /// Layout of a device formatted now.
    pub geometry: Geometry,
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is neither a block device nor a regular file")]
    NotADevice { path: String },
    #[error("{path} is in use by another process (another replica, a mount or LVM holds it); stop that user first")]
    InUse { path: String },
    #[error(
        "{path} holds data that is not a Basalt store (its first 64 KiB are not blank): refusing to \
         overwrite it; pass --format to wipe it and format it for Basalt"
    )]
    ForeignSignature { path: String },
    #[error("{path} is blank: it holds no Basalt store (start a replica on it to format it)")]
    NotFormatted { path: String },
    #[error(
        "{path} holds {device_bytes} bytes, but a {volume_bytes}-byte volume needs at least \
         {needed_bytes} bytes on it (the volume, room to rewrite its index log, and Basalt's \
         metadata); use a larger device or a smaller --size"
    )]
    TooSmall {
        path: String,
        device_bytes: u64,
        volume_bytes: u64,
        needed_bytes: u64,
    },
    #[error("invalid device geometry: {0}")]
    Geometry(String),
    #[error("{path}: the Basalt metadata is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DeviceError {
    let context = context.into();
    move |source| DeviceError::Io { context, source }
}

// ------------------------------------------------------------------------------------------------
// The medium
// ------------------------------------------------------------------------------------------------

/// The bytes under a [`BlockBackend`]: a block device or a file of fixed size. A trait so that tests
/// can put a medium that crashes, or forgets unsynced writes, under the real backend.
pub trait Medium: Send + Sync {
    /// Bytes the medium holds.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` (volatile until [`Medium::sync`]).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros (volatile until [`Medium::sync`]).
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros_by_writing(self, offset, len)
    }
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Where the medium is, for messages.
    fn location(&self) -> String;
}

/// Zeros by plain writes, 1 MiB at a time.
fn write_zeros_by_writing<M: Medium + ?Sized>(medium: &M, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        medium.write_at(&ZEROS[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// A block device node, or a regular file standing in for one, opened for exclusive use.
pub struct DeviceFile {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
}

impl DeviceFile {
    /// Opens `path` read-write, exclusively: `O_EXCL` on a block device, and an exclusive `flock`.
    pub fn open(path: &Path) -> Result<DeviceFile, DeviceError> {
        let shown = path.display().to_string();
        let open_err = |source| DeviceError::Open {
            path: shown.clone(),
            source,
        };
        let file_type = std::fs::metadata(path).map_err(open_err)?.file_type();
        let block_device = file_type.is_block_device();
        if !block_device && !file_type.is_file() {
            return Err(DeviceError::NotADevice { path: shown });
        }
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if block_device {
            // Without O_CREAT, O_EXCL on a block device asks the kernel for exclusive use: it fails
            // with EBUSY while the device is mounted or held by another exclusive opener.
            options.custom_flags(libc::O_EXCL);
        }
        let mut file = options.open(path).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => DeviceError::InUse { path: shown.clone() },
            _ => open_err(e),
        })?;
        // SAFETY: plain syscall on an fd we own; the arguments are integers.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => DeviceError::InUse { path: shown },
                _ => io_err(format!("locking {shown}"))(err),
            });
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(io_err(format!("sizing {shown}")))?;
        Ok(DeviceFile {
            file,
            path: path.to_path_buf(),
            size,
            block_device,
        })
    }
}

impl DeviceFile {
    /// Gives `[offset, offset + len)` back to the device (BLKDISCARD) or the filesystem (a hole),
    /// best effort: a medium that cannot discard keeps the bytes, which no Basalt store reads again
    /// (clusters are zeroed before they are handed out).
    fn discard(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if self.block_device {
            /// `_IO(0x12, 119)` from linux/fs.h.
            const BLKDISCARD: libc::c_ulong = 0x1277;
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKDISCARD reads two u64s from the pointer, which points at `range`.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
            if rc != 0 {
                tracing::debug!(device = %self.path.display(), error = %io::Error::last_os_error(), "discard not done");
            }
        } else if let Err(e) = self.write_zeros(offset, len) {
            tracing::debug!(device = %self.path.display(), error = %e, "discard not done");
        }
    }
}

impl Medium for DeviceFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.block_device {
            // A hole reads as zeros and gives the space back to the filesystem holding the file.
            // SAFETY: plain syscall on an fd we own; arguments are integers.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(err);
            }
        }
        // On a block device, plain writes keep the page cache coherent with no assumption about how
        // the kernel treats cached pages under BLKZEROOUT; zeroing is off the hot path (clean pool).
        write_zeros_by_writing(self, offset, len)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

// ------------------------------------------------------------------------------------------------
// On-device structures
// ------------------------------------------------------------------------------------------------

/// The superblock, and the layout it implies.
#[derive(Clone, Copy, Debug)]
struct Layout {
    cluster_bytes: u64,
    device_bytes: u64,
    uuid: [u8; 16],
    slot_bytes: u64,
    journal_bytes: u64,
    max_objects: u32,
}

impl Layout {
    fn new(geometry: Geometry, device_bytes: u64, uuid: [u8; 16]) -> Result<Layout, DeviceError> {
        let c = u64::from(geometry.cluster_bytes);
        if !c.is_power_of_two() || !(4096..=64 << 20).contains(&c) {
            return Err(DeviceError::Geometry(format!(
                "cluster size {c} must be a power of two from 4 KiB to 64 MiB"
            )));
        }
        if geometry.journal_bytes < 4096 || !geometry.journal_bytes.is_multiple_of(4096) {
            return Err(DeviceError::Geometry(format!(
                "journal size {} must be a positive multiple of 4 KiB",
                geometry.journal_bytes
            )));
        }
        if geometry.max_objects == 0 {
            return Err(DeviceError::Geometry("max_objects must be at least 1".into()));
        }
        // Sized for the worst case: every object present and every cluster mapped.
        let slot = CHECKPOINT_HEADER as u64
            + 12
            + u64::from(geometry.max_objects) * OBJECT_OVERHEAD
            + (device_bytes / c) * CLUSTER_ENTRY;
        Ok(Layout {
            cluster_bytes: c,
            device_bytes,
            uuid,
            slot_bytes: slot.div_ceil(4096) * 4096,
            journal_bytes: geometry.journal_bytes,
            max_objects: geometry.max_objects,
        })
    }

    fn slot_offset(&self, slot: usize) -> u64 {
        SIGNATURE_BYTES + slot as u64 * self.slot_bytes
    }

    fn journal_offset(&self) -> u64 {
        SIGNATURE_BYTES + 2 * self.slot_bytes
    }

    /// Where cluster 0 starts: everything before it is metadata.
    fn data_offset(&self) -> u64 {
        (self.journal_offset() + self.journal_bytes).div_ceil(self.cluster_bytes) * self.cluster_bytes
    }

    fn clusters(&self) -> u64 {
        self.device_bytes.saturating_sub(self.data_offset()) / self.cluster_bytes
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_offset() + u64::from(cluster) * self.cluster_bytes
    }

    /// Bytes a device needs for a volume of `volume_bytes`: the metadata, the volume itself, its
    /// head index log twice (a compaction writes the new log before it drops the old one) and two
    /// clusters for `volume.meta` and its replacement.
    fn needed_bytes(&self, volume_bytes: u64) -> u64 {
        let c = self.cluster_bytes;
        let log = (volume_bytes / 4096 * 24).div_ceil(c) * c;
        self.data_offset() + volume_bytes.div_ceil(c) * c + 2 * log + 2 * c
    }

    /// The largest volume (a multiple of 4 KiB) whose [`Layout::needed_bytes`] fit on the device.
    fn max_volume_bytes(&self) -> u64 {
        // needed_bytes grows with the volume: a binary search over 4 KiB blocks.
        let (mut fits, mut too_big) = (0u64, self.device_bytes / 4096 + 1);
        while too_big - fits > 1 {
            let mid = fits + (too_big - fits) / 2;
            if self.needed_bytes(mid * 4096) <= self.device_bytes {
                fits = mid;
            } else {
                too_big = mid;
            }
        }
        fits * 4096
    }

    fn encode(&self) -> [u8; SUPER_LEN] {
        let mut out = [0u8; SUPER_LEN];
        out[0..8].copy_from_slice(SUPER_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(self.cluster_bytes as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.device_bytes.to_le_bytes());
        out[24..40].copy_from_slice(&self.uuid);
        out[40..48].copy_from_slice(&self.slot_bytes.to_le_bytes());
        out[48..56].copy_from_slice(&self.journal_bytes.to_le_bytes());
        out[56..60].copy_from_slice(&self.max_objects.to_le_bytes());
        let crc = crc32fast::hash(&out[..64]);
        out[64..68].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// `Ok(None)`: no Basalt magic at all. `Err`: a Basalt superblock that cannot be used.
    fn decode(bytes: &[u8]) -> Result<Option<Layout>, String> {
        if &bytes[0..8] != SUPER_MAGIC {
            return Ok(None);
        }
        let crc = u32::from_le_bytes(bytes[64..68].try_into().unwrap_or_default());
        if crc32fast::hash(&bytes[..64]) != crc {
            return Err("the superblock fails its checksum".into());
        }
        let version = le_u32(&bytes[8..12]);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version} (this build reads {FORMAT_VERSION})"
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&bytes[24..40]);
        let geometry = Geometry {
            cluster_bytes: le_u32(&bytes[12..16]),
            journal_bytes: le_u64(&bytes[48..56]),
            max_objects: le_u32(&bytes[56..60]),
        };
        let layout = Layout::new(geometry, le_u64(&bytes[16..24]), uuid).map_err(|e| e.to_string())?;
        if layout.slot_bytes != le_u64(&bytes[40..48]) {
            return Err("the superblock's slot size disagrees with its geometry".into());
        }
        Ok(Some(layout))
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap_or_default())
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap_or_default())
}

/// A CRC that also covers the device's UUID: metadata left by an earlier format never validates.
fn crc_with(uuid: &[u8; 16], bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(uuid);
    hasher.update(bytes);
    hasher.finalize()
}

/// One metadata change. A journal record holds several, applied together or not at all.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    /// A new, empty object; an object of the same name is dropped (its clusters released).
    Create {
        id: u64,
        name: String,
    },
    Remove {
        id: u64,
    },
    Map {
        id: u64,
        index: u64,
        cluster: u32,
    },
    Unmap {
        id: u64,
        index: u64,
    },
    SetLen {
        id: u64,
        len: u64,
    },
}

impl Op {
    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Op::Create { id, name } => {
                out.push(1);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&(name.len() as u16).to_le_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            Op::Remove { id } => {
                out.push(2);
                out.extend_from_slice(&id.to_le_bytes());
            }
            Op::Map { id, index, cluster } => {
                out.push(3);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&cluster.to_le_bytes());
            }
            Op::Unmap { id, index } => {
                out.push(4);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
            }
            Op::SetLen { id, len } => {
                out.push(5);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
    }

    fn decode_all(mut bytes: &[u8]) -> Option<Vec<Op>> {
        fn take(rest: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
            (rest.len() >= n).then(|| rest.split_at(n))
        }
        let mut ops = Vec::new();
        while let Some((&tag, rest)) = bytes.split_first() {
            let (id, rest) = take(rest, 8)?;
            let id = le_u64(id);
            let (op, rest) = match tag {
                1 => {
                    let (n, rest) = take(rest, 2)?;
                    let n = u16::from_le_bytes([n[0], n[1]]) as usize;
                    let (name, rest) = take(rest, n)?;
                    let name = String::from_utf8(name.to_vec()).ok()?;
                    (Op::Create { id, name }, rest)
                }
                2 => (Op::Remove { id }, rest),
                3 => {
                    let (v, rest) = take(rest, 12)?;
                    (
                        Op::Map {
                            id,
                            index: le_u64(&v[..8]),
                            cluster: le_u32(&v[8..]),
                        },
                        rest,
                    )
                }
                4 => {
                    let (v, rest) = take(rest, 8)?;
                    (Op::Unmap { id, index: le_u64(v) }, rest)
                }
                5 => {
                    let (v, rest) = take(rest, 8)?;
                    (Op::SetLen { id, len: le_u64(v) }, rest)
                }
                _ => return None,
            };
            ops.push(op);
            bytes = rest;
        }
        Some(ops)
    }
}

// ------------------------------------------------------------------------------------------------
// The in-memory table and allocator
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct ObjectMeta {
    name: String,
    len: u64,
    /// Object cluster index -> device cluster.
    clusters: BTreeMap<u64, u32>,
}

/// Everything the metadata describes, plus the allocator and the journal position.
struct State {
    objects: HashMap<u64, ObjectMeta>,
    by_name: BTreeMap<String, u64>,
    next_id: u64,
    /// One bit per device cluster: set = free and not in the clean pool.
    free: Vec<u64>,
    /// Where the next search for a free cluster starts.
    cursor: u64,
    /// Free clusters whose zeros are durable: the only ones handed out.
    clean: Vec<u32>,
    /// Released clusters the durable metadata may still point at (rule 1).
    pending_free: Vec<u32>,
    generation: u64,
    seq: u64,
    /// Bytes of the journal in use.
    tail: u64,
    /// The slot holding the newest checkpoint.
    active_slot: usize,
    /// Set when a metadata write failed: memory and device may disagree, so everything is refused
    /// until the device is reopened (and replays what is really there).
    failed: Option<String>,
}

impl State {
    fn apply(&mut self, op: &Op, released: &mut Vec<u32>) -> Result<(), String> {
        match op {
            Op::Create { id, name } => {
                if let Some(old) = self.by_name.remove(name) {
                    if let Some(meta) = self.objects.remove(&old) {
                        released.extend(meta.clusters.values());
                    }
                }
                self.objects.insert(
                    *id,
                    ObjectMeta {
                        name: name.clone(),
                        ..ObjectMeta::default()
                    },
                );
                self.by_name.insert(name.clone(), *id);
                self.next_id = self.next_id.max(id + 1);
            }
            Op::Remove { id } => {
                let meta = self
                    .objects
                    .remove(id)
                    .ok_or(format!("remove of unknown object {id}"))?;
                self.by_name.remove(&meta.name);
                released.extend(meta.clusters.values());
            }
            Op::Map { id, index, cluster } => {
                let meta = self
                    .objects
                    .get_mut(id)
                    .ok_or(format!("map into unknown object {id}"))?;
                if let Some(old) = meta.clusters.insert(*index, *cluster) {
                    released.push(old);
                }
            }
            Op::Unmap { id, index } => {
                let meta = self
                    .objects
                    .get_mut(id)
                    .ok_or(format!("unmap in unknown object {id}"))?;
                released.extend(meta.clusters.remove(index));
            }
            Op::SetLen { id, len } => {
                self.objects
                    .get_mut(id)
                    .ok_or(format!("length of unknown object {id}"))?
                    .len = *len;
            }
        }
        Ok(())
    }

    fn encode_checkpoint(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.next_id.to_le_bytes());
        out.extend_from_slice(&(self.objects.len() as u32).to_le_bytes());
        for (id, meta) in &self.objects {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&(meta.name.len() as u16).to_le_bytes());
            out.extend_from_slice(meta.name.as_bytes());
            out.extend_from_slice(&meta.len.to_le_bytes());
            out.extend_from_slice(&(meta.clusters.len() as u64).to_le_bytes());
            for (index, cluster) in &meta.clusters {
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&cluster.to_le_bytes());
            }
        }
        out
    }

    fn decode_checkpoint(bytes: &[u8]) -> Option<(u64, HashMap<u64, ObjectMeta>)> {
        let mut at = 0usize;
        let mut take = |n: usize| {
            let piece = bytes.get(at..at + n)?;
            at += n;
            Some(piece)
        };
        let next_id = le_u64(take(8)?);
        let count = le_u32(take(4)?);
        let mut objects = HashMap::new();
        for _ in 0..count {
            let id = le_u64(take(8)?);
            let n = take(2)?;
            let n = u16::from_le_bytes([n[0], n[1]]) as usize;
            let name = String::from_utf8(take(n)?.to_vec()).ok()?;
            let len = le_u64(take(8)?);
            let mapped = le_u64(take(8)?);
            let mut clusters = BTreeMap::new();
            for _ in 0..mapped {
                let index = le_u64(take(8)?);
                clusters.insert(index, le_u32(take(4)?));
            }
            objects.insert(id, ObjectMeta { name, len, clusters });
        }
        Some((next_id, objects))
    }

    fn set_free(&mut self, cluster: u32, free: bool) {
        let (word, bit) = (cluster as usize / 64, cluster % 64);
        if free {
            self.free[word] |= 1 << bit;
        } else {
            self.free[word] &= !(1 << bit);
        }
    }

    /// Takes up to `n` free clusters out of the free set, searching on from the cursor.
    fn take_free(&mut self, n: usize, clusters: u64) -> Vec<u32> {
        let mut taken = Vec::new();
        let words = self.free.len() as u64;
        let start = self.cursor / 64;
        for step in 0..=words {
            if taken.len() >= n {
                break;
            }
            let w = ((start + step) % words.max(1)) as usize;
            while self.free.get(w).is_some_and(|&bits| bits != 0) && taken.len() < n {
                let bit = self.free[w].trailing_zeros();
                let cluster = w as u64 * 64 + u64::from(bit);
                if cluster >= clusters {
                    break;
                }
                self.free[w] &= !(1u64 << bit);
                taken.push(cluster as u32);
                self.cursor = cluster + 1;
            }
        }
        taken
    }
}

// ------------------------------------------------------------------------------------------------
// The backend
// ------------------------------------------------------------------------------------------------

struct Shared {
    medium: Arc<dyn Medium>,
    layout: Layout,
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn corrupt(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Shared {
    fn check(&self, state: &State) -> io::Result<()> {
        match &state.failed {
            Some(why) => Err(io::Error::other(format!(
                "{} stopped after a failed metadata write ({why}); reopen it",
                self.medium.location()
            ))),
            None => Ok(()),
        }
    }

    /// Applies `ops` in memory and writes them as one journal record (or a checkpoint, when the
    /// journal has no room). Released clusters wait for a sync (rule 1).
    fn commit(&self, state: &mut State, ops: &[Op]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut released = Vec::new();
        for op in ops {
            state.apply(op, &mut released).map_err(io::Error::other)?;
        }
        state.pending_free.extend(released);
        let mut payload = Vec::new();
        for op in ops {
            op.encode_into(&mut payload);
        }
        let mut record = Vec::with_capacity(RECORD_HEADER + payload.len() + 4);
        record.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&state.generation.to_le_bytes());
        record.extend_from_slice(&state.seq.to_le_bytes());
        record.extend_from_slice(&payload);
        let crc = crc_with(&self.layout.uuid, &record);
        record.extend_from_slice(&crc.to_le_bytes());
        let result = if state.tail + record.len() as u64 <= self.layout.journal_bytes {
            self.medium
                .write_at(&record, self.layout.journal_offset() + state.tail)
                .map(|()| {
                    state.tail += record.len() as u64;
                    state.seq += 1;
                })
        } else {
            self.checkpoint(state)
        };
        result.inspect_err(|e| {
            state.failed.get_or_insert_with(|| e.to_string());
        })
    }

    /// Writes the whole table as the next generation's checkpoint into the other slot and syncs:
    /// from then on the journal starts empty (its old records have an older generation).
    fn checkpoint(&self, state: &mut State) -> io::Result<()> {
        let generation = state.generation + 1;
        let slot = 1 - state.active_slot;
        let payload = state.encode_checkpoint();
        if (CHECKPOINT_HEADER + payload.len()) as u64 > self.layout.slot_bytes {
            return Err(io::Error::other("the object table outgrew its checkpoint slot"));
        }
        let bytes = checkpoint_bytes(&self.layout, generation, &payload);
        self.medium.write_at(&bytes, self.layout.slot_offset(slot))?;
        self.medium.sync()?;
        state.generation = generation;
        state.active_slot = slot;
        state.seq = 0;
        state.tail = 0;
        // The sync made every release durable.
        for cluster in std::mem::take(&mut state.pending_free) {
            state.set_free(cluster, true);
        }
        Ok(())
    }

    /// One device sync; releases recorded before it become reusable after it (rule 1).
    fn sync(&self) -> io::Result<()> {
        let pending = std::mem::take(&mut lock(&self.state).pending_free);
        if let Err(e) = self.medium.sync() {
            lock(&self.state).pending_free.extend(pending);
            return Err(e);
        }
        let mut state = lock(&self.state);
        for cluster in pending {
            state.set_free(cluster, true);
        }
        Ok(())
    }

    /// A durably zero cluster (rule 2), refilling the clean pool when it is empty.
    fn take_clean(&self, state: &mut State) -> io::Result<u32> {
        if let Some(cluster) = state.clean.pop() {
            return Ok(cluster);
        }
        let clusters = self.layout.clusters();
        let mut batch = state.take_free(CLEAN_BATCH, clusters);
        if batch.is_empty() && !state.pending_free.is_empty() {
            // Releases waiting for a sync: one sync makes them reusable.
            self.medium.sync()?;
            for cluster in std::mem::take(&mut state.pending_free) {
                state.set_free(cluster, true);
            }
            batch = state.take_free(CLEAN_BATCH, clusters);
        }
        if batch.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{} is full: all {clusters} clusters of {} bytes are in use",
                    self.medium.location(),
                    self.layout.cluster_bytes
                ),
            ));
        }
        let zeroed = self.zero_clusters(&batch).and_then(|()| self.medium.sync());
        if let Err(e) = zeroed {
            for &cluster in &batch {
                state.set_free(cluster, true);
            }
            return Err(e);
        }
        // The sync also made every pending release durable.
        for cluster in std::mem::take(&mut state.pending_free) {
            state.set_free(cluster, true);
        }
        state.clean = batch;
        state.clean.reverse();
        Ok(state.clean.pop().unwrap_or_default())
    }

    fn zero_clusters(&self, clusters: &[u32]) -> io::Result<()> {
        let mut sorted = clusters.to_vec();
        sorted.sort_unstable();
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            self.medium.write_zeros(
                self.layout.cluster_offset(sorted[i]),
                (j - i) as u64 * self.layout.cluster_bytes,
            )?;
            i = j;
        }
        Ok(())
    }

    /// Splits `[offset, offset + len)` into per-cluster pieces `(cluster index, offset in cluster,
    /// start in the caller's buffer, length)`.
    fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = (u64, u64, usize, usize)> {
        let c = self.layout.cluster_bytes;
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let at = offset + done as u64;
            let within = at % c;
            let n = ((c - within) as usize).min(len - done);
            let piece = (at / c, within, done, n);
            done += n;
            Some(piece)
        })
    }
}

/// The block-device backend: see the module documentation.
pub struct BlockBackend {
    shared: Arc<Shared>,
}

impl BlockBackend {
    /// Opens the device (or file) at `path` for exclusive use, formatting it first if it is blank,
    /// or if it holds something foreign and `options.format` allows wiping it (see [`Format`]).
    pub fn open(path: &Path, options: &DeviceOptions) -> Result<BlockBackend, DeviceError> {
        let medium = DeviceFile::open(path)?;
        BlockBackend::open_medium(Arc::new(medium), options)
    }

    /// [`BlockBackend::open`] on any medium.
    pub fn open_medium(
        medium: Arc<dyn Medium>,
        options: &DeviceOptions,
    ) -> Result<BlockBackend, DeviceError> {
        let path = medium.location();
        let device_bytes = medium.size();
        let mut head = vec![0u8; SIGNATURE_BYTES.min(device_bytes) as usize];
        medium
            .read_at(&mut head, 0)
            .map_err(io_err(format!("reading the start of {path}")))?;
        let found = if head.len() >= SUPER_LEN {
            Layout::decode(&head)
        } else {
            Ok(None)
        };
        let layout = match found {
            Ok(Some(layout)) => {
                if layout.device_bytes > device_bytes {
                    return Err(DeviceError::Corrupt {
                        path,
                        detail: format!(
                            "it was formatted for {} bytes but now holds {device_bytes}",
                            layout.device_bytes
                        ),
                    });
                }
                check_size(&layout, &path, options.volume_bytes)?;
                layout
            }
            Ok(None) | Err(_)
                if options.format == Format::WipeForeign
                    || (options.format == Format::IfBlank && head.iter().all(|&b| b == 0)) =>
            {
                let layout = Layout::new(options.geometry, device_bytes, *uuid::Uuid::new_v4().as_bytes())?;
                check_size(&layout, &path, options.volume_bytes)?;
                if layout.clusters() == 0 {
                    return Err(DeviceError::TooSmall {
                        path,
                        device_bytes,
                        volume_bytes: 0,
                        needed_bytes: layout.data_offset() + layout.cluster_bytes,
                    });
                }
                format(&*medium, &layout).map_err(io_err(format!("formatting {path}")))?;
                tracing::info!(device = %path, cluster_bytes = layout.cluster_bytes, "formatted for Basalt");
                layout
            }
            Ok(None) if head.iter().all(|&b| b == 0) => return Err(DeviceError::NotFormatted { path }),
            Ok(None) => return Err(DeviceError::ForeignSignature { path }),
            Err(detail) => {
                return Err(DeviceError::Corrupt {
                    path,
                    detail: format!("{detail}; pass --format to wipe it and start afresh"),
                })
            }
        };
        let state = load(&*medium, &layout)?;
        let shared = Arc::new(Shared {
            medium,
            layout,
            state: Mutex::new(state),
        });
        {
            // A new generation at every open: records a crash left beyond the replayed tail can
            // never be mistaken for new ones.
            let mut state = lock(&shared.state);
            shared
                .checkpoint(&mut state)
                .map_err(io_err(format!("writing a checkpoint to {path}")))?;
        }
        Ok(BlockBackend { shared })
    }

    /// The device's UUID (set at format).
    pub fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.shared.layout.uuid)
    }

    /// The allocation unit.
    pub fn cluster_bytes(&self) -> u64 {
        self.shared.layout.cluster_bytes
    }

    /// Clusters not held by any object (free, clean or waiting for a sync to become free).
    pub fn free_clusters(&self) -> u64 {
        let state = lock(&self.shared.state);
        let free: u64 = state.free.iter().map(|w| u64::from(w.count_ones())).sum();
        free + state.clean.len() as u64 + state.pending_free.len() as u64
    }

    /// Clusters the device has for objects.
    pub fn total_clusters(&self) -> u64 {
        self.shared.layout.clusters()
    }
}

/// Wipes the Basalt store on the device (or file) at `path`, once its replica is deleted: the
/// superblock, both checkpoints and the journal are zeroed and synced, so the device reads as blank
/// (a later replica formats it afresh, and rule 2 above keeps the old clusters' bytes from ever being
/// read), and the data clusters are given back (discarded on a block device, punched in a file) where
/// the medium can. Opens the device exclusively, so it fails while a replica still serves it.
/// `Ok(false)`: there was no Basalt store to wipe (blank, or foreign data that is not ours to touch).
pub fn wipe(path: &Path) -> Result<bool, DeviceError> {
    let medium = DeviceFile::open(path)?;
    let shown = medium.location();
    let device_bytes = medium.size();
    let mut head = vec![0u8; SIGNATURE_BYTES.min(device_bytes) as usize];
    medium
        .read_at(&mut head, 0)
        .map_err(io_err(format!("reading the start of {shown}")))?;
    if head.len() < SUPER_LEN || &head[0..8] != SUPER_MAGIC {
        return Ok(false);
    }
    let metadata_end = match Layout::decode(&head) {
        Ok(Some(layout)) => layout.data_offset().min(device_bytes),
        // Our magic with a damaged superblock: the signature region is still ours to clear.
        Ok(None) | Err(_) => head.len() as u64,
    };
    // The superblock last: a wipe cut short leaves it, and the next wipe finds the device again.
    medium
        .write_zeros(
            SIGNATURE_BYTES.min(metadata_end),
            metadata_end.saturating_sub(SIGNATURE_BYTES),
        )
        .and_then(|()| medium.sync())
        .and_then(|()| medium.write_zeros(0, SIGNATURE_BYTES.min(metadata_end)))
        .and_then(|()| medium.sync())
        .map_err(io_err(format!("zeroing the store's metadata on {shown}")))?;
    medium.discard(metadata_end, device_bytes - metadata_end);
    Ok(true)
}

fn check_size(layout: &Layout, path: &str, volume_bytes: Option<u64>) -> Result<(), DeviceError> {
    let Some(volume_bytes) = volume_bytes else {
        return Ok(());
    };
    let needed_bytes = layout.needed_bytes(volume_bytes);
    if needed_bytes > layout.device_bytes {
        return Err(DeviceError::TooSmall {
            path: path.to_string(),
            device_bytes: layout.device_bytes,
            volume_bytes,
            needed_bytes,
        });
    }
    Ok(())
}

/// A checkpoint as written to a slot: header (magic, generation, payload length, payload CRC,
/// header CRC) and payload.
fn checkpoint_bytes(layout: &Layout, generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(CHECKPOINT_HEADER + payload.len());
    bytes.extend_from_slice(CHECKPOINT_MAGIC);
    bytes.extend_from_slice(&generation.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc_with(&layout.uuid, payload).to_le_bytes());
    let header_crc = crc_with(&layout.uuid, &bytes);
    bytes.extend_from_slice(&header_crc.to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

impl State {
    fn empty(clusters: u64) -> State {
        State {
            objects: HashMap::new(),
            by_name: BTreeMap::new(),
            next_id: 1,
            free: vec![0; clusters.div_ceil(64) as usize],
            cursor: 0,
            clean: Vec::new(),
            pending_free: Vec::new(),
            generation: 0,
            seq: 0,
            tail: 0,
            active_slot: 0,
            failed: None,
        }
    }
}

/// Writes an empty table as checkpoint generation 1, invalidates the other slot, then commits the
/// format by writing the superblock (each step synced: a torn format leaves no superblock, and the
/// device then still reads as blank or foreign).
fn format(medium: &dyn Medium, layout: &Layout) -> io::Result<()> {
    medium.write_zeros(0, SIGNATURE_BYTES)?;
    medium.write_zeros(layout.slot_offset(1), CHECKPOINT_HEADER as u64)?;
    let payload = State::empty(0).encode_checkpoint();
    medium.write_at(&checkpoint_bytes(layout, 1, &payload), layout.slot_offset(0))?;
    medium.sync()?;
    medium.write_at(&layout.encode(), 0)?;
    medium.sync()
}

/// Reads the newest valid checkpoint and replays its journal records.
fn load(medium: &dyn Medium, layout: &Layout) -> Result<State, DeviceError> {
    let path = medium.location();
    let corrupt = |detail: String| DeviceError::Corrupt {
        path: path.clone(),
        detail,
    };
    let mut best: Option<(u64, usize, Vec<u8>)> = None;
    for slot in 0..2 {
        let mut header = [0u8; CHECKPOINT_HEADER];
        medium
            .read_at(&mut header, layout.slot_offset(slot))
            .map_err(io_err(format!("reading checkpoint slot {slot} of {path}")))?;
        if &header[..8] != CHECKPOINT_MAGIC
            || crc_with(&layout.uuid, &header[..28]) != le_u32(&header[28..32])
        {
            continue;
        }
        let generation = le_u64(&header[8..16]);
        let len = le_u64(&header[16..24]);
        if len + CHECKPOINT_HEADER as u64 > layout.slot_bytes
            || best.as_ref().is_some_and(|(g, _, _)| *g >= generation)
        {
            continue;
        }
        let mut payload = vec![0u8; len as usize];
        medium
            .read_at(&mut payload, layout.slot_offset(slot) + CHECKPOINT_HEADER as u64)
            .map_err(io_err(format!("reading checkpoint slot {slot} of {path}")))?;
        if crc_with(&layout.uuid, &payload) == le_u32(&header[24..28]) {
            best = Some((generation, slot, payload));
        }
    }
    let (generation, slot, payload) =
        best.ok_or_else(|| corrupt("neither checkpoint slot holds a valid checkpoint".into()))?;
    let (next_id, objects) = State::decode_checkpoint(&payload)
        .ok_or_else(|| corrupt(format!("checkpoint {generation} does not decode")))?;
    let clusters = layout.clusters();
    let mut state = State::empty(clusters);
    state.next_id = next_id;
    state.by_name = objects.iter().map(|(&id, m)| (m.name.clone(), id)).collect();
    state.objects = objects;
    state.generation = generation;
    state.active_slot = slot;

    let mut journal = vec![0u8; layout.journal_bytes as usize];
    medium
        .read_at(&mut journal, layout.journal_offset())
        .map_err(io_err(format!("reading the journal of {path}")))?;
    let mut at = 0usize;
    let mut seq = 0u64;
    let mut released = Vec::new();
    while let Some(header) = journal.get(at..at + RECORD_HEADER) {
        let len = le_u32(&header[4..8]) as usize;
        if le_u32(&header[0..4]) != RECORD_MAGIC
            || le_u64(&header[8..16]) != generation
            || le_u64(&header[16..24]) != seq
        {
            break;
        }
        let Some(record) = journal.get(at..at + RECORD_HEADER + len + 4) else {
            break;
        };
        let (body, crc) = record.split_at(RECORD_HEADER + len);
        if crc_with(&layout.uuid, body) != le_u32(crc) {
            break;
        }
        let ops = Op::decode_all(&body[RECORD_HEADER..])
            .ok_or_else(|| corrupt(format!("journal record {seq} does not decode")))?;
        for op in &ops {
            state
                .apply(op, &mut released)
                .map_err(|e| corrupt(format!("journal record {seq}: {e}")))?;
        }
        at += record.len();
        seq += 1;
    }
    state.seq = seq;
    state.tail = at as u64;

    // Every cluster not mapped by an object is free; one mapped twice, or past the end, is corruption.
    let mut used = vec![0u64; clusters.div_ceil(64) as usize];
    for (id, meta) in &state.objects {
        if meta.name.is_empty() || meta.name.len() > MAX_NAME {
            return Err(corrupt(format!("object {id} has an invalid name")));
        }
        for &cluster in meta.clusters.values() {
            let (w, b) = (cluster as usize / 64, cluster % 64);
            if u64::from(cluster) >= clusters || used[w] & (1 << b) != 0 {
                return Err(corrupt(format!(
                    "cluster {cluster} of {} is out of range or shared",
                    meta.name
                )));
            }
            used[w] |= 1 << b;
        }
    }
    for (w, word) in state.free.iter_mut().enumerate() {
        *word = !used[w];
    }
    // Bits past the last cluster are never free.
    if !clusters.is_multiple_of(64) {
        if let Some(last) = state.free.last_mut() {
            *last &= (1u64 << (clusters % 64)) - 1;
        }
    }
    Ok(state)
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid object name {name:?} (1 to {MAX_NAME} bytes, no '/')"),
        ));
    }
    Ok(())
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no object named {name}"))
}

impl Backend for BlockBackend {
    fn create(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>> {
        check_name(name)?;
        let shared = &self.shared;
        let mut state = lock(&shared.state);
        shared.check(&state)?;
        if !state.by_name.contains_key(name) && state.objects.len() >= shared.layout.max_objects as usize {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{} holds its maximum of {} objects",
                    shared.medium.location(),
                    shared.layout.max_objects
                ),
            ));
        }
        let id = state.next_id;
        shared.commit(
            &mut state,
            &[Op::Create {
                id,
                name: name.to_string(),
            }],
        )?;
        Ok(Box::new(BlockObject {
            shared: shared.clone(),
            id,
            name: name.to_string(),
            capacity,
        }))
    }

    fn open(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>> {
        check_name(name)?;
        let state = lock(&self.shared.state);
        let id = *state.by_name.get(name).ok_or_else(|| not_found(name))?;
        Ok(Box::new(BlockObject {
            shared: self.shared.clone(),
            id,
            name: name.to_string(),
            capacity,
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        let mut state = lock(&self.shared.state);
        self.shared.check(&state)?;
        match state.by_name.get(name) {
            Some(&id) => self.shared.commit(&mut state, &[Op::Remove { id }]),
            None => Ok(()),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(lock(&self.shared.state).by_name.keys().cloned().collect())
    }

    fn read_blob(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        check_name(name)?;
        let (id, len) = {
            let state = lock(&self.shared.state);
            let Some(&id) = state.by_name.get(name) else {
                return Ok(None);
            };
            (id, state.objects[&id].len)
        };
        let object = BlockObject {
            shared: self.shared.clone(),
            id,
            name: name.to_string(),
            capacity: 0,
        };
        let len = usize::try_from(len).map_err(|_| corrupt(format!("{name} is too large to read whole")))?;
        let mut content = vec![0u8; len];
        object.read_at(&mut content, 0)?;
        Ok(Some(content))
    }

    fn replace_blob(&self, name: &str, content: &[u8]) -> io::Result<()> {
        check_name(name)?;
        let shared = &self.shared;
        let c = shared.layout.cluster_bytes;
        let needed = (content.len() as u64).div_ceil(c) as usize;
        // 1. Fresh, durably zero clusters for the new content (rule 2: the tail needs no zeroing).
        let clusters = {
            let mut state = lock(&shared.state);
            shared.check(&state)?;
            let mut clusters = Vec::with_capacity(needed);
            for _ in 0..needed {
                match shared.take_clean(&mut state) {
                    Ok(cluster) => clusters.push(cluster),
                    Err(e) => {
                        state.clean.extend(clusters);
                        return Err(e);
                    }
                }
            }
            clusters
        };
        // 2. The content, made durable before anything points at it (rule 3).
        let written = content
            .chunks(c as usize)
            .zip(&clusters)
            .try_for_each(|(piece, &cluster)| {
                shared
                    .medium
                    .write_at(piece, shared.layout.cluster_offset(cluster))
            })
            .and_then(|()| shared.medium.sync());
        let mut state = lock(&shared.state);
        if let Err(e) = written {
            for cluster in clusters {
                state.set_free(cluster, true);
            }
            return Err(e);
        }
        // 3. One record commits it; the old object's clusters wait for the sync below.
        let id = state.next_id;
        let mut ops = vec![Op::Create {
            id,
            name: name.to_string(),
        }];
        ops.extend(clusters.iter().enumerate().map(|(index, &cluster)| Op::Map {
            id,
            index: index as u64,
            cluster,
        }));
        ops.push(Op::SetLen {
            id,
            len: content.len() as u64,
        });
        shared.commit(&mut state, &ops)?;
        drop(state);
        shared.sync()
    }

    fn sync_namespace(&self) -> io::Result<()> {
        self.shared.sync()
    }

    fn location(&self) -> String {
        self.shared.medium.location()
    }

    /// The same bound [`BlockBackend::open`] checks a volume against at start (see
    /// [`Layout::needed_bytes`]), so that a volume grown to it still opens on this device.
    fn max_volume_bytes(&self) -> Option<u64> {
        Some(self.shared.layout.max_volume_bytes())
    }
}

/// One object of a [`BlockBackend`]. It names its object by id: once the object is removed or
/// replaced, the handle refuses every operation instead of touching clusters that may be reused.
struct BlockObject {
    shared: Arc<Shared>,
    id: u64,
    name: String,
    /// Largest size (0: unbounded, a small object).
    capacity: u64,
}

impl BlockObject {
    fn gone(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} was removed or replaced", self.name),
        )
    }

    fn meta<'a>(&self, state: &'a State) -> io::Result<&'a ObjectMeta> {
        state.objects.get(&self.id).ok_or_else(|| self.gone())
    }

    fn check_capacity(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.capacity > 0 && offset.checked_add(len).is_none_or(|end| end > self.capacity) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("write past the capacity of {}", self.name),
            ));
        }
        Ok(())
    }
}

impl Object for BlockObject {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let shared = &self.shared;
        let targets: Vec<(Option<u64>, u64, usize, usize)> = {
            let state = lock(&shared.state);
            let meta = self.meta(&state)?;
            shared
                .pieces(offset, buf.len())
                .map(|(index, within, start, n)| {
                    let at = meta
                        .clusters
                        .get(&index)
                        .map(|&c| shared.layout.cluster_offset(c));
                    (at, within, start, n)
                })
                .collect()
        };
        for (at, within, start, n) in targets {
            let part = &mut buf[start..start + n];
            match at {
                Some(at) => shared.medium.read_at(part, at + within)?,
                None => part.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_capacity(offset, buf.len() as u64)?;
        let shared = &self.shared;
        let targets: Vec<(u64, usize, usize)> = {
            let mut state = lock(&shared.state);
            shared.check(&state)?;
            let pieces: Vec<_> = shared.pieces(offset, buf.len()).collect();
            let missing: Vec<u64> = {
                let meta = self.meta(&state)?;
                pieces
                    .iter()
                    .map(|p| p.0)
                    .filter(|i| !meta.clusters.contains_key(i))
                    .collect()
            };
            let mut ops = Vec::new();
            for index in missing {
                let cluster = shared.take_clean(&mut state)?;
                ops.push(Op::Map {
                    id: self.id,
                    index,
                    cluster,
                });
            }
            let end = offset + buf.len() as u64;
            if end > self.meta(&state)?.len {
                ops.push(Op::SetLen {
                    id: self.id,
                    len: end,
                });
            }
            // The record goes out before the data: after a crash between them the cluster reads
            // as zeros, never as another object's bytes.
            shared.commit(&mut state, &ops)?;
            let meta = self.meta(&state)?;
            pieces
                .iter()
                .map(|&(index, within, start, n)| {
                    (
                        shared.layout.cluster_offset(meta.clusters[&index]) + within,
                        start,
                        n,
                    )
                })
                .collect()
        };
        for (at, start, n) in targets {
            shared.medium.write_at(&buf[start..start + n], at)?;
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let shared = &self.shared;
        let c = shared.layout.cluster_bytes;
        let mut state = lock(&shared.state);
        shared.check(&state)?;
        let meta = self.meta(&state)?;
        let mut ops = Vec::new();
        let mut zeros = Vec::new();
        for (index, within, _, n) in shared.pieces(offset, len) {
            let Some(&cluster) = meta.clusters.get(&index) else {
                continue;
            };
            if within == 0 && n as u64 == c {
                ops.push(Op::Unmap { id: self.id, index });
            } else {
                zeros.push((shared.layout.cluster_offset(cluster) + within, n as u64));
            }
        }
        for (at, n) in zeros {
            shared.medium.write_zeros(at, n)?;
        }
        shared.commit(&mut state, &ops)
    }

    fn sync(&self) -> io::Result<()> {
        self.shared.sync()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.meta(&lock(&self.shared.state))?.len)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        let shared = &self.shared;
        let c = shared.layout.cluster_bytes;
        let mut state = lock(&shared.state);
        shared.check(&state)?;
        let meta = self.meta(&state)?;
        let mut ops: Vec<Op> = meta
            .clusters
            .range(len.div_ceil(c)..)
            .map(|(&index, _)| Op::Unmap { id: self.id, index })
            .collect();
        if let Some(&cluster) = meta.clusters.get(&(len / c)).filter(|_| !len.is_multiple_of(c)) {
            // Bytes past the new end must read as zeros if the object grows again; the zeros are
            // made durable before the shorter length can be (a rare call, so the sync is cheap).
            let within = len % c;
            shared
                .medium
                .write_zeros(shared.layout.cluster_offset(cluster) + within, c - within)?;
            shared.medium.sync()?;
        }
        ops.push(Op::SetLen { id: self.id, len });
        shared.commit(&mut state, &ops)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        let state = lock(&self.shared.state);
        Ok(self.meta(&state)?.clusters.len() as u64 * self.shared.layout.cluster_bytes)
    }
}
