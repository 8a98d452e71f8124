//! The fixed 52-byte frame header and the encoder that renders a [`Frame`]
//! into header + untouched payload (see the layout in the parent module).
//!
//! Encoding never copies a payload: [`EncodedFrame`] owns the rendered header
//! and a clone of the payload's `Bytes` (a reference-count increment), and is
//! itself a [`Buf`] whose `chunks_vectored` yields the pieces for one
//! vectored write. A payload may come in two pieces: a `WriteV`'s extent
//! list, rendered here, then its data, which is the `ReadV` answer the
//! controller received and is sent on as it is.

use bytes::{Buf, Bytes};

use super::{
    pb, BlockCrc, BlockRun, EncodeError, Extent, Frame, LayerBlock, LayerBlockState, Message,
    ProtocolVersion, SyncPoint, WrittenAnswer, MAX_ERROR_MESSAGE, MAX_PAYLOAD, REPLY_BIT,
};

/// Size of the fixed header in front of every payload.
pub const HEADER_LEN: usize = 52;

/// The first four bytes of every frame: ASCII `BSLT`.
pub const MAGIC: [u8; 4] = *b"BSLT";

/// The CRC covers the header up to (not including) itself, then the payload.
pub(super) const CRC_OFFSET: usize = 48;

/// Write flag: the write must be durable before it is acknowledged.
pub(super) const FLAG_FUA: u8 = 0x01;

/// Resize flag: only say whether the resize could be done; change nothing.
pub(super) const FLAG_CHECK_ONLY: u8 = 0x02;

/// The header fields, decoded but not yet interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RawHeader {
    pub version: u16,
    pub op: u8,
    pub flags: u8,
    pub id: u64,
    pub epoch: u64,
    /// Byte offset in requests, status detail in failed replies.
    pub offset: u64,
    pub length: u64,
    pub status: u16,
    pub reserved: u16,
    pub payload_len: u32,
    pub crc: u32,
}

impl RawHeader {
    /// Reads the fields; checks nothing (the codec does, in a fixed order).
    pub fn parse(b: &[u8; HEADER_LEN]) -> RawHeader {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        RawHeader {
            version: u16_at(4),
            op: b[6],
            flags: b[7],
            id: u64_at(8),
            epoch: u64_at(16),
            offset: u64_at(24),
            length: u64_at(32),
            status: u16_at(40),
            reserved: u16_at(42),
            payload_len: u32_at(44),
            crc: u32_at(CRC_OFFSET),
        }
    }

    /// Renders the header with a zero CRC field.
    fn render(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = self.op;
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        b[40..42].copy_from_slice(&self.status.to_le_bytes());
        b[42..44].copy_from_slice(&self.reserved.to_le_bytes());
        b[44..48].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }
}

/// CRC32 (IEEE) of a payload, to encode the same payload in several frames
/// with [`Frame::encode_with_payload_crc`] while reading it only once.
pub fn payload_crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// [`payload_crc`] of a payload in two pieces, without joining them.
fn split_payload_crc(head: &[u8], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(data);
    h.finalize()
}

/// The frame CRC: header bytes `0..48`, then the payload, combined from the
/// payload's own CRC so that the payload need not be read again.
pub(super) fn frame_crc(header: &[u8], payload_crc: u32, payload_len: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..CRC_OFFSET]);
    h.combine(&crc32fast::Hasher::new_with_initial_len(payload_crc, payload_len));
    h.finalize()
}

/// A frame ready for the socket: rendered header plus the payload by
/// reference. As a [`Buf`] it yields the header, then the payload (its head,
/// if any, then its data).
#[derive(Clone, Debug)]
pub struct EncodedFrame {
    header: [u8; HEADER_LEN],
    /// The part of the payload rendered by the encoder in front of `payload`
    /// (a `WriteV`'s extent list); empty for every other message.
    payload_head: Bytes,
    payload: Bytes,
    /// How much of the header has been consumed through [`Buf::advance`].
    header_pos: usize,
}

impl EncodedFrame {
    /// The rendered header (with its CRC).
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// The payload's data, shared with the [`Frame`] it came from. For a
    /// `WriteV` the payload starts with its extent list
    /// ([`EncodedFrame::payload_head`]) and this is what follows it; for
    /// every other message it is the whole payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// What the payload holds before [`EncodedFrame::payload`]: a
    /// `WriteV`'s extent list, empty otherwise.
    pub fn payload_head(&self) -> &Bytes {
        &self.payload_head
    }

    /// Header plus payload length.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload_head.len() + self.payload.len()
    }
}

impl Buf for EncodedFrame {
    fn remaining(&self) -> usize {
        HEADER_LEN - self.header_pos + self.payload_head.len() + self.payload.len()
    }

    fn chunk(&self) -> &[u8] {
        if self.header_pos < HEADER_LEN {
            &self.header[self.header_pos..]
        } else if !self.payload_head.is_empty() {
            &self.payload_head
        } else {
            &self.payload
        }
    }

    fn advance(&mut self, mut cnt: usize) {
        let in_header = (HEADER_LEN - self.header_pos).min(cnt);
        self.header_pos += in_header;
        cnt -= in_header;
        let in_head = self.payload_head.len().min(cnt);
        self.payload_head.advance(in_head);
        self.payload.advance(cnt - in_head);
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        let chunks = [
            &self.header[self.header_pos..],
            &self.payload_head[..],
            &self.payload[..],
        ];
        for chunk in chunks {
            if n == dst.len() {
                break;
            }
            if !chunk.is_empty() {
                dst[n] = std::io::IoSlice::new(chunk);
                n += 1;
            }
        }
        n
    }
}

impl Frame {
    /// Renders the header and attaches the payload without copying it.
    pub fn encode(&self) -> Result<EncodedFrame, EncodeError> {
        let (raw, head, payload) = self.to_raw()?;
        let crc = split_payload_crc(&head, &payload);
        Ok(finish(raw, head, payload, crc))
    }

    /// Like [`Frame::encode`], with the CRC of the whole payload already
    /// computed by [`payload_crc`] (a controller sending one write to three
    /// replicas checksums it once). A wrong `payload_crc` produces a frame
    /// that the receiver rejects.
    pub fn encode_with_payload_crc(&self, payload_crc: u32) -> Result<EncodedFrame, EncodeError> {
        let (raw, head, payload) = self.to_raw()?;
        Ok(finish(raw, head, payload, payload_crc))
    }

    /// Maps the message onto header fields and a payload, the latter in two
    /// pieces: what the encoder renders (empty for the messages that carry
    /// data) and the message's data (empty for the others) -- except a
    /// `WriteV`, which has both.
    fn to_raw(&self) -> Result<(RawHeader, Bytes, Bytes), EncodeError> {
        use Message as M;
        let (op, is_reply) = self.message.op();
        let mut raw = RawHeader {
            version: ProtocolVersion::CURRENT.0,
            op: op as u8 | if is_reply { REPLY_BIT } else { 0 },
            flags: 0,
            id: self.id.0,
            epoch: self.epoch.0,
            offset: 0,
            length: 0,
            status: 0,
            reserved: 0,
            payload_len: 0,
            crc: 0,
        };
        let mut head = Bytes::new();
        let payload = match &self.message {
            M::Hello {
                volume,
                min_version,
                max_version,
                writer,
                nonce,
            } => pb_bytes(&pb::Hello {
                volume_uuid: volume.0.as_bytes().to_vec(),
                min_version: u32::from(min_version.0),
                max_version: u32::from(max_version.0),
                writer: *writer,
                client_nonce: nonce.0.to_vec(),
            }),
            M::HelloOk {
                version,
                volume,
                nonce,
                proof,
            } => pb_bytes(&pb::HelloReply {
                version: u32::from(version.0),
                volume_uuid: volume.0.as_bytes().to_vec(),
                replica_nonce: nonce.0.to_vec(),
                replica_proof: proof.0.to_vec(),
                ..Default::default()
            }),
            M::AuthOk { replica, membership } => pb_bytes(&pb::AuthReply {
                volume_uuid: replica.volume.0.as_bytes().to_vec(),
                size_bytes: replica.size_bytes,
                epoch: replica.epoch.0,
                revision: replica.revision.0,
                membership: membership.clone(),
            }),
            M::Auth { proof } => pb_bytes(&pb::Auth {
                proof: proof.0.to_vec(),
            }),
            M::SetMembership(membership) => pb_bytes(membership),
            M::Read { offset, len } => {
                if *len > MAX_PAYLOAD {
                    return Err(EncodeError::Oversize { len: u64::from(*len) });
                }
                raw.offset = *offset;
                raw.length = u64::from(*len);
                Bytes::new()
            }
            M::Write { offset, data, fua } => {
                raw.offset = *offset;
                raw.length = data.len() as u64;
                if *fua {
                    raw.flags |= FLAG_FUA;
                }
                data.clone()
            }
            // Read answers: the data, its length in the length field too.
            M::ReadOk { data }
            | M::ReadLayerOk { data }
            | M::ReadVOk { data }
            | M::ReadSnapshotOk { data } => {
                raw.length = data.len() as u64;
                data.clone()
            }
            M::Unmap { offset, len } => {
                raw.offset = *offset;
                raw.length = *len;
                Bytes::new()
            }
            M::FlushOk { revision } => {
                raw.offset = revision.0;
                Bytes::new()
            }
            M::Resize {
                size_bytes,
                check_only,
            } => {
                raw.offset = *size_bytes;
                if *check_only {
                    raw.flags |= FLAG_CHECK_ONLY;
                }
                Bytes::new()
            }
            M::ResizeOk { size_bytes } => {
                raw.offset = *size_bytes;
                Bytes::new()
            }
            M::InfoOk(info) => pb_bytes(info),
            M::BlockCrcs { start_lba, count } => {
                raw.offset = *start_lba;
                raw.length = *count;
                Bytes::new()
            }
            M::BlockCrcsOk(list) => put_block_crcs(list),
            M::RunCrcs { runs } => put_block_runs(runs),
            M::RunCrcsOk { crcs, end_lba } => {
                raw.offset = *end_lba;
                put_block_crcs(crcs)
            }
            M::ReadV { extents } => {
                Extent::check_list(extents)?;
                put_extents(extents)
            }
            M::WriteV { extents, data } => {
                let total = Extent::check_list(extents)?;
                if data.len() as u64 != u64::from(total) {
                    return Err(EncodeError::ExtentsMismatch {
                        extents: u64::from(total),
                        data: data.len() as u64,
                    });
                }
                raw.length = data.len() as u64;
                head = put_extents(extents);
                data.clone()
            }
            M::LayerBlocks {
                snapshot,
                start_lba,
                count,
            }
            | M::SnapshotRuns {
                snapshot,
                start_lba,
                count,
            } => {
                raw.offset = *start_lba;
                raw.length = *count;
                pb_bytes(&pb::SnapshotRequest {
                    name: snapshot.clone(),
                })
            }
            M::LayerBlocksOk { blocks, end_lba } => {
                raw.offset = *end_lba;
                let mut buf = bytes::BytesMut::with_capacity(blocks.len() * LayerBlock::WIRE_LEN);
                for b in blocks {
                    let (kind, crc) = match b.state {
                        LayerBlockState::Data { crc } => (LayerBlock::KIND_DATA, crc),
                        LayerBlockState::Tombstone => (LayerBlock::KIND_TOMBSTONE, 0),
                    };
                    buf.extend_from_slice(&b.lba.to_le_bytes());
                    buf.extend_from_slice(&[kind]);
                    buf.extend_from_slice(&crc.to_le_bytes());
                }
                buf.freeze()
            }
            M::ReadLayer {
                snapshot,
                offset,
                len,
            }
            | M::ReadSnapshot {
                snapshot,
                offset,
                len,
            } => {
                if *len > MAX_PAYLOAD {
                    return Err(EncodeError::Oversize { len: u64::from(*len) });
                }
                raw.offset = *offset;
                raw.length = u64::from(*len);
                pb_bytes(&pb::SnapshotRequest {
                    name: snapshot.clone(),
                })
            }
            M::SnapshotRunsOk { runs, end_lba } => {
                raw.offset = *end_lba;
                put_block_runs(runs)
            }
            M::SnapshotHold { snapshot, holder } | M::SnapshotRelease { snapshot, holder } => {
                pb_bytes(&pb::SnapshotHoldRequest {
                    name: snapshot.clone(),
                    holder: holder.clone(),
                })
            }
            M::HoldListOk(holds) => pb_bytes(&pb::HoldList { holds: holds.clone() }),
            M::WrittenSince { since, start_lba } => {
                raw.offset = *start_lba;
                let mut buf = bytes::BytesMut::new();
                if let Some(point) = since {
                    put_sync_point(&mut buf, point);
                }
                buf.freeze()
            }
            M::WrittenSinceOk {
                position,
                answer,
                end_lba,
            } => {
                raw.offset = *end_lba;
                let mut buf = bytes::BytesMut::new();
                put_sync_point(&mut buf, position);
                match answer {
                    WrittenAnswer::Regions(runs) => {
                        buf.extend_from_slice(&[WrittenAnswer::KIND_REGIONS]);
                        for r in runs {
                            buf.extend_from_slice(&r.lba.to_le_bytes());
                            buf.extend_from_slice(&r.blocks.to_le_bytes());
                        }
                    }
                    WrittenAnswer::Unknown(why) => {
                        buf.extend_from_slice(&[WrittenAnswer::KIND_UNKNOWN]);
                        buf.extend_from_slice(truncate_utf8(why, MAX_ERROR_MESSAGE).as_bytes());
                    }
                }
                buf.freeze()
            }
            M::AdoptSyncPoint { point, own_revision } => {
                raw.offset = own_revision.0;
                let mut buf = bytes::BytesMut::new();
                if let Some(point) = point {
                    put_sync_point(&mut buf, point);
                }
                buf.freeze()
            }
            M::AdoptSyncPointOk { position } => {
                let mut buf = bytes::BytesMut::new();
                put_sync_point(&mut buf, position);
                buf.freeze()
            }
            M::SnapshotCreate { name } | M::SnapshotDelete { name } | M::SnapshotRevert { name } => {
                pb_bytes(&pb::SnapshotRequest { name: name.clone() })
            }
            M::SnapshotCreateOk(info) => pb_bytes(info),
            M::SnapshotListOk(snapshots) => pb_bytes(&pb::SnapshotList {
                snapshots: snapshots.clone(),
            }),
            M::Failed { error, message, .. } => {
                raw.status = error.code();
                raw.offset = error.detail();
                Bytes::copy_from_slice(truncate_utf8(message, MAX_ERROR_MESSAGE).as_bytes())
            }
            M::WriteOk
            | M::Flush
            | M::UnmapOk
            | M::Ping
            | M::Pong
            | M::Info
            | M::SnapshotList
            | M::SnapshotDeleteOk
            | M::SnapshotRevertOk
            | M::SetEpoch
            | M::SetEpochOk
            | M::Reset
            | M::ResetOk
            | M::WriteVOk
            | M::SetMembershipOk
            | M::SnapshotHoldOk
            | M::SnapshotReleaseOk
            | M::HoldList => Bytes::new(),
        };
        let len = head.len() + payload.len();
        raw.payload_len = u32::try_from(len)
            .ok()
            .filter(|len| *len <= MAX_PAYLOAD)
            .ok_or(EncodeError::Oversize { len: len as u64 })?;
        Ok((raw, head, payload))
    }
}

fn finish(raw: RawHeader, payload_head: Bytes, payload: Bytes, payload_crc: u32) -> EncodedFrame {
    let mut header = raw.render();
    let len = payload_head.len() + payload.len();
    let crc = frame_crc(&header, payload_crc, len as u64);
    header[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    EncodedFrame {
        header,
        payload_head,
        payload,
        header_pos: 0,
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary.
pub(super) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_block_crcs(list: &[BlockCrc]) -> Bytes {
    let mut buf = bytes::BytesMut::with_capacity(list.len() * BlockCrc::WIRE_LEN);
    for b in list {
        buf.extend_from_slice(&b.lba.to_le_bytes());
        buf.extend_from_slice(&b.crc.to_le_bytes());
    }
    buf.freeze()
}

fn put_block_runs(runs: &[BlockRun]) -> Bytes {
    let mut buf = bytes::BytesMut::with_capacity(runs.len() * BlockRun::WIRE_LEN);
    for r in runs {
        buf.extend_from_slice(&r.lba.to_le_bytes());
        buf.extend_from_slice(&r.blocks.to_le_bytes());
    }
    buf.freeze()
}

fn put_extents(extents: &[Extent]) -> Bytes {
    let mut buf = bytes::BytesMut::with_capacity(extents.len() * Extent::WIRE_LEN);
    for e in extents {
        buf.extend_from_slice(&e.offset.to_le_bytes());
        buf.extend_from_slice(&e.len.to_le_bytes());
    }
    buf.freeze()
}

fn put_sync_point(buf: &mut bytes::BytesMut, point: &SyncPoint) {
    buf.extend_from_slice(&point.lineage.to_le_bytes());
    buf.extend_from_slice(&point.revision.0.to_le_bytes());
    buf.extend_from_slice(&point.epoch.0.to_le_bytes());
}

/// A control payload, prost-encoded.
fn pb_bytes<M: prost::Message>(m: &M) -> Bytes {
    Bytes::from(m.encode_to_vec())
}
