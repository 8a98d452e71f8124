//! The per-layer index log: which blocks a layer holds, with their CRC32, and flush markers.
//!
//! ```text
//!  record (24 bytes, little endian)
//!  +------+-----+-----------+---------------------+----------+------------+
//!  | kind | 0 0 0 | data crc32 | lba or revision (u64) | reserved | record crc32 |
//!  +------+-----+-----------+---------------------+----------+------------+
//!    kind: 1 = Data (block holds data with this crc), 2 = Tombstone (block reads as zeros),
//!          3 = Flush (everything before this marker is durable; carries the revision)
//! ```
//!
//! The log is append-only. A write appends its record *before* it writes the data, so after a crash
//! every block whose data reached the file also has its record. Records after the last flush marker are
//! not trusted: at open each one is checked against the data on disk ([`resolve`]), newest first, and
//! the block keeps the newest record whose CRC matches (a tombstone always matches), else whatever it
//! had before the marker. Under `kill -9` the page cache survives and a 4 KiB page write is never torn,
//! so this yields exactly "old or new content, with a valid checksum".
//!
//! Where the log ends: a log file may be longer than its records, zero-filled past them (the store
//! preallocates the file it appends to through a memory mapping), so an all-zero record with nothing
//! but zeros after it is the **clean end**: no record is ever all zeros (its kind and its own CRC are
//! not). Any other record whose own CRC does not match ends the log as a **torn tail** (a `kill -9`
//! inside a record's copy, or power loss), and the log is rewritten before anything is appended --
//! appending after junk would let a later crash read the junk as records. A flush marker found
//! after such a record means the log is damaged in the middle, which is reported as corruption.

use std::ops::Range;

use basalt_proto::Revision;

use super::backend::Object;
use super::types::{Lba, BLOCK};
use super::StoreError;

/// Size of one encoded record.
pub(crate) const RECORD_LEN: usize = 24;

const KIND_DATA: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
const KIND_FLUSH: u8 = 3;

/// What one layer says about one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// The layer's data object holds the block; its content has this CRC32.
    Data { crc: u32 },
    /// The block was discarded in this layer: it reads as zeros whatever older layers hold.
    Tombstone,
}

/// One entry of an index log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    Block { lba: Lba, state: BlockState },
    Flush { revision: Revision },
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        let (kind, crc, value) = match *self {
            Record::Block {
                lba,
                state: BlockState::Data { crc },
            } => (KIND_DATA, crc, lba.0),
            Record::Block {
                lba,
                state: BlockState::Tombstone,
            } => (KIND_TOMBSTONE, 0, lba.0),
            Record::Flush { revision } => (KIND_FLUSH, 0, revision.0),
        };
        out[0] = kind;
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        out[8..16].copy_from_slice(&value.to_le_bytes());
        let record_crc = crc32fast::hash(&out[..20]);
        out[20..24].copy_from_slice(&record_crc.to_le_bytes());
        out
    }

    /// Decodes one record; `None` if it is torn, zeroed or otherwise not a record.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let bytes: &[u8; RECORD_LEN] = bytes.try_into().ok()?;
        let record_crc = u32::from_le_bytes(bytes[20..24].try_into().ok()?);
        if crc32fast::hash(&bytes[..20]) != record_crc || bytes[1..4] != [0, 0, 0] {
            return None;
        }
        let crc = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
        let value = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
        match bytes[0] {
            KIND_DATA => Some(Record::Block {
                lba: Lba(value),
                state: BlockState::Data { crc },
            }),
            KIND_TOMBSTONE => Some(Record::Block {
                lba: Lba(value),
                state: BlockState::Tombstone,
            }),
            KIND_FLUSH => Some(Record::Flush {
                revision: Revision(value),
            }),
            _ => None,
        }
    }
}

/// Appends the encoding of `records` to `out`.
pub(crate) fn encode_into(out: &mut Vec<u8>, records: impl IntoIterator<Item = Record>) {
    let records = records.into_iter();
    // A compacted head log is megabytes: grown by doubling, it was copied and faulted in several times.
    out.reserve(records.size_hint().0 * RECORD_LEN);
    for record in records {
        out.extend_from_slice(&record.encode());
    }
}

/// A log split at its last flush marker.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ParsedLog {
    /// Block records before the last flush marker, in log order: trusted.
    pub trusted: Vec<(Lba, BlockState)>,
    /// Block records after it, in log order: to be checked against the data.
    pub unverified: Vec<(Lba, BlockState)>,
    /// Revision of the last flush marker.
    pub last_revision: Option<Revision>,
    /// Whether the log ended in bytes that are not a record (a torn tail).
    pub torn_tail: bool,
}

/// Parses a whole log. `what` names it in errors.
///
/// A large log is decoded in two halves on two threads (a head holding 1 GiB has 262,144 records,
/// ~5 ms of decoding and checksumming, and a returning replica misses writes while it opens); the
/// halves are joined as if read in one pass, and a log that ends early in its first half (a torn
/// or cleanly ended log) is taken from the first half alone, exactly as one pass would.
pub(crate) fn parse(bytes: &[u8], what: &str, volume_blocks: u64) -> Result<ParsedLog, StoreError> {
    parse_split(bytes, what, volume_blocks, PARALLEL_PARSE_RECORDS)
}

/// [`parse`], on two threads from `parallel_from` records.
fn parse_split(
    bytes: &[u8],
    what: &str,
    volume_blocks: u64,
    parallel_from: usize,
) -> Result<ParsedLog, StoreError> {
    let records = bytes.len() / RECORD_LEN;
    let mut decoded = if records < parallel_from.max(2) {
        decode_run(bytes, 0, records, volume_blocks)
    } else {
        let half = records / 2;
        let (first, second) = std::thread::scope(|scope| {
            let second = scope.spawn(|| decode_run(bytes, half, records, volume_blocks));
            let first = decode_run(bytes, 0, half, volume_blocks);
            let second = second
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (first, second)
        });
        first.join(second)
    };
    if decoded.ended_at.is_none() && records * RECORD_LEN < bytes.len() {
        // Bytes after the last whole record: not a record either.
        decoded.ended_at = Some(records);
    }
    if let Some(lba) = decoded.beyond_volume {
        return Err(StoreError::Corrupt {
            what: what.to_string(),
            detail: format!("{lba} is beyond the end of the volume"),
        });
    }
    let DecodedRun {
        mut blocks,
        last_marker,
        ended_at,
        ..
    } = decoded;
    // Where the records stop, anything but zeros is a torn tail.
    let torn_at = ended_at.filter(|&end| !is_clean_end(&bytes[end * RECORD_LEN..]));
    if let Some(end) = torn_at {
        let rest = bytes.get((end + 1) * RECORD_LEN..).unwrap_or_default();
        if rest
            .chunks(RECORD_LEN)
            .any(|c| matches!(Record::decode(c), Some(Record::Flush { .. })))
        {
            return Err(StoreError::Corrupt {
                what: what.to_string(),
                detail: format!(
                    "damaged record at byte {} before a later flush marker",
                    end * RECORD_LEN
                ),
            });
        }
    }
    let (trusted, last_revision) = last_marker.map_or((0, None), |(at, revision)| (at, Some(revision)));
    // Split without copying the (large) trusted part; a log with no marker is all unverified.
    let unverified = match trusted {
        0 => std::mem::take(&mut blocks),
        _ => blocks.split_off(trusted),
    };
    Ok(ParsedLog {
        trusted: blocks,
        unverified,
        last_revision,
        torn_tail: torn_at.is_some(),
    })
}

/// Records from which [`parse`] decodes a log on two threads: below it a thread costs more than it
/// saves.
const PARALLEL_PARSE_RECORDS: usize = 1 << 16;

/// What decoding records `from..to` of a log found.
#[derive(Debug)]
struct DecodedRun {
    /// One pass straight into the block list: a head log holds a record per block written, and an
    /// intermediate list of records would cost a copy of all of them at every open.
    blocks: Vec<(Lba, BlockState)>,
    /// The last flush marker: how many of `blocks` came before it, and its revision.
    last_marker: Option<(usize, Revision)>,
    /// The first record that is not one (zeros or damage), as a record number of the whole log:
    /// where the log ends.
    ended_at: Option<usize>,
    /// A block record beyond the end of the volume, before `ended_at`: the log is corrupt.
    beyond_volume: Option<Lba>,
}

/// Decodes records `from..to` of `bytes`, stopping at the first one that is not a record or that
/// names a block beyond the volume.
fn decode_run(bytes: &[u8], from: usize, to: usize, volume_blocks: u64) -> DecodedRun {
    let mut run = DecodedRun {
        blocks: Vec::with_capacity(to - from),
        last_marker: None,
        ended_at: None,
        beyond_volume: None,
    };
    for (i, chunk) in bytes[from * RECORD_LEN..to * RECORD_LEN]
        .chunks_exact(RECORD_LEN)
        .enumerate()
    {
        match Record::decode(chunk) {
            Some(Record::Block { lba, .. }) if lba.0 >= volume_blocks => {
                run.beyond_volume = Some(lba);
                break;
            }
            Some(Record::Block { lba, state }) => run.blocks.push((lba, state)),
            Some(Record::Flush { revision }) => run.last_marker = Some((run.blocks.len(), revision)),
            None => {
                run.ended_at = Some(from + i);
                break;
            }
        }
    }
    run
}

impl DecodedRun {
    /// The run of the records that follow this one's, joined as one pass over both would have
    /// found them: if this one stopped (the log ended, or a record was out of range), what follows
    /// is never read.
    fn join(mut self, next: DecodedRun) -> DecodedRun {
        if self.ended_at.is_some() || self.beyond_volume.is_some() {
            return self;
        }
        let before = self.blocks.len();
        self.blocks.extend_from_slice(&next.blocks);
        DecodedRun {
            blocks: self.blocks,
            last_marker: next
                .last_marker
                .map(|(at, revision)| (before + at, revision))
                .or(self.last_marker),
            ended_at: next.ended_at,
            beyond_volume: next.beyond_volume,
        }
    }
}

/// Sorts `records` (given in the order they were written) by block and keeps only the last record of
/// each block: what replaying them one by one into a map would leave, in a stable sort (which
/// finds the runs already in order: a sequential write, or each layer of a chain) and one pass.
pub(crate) fn replay_in_place<T: Copy>(records: &mut Vec<(u64, T)>) {
    // Stable, so the records of one block stay in written order and the last of them survives
    // `dedup_by` (which hands over the later element first and removes it when told to).
    records.sort_by_key(|&(lba, _)| lba);
    records.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            *kept = *later;
        }
        same
    });
}

/// The blocks one layer holds, in block order, each once.
///
/// A sorted vector rather than a map: it is built once per open from the log (a stable sort of
/// records that are mostly in order already, then keeping the last record of each block, which is
/// exactly log replay) and then only read in order or by range, which a map would do no faster at
/// several times the cost to build.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LayerBlocks(Vec<(u64, BlockState)>);

impl LayerBlocks {
    /// Replays `records` in log order: the last record of each block wins.
    pub fn replay(mut records: Vec<(u64, BlockState)>) -> LayerBlocks {
        replay_in_place(&mut records);
        // A list outlives its open (it is the head's ordered index in the map), and a log that
        // rewrote its blocks many times leaves most of the room it was decoded into unused.
        if records.capacity() / 2 > records.len() {
            records.shrink_to_fit();
        }
        LayerBlocks(records)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// In block order.
    pub fn as_slice(&self) -> &[(u64, BlockState)] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<(u64, BlockState)> {
        self.0
    }

    /// The blocks among `lbas`, in block order.
    pub fn range(&self, lbas: Range<u64>) -> &[(u64, BlockState)] {
        let start = self.0.partition_point(|&(lba, _)| lba < lbas.start);
        let end = start + self.0[start..].partition_point(|&(lba, _)| lba < lbas.end);
        &self.0[start..end]
    }
}

/// Whether the bytes after a log's last record are its clean end (see the module doc): only zeros.
fn is_clean_end(rest: &[u8]) -> bool {
    rest.iter().all(|&b| b == 0)
}

/// The logical end of a log whose end is clean (every byte after its last record is zero): one past
/// its last record. Found from the end of the object backwards, so a preallocated tail costs one read
/// per 64 KiB of it, whatever the log's length.
pub(crate) fn logical_end(object: &dyn Object) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut end = object.len()?;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        object.read_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b != 0) {
            // The last nonzero byte is inside the last record (a record may end in zero bytes).
            return Ok((start + i as u64 + 1).next_multiple_of(RECORD_LEN as u64));
        }
        end = start;
    }
    Ok(0)
}

/// The blocks one layer holds, after recovery.
#[derive(Debug, Default)]
pub(crate) struct LayerIndex {
    pub blocks: LayerBlocks,
    /// The log holds unverified records or a torn tail: it must be rewritten (after syncing the data)
    /// before anything is appended, or a later flush marker would vouch for records that were discarded.
    pub needs_rewrite: bool,
    pub last_revision: Option<Revision>,
}

impl LayerIndex {
    pub fn data_blocks(&self) -> u64 {
        self.blocks
            .as_slice()
            .iter()
            .filter(|(_, s)| matches!(s, BlockState::Data { .. }))
            .count() as u64
    }

    pub fn tombstones(&self) -> u64 {
        self.blocks.len() as u64 - self.data_blocks()
    }
}

/// Replays a parsed log against the layer's data: trusted records as they are, unverified ones only if
/// the data on disk matches them (see the module doc).
pub(crate) fn resolve(parsed: ParsedLog, data: &dyn Object, what: &str) -> Result<LayerIndex, StoreError> {
    let needs_rewrite = parsed.torn_tail || !parsed.unverified.is_empty();
    let last_revision = parsed.last_revision;
    // Each block named after the marker, with its records newest first (a stable sort by block of
    // the reversed tail): the first record that matches the data wins. Reading them in block order
    // also reads the data object front to back.
    let mut candidates: Vec<(u64, BlockState)> = parsed
        .unverified
        .iter()
        .rev()
        .map(|&(lba, state)| (lba.0, state))
        .collect();
    candidates.sort_by_key(|&(lba, _)| lba);
    // In place: `Lba` is a plain `u64`, so this reuses the trusted list's allocation, whose spare
    // room (sized for the whole log) takes the accepted tail records.
    let mut records: Vec<(u64, BlockState)> = parsed
        .trusted
        .into_iter()
        .map(|(lba, state)| (lba.0, state))
        .collect();
    let mut block = vec![0u8; BLOCK];
    for newest_first in candidates.chunk_by(|a, b| a.0 == b.0) {
        let lba = newest_first[0].0;
        let mut on_disk: Option<u32> = None;
        for &(_, state) in newest_first {
            let accept = match state {
                BlockState::Tombstone => true,
                BlockState::Data { crc } => {
                    let actual = match on_disk {
                        Some(c) => c,
                        None => {
                            data.read_at(&mut block, Lba(lba).byte_offset())
                                .map_err(|e| StoreError::Io {
                                    context: format!("verifying {} of {what}", Lba(lba)),
                                    source: e,
                                })?;
                            *on_disk.insert(crc32fast::hash(&block))
                        }
                    };
                    actual == crc
                }
            };
            if accept {
                // After every trusted record: it wins the replay.
                records.push((lba, state));
                break;
            }
        }
    }
    Ok(LayerIndex {
        blocks: LayerBlocks::replay(records),
        needs_rewrite,
        last_revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a log file may hold, record by record.
    #[derive(Clone, Debug)]
    enum Piece {
        Data(u64, u32),
        Tombstone(u64),
        Flush(u64),
        /// A record torn by a crash: its own CRC does not match.
        Damaged,
        /// The zeros of a preallocated tail.
        Zeros,
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            6 => (0..40u64, any::<u32>()).prop_map(|(lba, crc)| Piece::Data(lba, crc)),
            1 => (0..40u64).prop_map(Piece::Tombstone),
            2 => (0..1000u64).prop_map(Piece::Flush),
            1 => Just(Piece::Damaged),
            1 => Just(Piece::Zeros),
        ]
    }

    fn encode_pieces(pieces: &[Piece]) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in pieces {
            let record = match *piece {
                Piece::Data(lba, crc) => Record::Block {
                    lba: Lba(lba),
                    state: BlockState::Data { crc },
                },
                Piece::Tombstone(lba) => Record::Block {
                    lba: Lba(lba),
                    state: BlockState::Tombstone,
                },
                Piece::Flush(revision) => Record::Flush {
                    revision: Revision(revision),
                },
                Piece::Damaged => {
                    let mut bytes = Record::Flush {
                        revision: Revision(1),
                    }
                    .encode();
                    bytes[9] ^= 0x10;
                    out.extend_from_slice(&bytes);
                    continue;
                }
                Piece::Zeros => {
                    out.extend_from_slice(&[0; RECORD_LEN]);
                    continue;
                }
            };
            out.extend_from_slice(&record.encode());
        }
        out
    }

    proptest! {
        /// Decoding on two threads finds exactly what one pass finds -- the blocks, the split at the
        /// last marker, a torn or clean end, corruption -- wherever the halves meet: at a marker,
        /// inside a torn stretch, in the zeros of a clean end, or after a record beyond the volume.
        #[test]
        fn a_log_parsed_in_two_halves_reads_as_one_pass_reads_it(
            pieces in proptest::collection::vec(piece(), 0..60),
            ragged in 0..RECORD_LEN,
            volume_blocks in 30..50u64,
        ) {
            let mut bytes = encode_pieces(&pieces);
            // A few bytes of a record cut short, zeros or not.
            bytes.extend((0..ragged).map(|i| (i % 3) as u8));
            let one_pass = parse_split(&bytes, "log", volume_blocks, usize::MAX);
            let two_halves = parse_split(&bytes, "log", volume_blocks, 2);
            match (one_pass, two_halves) {
                (Ok(one), Ok(two)) => prop_assert_eq!(one, two),
                (Err(one), Err(two)) => prop_assert_eq!(one.to_string(), two.to_string()),
                (one, two) => prop_assert!(false, "one pass {:?}, two halves {:?}", one, two),
            }
        }
    }

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let records = [
            Record::Block {
                lba: Lba(7),
                state: BlockState::Data { crc: 0xdead_beef },
            },
            Record::Block {
                lba: Lba(u64::MAX >> 12),
                state: BlockState::Tombstone,
            },
            Record::Flush {
                revision: Revision(42),
            },
        ];
        for record in records {
            let mut bytes = record.encode();
            assert_eq!(Record::decode(&bytes), Some(record));
            bytes[9] ^= 1;
            assert_eq!(Record::decode(&bytes), None);
        }
        assert_eq!(Record::decode(&[0u8; RECORD_LEN]), None);
    }

    #[test]
    fn records_after_the_last_marker_are_unverified_and_a_torn_tail_is_dropped() {
        let mut log = Vec::new();
        encode_into(
            &mut log,
            [
                Record::Block {
                    lba: Lba(1),
                    state: BlockState::Data { crc: 1 },
                },
                Record::Flush {
                    revision: Revision(5),
                },
                Record::Block {
                    lba: Lba(2),
                    state: BlockState::Tombstone,
                },
            ],
        );
        log.extend_from_slice(&[0xff; 10]);
        let parsed = parse(&log, "test log", 100).unwrap();
        assert_eq!(parsed.trusted, vec![(Lba(1), BlockState::Data { crc: 1 })]);
        assert_eq!(parsed.unverified, vec![(Lba(2), BlockState::Tombstone)]);
        assert_eq!(parsed.last_revision, Some(Revision(5)));
        assert!(parsed.torn_tail);
    }

    fn data(lba: u64) -> Record {
        Record::Block {
            lba: Lba(lba),
            state: BlockState::Data { crc: lba as u32 },
        }
    }

    fn flush(revision: u64) -> Record {
        Record::Flush {
            revision: Revision(revision),
        }
    }

    /// Two records, a marker and one record after it, then `tail`.
    fn log_with_tail(tail: &[u8]) -> Vec<u8> {
        let mut log = Vec::new();
        encode_into(&mut log, [data(1), flush(3), data(2)]);
        log.extend_from_slice(tail);
        log
    }

    #[test]
    fn zeros_after_the_last_record_are_the_clean_end_of_the_log() {
        // A preallocated tail: whole zero records, then a partial one (a file grown in MiB steps).
        for tail in [&[][..], &[0; RECORD_LEN], &[0; 10 * RECORD_LEN + 7]] {
            let parsed = parse(&log_with_tail(tail), "test log", 100).unwrap();
            assert!(!parsed.torn_tail, "{} zero bytes", tail.len());
            assert_eq!(parsed.trusted, vec![(Lba(1), BlockState::Data { crc: 1 })]);
            assert_eq!(parsed.unverified, vec![(Lba(2), BlockState::Data { crc: 2 })]);
            assert_eq!(parsed.last_revision, Some(Revision(3)));
        }
    }

    #[test]
    fn a_damaged_record_before_zeros_or_anything_after_zeros_is_a_torn_tail() {
        // A record half copied when the process was killed: some of its bytes, zeros after.
        let mut half = data(9).encode();
        half[12..].fill(0);
        let mut damaged_then_zeros = half.to_vec();
        damaged_then_zeros.extend_from_slice(&[0; 100]);
        // A zero record with bytes after it: appending there would later read them as records.
        let mut zeros_then_junk = vec![0u8; 2 * RECORD_LEN];
        zeros_then_junk[RECORD_LEN + 5] = 1;
        let mut zeros_then_record = vec![0u8; RECORD_LEN];
        zeros_then_record.extend_from_slice(&data(4).encode());
        for (what, tail) in [
            ("a half-copied record", damaged_then_zeros),
            ("a stray byte after zeros", zeros_then_junk),
            ("a record after zeros", zeros_then_record),
        ] {
            let parsed = parse(&log_with_tail(&tail), "test log", 100).unwrap();
            assert!(parsed.torn_tail, "{what}");
            assert_eq!(
                parsed.unverified,
                vec![(Lba(2), BlockState::Data { crc: 2 })],
                "{what}"
            );
        }
    }

    #[test]
    fn damage_or_zeros_before_a_later_flush_marker_are_corruption() {
        let mut damaged = data(9).encode();
        damaged[0] = 0x7f;
        for (what, gap) in [("a damaged record", damaged), ("a zero record", [0; RECORD_LEN])] {
            let mut tail = gap.to_vec();
            encode_into(&mut tail, [flush(4)]);
            tail.extend_from_slice(&[0; 3 * RECORD_LEN]);
            assert!(
                matches!(
                    parse(&log_with_tail(&tail), "test log", 100),
                    Err(StoreError::Corrupt { .. })
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn the_logical_end_of_a_clean_log_is_past_its_last_record_whatever_its_last_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::store::DirBackend::new(dir.path()).unwrap();
        let object = crate::store::Backend::create(&backend, "log", 0).unwrap();
        assert_eq!(logical_end(&*object).unwrap(), 0, "an empty log");
        // A record whose own CRC ends in a zero byte: the end is still after the whole record.
        let ends_in_zero = (0..).map(data).find(|r| r.encode()[RECORD_LEN - 1] == 0).unwrap();
        let mut log = Vec::new();
        encode_into(&mut log, [data(1), flush(2), ends_in_zero]);
        object.write_at(&log, 0).unwrap();
        assert_eq!(logical_end(&*object).unwrap(), 3 * RECORD_LEN as u64);
        // Followed by zeros over more than one of the backward reads.
        object.write_at(&vec![0; 300_000], log.len() as u64).unwrap();
        assert_eq!(logical_end(&*object).unwrap(), 3 * RECORD_LEN as u64);
    }

    #[test]
    fn damage_before_a_flush_marker_is_corruption() {
        let mut log = Vec::new();
        encode_into(
            &mut log,
            [
                Record::Block {
                    lba: Lba(1),
                    state: BlockState::Data { crc: 1 },
                },
                Record::Flush {
                    revision: Revision(1),
                },
            ],
        );
        log[3] = 9;
        assert!(matches!(
            parse(&log, "test log", 100),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn replay_keeps_the_last_record_of_each_block_and_the_newest_tail_record_the_data_matches() {
        use crate::store::backend::{Backend, DirBackend};

        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        let data = backend.create("data", 1 << 20).unwrap();
        let block = |byte: u8| vec![byte; BLOCK];
        let crc = |byte: u8| crc32fast::hash(&block(byte));
        data.write_at(&block(0xa), Lba(3).byte_offset()).unwrap();
        let record = |lba, state| Record::Block { lba: Lba(lba), state };
        let data_of = |crc| BlockState::Data { crc };
        let mut log = Vec::new();
        encode_into(
            &mut log,
            [
                // Trusted, out of order, with overwrites: the last record of a block wins.
                record(7, data_of(4)),
                record(5, data_of(1)),
                record(3, data_of(2)),
                record(5, BlockState::Tombstone),
                record(7, data_of(5)),
                Record::Flush {
                    revision: Revision(1),
                },
                // Unverified: block 3 was written twice, and only the older write reached the data.
                record(3, data_of(crc(0xa))),
                record(3, data_of(crc(0xb))),
                // A tombstone needs no data; a write that never reached the data leaves the block
                // as the trusted records have it (block 7) or not held at all (block 9).
                record(5, data_of(crc(0xc))),
                record(5, BlockState::Tombstone),
                record(7, data_of(crc(0xd))),
                record(9, data_of(crc(0xe))),
            ],
        );
        let parsed = parse(&log, "test log", 256).unwrap();
        let index = resolve(parsed, &*data, "test log").unwrap();
        assert_eq!(
            index.blocks.as_slice(),
            [
                (3, data_of(crc(0xa))),
                (5, BlockState::Tombstone),
                (7, data_of(5)),
            ]
        );
        assert!(index.needs_rewrite);
        assert_eq!(index.last_revision, Some(Revision(1)));
        assert_eq!(index.blocks.range(4..8), &index.blocks.as_slice()[1..]);
        assert_eq!(index.blocks.range(8..100), []);
    }
}
