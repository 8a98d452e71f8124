//! A [`BlockDevice`] over a plain file or a host block device.
//!
//! Every I/O is a positioned `pread`/`pwrite` on one shared file descriptor,
//! so any number of commands are in flight at once and nothing serialises
//! them except the kernel. Where the syscall runs depends on what it costs:
//!
//! ```text
//!   read  <= INLINE_IO_MAX ──► preadv2(RWF_NOWAIT) on the runtime thread
//!                                 └─ not all in the page cache ──► blocking pool
//!   write <= INLINE_IO_MAX, no FUA ──► pwrite on the runtime thread
//!   everything else (large I/O, FUA, FLUSH, UNMAP, WRITE SAME, CAW) ──► blocking pool
//! ```
//!
//! Why inline: a 4 KiB `pread`/`pwrite` against the page cache takes 1-3 µs,
//! while a hop to the blocking pool (queue, futex wake of a pool thread, then
//! a wake of the runtime task) costs more than that and two context switches,
//! which on a small shared machine is most of a 4 KiB command's budget. The
//! trade-off is that an inline syscall occupies a runtime worker for as long
//! as it takes, so only calls that cannot wait for the disk are made there:
//! reads use `RWF_NOWAIT`, which fails with `EAGAIN` instead of waiting for a
//! page-cache miss (the read is then redone on the pool); buffered writes
//! only copy into the page cache (they can still be throttled by dirty-page
//! writeback, which is bounded by the kernel's dirty limits and hits tgt's
//! worker threads alike); anything that waits for the medium (FUA, FLUSH,
//! `fdatasync`) stays off the runtime threads.
//!
//! ```text
//!   write / write_same / unmap ──► shared side of `write_gate` ──► pwrite / fallocate
//!   compare_and_write          ──► exclusive side of `write_gate` ──► pread, compare, pwrite
//!   read / provisioning        ──► no lock (a read racing a write may see either, as SBC allows)
//! ```
//!
//! COMPARE AND WRITE is atomic against every other write because all writes
//! hold the shared side of one `RwLock` while CAW holds the exclusive side;
//! the lock is tokio's, which is fair, so a CAW is not starved by a stream of
//! writes.
//!
//! Durability: FUA is `pwritev2(RWF_DSYNC)` (falling back to `pwrite` +
//! `fdatasync` on kernels without it), FLUSH is `fdatasync`.
//!
//! Thin provisioning: a regular file is sparse and thin. UNMAP punches holes
//! (`fallocate(PUNCH_HOLE|KEEP_SIZE)`), which read back as zeros; if the
//! filesystem refuses, the range is written with zeros instead. GET LBA
//! STATUS comes from `lseek(SEEK_DATA/SEEK_HOLE)`. A block device is sized
//! with `lseek(SEEK_END)` (the same answer as BLKGETSIZE64, without an ioctl
//! number per architecture), reported thick, and its "unmap" is
//! `fallocate(PUNCH_HOLE)` too, which Linux turns into a zeroing discard; we
//! do not use BLKDISCARD because it does not promise that the range reads
//! back as zeros, which the [`BlockDevice::unmap`] contract requires.
//!
//! Cancellation: dropping a future does not stop a syscall already handed to
//! the blocking pool; the write then lands or not, as SAM allows for an
//! aborted task.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::RwLock;

use crate::device::{BlockDevice, DeviceError, Geometry, Provisioning};

/// WRITE SAME and zero-fill write in chunks of this size: big enough that a
/// 1 GiB WRITE SAME is a thousand syscalls, small enough that the buffer is
/// not a noticeable allocation.
const FILL_CHUNK: usize = 1 << 20;

/// Reads and non-FUA writes up to this size run on the runtime thread (see
/// the module doc). 64 KiB keeps the memcpy an inline call does under ~10 µs,
/// so other connections sharing the worker are not held up noticeably, while
/// covering the 4-64 KiB commands for which the pool hop dominates; larger
/// transfers go to the pool, where their copy overlaps with network work on
/// the other cores.
const INLINE_IO_MAX: usize = 64 * 1024;

/// Buffered writes are issued in pieces of at most this size. The kernel
/// sizes a page-cache folio after the write that creates it, and a later
/// small write into a large folio walks every block of it: on ext4 (Linux
/// 6.x, large folios) a 4 KiB `pwrite` into a range first written with
/// 1 MiB writes costs 13-30 µs instead of ~5 µs (measured with a 256 MiB
/// file, 50k random writes). Splitting keeps folios at 64 KiB, which makes a
/// 1 MiB write ~20-50 % dearer in CPU (more calls, more folios) but keeps
/// random 4 KiB writes after sequential ones cheap; 1 MiB writes are still
/// well ahead of tgt, which is what the benchmarks weigh.
const PAGE_CACHE_WRITE_CHUNK: usize = 64 * 1024;

/// How to open a [`FileDevice`].
#[derive(Clone, Debug)]
pub struct FileDeviceOptions {
    /// For a regular file: the capacity in bytes. The file is created if
    /// missing and extended (sparsely) if shorter; it is never truncated.
    /// `None` uses the current length. Must be `None` or the device's size
    /// for a block device.
    pub size: Option<u64>,
    /// 512 or 4096. The physical block reported is the logical block: a
    /// file has no physical sectors, and reporting 4 KiB "physical" blocks
    /// under 512-byte logical blocks breaks libiscsi's
    /// GetLBAStatus.UnmapSingle, which assumes one logical block per
    /// physical block when it checks descriptor LBAs.
    pub logical_block_size: u32,
}

impl Default for FileDeviceOptions {
    fn default() -> Self {
        FileDeviceOptions {
            size: None,
            logical_block_size: 512,
        }
    }
}

/// Why a file device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FileDeviceError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("logical block size {0} is not supported: use 512 or 4096")]
    BlockSize(u32),
    #[error("{path}: size {size} is not a positive multiple of the {block} byte logical block size")]
    Size { path: PathBuf, size: u64, block: u32 },
    #[error("{path} is a block device of {actual} bytes; a requested size of {requested} cannot be applied (omit the size)")]
    BlockDeviceSize {
        path: PathBuf,
        actual: u64,
        requested: u64,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotAFileOrBlockDevice { path: PathBuf },
}

#[derive(Debug)]
struct Inner {
    file: File,
    geometry: Geometry,
    /// Shared by every write, exclusive for COMPARE AND WRITE.
    write_gate: RwLock<()>,
    /// Whether `pwritev2(RWF_DSYNC)` is known to work (cleared on ENOSYS or
    /// EOPNOTSUPP and never retried).
    dsync_writes: std::sync::atomic::AtomicBool,
    /// Whether `preadv2(RWF_NOWAIT)` is known to work (cleared on ENOSYS or
    /// EOPNOTSUPP; every read then goes to the blocking pool).
    nowait_reads: std::sync::atomic::AtomicBool,
}

/// A block device backed by a file (thin) or a host block device (thick).
#[derive(Clone, Debug)]
pub struct FileDevice {
    inner: Arc<Inner>,
}

impl FileDevice {
    /// Open (creating or extending a regular file as `options.size` says).
    pub fn open(path: impl AsRef<Path>, options: FileDeviceOptions) -> Result<FileDevice, FileDeviceError> {
        let path = path.as_ref();
        let bs = options.logical_block_size;
        if bs != 512 && bs != 4096 {
            return Err(FileDeviceError::BlockSize(bs));
        }
        let open_err = |source| FileDeviceError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(options.size.is_some())
            .truncate(false)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let kind = file.metadata().map_err(open_err)?.file_type();
        let (size, thin) = if kind.is_block_device() {
            let actual = seek_end(&file).map_err(open_err)?;
            if let Some(requested) = options.size.filter(|r| *r != actual) {
                return Err(FileDeviceError::BlockDeviceSize {
                    path: path.to_path_buf(),
                    actual,
                    requested,
                });
            }
            (actual, false)
        } else if kind.is_file() {
            let current = file.metadata().map_err(open_err)?.len();
            let size = options.size.unwrap_or(current);
            if size > current {
                file.set_len(size).map_err(open_err)?;
            }
            (size, true)
        } else {
            return Err(FileDeviceError::NotAFileOrBlockDevice {
                path: path.to_path_buf(),
            });
        };
        if size == 0 || size % u64::from(bs) != 0 {
            return Err(FileDeviceError::Size {
                path: path.to_path_buf(),
                size,
                block: bs,
            });
        }
        let geometry = Geometry {
            size_bytes: size,
            logical_block_size: bs,
            physical_block_exponent: 0,
            thin,
        };
        Ok(FileDevice {
            inner: Arc::new(Inner {
                file,
                geometry,
                write_gate: RwLock::new(()),
                dsync_writes: std::sync::atomic::AtomicBool::new(true),
                nowait_reads: std::sync::atomic::AtomicBool::new(true),
            }),
        })
    }

    /// Run `f` on the blocking pool with the shared file.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, DeviceError> + Send + 'static,
    ) -> Result<T, DeviceError> {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(r) => r,
            Err(e) => Err(DeviceError::Io(io::Error::other(format!(
                "I/O worker failed: {e}"
            )))),
        }
    }
}

fn seek_end(file: &File) -> io::Result<u64> {
    // SAFETY: lseek on a valid descriptor owned by `file`.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

impl Inner {
    fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        let mut buf = BytesMut::zeroed(len);
        match self.file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(buf.freeze()),
            Err(e) if e.raw_os_error() == Some(libc::EIO) || e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(DeviceError::Medium {
                    offset,
                    reason: e.to_string(),
                })
            }
            Err(e) => Err(DeviceError::Io(e)),
        }
    }

    /// Read from the page cache without waiting for the medium: `None` if
    /// any of the range is not cached (or the kernel cannot tell), in which
    /// case the caller reads on the blocking pool.
    fn read_cached(&self, offset: u64, len: usize) -> Option<Bytes> {
        use std::sync::atomic::Ordering;
        if !self.nowait_reads.load(Ordering::Relaxed) {
            return None;
        }
        let mut buf = BytesMut::zeroed(len);
        let mut done = 0usize;
        while done < len {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: `iov` points into `buf`, which outlives the call and is
            // at least `iov_len` bytes long.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            match n {
                // End of file: the pool's read reports it as a medium error.
                0 => return None,
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
                            self.nowait_reads.store(false, Ordering::Relaxed);
                        }
                        // EAGAIN: not cached. Anything else: let the
                        // blocking read see (and report) it.
                        _ => {}
                    }
                    return None;
                }
            }
        }
        Some(buf.freeze())
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        use std::sync::atomic::Ordering;
        if fua && self.dsync_writes.load(Ordering::Relaxed) {
            match pwrite_dsync(&self.file, data, offset) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)) => {
                    self.dsync_writes.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(DeviceError::Io(e)),
            }
        }
        if fua {
            self.file.write_all_at(data, offset)?;
            self.file.sync_data()?;
            return Ok(());
        }
        for (i, chunk) in data.chunks(PAGE_CACHE_WRITE_CHUNK).enumerate() {
            self.file
                .write_all_at(chunk, offset + (i * PAGE_CACHE_WRITE_CHUNK) as u64)?;
        }
        Ok(())
    }

    fn fill(&self, offset: u64, len: u64, pattern: &[u8]) -> Result<(), DeviceError> {
        if len == 0 {
            return Ok(());
        }
        let chunk_len = (FILL_CHUNK as u64).min(len) as usize;
        let chunk_len = chunk_len - chunk_len % pattern.len();
        let chunk_len = chunk_len.max(pattern.len());
        let chunk: Vec<u8> = pattern.iter().copied().cycle().take(chunk_len).collect();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_all_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        // SAFETY: fallocate on a valid descriptor owned by `self.file`.
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
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // The filesystem or device cannot deallocate: keep the contract
            // (reads return zeros) by writing zeros.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                let zero_block = vec![0u8; self.geometry.logical_block_size as usize];
                self.fill(offset, len, &zero_block)
            }
            _ => Err(DeviceError::Io(e)),
        }
    }

    fn provisioning(&self, offset: u64, max_len: u64) -> Result<(Provisioning, u64), DeviceError> {
        let end = offset.saturating_add(max_len).min(self.geometry.size_bytes);
        if !self.geometry.thin {
            return Ok((Provisioning::Mapped, end - offset));
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a valid descriptor; it only moves our own offset
        // and every I/O here is positioned, so the offset is never used.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data after `offset`: a hole up to the end.
                Some(libc::ENXIO) => Ok((Provisioning::Deallocated, end - offset)),
                // The filesystem cannot tell: everything is mapped.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((Provisioning::Mapped, end - offset)),
                _ => Err(DeviceError::Io(e)),
            };
        }
        let data = data as u64;
        if data > offset {
            return Ok((Provisioning::Deallocated, data.min(end) - offset));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(DeviceError::Io(io::Error::last_os_error()));
        }
        Ok((Provisioning::Mapped, (hole as u64).min(end) - offset))
    }
}

/// `pwritev2(RWF_DSYNC)` the whole buffer, looping over short writes.
fn pwrite_dsync(file: &File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        let iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: `iov` points into `data`, which outlives the call; the
        // kernel only reads from it.
        let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, libc::RWF_DSYNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev2 wrote nothing"));
        }
        data = &data[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

impl BlockDevice for FileDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        if len as usize <= INLINE_IO_MAX {
            if let Some(data) = self.inner.read_cached(offset, len as usize) {
                return Ok(data);
            }
        }
        self.blocking(move |inner| inner.read_at(offset, len as usize))
            .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        let _shared = self.inner.write_gate.read().await;
        if !fua && data.len() <= INLINE_IO_MAX {
            return self.inner.write_at(offset, &data, false);
        }
        self.blocking(move |inner| inner.write_at(offset, &data, fua))
            .await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.blocking(|inner| Ok(inner.file.sync_data()?)).await
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _shared = self.inner.write_gate.read().await;
        self.blocking(move |inner| inner.punch_hole(offset, len)).await
    }

    async fn write_same(&self, offset: u64, len: u64, pattern: Bytes) -> Result<(), DeviceError> {
        if pattern.is_empty() {
            return Err(DeviceError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "WRITE SAME pattern is empty: pass one logical block",
            )));
        }
        let _shared = self.inner.write_gate.read().await;
        self.blocking(move |inner| inner.fill(offset, len, &pattern))
            .await
    }

    async fn compare_and_write(&self, offset: u64, compare: Bytes, data: Bytes) -> Result<(), DeviceError> {
        let _exclusive = self.inner.write_gate.write().await;
        self.blocking(move |inner| {
            let current = inner.read_at(offset, compare.len())?;
            if let Some(at) = current.iter().zip(compare.iter()).position(|(a, b)| a != b) {
                return Err(DeviceError::Miscompare { offset: at as u64 });
            }
            inner.write_at(offset, &data, false)
        })
        .await
    }

    async fn provisioning(&self, offset: u64, max_len: u64) -> Result<(Provisioning, u64), DeviceError> {
        self.blocking(move |inner| inner.provisioning(offset, max_len))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(dir: &tempfile::TempDir, size: u64) -> FileDevice {
        let options = FileDeviceOptions {
            size: Some(size),
            ..FileDeviceOptions::default()
        };
        FileDevice::open(dir.path().join("lun.img"), options).expect("open a fresh file device")
    }

    fn pattern(len: usize, seed: u8) -> Bytes {
        Bytes::from(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect::<Vec<u8>>(),
        )
    }

    #[tokio::test]
    async fn small_write_reads_back_from_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, 1 << 20);
        let data = pattern(4096, 1);
        dev.write(8192, data.clone(), false).await.unwrap();
        assert_eq!(dev.read(8192, 4096).await.unwrap(), data);
    }

    #[tokio::test]
    async fn never_written_blocks_read_as_zeros_inline_and_through_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, 4 << 20);
        let small = dev.read(4096, 512).await.unwrap();
        assert!(small.iter().all(|b| *b == 0));
        let large = dev.read(1 << 20, (INLINE_IO_MAX * 4) as u32).await.unwrap();
        assert_eq!(large.len(), INLINE_IO_MAX * 4);
        assert!(large.iter().all(|b| *b == 0));
    }

    #[tokio::test]
    async fn inline_and_pooled_writes_are_seen_by_reads_of_either_size() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, 4 << 20);
        let big = pattern(INLINE_IO_MAX * 2, 7);
        dev.write(0, big.clone(), false).await.unwrap();
        let small = pattern(4096, 9);
        dev.write(4096, small.clone(), false).await.unwrap();
        let mut expected = big.to_vec();
        expected[4096..8192].copy_from_slice(&small);
        assert_eq!(&dev.read(0, big.len() as u32).await.unwrap()[..], &expected[..]);
        assert_eq!(dev.read(4096, 4096).await.unwrap(), small);
    }

    #[tokio::test]
    async fn fua_write_of_a_small_block_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, 1 << 20);
        let data = pattern(4096, 3);
        dev.write(0, data.clone(), true).await.unwrap();
        assert_eq!(dev.read(0, 4096).await.unwrap(), data);
    }

    #[tokio::test]
    async fn small_read_beyond_a_file_shrunk_behind_our_back_is_a_medium_error() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, 1 << 20);
        // Someone truncates the backing file: the page-cache read finds end
        // of file, and the blocking read must report it, not return zeros.
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("lun.img"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        match dev.read(65536, 4096).await {
            Err(DeviceError::Medium { offset, .. }) => assert_eq!(offset, 65536),
            other => panic!("expected a medium error, got {other:?}"),
        }
    }
}
