//! The block device a logical unit serves.
//!
//! The SCSI layer speaks in bytes, already range-checked against
//! [`Geometry::size_bytes`] (as the device reports it at that command) and aligned to the logical block size, so an
//! implementation only has to move data. Methods return `impl Future + Send`
//! so that the target can be generic over a device (a file here, the
//! replicated volume in `basalt-engine`) without boxing every I/O.

use std::future::Future;

use bytes::Bytes;

/// Shape of a device. Everything but the capacity is fixed for its lifetime;
/// the capacity may grow (an online expansion), never shrink: the SCSI layer
/// reads it per command and tells initiators when it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Capacity in bytes; a multiple of `logical_block_size`.
    pub size_bytes: u64,
    /// 512 (default) or 4096.
    pub logical_block_size: u32,
    /// log2(physical block / logical block): 3 for 4 KiB physical blocks under
    /// 512-byte logical blocks.
    pub physical_block_exponent: u8,
    /// Thin provisioned: unmapped blocks read as zeros and UNMAP gives space
    /// back (reported as LBPME/LBPRZ and in VPD 0xB2).
    pub thin: bool,
}

impl Geometry {
    /// Number of logical blocks.
    pub fn block_count(&self) -> u64 {
        self.size_bytes / u64::from(self.logical_block_size)
    }
}

/// Why a device operation failed. The SCSI layer maps each variant to sense
/// data; the text goes to the log.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Data could not be read back (reported as MEDIUM ERROR, UNRECOVERED
    /// READ ERROR, with the failing offset as INFORMATION).
    #[error("unrecoverable read error at byte offset {offset}: {reason}")]
    Medium { offset: u64, reason: String },
    /// COMPARE AND WRITE found different data (MISCOMPARE, with the offset of
    /// the first differing byte relative to the start of the compare).
    #[error("miscompare at byte {offset} of the compared range")]
    Miscompare { offset: u64 },
    /// The device cannot serve I/O right now (e.g. too few healthy replicas):
    /// reported as a retryable NOT READY / hardware error.
    #[error("device unavailable: {0}")]
    Unavailable(String),
    /// Any other I/O failure (reported as HARDWARE ERROR).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Provisioning status of a run of blocks, for GET LBA STATUS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioning {
    Mapped,
    Deallocated,
}

/// An async block device. All offsets and lengths are in bytes.
pub trait BlockDevice: Send + Sync + 'static {
    /// The device's shape now. Called for every command, so it must be cheap
    /// (a copy, an atomic load); the capacity it reports may grow between
    /// calls, and I/O up to the reported end must be accepted from then on.
    fn geometry(&self) -> Geometry;

    /// Read `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, DeviceError>> + Send;

    /// Write `data` at `offset`. With `fua` the data is durable when the
    /// future resolves; without it, only after a later [`BlockDevice::flush`].
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Make every write that completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Deallocate `len` bytes at `offset`: they read as zeros afterwards.
    fn unmap(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Write `len` bytes at `offset` filled with the one-block `pattern`.
    fn write_same(
        &self,
        offset: u64,
        len: u64,
        pattern: Bytes,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Atomically (against every other write) compare the range with
    /// `compare` and, if equal, write `data` there.
    fn compare_and_write(
        &self,
        offset: u64,
        compare: Bytes,
        data: Bytes,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Provisioning status of the run of bytes starting at `offset`, and the
    /// length of that run (at most `max_len`).
    fn provisioning(
        &self,
        offset: u64,
        max_len: u64,
    ) -> impl Future<Output = Result<(Provisioning, u64), DeviceError>> + Send;
}
