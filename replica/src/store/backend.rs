//! Where the store's bytes live: a small trait of named objects, and the host-directory implementation.
//!
//! The store needs very little from its storage: named objects it can create, open, remove and list;
//! positional reads and writes; hole punching; a durability barrier; and an atomic replace of a small
//! blob (the volume metadata, a compacted index log). Everything above this trait is backend-agnostic,
//! so a block-device backend (objects as extents of a raw device) can be added without touching the
//! store (the same shape as tgt's `bs_rdwr.c` plug-ins).
//!
//! ## The host-directory backend
//!
//! Each object is a sparse file. ext4 caps a file at 16 TiB, but a volume may be 64 TiB or more, so a
//! data object larger than [`SEGMENT_BYTES`] is split into *segments*: segment 0 is the file `<name>`,
//! segment `k` is `<name>.seg<k>`. Segments are created lazily on first write, so a thin volume costs
//! one file per layer; reading a segment that was never written returns zeros.
//!
//! A segment file that has just been created is only durable once the directory is fsynced, so the
//! object remembers it and [`Object::sync`] fsyncs the directory too.
//!
//! ## One process per directory
//!
//! Two stores over one directory would append to the same index log and overwrite each other's
//! recovery, so [`DirBackend::new`] takes an exclusive `flock` on [`LOCK_FILE`] in the directory and
//! holds it as long as the backend lives (a `Store` keeps its backend for its whole life). `flock`
//! belongs to the open file description, so a second open in the *same* process is refused too, and
//! the kernel drops the lock when the holder exits, however it dies: there is no stale lock to clean
//! up after `kill -9`.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::StoreError;

pub mod block;

/// Size of one segment file of a data object: 1 TiB keeps every file far below ext4's 16 TiB limit,
/// and a 64 TiB volume needs at most 64 files per layer (all lazily created).
pub const SEGMENT_BYTES: u64 = 1 << 40;

/// Suffix of a temporary file written by [`Backend::replace_blob`]; such files are garbage after a crash.
const TMP_SUFFIX: &str = ".tmp";

/// The file a [`DirBackend`] holds an exclusive `flock` on while it is open. It is never an object:
/// [`Backend::list`] skips it and no object may take its name.
pub const LOCK_FILE: &str = "volume.lock";

/// Whether `preadv2(RWF_NOWAIT)` works here (cleared the first time the kernel or file system says no).
static PREADV2_NOWAIT: AtomicBool = AtomicBool::new(true);

/// Most buffers handed to one `pwritev` (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Largest aligned piece of a data file written by one call. The page cache sizes a new folio after the
/// write that creates it (Linux 6.x large folios on ext4/xfs), and a later 4 KiB overwrite into a large
/// folio costs far more kernel time (perf: in `ext4_block_write_begin`, which walks the folio's buffer
/// heads). Measured on this machine's 6.18 kernel, a 3-replica volume prefilled with 1 MiB writes: ~50 us
/// of replica CPU per 4 KiB overwrite with whole-request writes, ~18 us with 64 KiB pieces -- the same as
/// after a 4 KiB prefill. A plain file shows what is left between 64 KiB and smaller pieces: 1 GiB
/// written in pieces of a given size and synced, then 26,000 random 4 KiB overwrites, each costs
/// 1.7-2.4 us after 4 KiB pieces, 1.9-3.2 after 16 KiB, 2.5-3.7 after 32 KiB, 4.3-4.5 after 64 KiB and
/// 19-29 after 1 MiB (three runs each, alternating), while writing the GiB took as long in 16 KiB pieces
/// as in 64 KiB ones. A rebuild's copy onto a returning replica is that pattern exactly: its file was
/// written by the full rebuild's 1 MiB copies, its delta is scattered 4 KiB blocks (copy of 2,600 blocks
/// 20.2-27.4 -> 19.9-21.7 ms in four alternating pairs). 16 KiB keeps folios at most 4 blocks, at the price of 64 calls per 1 MiB write
/// (~1 us each).
const WRITE_CHUNK: u64 = 16 << 10;

/// One named object of a backend: a sparse byte array.
pub trait Object: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`. Bytes never written (holes, past the end) read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Like [`Object::read_at`], but only if it needs no wait for the medium (everything is in
    /// memory): `Ok(false)` means the read would have waited, and `buf` holds nothing useful. Lets
    /// a server answer a cached read on its network thread and send only misses to a blocking pool.
    /// The default cannot tell, so it always says `false`.
    fn read_cached_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Writes all of `buf` at `offset` (volatile until [`Object::sync`]).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` back to back from `offset` on (volatile until [`Object::sync`]). A backend that
    /// can gather overrides it with one call (`pwritev`), so a run of adjacent blocks coming from
    /// separate requests costs one syscall; the default writes them one after the other.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for buf in bufs {
            self.write_at(buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }
    /// A shared, writable memory mapping of `[offset, offset + len)` (`offset` a multiple of the page
    /// size), the object first extended over that range with its space reserved. The index log
    /// appends through it (see `LogAppender` in the store): a `memcpy` into the page cache instead of
    /// a syscall per append. What is stored through it is in the page cache at once -- a `kill -9`
    /// keeps it, and a later `pread` sees it -- and [`Object::sync`] makes it durable like a write.
    ///
    /// `None` where the object cannot be mapped (the default: a raw device's objects are not files)
    /// or its space cannot be reserved up front; the caller then writes with [`Object::write_at`].
    /// Reserving matters: a store into a mapped hole that finds the disk full is a `SIGBUS`, not an
    /// error.
    fn map_for_append(&self, _offset: u64, _len: usize) -> io::Result<Option<memmap2::MmapMut>> {
        Ok(None)
    }
    /// Gives back the space of `[offset, offset + len)`; the range then reads as zeros.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync, plus the directory entry of new files).
    fn sync(&self) -> io::Result<()>;
    /// Starts writing back what was written so far, without waiting for it and without making
    /// anything durable: a later [`Object::sync`] then has less to write. A no-op by default.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// Logical length: one past the last byte ever written (holes included).
    fn len(&self) -> io::Result<u64>;
    /// Whether the object has never been written.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Cuts the object to `len` bytes (used to drop a torn tail of an index log).
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// Bytes actually allocated on the medium (sparse files: fewer than `len`).
    fn allocated_bytes(&self) -> io::Result<u64>;
}

/// A namespace of objects: one replica's storage.
pub trait Backend: Send + Sync {
    /// Creates (or truncates) an object able to hold `capacity` bytes (0: small, unsegmented).
    fn create(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>>;
    /// Opens an existing object.
    fn open(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>>;
    /// Removes an object and all its parts; removing a missing object is not an error.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Names of all objects (not blobs' temporaries).
    fn list(&self) -> io::Result<Vec<String>>;
    /// The whole content of a small object, `None` if it does not exist.
    fn read_blob(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// The whole content of an object read once and parsed (an index log at open): mapped where the
    /// backend can, read like a blob otherwise. A head that holds 1 GiB has a 7 MiB log; reading it
    /// into a fresh buffer faulted in and zeroed 7 MiB of memory only to copy the page cache into it,
    /// ~5 ms of a replica's restart, where mapping the cached pages costs a fraction of that.
    fn read_whole(&self, name: &str) -> io::Result<Option<Whole>> {
        Ok(self.read_blob(name)?.map(Whole::Read))
    }
    /// Atomically and durably replaces a small object: after a crash it holds either the old or the
    /// new content, and once this returns the new content survives power loss.
    fn replace_blob(&self, name: &str, content: &[u8]) -> io::Result<()>;
    /// Makes creations and removals of objects durable.
    fn sync_namespace(&self) -> io::Result<()>;
    /// Where this backend keeps its data, for error messages.
    fn location(&self) -> String;
    /// The largest volume this storage can hold (data, index logs and metadata together), checked
    /// before a volume grows; `None` when only the store's own limit applies (a host directory's
    /// sparse files take space as they are written, like any thin volume).
    fn max_volume_bytes(&self) -> Option<u64> {
        None
    }
}

/// The content of an object, from [`Backend::read_whole`].
pub enum Whole {
    Read(Vec<u8>),
    /// Valid as long as nothing else changes the file: the store reads an object whole only while
    /// it opens, when it is the only user of its directory (see the module documentation).
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Whole {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Whole::Read(bytes) => bytes,
            Whole::Mapped(map) => map,
        }
    }
}

/// The host-directory backend: every object is one or more sparse files in `dir`.
pub struct DirBackend {
    dir: PathBuf,
    /// Holds the exclusive `flock` on [`LOCK_FILE`]; closing it (on drop) releases the directory.
    _lock: File,
}

impl DirBackend {
    /// A backend over `dir`, created if missing, locked against every other opener (see the module
    /// documentation) until the backend is dropped.
    pub fn new(dir: &Path) -> Result<DirBackend, StoreError> {
        let location = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(StoreError::io(format!("creating {location}")))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(StoreError::io(format!("opening {}", lock_path.display())))?;
        // Non-blocking: a replica that finds its directory taken must say so, not hang.
        // SAFETY: plain syscall on an fd we own; the arguments are integers.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => StoreError::InUse {
                    dir: location,
                    lock: lock_path.display().to_string(),
                },
                _ => StoreError::Io {
                    context: format!("locking {}", lock_path.display()),
                    source: err,
                },
            });
        }
        Ok(DirBackend {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn open_object(&self, name: &str, capacity: u64, create: bool) -> io::Result<Box<dyn Object>> {
        self.dir_object(name, capacity, create)
            .map(|o| Box::new(o) as Box<dyn Object>)
    }

    fn dir_object(&self, name: &str, capacity: u64, create: bool) -> io::Result<DirObject> {
        check_name(name)?;
        let slots = capacity.div_ceil(SEGMENT_BYTES).max(1) as usize;
        let object = DirObject {
            dir: self.dir.clone(),
            name: name.to_string(),
            segments: (0..slots).map(|_| OnceLock::new()).collect(),
            dirty: (0..slots).map(|_| AtomicBool::new(false)).collect(),
            creating: Mutex::new(()),
            namespace_dirty: AtomicBool::new(false),
            mapped: AtomicBool::new(false),
        };
        let first = open_segment(&object.segment_path(0), create, create)?;
        let _ = object.segments[0].set(Arc::new(first));
        if create {
            object.namespace_dirty.store(true, Ordering::Release);
        }
        for k in 1..slots {
            let path = object.segment_path(k);
            if create {
                remove_if_exists(&path)?;
            } else if let Ok(file) = open_segment(&path, false, false) {
                let _ = object.segments[k].set(Arc::new(file));
            }
        }
        if !create {
            // What an earlier process wrote may still be only in the page cache (it was killed before
            // it synced): the first sync must flush it, or the store's recovery at open would vouch
            // for data that a power loss can still take back.
            for (k, segment) in object.segments.iter().enumerate() {
                if segment.get().is_some() {
                    object.dirty[k].store(true, Ordering::Release);
                }
            }
        }
        Ok(object)
    }
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.contains('/')
        || name.ends_with(TMP_SUFFIX)
        || name.contains(".seg")
        || name == LOCK_FILE
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid object name {name:?}"),
        ));
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Backend for DirBackend {
    fn create(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>> {
        self.open_object(name, capacity, true)
    }

    fn open(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>> {
        self.open_object(name, capacity, false)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        remove_if_exists(&self.dir.join(name))?;
        let prefix = format!("{name}.seg");
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
                remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = BTreeSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !entry.file_type()?.is_file() || name == LOCK_FILE {
                continue;
            }
            if name.ends_with(TMP_SUFFIX) {
                // A replace_blob that crashed before its rename: garbage, never visible as an object.
                remove_if_exists(&entry.path())?;
                continue;
            }
            let base = match name.find(".seg") {
                Some(i) => name[..i].to_string(),
                None => name,
            };
            names.insert(base);
        }
        Ok(names.into_iter().collect())
    }

    fn read_blob(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        check_name(name)?;
        match std::fs::read(self.dir.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads segment 0 only, like [`DirBackend::read_blob`]: what is read whole is an index log, never
    /// segmented.
    fn read_whole(&self, name: &str) -> io::Result<Option<Whole>> {
        check_name(name)?;
        let file = match File::open(self.dir.join(name)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() == 0 {
            // Nothing to map (a mapping cannot be empty).
            return Ok(Some(Whole::Read(Vec::new())));
        }
        // SAFETY: the mapping is read-only, and nothing writes or truncates the file while it lives:
        // the store reads an object whole only while it opens, holding the directory's lock (see the
        // module documentation), and drops the mapping before it appends to the object.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        match read_in(&map, name) {
            Ok(()) => Ok(Some(Whole::Mapped(map))),
            // A kernel older than 5.14 cannot say whether the pages could be read: read the object
            // instead, so that a disk error is an error there too.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(self.read_blob(name)?.map(Whole::Read)),
            Err(e) => Err(e),
        }
    }

    fn replace_blob(&self, name: &str, content: &[u8]) -> io::Result<()> {
        check_name(name)?;
        // write, fsync, rename, fsync the directory: the rename is the atomic commit point and the
        // directory fsync makes it durable (Longhorn skipped both fsyncs and lost volume.meta, #9988).
        let tmp = self.dir.join(format!("{name}{TMP_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all_at(content, 0)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, self.dir.join(name))?;
        fsync_dir(&self.dir)
    }

    fn sync_namespace(&self) -> io::Result<()> {
        fsync_dir(&self.dir)
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }
}

/// A sparse object of the directory backend, split into lazily created segment files.
struct DirObject {
    dir: PathBuf,
    name: String,
    segments: Box<[OnceLock<Arc<File>>]>,
    /// Segments written since the last sync, so a sync touches only those.
    dirty: Box<[AtomicBool]>,
    /// Serializes the creation of segment files.
    creating: Mutex<()>,
    /// A segment file was created since the last sync: its directory entry is not durable yet.
    namespace_dirty: AtomicBool,
    /// A mapping of segment 0 was handed out ([`Object::map_for_append`]): stores through it leave
    /// no trace here, so every sync fdatasyncs segment 0.
    mapped: AtomicBool,
}

impl DirObject {
    fn segment_path(&self, k: usize) -> PathBuf {
        if k == 0 {
            self.dir.join(&self.name)
        } else {
            self.dir.join(format!("{}.seg{k}", self.name))
        }
    }

    /// Splits `[offset, offset + len)` into per-segment pieces `(segment, offset in segment, start in
    /// the caller's buffer, length)`. A one-slot object is unsegmented: everything is in segment 0.
    fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize, usize)> + '_ {
        let single = self.segments.len() == 1;
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let at = offset + done as u64;
            let (k, within, room) = if single {
                (0, at, len - done)
            } else {
                let k = (at / SEGMENT_BYTES) as usize;
                let within = at % SEGMENT_BYTES;
                (k, within, ((SEGMENT_BYTES - within) as usize).min(len - done))
            };
            let piece = (k, within, done, room);
            done += room;
            Some(piece)
        })
    }

    fn segment_for_write(&self, k: usize) -> io::Result<&Arc<File>> {
        let slot = self.segments.get(k).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("write past the capacity of {}", self.name),
            )
        })?;
        if let Some(file) = slot.get() {
            return Ok(file);
        }
        let _guard = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = slot.get() {
            return Ok(file);
        }
        let file = open_segment(&self.segment_path(k), true, false)?;
        self.namespace_dirty.store(true, Ordering::Release);
        Ok(slot.get_or_init(|| Arc::new(file)))
    }
}

impl Object for DirObject {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (k, within, start, len) in self.pieces(offset, buf.len()) {
            let part = &mut buf[start..start + len];
            match self.segments.get(k).and_then(OnceLock::get) {
                Some(file) => {
                    let mut filled = 0;
                    while filled < part.len() {
                        let n = file.read_at(&mut part[filled..], within + filled as u64)?;
                        if n == 0 {
                            // Past the end of the file: never written, so zeros.
                            part[filled..].fill(0);
                            break;
                        }
                        filled += n;
                    }
                }
                None => part.fill(0),
            }
        }
        Ok(())
    }

    fn read_cached_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if !PREADV2_NOWAIT.load(Ordering::Relaxed) {
            return Ok(false);
        }
        for (k, within, start, len) in self.pieces(offset, buf.len()) {
            let part = &mut buf[start..start + len];
            let Some(file) = self.segments.get(k).and_then(OnceLock::get) else {
                part.fill(0);
                continue;
            };
            let mut filled = 0;
            while filled < part.len() {
                let rest = &mut part[filled..];
                let iov = libc::iovec {
                    iov_base: rest.as_mut_ptr().cast(),
                    iov_len: rest.len(),
                };
                // SAFETY: one iovec over a live, exclusively borrowed buffer, for the call's duration.
                let n = unsafe {
                    libc::preadv2(
                        file.as_raw_fd(),
                        &iov,
                        1,
                        (within + filled as u64) as libc::off_t,
                        libc::RWF_NOWAIT,
                    )
                };
                match n {
                    0 => {
                        // Past the end of the file: never written, so zeros.
                        rest.fill(0);
                        break;
                    }
                    n if n > 0 => filled += n as usize,
                    _ => {
                        let err = io::Error::last_os_error();
                        match err.raw_os_error() {
                            Some(libc::EINTR) => continue,
                            Some(libc::EAGAIN) => return Ok(false),
                            // A kernel or file system without RWF_NOWAIT: stop asking.
                            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                                PREADV2_NOWAIT.store(false, Ordering::Relaxed);
                                return Ok(false);
                            }
                            _ => return Err(err),
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        for (k, within, start, len) in self.pieces(offset, buf.len()) {
            let file = self.segment_for_write(k)?;
            pwritev_all(file, &[&buf[start..start + len]], within)?;
            self.dirty[k].store(true, Ordering::Release);
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut pieces = self.pieces(offset, total);
        let (Some((k, within, _, _)), None) = (pieces.next(), pieces.next()) else {
            // Empty, or straddling two segment files (once per TiB): one write per buffer.
            let mut at = offset;
            for buf in bufs {
                self.write_at(buf, at)?;
                at += buf.len() as u64;
            }
            return Ok(());
        };
        let file = self.segment_for_write(k)?;
        pwritev_all(file, bufs, within)?;
        self.dirty[k].store(true, Ordering::Release);
        Ok(())
    }

    /// Only an unsegmented object (an index log) is mapped. `fallocate` both extends the file over
    /// the range (a mapping past the end of a file faults) and reserves its blocks, as unwritten
    /// extents that read as zeros. A file system without `fallocate` gets `None`.
    fn map_for_append(&self, offset: u64, len: usize) -> io::Result<Option<memmap2::MmapMut>> {
        if self.segments.len() != 1 {
            return Ok(None);
        }
        let file = self.segment_for_write(0)?;
        // SAFETY: plain syscall on an fd we own; arguments are integers.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(err),
            };
        }
        // The size changed, and from now on stores through the mapping dirty the file unseen.
        self.mapped.store(true, Ordering::Release);
        // SAFETY: the mapping covers allocated bytes of a file only this store opens (the directory
        // is `flock`ed) and never truncates below them while the mapping lives: a log is replaced by
        // a rename, which leaves this file's inode and blocks alone.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map_mut(&**file)?
        };
        Ok(Some(map))
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        for (k, within, _, part) in self.pieces(offset, len) {
            let Some(file) = self.segments.get(k).and_then(OnceLock::get) else {
                continue;
            };
            // SAFETY: plain syscall on an fd we own; arguments are integers.
            let rc = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    within as libc::off_t,
                    part as libc::off_t,
                )
            };
            if rc != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    // A filesystem without hole punching: write zeros so the range still reads as zeros.
                    let zeros = vec![0u8; part.min(1 << 20)];
                    let mut done = 0;
                    while done < part {
                        let n = zeros.len().min(part - done);
                        file.write_all_at(&zeros[..n], within + done as u64)?;
                        done += n;
                    }
                } else {
                    return Err(err);
                }
            }
            self.dirty[k].store(true, Ordering::Release);
        }
        Ok(())
    }

    fn start_writeback(&self) -> io::Result<()> {
        for (k, slot) in self.segments.iter().enumerate() {
            if let Some(file) = slot.get().filter(|_| self.dirty[k].load(Ordering::Acquire)) {
                // SAFETY: plain syscall on an fd we own; the range 0..0 means the whole file.
                let rc =
                    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        for (k, slot) in self.segments.iter().enumerate() {
            if let Some(file) = slot.get() {
                // On Linux an fdatasync writes back the pages dirtied through a shared mapping too
                // (msync(MS_SYNC) is the same `vfs_fsync_range`): a store through it faults the page
                // writable and marks it dirty in the page cache.
                let mapped = k == 0 && self.mapped.load(Ordering::Acquire);
                if self.dirty[k].swap(false, Ordering::AcqRel) || mapped {
                    if let Err(e) = file.sync_data() {
                        self.dirty[k].store(true, Ordering::Release);
                        return Err(e);
                    }
                }
            }
        }
        if self.namespace_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = fsync_dir(&self.dir) {
                self.namespace_dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut len = 0;
        for (k, slot) in self.segments.iter().enumerate() {
            if let Some(file) = slot.get() {
                let flen = file.metadata()?.len();
                if flen > 0 {
                    len = len.max(k as u64 * SEGMENT_BYTES + flen);
                }
            }
        }
        Ok(len)
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        if self.segments.len() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "truncate of a segmented object",
            ));
        }
        let file = self.segment_for_write(0)?;
        file.set_len(len)?;
        self.dirty[0].store(true, Ordering::Release);
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        for slot in self.segments.iter() {
            if let Some(file) = slot.get() {
                total += file.metadata()?.blocks() * 512;
            }
        }
        Ok(total)
    }
}

/// Reads every page of `map` (a mapping of object `name`) into memory now, or says why it cannot.
///
/// A page of a mapping that the disk fails to read is a SIGBUS when it is touched, which would kill the
/// replica with no word of which file or why; `MAP_POPULATE` reads the pages in too, but ignores such
/// a failure. `MADV_POPULATE_READ` (Linux 5.14) reports it instead, as `EFAULT`, turned here into an
/// error that names the object. `EINVAL` (an older kernel) is passed on for the caller to fall back.
fn read_in(map: &memmap2::Mmap, name: &str) -> io::Result<()> {
    map.advise(memmap2::Advice::PopulateRead)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EFAULT | libc::EIO | libc::EHWPOISON) => io::Error::other(format!(
                "{name} could not be read in whole (the disk or the file system failed to read a page \
                 of it, or it shrank while being read); check the disk and the kernel log"
            )),
            _ => e,
        })
}

/// Opens a segment file for reading and writing, without access-time updates where allowed: every
/// read after a write would otherwise dirty the inode's atime (relatime updates it whenever it is
/// older than mtime), which the store-read profile showed as ~6% of a cached 4 KiB `pread`; nothing
/// reads a replica's atimes.
/// `O_NOATIME` needs the caller to own the file (or CAP_FOWNER): without that, a plain open.
fn open_segment(path: &Path, create: bool, truncate: bool) -> io::Result<File> {
    let open = |flags: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(truncate)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        other => other,
    }
}

/// `pwritev` until every byte of `bufs` is written at `offset` (a regular file may take less per call).
fn pwritev_all(file: &File, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
    if let [buf] = bufs {
        if (offset % WRITE_CHUNK) + buf.len() as u64 <= WRITE_CHUNK {
            // One buffer inside one piece (every small write): a plain pwrite, no iovec list to build.
            return file.write_all_at(buf, offset);
        }
    }
    // Cut the buffers at every WRITE_CHUNK boundary of the file, then write chunk by chunk.
    let mut chunk: Vec<IoSlice<'_>> = Vec::new();
    let (mut chunk_start, mut at) = (offset, offset);
    for buf in bufs {
        let mut buf: &[u8] = buf;
        while !buf.is_empty() {
            let room = (WRITE_CHUNK - at % WRITE_CHUNK) as usize;
            let (head, tail) = buf.split_at(room.min(buf.len()));
            chunk.push(IoSlice::new(head));
            at += head.len() as u64;
            buf = tail;
            if at.is_multiple_of(WRITE_CHUNK) || chunk.len() == IOV_MAX {
                pwritev_chunk(file, &mut chunk, chunk_start)?;
                chunk_start = at;
            }
        }
    }
    pwritev_chunk(file, &mut chunk, chunk_start)
}

/// Writes all of `slices` at `offset` (looping over short writes) and empties `slices`.
fn pwritev_chunk(file: &File, slices: &mut Vec<IoSlice<'_>>, mut offset: u64) -> io::Result<()> {
    let mut rest = &mut slices[..];
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        let count = rest.len().min(IOV_MAX);
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and the slices borrow live buffers
        // for the duration of the call; the kernel only reads them.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                rest.as_ptr().cast::<libc::iovec>(),
                count as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
        }
        offset += n as u64;
        IoSlice::advance_slices(&mut rest, n as usize);
    }
    slices.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_object_whose_pages_cannot_be_read_is_an_error_that_names_it_not_a_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer-00000001.idx");
        std::fs::write(&path, vec![7u8; 64 << 10]).unwrap();
        let file = File::open(&path).unwrap();
        // SAFETY: the test truncates the file under the mapping on purpose and never touches its pages.
        let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
        // Pages past the end of the file fault like pages the disk cannot read.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let err = read_in(&map, "layer-00000001.idx").unwrap_err();
        assert!(
            err.to_string()
                .contains("layer-00000001.idx could not be read in whole"),
            "{err}"
        );
        drop(map);
        // A readable object is read in, and reads as written.
        std::fs::write(&path, vec![7u8; 64 << 10]).unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        let whole = backend.read_whole("layer-00000001.idx").unwrap().unwrap();
        assert_eq!(&whole[..], &vec![7u8; 64 << 10][..]);
    }

    #[test]
    fn a_data_object_spans_segments_and_reads_holes_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        let object = backend.create("layer", 3 * SEGMENT_BYTES).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        // Straddles the boundary between segment 0 and segment 1.
        object.write_at(&data, SEGMENT_BYTES - 4096).unwrap();
        object.sync().unwrap();
        let mut back = vec![0u8; 8192];
        object.read_at(&mut back, SEGMENT_BYTES - 4096).unwrap();
        assert_eq!(back, data);
        let mut hole = vec![1u8; 4096];
        object.read_at(&mut hole, 2 * SEGMENT_BYTES + 4096).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        assert_eq!(backend.list().unwrap(), vec!["layer".to_string()]);
        backend.remove("layer").unwrap();
        assert!(backend.list().unwrap().is_empty());
    }

    #[test]
    fn the_first_sync_after_an_open_flushes_what_an_earlier_opener_left_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 4096];
        {
            let backend = DirBackend::new(dir.path()).unwrap();
            let object = backend.create("layer", 2 * SEGMENT_BYTES).unwrap();
            object.write_at(&data, 0).unwrap();
            object.write_at(&data, SEGMENT_BYTES).unwrap();
            // Dropped unsynced, like a process killed before its flush.
        }
        let backend = DirBackend::new(dir.path()).unwrap();
        let object = backend.dir_object("layer", 2 * SEGMENT_BYTES, false).unwrap();
        let dirty = |o: &DirObject| {
            o.dirty
                .iter()
                .map(|d| d.load(Ordering::Acquire))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            dirty(&object),
            [true, true],
            "both segment files are synced by the next sync"
        );
        object.sync().unwrap();
        assert_eq!(dirty(&object), [false, false]);
        let created = backend.dir_object("fresh", SEGMENT_BYTES, true).unwrap();
        assert_eq!(dirty(&created), [false], "a new object holds nothing to sync");
    }

    #[test]
    fn replace_blob_is_all_or_nothing_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        assert_eq!(backend.read_blob("meta").unwrap(), None);
        backend.replace_blob("meta", b"one").unwrap();
        backend.replace_blob("meta", b"two").unwrap();
        assert_eq!(backend.read_blob("meta").unwrap().as_deref(), Some(&b"two"[..]));
        std::fs::write(dir.path().join("meta.tmp"), b"half").unwrap();
        assert_eq!(backend.list().unwrap(), vec!["meta".to_string()]);
        assert!(!dir.path().join("meta.tmp").exists());
    }

    #[test]
    fn a_vectored_write_lands_back_to_back_within_and_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        let object = backend.create("layer", 2 * SEGMENT_BYTES).unwrap();
        let (a, b, c) = (vec![1u8; 4096], vec![2u8; 512], vec![3u8; 8192]);
        let bufs: [&[u8]; 4] = [&a, &[], &b, &c];
        let expected = [&a[..], &b[..], &c[..]].concat();
        for offset in [4096, SEGMENT_BYTES - 4096] {
            object.write_vectored_at(&bufs, offset).unwrap();
            let mut back = vec![0u8; expected.len()];
            object.read_at(&mut back, offset).unwrap();
            assert_eq!(back, expected, "at {offset}");
        }
    }

    #[test]
    fn writes_cut_into_aligned_pieces_land_exactly_where_they_were_aimed() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        let object = backend.create("layer", SEGMENT_BYTES).unwrap();
        // Buffers that straddle piece boundaries, one larger than several pieces, more buffers than
        // one pwritev takes, all starting off a piece boundary.
        let big: Vec<u8> = (0..(3 * WRITE_CHUNK as usize + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        let small: Vec<Vec<u8>> = (0..IOV_MAX + 10).map(|i| vec![(i % 200) as u8; 512]).collect();
        let mut bufs: Vec<&[u8]> = vec![&big];
        bufs.extend(small.iter().map(|b| &b[..]));
        let expected = bufs.concat();
        let offset = WRITE_CHUNK - 512;
        object.write_vectored_at(&bufs, offset).unwrap();
        let mut back = vec![0u8; expected.len()];
        object.read_at(&mut back, offset).unwrap();
        assert!(back == expected, "vectored write read back differently");
        // A single large buffer goes the same way, and a cached read sees it too.
        object.write_at(&big, 4096).unwrap();
        let mut back = vec![0u8; big.len()];
        assert!(
            object.read_cached_at(&mut back, 4096).unwrap(),
            "just written: in the page cache"
        );
        assert!(back == big, "write_at read back differently");
    }

    #[test]
    fn the_lock_file_is_neither_listed_nor_usable_as_an_object() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        assert!(dir.path().join(LOCK_FILE).exists());
        assert!(backend.list().unwrap().is_empty());
        assert!(backend.create(LOCK_FILE, 0).is_err());
        assert!(backend.remove(LOCK_FILE).is_err());
    }

    #[test]
    fn a_second_backend_on_a_locked_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirBackend::new(dir.path()).unwrap();
        let second = DirBackend::new(dir.path());
        assert!(
            matches!(second, Err(StoreError::InUse { .. })),
            "{:?}",
            second.err()
        );
        drop(first);
        DirBackend::new(dir.path()).unwrap();
    }

    #[test]
    fn punch_gives_space_back_and_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        let object = backend.create("data", 1 << 30).unwrap();
        object.write_at(&vec![7u8; 1 << 20], 0).unwrap();
        object.sync().unwrap();
        let before = object.allocated_bytes().unwrap();
        object.punch(0, 1 << 20).unwrap();
        assert!(object.allocated_bytes().unwrap() < before);
        let mut back = vec![1u8; 4096];
        object.read_at(&mut back, 8192).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }
}
