//! The tokio-util codec: bytes from a socket to [`Frame`]s and back.
//!
//! Decoding checks, in this order and before allocating anything for the
//! payload: magic, version, payload length (`<=` [`MAX_PAYLOAD`]). Only then
//! does it wait for the whole payload, verify the CRC and interpret the op.
//! Every check failure is a [`DecodeError`] naming what was wrong; the
//! decoder never panics on any input (a proptest and a fuzz target hold it to
//! that). After an error the stream is out of sync and must be closed.
//!
//! The [`Encoder`] impl copies header and payload into the output buffer,
//! which is convenient for tests and control traffic; the data path uses
//! [`Frame::encode`] and [`super::FrameBatchWriter`] instead, which do not
//! copy payloads.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message as _;
use tokio_util::codec::{Decoder, Encoder};

use super::header::{
    frame_crc, payload_crc, RawHeader, CRC_OFFSET, FLAG_CHECK_ONLY, FLAG_FUA, HEADER_LEN, MAGIC,
};
use super::{
    pb, BlockCrc, BlockRun, Extent, ExtentsError, Frame, LayerBlock, LayerBlockState, Message, Op,
    ProtocolVersion, ReplicaIdentity, ReplyError, RequestId, SyncPoint, WrittenAnswer, MAX_PAYLOAD,
    REPLY_BIT,
};
use crate::auth::{Nonce, Proof, CHALLENGE_LEN};
use crate::{Epoch, Revision, VolumeId};

/// Why bytes received could not be a frame. Any of these ends the
/// connection: the sender is broken, hostile or not a Basalt peer.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "not a Basalt frame (magic {found:02x?}, expected \"BSLT\"); is the peer a Basalt controller or \
         replica, on the data-path port?"
    )]
    BadMagic { found: [u8; 4] },
    #[error(
        "frame of protocol version {found}, this build speaks v{}..=v{}; upgrade the older side",
        ProtocolVersion::MIN_SUPPORTED.0,
        ProtocolVersion::CURRENT.0
    )]
    UnsupportedVersion { found: u16 },
    #[error("frame announces {len} bytes of payload, the limit is {MAX_PAYLOAD}; the sender is broken")]
    Oversize { len: u64 },
    #[error(
        "frame CRC mismatch (header says {expected:#010x}, computed {computed:#010x}); the data was \
         corrupted in transit"
    )]
    Crc { expected: u32, computed: u32 },
    #[error("unknown op code {code:#04x}; the peer speaks a protocol this build does not know")]
    UnknownOp { code: u8 },
    #[error("{op} frame with invalid flags {flags:#04x}")]
    BadFlags { op: Op, flags: u8 },
    #[error("frame with non-zero reserved field {value:#06x}")]
    Reserved { value: u16 },
    #[error("{op} frame: length field says {length} bytes but the payload has {payload_len}")]
    LengthMismatch { op: Op, length: u64, payload_len: u32 },
    #[error("{op} frame must not carry a payload or length, but has {payload_len} bytes of payload")]
    UnexpectedPayload { op: Op, payload_len: u32 },
    #[error("{op} frame: unknown status code {code}; the replica is newer than this build")]
    UnknownStatus { op: Op, code: u16 },
    #[error("{op} request frame with a status code {code}; only replies carry a status")]
    StatusOnRequest { op: Op, code: u16 },
    #[error("{op} frame: control payload does not decode: {source}")]
    BadControlPayload {
        op: Op,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{op} frame: invalid field: {what}")]
    BadField { op: Op, what: &'static str },
    #[error("{op} frame: invalid extent list: {source}")]
    BadExtents {
        op: Op,
        #[source]
        source: ExtentsError,
    },
    #[error("reading from the connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "payload or read length of {len} bytes exceeds the {MAX_PAYLOAD}-byte frame limit; split the I/O"
    )]
    Oversize { len: u64 },
    #[error("invalid extent list: {0}")]
    Extents(#[from] ExtentsError),
    #[error(
        "vectored write of {data} bytes to extents that hold {extents}; the data must fill them exactly"
    )]
    ExtentsMismatch { extents: u64, data: u64 },
    #[error("writing to the connection: {0}")]
    Io(#[from] std::io::Error),
}

/// The frame codec for `tokio_util::codec::Framed*`. Stateless: every frame
/// says its own version.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        // Check what we can as soon as bytes arrive, so that garbage is
        // refused without waiting for a full header.
        let magic_seen = src.len().min(MAGIC.len());
        if src[..magic_seen] != MAGIC[..magic_seen] {
            let mut found = [0u8; 4];
            found[..magic_seen].copy_from_slice(&src[..magic_seen]);
            return Err(DecodeError::BadMagic { found });
        }
        let Some(head) = src
            .get(..HEADER_LEN)
            .and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
        else {
            return Ok(None);
        };
        let raw = RawHeader::parse(head);
        if !ProtocolVersion(raw.version).is_supported() {
            return Err(DecodeError::UnsupportedVersion { found: raw.version });
        }
        if raw.payload_len > MAX_PAYLOAD {
            return Err(DecodeError::Oversize {
                len: u64::from(raw.payload_len),
            });
        }
        let total = HEADER_LEN + raw.payload_len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let computed = frame_crc(
            &head[..CRC_OFFSET],
            payload_crc(&src[HEADER_LEN..total]),
            u64::from(raw.payload_len),
        );
        if computed != raw.crc {
            return Err(DecodeError::Crc {
                expected: raw.crc,
                computed,
            });
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(raw.payload_len as usize).freeze();
        interpret(raw, payload).map(Some)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let encoded = frame.encode()?;
        dst.reserve(encoded.wire_len());
        dst.extend_from_slice(encoded.header());
        dst.extend_from_slice(encoded.payload_head());
        dst.extend_from_slice(encoded.payload());
        Ok(())
    }
}

/// Decodes every frame in `bytes`, stopping at the first error or at an
/// incomplete frame. This is the body of the fuzz target (`proto/fuzz`) and
/// of the tests that replay its corpus: it must return, never panic.
pub fn decode_all(bytes: &[u8]) -> (Vec<Frame>, Option<DecodeError>) {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        match FrameCodec.decode(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// Turns checked header fields and payload into a typed message.
fn interpret(raw: RawHeader, payload: Bytes) -> Result<Frame, DecodeError> {
    let is_reply = raw.op & REPLY_BIT != 0;
    let op = Op::from_code(raw.op & !REPLY_BIT).ok_or(DecodeError::UnknownOp { code: raw.op })?;
    if raw.reserved != 0 {
        return Err(DecodeError::Reserved { value: raw.reserved });
    }
    let allowed_flags = match (op, is_reply) {
        (Op::Write, false) => FLAG_FUA,
        (Op::Resize, false) => FLAG_CHECK_ONLY,
        _ => 0,
    };
    if raw.flags & !allowed_flags != 0 {
        return Err(DecodeError::BadFlags { op, flags: raw.flags });
    }
    let frame = |message| Frame {
        id: RequestId(raw.id),
        epoch: Epoch(raw.epoch),
        message,
    };

    if is_reply && raw.status != 0 {
        let error = ReplyError::from_wire(raw.status, raw.offset)
            .ok_or(DecodeError::UnknownStatus { op, code: raw.status })?;
        if raw.length != 0 {
            return Err(DecodeError::LengthMismatch {
                op,
                length: raw.length,
                payload_len: raw.payload_len,
            });
        }
        // The message is for humans: a replica sending invalid UTF-8 should
        // not cost the controller its connection.
        let message = String::from_utf8_lossy(&payload).into_owned();
        return Ok(frame(Message::Failed { op, error, message }));
    }
    if !is_reply && raw.status != 0 {
        return Err(DecodeError::StatusOnRequest { op, code: raw.status });
    }

    // Which header fields each message uses; all others must be zero so that
    // a later version can give them a meaning without ambiguity.
    let no_payload = || {
        if raw.payload_len != 0 || raw.length != 0 {
            Err(DecodeError::UnexpectedPayload {
                op,
                payload_len: raw.payload_len,
            })
        } else {
            Ok(())
        }
    };
    let no_offset = || {
        if raw.offset != 0 {
            Err(DecodeError::BadField {
                op,
                what: "offset must be zero for this op",
            })
        } else {
            Ok(())
        }
    };
    let no_length = || {
        if raw.length != 0 {
            Err(DecodeError::LengthMismatch {
                op,
                length: raw.length,
                payload_len: raw.payload_len,
            })
        } else {
            Ok(())
        }
    };
    let length_is_payload = || {
        if raw.length != u64::from(raw.payload_len) {
            Err(DecodeError::LengthMismatch {
                op,
                length: raw.length,
                payload_len: raw.payload_len,
            })
        } else {
            Ok(())
        }
    };
    // Control messages carry everything in their protobuf payload.
    let control = || no_offset().and_then(|()| no_length());
    let bad_pb = |source| DecodeError::BadControlPayload { op, source };

    use Message as M;
    let message = match (op, is_reply) {
        (Op::Hello, false) => {
            control()?;
            let hello = pb::Hello::decode(payload).map_err(bad_pb)?;
            let versions = [hello.min_version, hello.max_version].map(u16::try_from);
            let [Ok(min), Ok(max)] = versions else {
                return Err(DecodeError::BadField {
                    op,
                    what: "protocol versions must fit in 16 bits",
                });
            };
            M::Hello {
                volume: volume_id(op, &hello.volume_uuid)?,
                min_version: ProtocolVersion(min),
                max_version: ProtocolVersion(max),
                writer: hello.writer,
                nonce: Nonce(challenge(
                    op,
                    &hello.client_nonce,
                    "client nonce must be 32 bytes",
                )?),
            }
        }
        (Op::Hello, true) => {
            control()?;
            let reply = pb::HelloReply::decode(payload).map_err(bad_pb)?;
            let version = u16::try_from(reply.version).map_err(|_| DecodeError::BadField {
                op,
                what: "protocol version must fit in 16 bits",
            })?;
            M::HelloOk {
                version: ProtocolVersion(version),
                volume: volume_id(op, &reply.volume_uuid)?,
                nonce: Nonce(challenge(
                    op,
                    &reply.replica_nonce,
                    "replica nonce must be 32 bytes",
                )?),
                proof: Proof(challenge(
                    op,
                    &reply.replica_proof,
                    "replica proof must be 32 bytes",
                )?),
            }
        }
        (Op::Auth, true) => {
            control()?;
            let reply = pb::AuthReply::decode(payload).map_err(bad_pb)?;
            M::AuthOk {
                replica: ReplicaIdentity {
                    volume: volume_id(op, &reply.volume_uuid)?,
                    size_bytes: reply.size_bytes,
                    epoch: Epoch(reply.epoch),
                    revision: Revision(reply.revision),
                },
                membership: reply.membership,
            }
        }
        (Op::Auth, false) => {
            control()?;
            let auth = pb::Auth::decode(payload).map_err(bad_pb)?;
            M::Auth {
                proof: Proof(challenge(op, &auth.proof, "proof must be 32 bytes")?),
            }
        }
        (Op::SetMembership, false) => {
            control()?;
            M::SetMembership(pb::Membership::decode(payload).map_err(bad_pb)?)
        }
        (Op::Read, false) => {
            if raw.payload_len != 0 {
                return Err(DecodeError::UnexpectedPayload {
                    op,
                    payload_len: raw.payload_len,
                });
            }
            if raw.length > u64::from(MAX_PAYLOAD) {
                return Err(DecodeError::Oversize { len: raw.length });
            }
            M::Read {
                offset: raw.offset,
                len: raw.length as u32,
            }
        }
        (Op::Read, true) => {
            no_offset()?;
            length_is_payload()?;
            M::ReadOk { data: payload }
        }
        (Op::Write, false) => {
            length_is_payload()?;
            M::Write {
                offset: raw.offset,
                data: payload,
                fua: raw.flags & FLAG_FUA != 0,
            }
        }
        (Op::Unmap, false) => {
            if raw.payload_len != 0 {
                return Err(DecodeError::UnexpectedPayload {
                    op,
                    payload_len: raw.payload_len,
                });
            }
            M::Unmap {
                offset: raw.offset,
                len: raw.length,
            }
        }
        (Op::Flush, true) => {
            no_payload()?;
            M::FlushOk {
                revision: Revision(raw.offset),
            }
        }
        (Op::Resize, false) => {
            no_payload()?;
            M::Resize {
                size_bytes: raw.offset,
                check_only: raw.flags & FLAG_CHECK_ONLY != 0,
            }
        }
        (Op::Resize, true) => {
            no_payload()?;
            M::ResizeOk {
                size_bytes: raw.offset,
            }
        }
        (Op::Info, true) => {
            control()?;
            M::InfoOk(pb::ReplicaInfo::decode(payload).map_err(bad_pb)?)
        }
        (Op::SnapshotCreate | Op::SnapshotDelete | Op::SnapshotRevert, false) => {
            control()?;
            let name = pb::SnapshotRequest::decode(payload).map_err(bad_pb)?.name;
            match op {
                Op::SnapshotCreate => M::SnapshotCreate { name },
                Op::SnapshotDelete => M::SnapshotDelete { name },
                _ => M::SnapshotRevert { name },
            }
        }
        (Op::SnapshotCreate, true) => {
            control()?;
            M::SnapshotCreateOk(pb::SnapshotInfo::decode(payload).map_err(bad_pb)?)
        }
        (Op::SnapshotList, true) => {
            control()?;
            M::SnapshotListOk(pb::SnapshotList::decode(payload).map_err(bad_pb)?.snapshots)
        }
        (Op::BlockCrcs, false) => {
            if raw.payload_len != 0 {
                return Err(DecodeError::UnexpectedPayload {
                    op,
                    payload_len: raw.payload_len,
                });
            }
            M::BlockCrcs {
                start_lba: raw.offset,
                count: raw.length,
            }
        }
        (Op::BlockCrcs, true) => M::BlockCrcsOk(block_crcs(op, &payload)?),
        (Op::RunCrcs, false) => {
            no_offset()?;
            no_length()?;
            if !payload.len().is_multiple_of(BlockRun::WIRE_LEN) {
                return Err(DecodeError::BadField {
                    op,
                    what: "run list must be a whole number of 16-byte runs",
                });
            }
            M::RunCrcs {
                runs: block_runs(&payload),
            }
        }
        (Op::RunCrcs, true) => {
            no_length()?;
            M::RunCrcsOk {
                crcs: block_crcs(op, &payload)?,
                end_lba: raw.offset,
            }
        }
        (Op::ReadV, false) => {
            no_offset()?;
            no_length()?;
            M::ReadV {
                extents: extents(op, &payload)?,
            }
        }
        (Op::ReadV, true) => {
            no_offset()?;
            length_is_payload()?;
            M::ReadVOk { data: payload }
        }
        (Op::WriteV, false) => {
            no_offset()?;
            // The length field is the data's; the extent list comes first.
            let list_len =
                u64::from(raw.payload_len)
                    .checked_sub(raw.length)
                    .ok_or(DecodeError::LengthMismatch {
                        op,
                        length: raw.length,
                        payload_len: raw.payload_len,
                    })? as usize;
            let extents = extents(op, &payload[..list_len])?;
            let total: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
            if total != raw.length {
                return Err(DecodeError::BadField {
                    op,
                    what: "the extents must hold exactly the data's length",
                });
            }
            M::WriteV {
                extents,
                data: payload.slice(list_len..),
            }
        }
        (Op::LayerBlocks | Op::SnapshotRuns, false) => {
            let snapshot = pb::SnapshotRequest::decode(payload).map_err(bad_pb)?.name;
            let (start_lba, count) = (raw.offset, raw.length);
            match op {
                Op::LayerBlocks => M::LayerBlocks {
                    snapshot,
                    start_lba,
                    count,
                },
                _ => M::SnapshotRuns {
                    snapshot,
                    start_lba,
                    count,
                },
            }
        }
        (Op::LayerBlocks, true) => {
            if !payload.len().is_multiple_of(LayerBlock::WIRE_LEN) {
                return Err(DecodeError::BadField {
                    op,
                    what: "layer block list must be a whole number of 13-byte entries",
                });
            }
            let blocks = payload
                .chunks_exact(LayerBlock::WIRE_LEN)
                .map(|c| {
                    let lba = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
                    let crc = u32::from_le_bytes(c[9..].try_into().expect("4 bytes"));
                    let state = match (c[8], crc) {
                        (LayerBlock::KIND_DATA, crc) => LayerBlockState::Data { crc },
                        (LayerBlock::KIND_TOMBSTONE, 0) => LayerBlockState::Tombstone,
                        _ => {
                            return Err(DecodeError::BadField {
                                op,
                                what: "layer block kind must be 1 (data) or 2 (tombstone, with a zero crc)",
                            })
                        }
                    };
                    Ok(LayerBlock { lba, state })
                })
                .collect::<Result<Vec<_>, _>>()?;
            M::LayerBlocksOk {
                blocks,
                end_lba: raw.offset,
            }
        }
        (Op::ReadLayer | Op::ReadSnapshot, false) => {
            if raw.length > u64::from(MAX_PAYLOAD) {
                return Err(DecodeError::Oversize { len: raw.length });
            }
            let snapshot = pb::SnapshotRequest::decode(payload).map_err(bad_pb)?.name;
            let (offset, len) = (raw.offset, raw.length as u32);
            match op {
                Op::ReadLayer => M::ReadLayer {
                    snapshot,
                    offset,
                    len,
                },
                _ => M::ReadSnapshot {
                    snapshot,
                    offset,
                    len,
                },
            }
        }
        (Op::ReadLayer | Op::ReadSnapshot, true) => {
            no_offset()?;
            length_is_payload()?;
            match op {
                Op::ReadLayer => M::ReadLayerOk { data: payload },
                _ => M::ReadSnapshotOk { data: payload },
            }
        }
        (Op::SnapshotRuns, true) => {
            no_length()?;
            if !payload.len().is_multiple_of(BlockRun::WIRE_LEN) {
                return Err(DecodeError::BadField {
                    op,
                    what: "run list must be a whole number of 16-byte runs",
                });
            }
            M::SnapshotRunsOk {
                runs: block_runs(&payload),
                end_lba: raw.offset,
            }
        }
        (Op::SnapshotHold | Op::SnapshotRelease, false) => {
            control()?;
            let request = pb::SnapshotHoldRequest::decode(payload).map_err(bad_pb)?;
            let (snapshot, holder) = (request.name, request.holder);
            match op {
                Op::SnapshotHold => M::SnapshotHold { snapshot, holder },
                _ => M::SnapshotRelease { snapshot, holder },
            }
        }
        (Op::HoldList, true) => {
            control()?;
            M::HoldListOk(pb::HoldList::decode(payload).map_err(bad_pb)?.holds)
        }
        (Op::WrittenSince, false) => {
            no_length()?;
            M::WrittenSince {
                since: optional_sync_point(op, &payload)?,
                start_lba: raw.offset,
            }
        }
        (Op::WrittenSince, true) => {
            no_length()?;
            let position = sync_point(op, payload.get(..SyncPoint::WIRE_LEN))?;
            let rest = &payload[SyncPoint::WIRE_LEN..];
            let answer = match rest.split_first() {
                Some((&WrittenAnswer::KIND_REGIONS, runs))
                    if runs.len().is_multiple_of(BlockRun::WIRE_LEN) =>
                {
                    WrittenAnswer::Regions(block_runs(runs))
                }
                Some((&WrittenAnswer::KIND_UNKNOWN, why)) => {
                    WrittenAnswer::Unknown(String::from_utf8_lossy(why).into_owned())
                }
                _ => {
                    return Err(DecodeError::BadField {
                        op,
                        what: "written-since answer must be kind 1 (16-byte runs) or 2 (a reason)",
                    })
                }
            };
            M::WrittenSinceOk {
                position,
                answer,
                end_lba: raw.offset,
            }
        }
        (Op::AdoptSyncPoint, false) => {
            no_length()?;
            M::AdoptSyncPoint {
                point: optional_sync_point(op, &payload)?,
                own_revision: Revision(raw.offset),
            }
        }
        (Op::AdoptSyncPoint, true) => {
            control()?;
            if payload.len() != SyncPoint::WIRE_LEN {
                return Err(DecodeError::BadField {
                    op,
                    what: "sync point must be 24 bytes",
                });
            }
            M::AdoptSyncPointOk {
                position: sync_point(op, Some(&payload[..]))?,
            }
        }
        // Everything else is a bare op: no offset, no length, no payload.
        (op, reply) => {
            no_payload()?;
            no_offset()?;
            match (op, reply) {
                (Op::Write, true) => M::WriteOk,
                (Op::Flush, false) => M::Flush,
                (Op::Unmap, true) => M::UnmapOk,
                (Op::Ping, false) => M::Ping,
                (Op::Ping, true) => M::Pong,
                (Op::Info, false) => M::Info,
                (Op::SnapshotList, false) => M::SnapshotList,
                (Op::SnapshotDelete, true) => M::SnapshotDeleteOk,
                (Op::SnapshotRevert, true) => M::SnapshotRevertOk,
                (Op::SetEpoch, false) => M::SetEpoch,
                (Op::SetEpoch, true) => M::SetEpochOk,
                (Op::Reset, false) => M::Reset,
                (Op::Reset, true) => M::ResetOk,
                (Op::WriteV, true) => M::WriteVOk,
                (Op::SetMembership, true) => M::SetMembershipOk,
                (Op::SnapshotHold, true) => M::SnapshotHoldOk,
                (Op::SnapshotRelease, true) => M::SnapshotReleaseOk,
                (Op::HoldList, false) => M::HoldList,
                // Every (op, reply) pair with a payload or an offset is
                // matched above; this arm cannot be reached, but a decoder
                // answers with an error rather than trusting that.
                _ => {
                    return Err(DecodeError::BadField {
                        op,
                        what: "op does not take this form",
                    })
                }
            }
        }
    };
    Ok(frame(message))
}

/// A nonce or proof: exactly [`CHALLENGE_LEN`] bytes, or the frame is refused with `what`.
fn challenge(op: Op, bytes: &[u8], what: &'static str) -> Result<[u8; CHALLENGE_LEN], DecodeError> {
    bytes.try_into().map_err(|_| DecodeError::BadField { op, what })
}

/// A list of 12-byte block checksums.
fn block_crcs(op: Op, payload: &[u8]) -> Result<Vec<BlockCrc>, DecodeError> {
    if !payload.len().is_multiple_of(BlockCrc::WIRE_LEN) {
        return Err(DecodeError::BadField {
            op,
            what: "block checksum list must be a whole number of 12-byte entries",
        });
    }
    Ok(payload
        .chunks_exact(BlockCrc::WIRE_LEN)
        .map(|c| BlockCrc {
            lba: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
            crc: u32::from_le_bytes(c[8..].try_into().expect("4 bytes")),
        })
        .collect())
}

/// The 16-byte runs of `bytes` (a whole number of them, checked by the caller).
fn block_runs(bytes: &[u8]) -> Vec<BlockRun> {
    bytes
        .chunks_exact(BlockRun::WIRE_LEN)
        .map(|c| BlockRun {
            lba: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
            blocks: u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
        })
        .collect()
}

/// A vectored request's extent list: whole 12-byte extents that pass
/// [`Extent::check_list`].
fn extents(op: Op, bytes: &[u8]) -> Result<Vec<Extent>, DecodeError> {
    if !bytes.len().is_multiple_of(Extent::WIRE_LEN) {
        return Err(DecodeError::BadField {
            op,
            what: "extent list must be a whole number of 12-byte extents",
        });
    }
    // Checked before the list is built, so that a hostile count costs nothing.
    let count = bytes.len() / Extent::WIRE_LEN;
    if count > super::MAX_EXTENTS {
        return Err(DecodeError::BadExtents {
            op,
            source: ExtentsError::TooMany { count },
        });
    }
    let extents: Vec<Extent> = bytes
        .chunks_exact(Extent::WIRE_LEN)
        .map(|c| Extent {
            offset: u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(c[8..].try_into().expect("4 bytes")),
        })
        .collect();
    Extent::check_list(&extents).map_err(|source| DecodeError::BadExtents { op, source })?;
    Ok(extents)
}

/// A sync point of exactly 24 bytes (`None`: too short).
fn sync_point(op: Op, bytes: Option<&[u8]>) -> Result<SyncPoint, DecodeError> {
    let b = bytes
        .filter(|b| b.len() == SyncPoint::WIRE_LEN)
        .ok_or(DecodeError::BadField {
            op,
            what: "sync point must be 24 bytes",
        })?;
    let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok(SyncPoint {
        lineage: word(0),
        revision: Revision(word(1)),
        epoch: Epoch(word(2)),
    })
}

/// No payload, or exactly one sync point.
fn optional_sync_point(op: Op, payload: &[u8]) -> Result<Option<SyncPoint>, DecodeError> {
    if payload.is_empty() {
        Ok(None)
    } else {
        sync_point(op, Some(payload)).map(Some)
    }
}

fn volume_id(op: Op, bytes: &[u8]) -> Result<VolumeId, DecodeError> {
    let bytes: [u8; 16] = bytes.try_into().map_err(|_| DecodeError::BadField {
        op,
        what: "volume UUID must be 16 bytes",
    })?;
    Ok(VolumeId(uuid::Uuid::from_bytes(bytes)))
}
