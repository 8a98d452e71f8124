//! The open index log of a writable layer: where each write's record goes before its data.
//!
//! A layer's log is append-only while the layer is writable (the head, or a snapshot being merged
//! into) and rewritten whole only when it is compacted or frozen ([`install_log`]). See [`super::log`]
//! for the record format and the crash rules the order of appends keeps.

use std::io;
use std::sync::Arc;

use basalt_proto::Revision;

use super::{lock, log, Backend, BlockState, Layer, Lba, Object, Record, StoreError, RECORD_LEN};

/// Bytes of index log mapped at a time, and the step in which a mapped log file grows (preallocated,
/// zero-filled): 1 MiB holds ~43,000 records, so the `fallocate` and `mmap` of the next window come
/// once every ~43,000 writes; the price is up to 1 MiB of zeros at the end of each log that was
/// appended to, read and skipped at open.
const LOG_WINDOW: u64 = 1 << 20;

/// The open index log of a writable layer.
///
/// Appends go through a shared memory mapping of the log where the backend offers one
/// ([`Object::map_for_append`]): a write's record is then a `memcpy` into the page cache instead of
/// a `pwrite`, which, appending past the end of the file, would also update its size in the file
/// system's journal every time: a large share of a 4 KiB store write (`benches/README.md`, "Store").
/// The order the crash rules
/// need ([`log`]: record before data) holds the same way: the record is in the page cache before the
/// data's `pwrite` starts, and a `kill -9` leaves the page cache alone. The file is preallocated a
/// [`LOG_WINDOW`] at a time, so the log ends in zeros, which the log's parser takes as its clean end.
pub(super) struct LogAppender {
    pub(super) object: Arc<dyn Object>,
    /// Where the next record goes: the log's logical end, not its file's length.
    pub(super) len: u64,
    /// Records in the log, for the compaction decision.
    pub(super) records: u64,
    window: LogWindow,
}

/// Where a [`LogAppender`]'s appends go.
enum LogWindow {
    /// Nothing mapped yet: the window is mapped at the first append, so a log that is opened but
    /// never appended to (a snapshot's, frozen by [`install_log`]) gets no preallocated tail.
    Unmapped,
    /// `[start, start + LOG_WINDOW)` of the log, mapped.
    Mapped { start: u64, map: memmap2::MmapMut },
    /// The backend cannot map the log: every append is an [`Object::write_at`].
    WriteAt,
}

impl LogAppender {
    /// Opens the index log `name` for appending at byte `len`, holding `records` records.
    pub(super) fn open(
        backend: &dyn Backend,
        name: &str,
        len: u64,
        records: u64,
    ) -> Result<LogAppender, StoreError> {
        let object = backend
            .open(name, 0)
            .map_err(StoreError::io(format!("opening {name}")))?;
        Ok(LogAppender {
            object: Arc::from(object),
            len,
            records,
            window: LogWindow::Unmapped,
        })
    }

    /// Opens the index log `name` for appending at its end, which must be clean (see
    /// [`log::logical_end`]).
    pub(super) fn open_at_end(
        backend: &dyn Backend,
        name: &str,
        count_records: bool,
    ) -> Result<LogAppender, StoreError> {
        let mut log = LogAppender::open(backend, name, 0, 0)?;
        log.len = log::logical_end(&*log.object).map_err(StoreError::io(format!("sizing {name}")))?;
        if count_records {
            log.records = log.len / RECORD_LEN as u64;
        }
        Ok(log)
    }

    /// Appends `bytes` (whole records, `records` of them) at the end of the log.
    pub(super) fn append(&mut self, bytes: &[u8], records: u64) -> io::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            match &mut self.window {
                LogWindow::Mapped { start, map } if self.len < *start + map.len() as u64 => {
                    let at = (self.len - *start) as usize;
                    let n = rest.len().min(map.len() - at);
                    map[at..at + n].copy_from_slice(&rest[..n]);
                    self.len += n as u64;
                    rest = &rest[n..];
                }
                LogWindow::WriteAt => {
                    self.object.write_at(rest, self.len)?;
                    self.len += rest.len() as u64;
                    rest = &[];
                }
                // Not mapped yet, or the window is full (a batch's records may straddle two).
                _ => {
                    self.window = LogWindow::Unmapped;
                    let start = self.len - self.len % LOG_WINDOW;
                    self.window = match self.object.map_for_append(start, LOG_WINDOW as usize)? {
                        Some(map) => LogWindow::Mapped { start, map },
                        None => LogWindow::WriteAt,
                    };
                }
            }
        }
        self.records += records;
        Ok(())
    }
}

/// Replaces a layer's log with exactly `blocks` followed by a flush marker, after syncing its data (the
/// new records are all trusted, so their data must be durable first). With `keep_open`, the layer's
/// appender is reopened on the new log.
pub(super) fn install_log(
    backend: &dyn Backend,
    layer: &Layer,
    blocks: impl Iterator<Item = (u64, BlockState)>,
    revision: Revision,
    keep_open: bool,
) -> Result<(), StoreError> {
    let name = layer.id.log_object();
    layer
        .data
        .sync()
        .map_err(StoreError::io(format!("syncing the data of {}", layer.id)))?;
    let mut bytes = Vec::new();
    let mut records = 0;
    log::encode_into(
        &mut bytes,
        blocks.map(|(lba, state)| {
            records += 1;
            Record::Block { lba: Lba(lba), state }
        }),
    );
    log::encode_into(&mut bytes, [Record::Flush { revision }]);
    backend
        .replace_blob(&name, &bytes)
        .map_err(StoreError::io(format!("rewriting {name}")))?;
    let mut log = lock(&layer.log);
    *log = None;
    if keep_open {
        *log = Some(LogAppender::open(
            backend,
            &name,
            bytes.len() as u64,
            records + 1,
        )?);
    }
    Ok(())
}
