//! iSCSI PDUs: framing, typed parsing of what initiators send, and building
//! what the target sends (RFC 7143 §11). Everything here is pure: bytes in,
//! values out, so it can be fuzzed and property-tested.
//!
//! ```text
//!   ┌──────────── 48-byte BHS ────────────┬─ AHS ─┬─ HD ─┬─ data ─┬ pad ┬─ DD ─┐
//!   │ op │flags│..│AHSlen│DSlen(24)│LUN│ITT│  ...  │ crc? │  ...   │0..3 │ crc? │
//!   └─────────────────────────────────────┴───────┴──────┴────────┴─────┴──────┘
//! ```
//!
//! [`FrameDecoder::decode`] cuts one frame off the front of a receive buffer
//! (checking digests and the negotiated segment limit) without copying the
//! data segment: it is a `Bytes` slice of the buffer the socket read into.
//! [`Request::parse`] turns a frame into a typed initiator PDU. Target PDUs are
//! built as a [`TargetPdu`] whose StatSN / ExpCmdSN / MaxCmdSN are left zero:
//! the connection's writer fills them in at send time, so that StatSN follows
//! transmission order even though commands complete out of order.

use bytes::{BufMut, Bytes, BytesMut};

use crate::iscsi::digest;
use crate::lu::{ScsiStatus, TaskAttribute};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// Largest data segment the 24-bit DataSegmentLength can describe.
pub const MAX_DATA_SEGMENT: u32 = (1 << 24) - 1;

macro_rules! serial_number {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u32);

        impl $name {
            /// The next number (wrapping, RFC 1982).
            pub fn next(self) -> Self {
                Self(self.0.wrapping_add(1))
            }

            /// `self + n` (wrapping).
            pub fn plus(self, n: u32) -> Self {
                Self(self.0.wrapping_add(n))
            }

            /// RFC 1982 "less than" for 32-bit serial numbers: true when
            /// `self` comes before `other` by less than 2^31.
            pub fn precedes(self, other: Self) -> bool {
                self.0 != other.0 && (other.0.wrapping_sub(self.0) as i32) > 0
            }

            /// `self` precedes or equals `other`.
            pub fn precedes_or_eq(self, other: Self) -> bool {
                self == other || self.precedes(other)
            }

            /// How far `later` is ahead of `self` (wrapping).
            pub fn distance_to(self, later: Self) -> u32 {
                later.0.wrapping_sub(self.0)
            }
        }
    };
}

serial_number!(
    /// Command sequence number (RFC 7143 §4.2.2.1): orders non-immediate
    /// commands within a session.
    CmdSn
);
serial_number!(
    /// Status sequence number (RFC 7143 §4.2.2.2): numbers responses on a
    /// connection.
    StatSn
);
serial_number!(
    /// Data sequence number of a Data-In / Data-Out PDU within a command or
    /// an R2T sequence.
    DataSn
);
serial_number!(
    /// Sequence number of an R2T within a command.
    R2tSn
);

/// Initiator Task Tag: names a task within a session (initiator's choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Itt(pub u32);

impl Itt {
    /// 0xffffffff: "no task" (a NOP-Out answering a NOP-In, or a Reject).
    pub const RESERVED: Itt = Itt(0xffff_ffff);
}

/// Target Transfer Tag: names an R2T (or a NOP-In ping, or a text
/// continuation) so the initiator's answer can be matched to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ttt(pub u32);

impl Ttt {
    /// 0xffffffff: "no transfer tag" (unsolicited data, no answer wanted).
    pub const RESERVED: Ttt = Ttt(0xffff_ffff);
}

/// The 8-byte LUN field (SAM-5 §4.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lun(pub [u8; 8]);

impl Lun {
    /// The LUN number for the command set. Peripheral (00b) and flat (01b)
    /// single-level addressing decode to their 14-bit number, which is how
    /// every initiator addresses LUN 0..16383; any other format is passed on
    /// as the raw 64-bit value so the command set can refuse it.
    pub fn number(&self) -> u64 {
        let rest_zero = self.0[2..].iter().all(|&b| b == 0);
        match self.0[0] >> 6 {
            0b00 | 0b01 if rest_zero => u64::from(u16::from_be_bytes([self.0[0] & 0x3f, self.0[1]])),
            _ => u64::from_be_bytes(self.0),
        }
    }

    /// The single-level encoding of LUN `n` (peripheral below 256, flat
    /// above), as targets report it.
    pub fn from_number(n: u16) -> Lun {
        let mut raw = [0u8; 8];
        if n < 256 {
            raw[1] = n as u8;
        } else {
            raw[0] = 0x40 | ((n >> 8) as u8 & 0x3f);
            raw[1] = n as u8;
        }
        Lun(raw)
    }
}

/// PDU opcodes (RFC 7143 §11.1.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    SnackRequest = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    ReadyToTransfer = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl TryFrom<u8> for Opcode {
    type Error = PduError;

    fn try_from(value: u8) -> Result<Self, PduError> {
        use Opcode::*;
        Ok(match value {
            0x00 => NopOut,
            0x01 => ScsiCommand,
            0x02 => TaskMgmtRequest,
            0x03 => LoginRequest,
            0x04 => TextRequest,
            0x05 => DataOut,
            0x06 => LogoutRequest,
            0x10 => SnackRequest,
            0x20 => NopIn,
            0x21 => ScsiResponse,
            0x22 => TaskMgmtResponse,
            0x23 => LoginResponse,
            0x24 => TextResponse,
            0x25 => DataIn,
            0x26 => LogoutResponse,
            0x31 => ReadyToTransfer,
            0x32 => AsyncMessage,
            0x3f => Reject,
            other => return Err(PduError::UnknownOpcode(other)),
        })
    }
}

/// Why bytes from an initiator are not a valid PDU. The connection answers
/// with a Reject where the RFC allows it and closes otherwise.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("unknown opcode {0:#04x}: the initiator speaks something other than iSCSI (RFC 7143)")]
    UnknownOpcode(u8),
    #[error("opcode {0:?} is sent by targets, not initiators")]
    NotAnInitiatorOpcode(Opcode),
    #[error(
        "data segment of {len} bytes exceeds the {limit}-byte MaxRecvDataSegmentLength we declared; \
         the initiator must split its data"
    )]
    DataSegmentTooLong { len: u32, limit: u32 },
    #[error("header digest mismatch (got {got:#010x}, computed {computed:#010x}): the header was corrupted")]
    HeaderDigest { got: u32, computed: u32 },
    #[error("data digest mismatch (got {got:#010x}, computed {computed:#010x}): the payload was corrupted")]
    DataDigest { got: u32, computed: u32 },
    #[error("invalid {field} value {value:#x} in a {opcode:?} PDU")]
    InvalidField {
        opcode: Opcode,
        field: &'static str,
        value: u64,
    },
    #[error("{opcode:?} PDU carries a data segment, which RFC 7143 does not allow for it")]
    UnexpectedData { opcode: Opcode },
}

/// A raw Basic Header Segment with typed accessors for the fields shared by
/// every PDU.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl Bhs {
    /// A header with `opcode` set and everything else zero.
    pub fn new(opcode: Opcode) -> Bhs {
        let mut bhs = Bhs::default();
        bhs.0[0] = opcode as u8;
        bhs
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_be_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.0[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_be_bytes([self.0[offset], self.0[offset + 1]])
    }

    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.0[offset..offset + 2].copy_from_slice(&value.to_be_bytes());
    }

    /// The 6-bit opcode value (byte 0 without the I bit).
    pub fn opcode_value(&self) -> u8 {
        self.0[0] & 0x3f
    }

    /// The I (immediate delivery) bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }

    pub fn set_immediate(&mut self, immediate: bool) {
        if immediate {
            self.0[0] |= 0x40;
        } else {
            self.0[0] &= !0x40;
        }
    }

    /// Byte 1: the F bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }

    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }

    /// DataSegmentLength (24 bits), without padding.
    pub fn data_segment_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }

    pub fn set_data_segment_len(&mut self, len: u32) {
        debug_assert!(len <= MAX_DATA_SEGMENT);
        let b = len.to_be_bytes();
        self.0[5..8].copy_from_slice(&b[1..]);
    }

    pub fn lun(&self) -> Lun {
        Lun(self.0[8..16].try_into().expect("8 bytes"))
    }

    pub fn set_lun(&mut self, lun: Lun) {
        self.0[8..16].copy_from_slice(&lun.0);
    }

    pub fn itt(&self) -> Itt {
        Itt(self.u32_at(16))
    }

    pub fn set_itt(&mut self, itt: Itt) {
        self.set_u32(16, itt.0);
    }
}

/// One PDU cut from the receive stream: header, AHS and data segment (padding
/// and digests already checked and removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub bhs: Bhs,
    pub ahs: Bytes,
    pub data: Bytes,
}

/// Cuts frames off a receive buffer. Its settings change when login
/// negotiates digests and when each side declares MaxRecvDataSegmentLength.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameDecoder {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The MaxRecvDataSegmentLength *we* declared: initiators must not send
    /// longer data segments.
    pub max_data_segment: u32,
}

impl FrameDecoder {
    /// How many bytes the frame with this BHS occupies on the wire.
    pub fn frame_len(&self, bhs: &Bhs) -> usize {
        let data = bhs.data_segment_len() as usize;
        let mut len = BHS_LEN + bhs.ahs_len() + data + digest::pad_len(data);
        if self.header_digest {
            len += digest::DIGEST_LEN;
        }
        if self.data_digest && data > 0 {
            len += digest::DIGEST_LEN;
        }
        len
    }

    /// Take one whole frame from the front of `buf`, or return `Ok(None)` if
    /// more bytes are needed (after reserving room for them). The data
    /// segment is not copied: it shares `buf`'s allocation.
    ///
    /// On error the buffer is left as it was; the caller closes the
    /// connection, since a stream with a bad frame cannot be resynchronised.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, PduError> {
        if buf.len() < BHS_LEN {
            buf.reserve(BHS_LEN - buf.len());
            return Ok(None);
        }
        let bhs = Bhs(buf[..BHS_LEN].try_into().expect("48 bytes"));
        let data_len = bhs.data_segment_len();
        if data_len > self.max_data_segment {
            return Err(PduError::DataSegmentTooLong {
                len: data_len,
                limit: self.max_data_segment,
            });
        }
        let total = self.frame_len(&bhs);
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let header_end = BHS_LEN + bhs.ahs_len();
        let mut pos = header_end;
        if self.header_digest {
            let got = digest::from_wire(buf[pos..pos + 4].try_into().expect("4 bytes"));
            let computed = digest::crc32c(&[&buf[..header_end]]);
            if got != computed {
                return Err(PduError::HeaderDigest { got, computed });
            }
            pos += digest::DIGEST_LEN;
        }
        let data_start = pos;
        let padded = data_len as usize + digest::pad_len(data_len as usize);
        if self.data_digest && data_len > 0 {
            let at = data_start + padded;
            let got = digest::from_wire(buf[at..at + 4].try_into().expect("4 bytes"));
            let computed = digest::crc32c(&[&buf[data_start..at]]);
            if got != computed {
                return Err(PduError::DataDigest { got, computed });
            }
        }
        let frame = buf.split_to(total).freeze();
        Ok(Some(Frame {
            bhs,
            ahs: frame.slice(BHS_LEN..header_end),
            data: frame.slice(data_start..data_start + data_len as usize),
        }))
    }
}

/// SCSI Command (opcode 0x01).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiCommandPdu {
    pub immediate: bool,
    /// F bit: no unsolicited Data-Out follows.
    pub final_bit: bool,
    pub read: bool,
    pub write: bool,
    pub attribute: TaskAttribute,
    pub lun: Lun,
    pub itt: Itt,
    pub expected_transfer_len: u32,
    pub cmdsn: CmdSn,
    pub exp_statsn: StatSn,
    /// The CDB: 16 bytes from the BHS plus any Extended CDB AHS.
    pub cdb: Bytes,
    /// Immediate data.
    pub data: Bytes,
    pub bhs: Bhs,
}

/// Task management functions (RFC 7143 §11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmfFunction {
    AbortTask,
    AbortTaskSet,
    ClearAca,
    ClearTaskSet,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
    TaskReassign,
    /// A function code RFC 7143 does not define (answered "not supported").
    Other(u8),
}

impl TmfFunction {
    fn from_code(code: u8) -> TmfFunction {
        match code {
            1 => TmfFunction::AbortTask,
            2 => TmfFunction::AbortTaskSet,
            3 => TmfFunction::ClearAca,
            4 => TmfFunction::ClearTaskSet,
            5 => TmfFunction::LogicalUnitReset,
            6 => TmfFunction::TargetWarmReset,
            7 => TmfFunction::TargetColdReset,
            8 => TmfFunction::TaskReassign,
            other => TmfFunction::Other(other),
        }
    }

    pub fn code(self) -> u8 {
        match self {
            TmfFunction::AbortTask => 1,
            TmfFunction::AbortTaskSet => 2,
            TmfFunction::ClearAca => 3,
            TmfFunction::ClearTaskSet => 4,
            TmfFunction::LogicalUnitReset => 5,
            TmfFunction::TargetWarmReset => 6,
            TmfFunction::TargetColdReset => 7,
            TmfFunction::TaskReassign => 8,
            TmfFunction::Other(code) => code,
        }
    }
}

/// Task Management Function Request (opcode 0x02).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMgmtPdu {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: Lun,
    pub itt: Itt,
    /// The task to abort (ABORT TASK only).
    pub referenced_itt: Itt,
    pub cmdsn: CmdSn,
    pub ref_cmdsn: CmdSn,
    pub bhs: Bhs,
}

/// Login stages (CSG / NSG, RFC 7143 §11.12.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoginStage {
    SecurityNegotiation = 0,
    OperationalNegotiation = 1,
    FullFeature = 3,
}

impl LoginStage {
    fn from_code(code: u8) -> Option<LoginStage> {
        match code {
            0 => Some(LoginStage::SecurityNegotiation),
            1 => Some(LoginStage::OperationalNegotiation),
            3 => Some(LoginStage::FullFeature),
            _ => None,
        }
    }
}

/// Login Request (opcode 0x03).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginPdu {
    /// T bit: the initiator wants to move to `next_stage`.
    pub transit: bool,
    /// C bit: the text continues in the next PDU.
    pub continue_bit: bool,
    pub current_stage: LoginStage,
    /// Meaningful only with `transit`.
    pub next_stage: LoginStage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: Itt,
    pub cid: u16,
    pub cmdsn: CmdSn,
    pub exp_statsn: StatSn,
    pub data: Bytes,
}

/// Text Request (opcode 0x04).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextPdu {
    pub immediate: bool,
    pub final_bit: bool,
    pub continue_bit: bool,
    pub itt: Itt,
    pub ttt: Ttt,
    pub cmdsn: CmdSn,
    pub data: Bytes,
    pub bhs: Bhs,
}

/// SCSI Data-Out (opcode 0x05).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOutPdu {
    pub final_bit: bool,
    pub itt: Itt,
    pub ttt: Ttt,
    pub datasn: DataSn,
    pub buffer_offset: u32,
    pub data: Bytes,
    pub bhs: Bhs,
}

/// Logout reasons (RFC 7143 §11.14.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogoutReason {
    CloseSession,
    CloseConnection,
    RemoveConnectionForRecovery,
}

/// Logout Request (opcode 0x06).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutPdu {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: Itt,
    pub cid: u16,
    pub cmdsn: CmdSn,
    pub bhs: Bhs,
}

/// NOP-Out (opcode 0x00).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NopOutPdu {
    pub immediate: bool,
    pub lun: Lun,
    /// `Itt::RESERVED` when this answers our NOP-In (no reply wanted).
    pub itt: Itt,
    /// The TTT of the NOP-In this answers, or `Ttt::RESERVED`.
    pub ttt: Ttt,
    pub cmdsn: CmdSn,
    /// Ping data, echoed back.
    pub data: Bytes,
    pub bhs: Bhs,
}

/// A PDU an initiator sent, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    NopOut(NopOutPdu),
    ScsiCommand(ScsiCommandPdu),
    TaskMgmt(TaskMgmtPdu),
    Login(LoginPdu),
    Text(TextPdu),
    DataOut(DataOutPdu),
    Logout(LogoutPdu),
    /// SNACK: only meaningful at ErrorRecoveryLevel > 0, which Basalt does
    /// not offer; answered with a Reject.
    Snack(Bhs),
}

impl Request {
    /// Type one frame. Fields that the RFC constrains are checked here, so
    /// the session logic only sees well-formed requests.
    pub fn parse(frame: Frame) -> Result<Request, PduError> {
        let Frame { bhs, ahs, data } = frame;
        let opcode = Opcode::try_from(bhs.opcode_value())?;
        let invalid = |field: &'static str, value: u64| PduError::InvalidField { opcode, field, value };
        Ok(match opcode {
            Opcode::NopOut => Request::NopOut(NopOutPdu {
                immediate: bhs.immediate(),
                lun: bhs.lun(),
                itt: bhs.itt(),
                ttt: Ttt(bhs.u32_at(20)),
                cmdsn: CmdSn(bhs.u32_at(24)),
                data,
                bhs,
            }),
            Opcode::ScsiCommand => {
                let flags = bhs.flags();
                let attribute = match flags & 0x07 {
                    0 => TaskAttribute::Untagged,
                    1 => TaskAttribute::Simple,
                    2 => TaskAttribute::Ordered,
                    3 => TaskAttribute::HeadOfQueue,
                    4 => TaskAttribute::Aca,
                    other => return Err(invalid("task attribute", u64::from(other))),
                };
                let cdb = extended_cdb(&bhs, &ahs).map_err(|len| invalid("AHS length", len as u64))?;
                Request::ScsiCommand(ScsiCommandPdu {
                    immediate: bhs.immediate(),
                    final_bit: bhs.final_bit(),
                    read: flags & 0x40 != 0,
                    write: flags & 0x20 != 0,
                    attribute,
                    lun: bhs.lun(),
                    itt: bhs.itt(),
                    expected_transfer_len: bhs.u32_at(20),
                    cmdsn: CmdSn(bhs.u32_at(24)),
                    exp_statsn: StatSn(bhs.u32_at(28)),
                    cdb,
                    data,
                    bhs,
                })
            }
            Opcode::TaskMgmtRequest => {
                if !data.is_empty() {
                    return Err(PduError::UnexpectedData { opcode });
                }
                Request::TaskMgmt(TaskMgmtPdu {
                    immediate: bhs.immediate(),
                    function: TmfFunction::from_code(bhs.flags() & 0x7f),
                    lun: bhs.lun(),
                    itt: bhs.itt(),
                    referenced_itt: Itt(bhs.u32_at(20)),
                    cmdsn: CmdSn(bhs.u32_at(24)),
                    ref_cmdsn: CmdSn(bhs.u32_at(32)),
                    bhs,
                })
            }
            Opcode::LoginRequest => {
                let flags = bhs.flags();
                let current_stage = LoginStage::from_code((flags >> 2) & 0x03)
                    .ok_or(invalid("CSG", u64::from((flags >> 2) & 0x03)))?;
                let transit = flags & 0x80 != 0;
                let next_stage = match LoginStage::from_code(flags & 0x03) {
                    Some(stage) => stage,
                    // NSG is reserved when T is clear.
                    None if !transit => current_stage,
                    None => return Err(invalid("NSG", u64::from(flags & 0x03))),
                };
                Request::Login(LoginPdu {
                    transit,
                    continue_bit: flags & 0x40 != 0,
                    current_stage,
                    next_stage,
                    version_max: bhs.0[2],
                    version_min: bhs.0[3],
                    isid: bhs.0[8..14].try_into().expect("6 bytes"),
                    tsih: bhs.u16_at(14),
                    itt: bhs.itt(),
                    cid: bhs.u16_at(20),
                    cmdsn: CmdSn(bhs.u32_at(24)),
                    exp_statsn: StatSn(bhs.u32_at(28)),
                    data,
                })
            }
            Opcode::TextRequest => Request::Text(TextPdu {
                immediate: bhs.immediate(),
                final_bit: bhs.final_bit(),
                continue_bit: bhs.flags() & 0x40 != 0,
                itt: bhs.itt(),
                ttt: Ttt(bhs.u32_at(20)),
                cmdsn: CmdSn(bhs.u32_at(24)),
                data,
                bhs,
            }),
            Opcode::DataOut => Request::DataOut(DataOutPdu {
                final_bit: bhs.final_bit(),
                itt: bhs.itt(),
                ttt: Ttt(bhs.u32_at(20)),
                datasn: DataSn(bhs.u32_at(36)),
                buffer_offset: bhs.u32_at(40),
                data,
                bhs,
            }),
            Opcode::LogoutRequest => {
                let reason = match bhs.flags() & 0x7f {
                    0 => LogoutReason::CloseSession,
                    1 => LogoutReason::CloseConnection,
                    2 => LogoutReason::RemoveConnectionForRecovery,
                    other => return Err(invalid("reason code", u64::from(other))),
                };
                if !data.is_empty() {
                    return Err(PduError::UnexpectedData { opcode });
                }
                Request::Logout(LogoutPdu {
                    immediate: bhs.immediate(),
                    reason,
                    itt: bhs.itt(),
                    cid: bhs.u16_at(20),
                    cmdsn: CmdSn(bhs.u32_at(24)),
                    bhs,
                })
            }
            Opcode::SnackRequest => Request::Snack(bhs),
            target_opcode => return Err(PduError::NotAnInitiatorOpcode(target_opcode)),
        })
    }

    /// The CmdSN and I bit of requests that carry one (everything but
    /// Data-Out, Login and SNACK).
    pub fn cmdsn(&self) -> Option<(CmdSn, bool)> {
        match self {
            Request::NopOut(p) => Some((p.cmdsn, p.immediate)),
            Request::ScsiCommand(p) => Some((p.cmdsn, p.immediate)),
            Request::TaskMgmt(p) => Some((p.cmdsn, p.immediate)),
            Request::Text(p) => Some((p.cmdsn, p.immediate)),
            Request::Logout(p) => Some((p.cmdsn, p.immediate)),
            Request::Login(_) | Request::DataOut(_) | Request::Snack(_) => None,
        }
    }
}

/// The CDB of a SCSI Command: the 16 BHS bytes, extended by an Extended CDB
/// AHS (type 1) when present. Errors with the AHS length if it is malformed.
fn extended_cdb(bhs: &Bhs, ahs: &Bytes) -> Result<Bytes, usize> {
    let base = &bhs.0[32..48];
    let mut rest = &ahs[..];
    while rest.len() >= 4 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let ahs_type = rest[2];
        // AHSLength counts bytes after the type/reserved pair, padded to 4.
        let body_end = 4 + len - 1;
        if len == 0 || body_end > rest.len() {
            return Err(ahs.len());
        }
        if ahs_type == 1 {
            let mut cdb = BytesMut::with_capacity(16 + len - 1);
            cdb.put_slice(base);
            cdb.put_slice(&rest[4..body_end]);
            return Ok(cdb.freeze());
        }
        let padded = body_end + digest::pad_len(body_end);
        rest = &rest[padded.min(rest.len())..];
    }
    Ok(Bytes::copy_from_slice(base))
}

/// How a target PDU uses the connection's StatSN (RFC 7143 §4.2.2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatSnUse {
    /// The PDU carries status: it takes the next StatSN.
    Advance,
    /// The PDU reports the current StatSN without consuming it (R2T,
    /// unsolicited NOP-In).
    Current,
    /// The field is reserved (Data-In without status).
    Reserved,
}

/// A PDU the target sends. StatSN, ExpCmdSN and MaxCmdSN (bytes 24..36 in
/// every target PDU) are filled in by the writer at send time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPdu {
    pub bhs: Bhs,
    pub data: Bytes,
    pub statsn: StatSnUse,
}

impl TargetPdu {
    fn new(opcode: Opcode, data: Bytes, statsn: StatSnUse) -> TargetPdu {
        let mut bhs = Bhs::new(opcode);
        bhs.0[1] = 0x80;
        bhs.set_data_segment_len(data.len() as u32);
        TargetPdu { bhs, data, statsn }
    }

    /// Fill in the sequence numbers (done by the writer).
    pub fn stamp(&mut self, statsn: StatSn, exp_cmdsn: CmdSn, max_cmdsn: CmdSn) {
        if self.statsn != StatSnUse::Reserved {
            self.bhs.set_u32(24, statsn.0);
        }
        self.bhs.set_u32(28, exp_cmdsn.0);
        self.bhs.set_u32(32, max_cmdsn.0);
    }

    /// The header as sent, followed by its digest when `header_digest`.
    pub fn encode_header(&self, header_digest: bool, out: &mut BytesMut) {
        out.put_slice(&self.bhs.0);
        if header_digest {
            out.put_slice(&digest::to_wire(digest::crc32c(&[&self.bhs.0])));
        }
    }

    /// What follows the data segment: padding, then the data digest.
    pub fn encode_trailer(&self, data_digest: bool, out: &mut BytesMut) {
        let pad = digest::pad_len(self.data.len());
        out.put_slice(&digest::PADDING[..pad]);
        if data_digest && !self.data.is_empty() {
            out.put_slice(&digest::to_wire(digest::crc32c(&[
                &self.data,
                &digest::PADDING[..pad],
            ])));
        }
    }
}

/// Residual reported in a SCSI Response or the final Data-In.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    None,
    /// The command wanted fewer bytes than the initiator expected (U bit).
    Underflow(u32),
    /// The command wanted more bytes than the initiator expected (O bit).
    Overflow(u32),
}

impl Residual {
    /// The residual of a transfer of `actual` bytes against the Expected
    /// Data Transfer Length.
    pub fn of(expected: u32, actual: u64) -> Residual {
        match actual.cmp(&u64::from(expected)) {
            std::cmp::Ordering::Equal => Residual::None,
            std::cmp::Ordering::Less => Residual::Underflow(expected - actual as u32),
            std::cmp::Ordering::Greater => {
                Residual::Overflow((actual - u64::from(expected)).min(u64::from(u32::MAX)) as u32)
            }
        }
    }

    fn flags_and_count(self) -> (u8, u32) {
        match self {
            Residual::None => (0, 0),
            Residual::Overflow(n) => (0x04, n),
            Residual::Underflow(n) => (0x02, n),
        }
    }
}

/// SCSI Response (0x21) with "command completed at target".
pub fn scsi_response(itt: Itt, status: ScsiStatus, residual: Residual, sense: Option<&Bytes>) -> TargetPdu {
    let data = match sense {
        // The sense is small (≤ 252 bytes); prefixing its length copies it.
        Some(sense) if !sense.is_empty() => {
            let mut d = BytesMut::with_capacity(2 + sense.len());
            d.put_u16(sense.len() as u16);
            d.put_slice(sense);
            d.freeze()
        }
        _ => Bytes::new(),
    };
    let mut pdu = TargetPdu::new(Opcode::ScsiResponse, data, StatSnUse::Advance);
    let (flags, count) = residual.flags_and_count();
    pdu.bhs.0[1] = 0x80 | flags;
    pdu.bhs.0[2] = 0x00;
    pdu.bhs.0[3] = status as u8;
    pdu.bhs.set_itt(itt);
    pdu.bhs.set_u32(44, count);
    pdu
}

/// SCSI Response for a command the target could not run (response 0x01,
/// "target failure"), e.g. its Data-Out never completed.
pub fn scsi_target_failure(itt: Itt) -> TargetPdu {
    let mut pdu = TargetPdu::new(Opcode::ScsiResponse, Bytes::new(), StatSnUse::Advance);
    pdu.bhs.0[2] = 0x01;
    pdu.bhs.set_itt(itt);
    pdu
}

/// One Data-In PDU. `status` is set on the last PDU of a command whose
/// status goes with the data (the S bit).
pub fn data_in(
    itt: Itt,
    data: Bytes,
    datasn: DataSn,
    buffer_offset: u32,
    final_bit: bool,
    status: Option<(ScsiStatus, Residual)>,
) -> TargetPdu {
    let statsn = if status.is_some() {
        StatSnUse::Advance
    } else {
        StatSnUse::Reserved
    };
    let mut pdu = TargetPdu::new(Opcode::DataIn, data, statsn);
    let mut flags = if final_bit { 0x80 } else { 0 };
    if let Some((scsi_status, residual)) = status {
        let (rflags, count) = residual.flags_and_count();
        flags |= 0x01 | rflags;
        pdu.bhs.0[3] = scsi_status as u8;
        pdu.bhs.set_u32(44, count);
    }
    pdu.bhs.0[1] = flags;
    pdu.bhs.set_itt(itt);
    pdu.bhs.set_u32(20, Ttt::RESERVED.0);
    pdu.bhs.set_u32(36, datasn.0);
    pdu.bhs.set_u32(40, buffer_offset);
    pdu
}

/// Ready To Transfer (0x31): ask for `len` bytes at `offset`.
pub fn r2t(itt: Itt, lun: Lun, ttt: Ttt, r2tsn: R2tSn, offset: u32, len: u32) -> TargetPdu {
    let mut pdu = TargetPdu::new(Opcode::ReadyToTransfer, Bytes::new(), StatSnUse::Current);
    pdu.bhs.set_lun(lun);
    pdu.bhs.set_itt(itt);
    pdu.bhs.set_u32(20, ttt.0);
    pdu.bhs.set_u32(36, r2tsn.0);
    pdu.bhs.set_u32(40, offset);
    pdu.bhs.set_u32(44, len);
    pdu
}

/// NOP-In answering a NOP-Out (`ttt` reserved, echoing its data), or a ping
/// of our own (`itt` reserved, `ttt` set: the initiator must answer).
pub fn nop_in(itt: Itt, ttt: Ttt, lun: Lun, data: Bytes) -> TargetPdu {
    // A ping of our own does not consume a StatSN (RFC 7143 §11.19).
    let statsn = if itt == Itt::RESERVED {
        StatSnUse::Current
    } else {
        StatSnUse::Advance
    };
    let mut pdu = TargetPdu::new(Opcode::NopIn, data, statsn);
    pdu.bhs.set_lun(lun);
    pdu.bhs.set_itt(itt);
    pdu.bhs.set_u32(20, ttt.0);
    pdu
}

/// Task management responses (RFC 7143 §11.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TmfResponse {
    FunctionComplete = 0,
    TaskDoesNotExist = 1,
    LunDoesNotExist = 2,
    TaskStillAllegiant = 3,
    ReassignmentNotSupported = 4,
    FunctionNotSupported = 5,
    AuthorizationFailed = 6,
    Rejected = 255,
}

/// Task Management Function Response (0x22).
pub fn tmf_response(itt: Itt, response: TmfResponse) -> TargetPdu {
    let mut pdu = TargetPdu::new(Opcode::TaskMgmtResponse, Bytes::new(), StatSnUse::Advance);
    pdu.bhs.0[2] = response as u8;
    pdu.bhs.set_itt(itt);
    pdu
}

/// Text Response (0x24). With `continues` the C bit is set and `ttt` names
/// the continuation; the final PDU has F and a reserved TTT.
pub fn text_response(itt: Itt, ttt: Ttt, continues: bool, data: Bytes) -> TargetPdu {
    let mut pdu = TargetPdu::new(Opcode::TextResponse, data, StatSnUse::Advance);
    pdu.bhs.0[1] = if continues { 0x40 } else { 0x80 };
    pdu.bhs.set_itt(itt);
    pdu.bhs.set_u32(20, ttt.0);
    pdu
}

/// Logout responses (RFC 7143 §11.15.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LogoutResponse {
    Success = 0,
    CidNotFound = 1,
    RecoveryNotSupported = 2,
    CleanupFailed = 3,
}

/// Logout Response (0x26). Time2Wait/Time2Retain are 0: at
/// ErrorRecoveryLevel 0 nothing is kept for reconnection.
pub fn logout_response(itt: Itt, response: LogoutResponse) -> TargetPdu {
    let mut pdu = TargetPdu::new(Opcode::LogoutResponse, Bytes::new(), StatSnUse::Advance);
    pdu.bhs.0[2] = response as u8;
    pdu.bhs.set_itt(itt);
    pdu
}

/// Reject reasons (RFC 7143 §11.17.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    DataDigestError = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandReject = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    OutOfResources = 0x0a,
    WaitingForLogout = 0x0c,
}

/// Reject (0x3f), carrying the rejected PDU's header as its data.
pub fn reject(reason: RejectReason, rejected: &Bhs) -> TargetPdu {
    let mut pdu = TargetPdu::new(
        Opcode::Reject,
        Bytes::copy_from_slice(&rejected.0),
        StatSnUse::Advance,
    );
    pdu.bhs.0[2] = reason as u8;
    pdu.bhs.set_itt(Itt::RESERVED);
    pdu
}

/// Login status (class, detail) codes used by Basalt (RFC 7143 §11.13.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginStatus {
    Success,
    /// 0x0101: the target is at the TargetAddress the response carries, for
    /// now; the initiator logs in there and comes back here when it next
    /// reconnects ([`crate::iscsi::redirect`]).
    TargetMovedTemporarily,
    /// 0x0200: the request was malformed.
    InitiatorError,
    /// 0x0201: CHAP failed.
    AuthenticationFailure,
    /// 0x0202: the initiator may not use this target.
    AuthorizationFailure,
    /// 0x0203: no such target.
    NotFound,
    /// 0x0205: unsupported iSCSI version.
    UnsupportedVersion,
    /// 0x0206: MaxConnections is 1.
    TooManyConnections,
    /// 0x0207: a required key was absent.
    MissingParameter,
    /// 0x0209: this portal does not serve this SessionType.
    SessionTypeNotSupported,
    /// 0x020a: a TSIH naming no session.
    SessionDoesNotExist,
    /// 0x020b: the request is valid but not at this stage.
    InvalidDuringLogin,
    /// 0x0300: the target failed.
    TargetError,
    /// 0x0301: the target is not available now; the initiator retries later.
    ServiceUnavailable,
}

impl LoginStatus {
    pub fn code(self) -> (u8, u8) {
        match self {
            LoginStatus::Success => (0, 0),
            LoginStatus::TargetMovedTemporarily => (1, 0x01),
            LoginStatus::InitiatorError => (2, 0x00),
            LoginStatus::AuthenticationFailure => (2, 0x01),
            LoginStatus::AuthorizationFailure => (2, 0x02),
            LoginStatus::NotFound => (2, 0x03),
            LoginStatus::UnsupportedVersion => (2, 0x05),
            LoginStatus::TooManyConnections => (2, 0x06),
            LoginStatus::MissingParameter => (2, 0x07),
            LoginStatus::SessionTypeNotSupported => (2, 0x09),
            LoginStatus::SessionDoesNotExist => (2, 0x0a),
            LoginStatus::InvalidDuringLogin => (2, 0x0b),
            LoginStatus::TargetError => (3, 0x00),
            LoginStatus::ServiceUnavailable => (3, 0x01),
        }
    }
}

/// Fields of a Login Response (0x23).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponseFields {
    pub transit: bool,
    pub current_stage: LoginStage,
    pub next_stage: LoginStage,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: Itt,
    pub status: LoginStatus,
    pub data: Bytes,
}

/// Login Response (0x23). Version-max and -active are 0 (the only version).
pub fn login_response(fields: LoginResponseFields) -> TargetPdu {
    let mut pdu = TargetPdu::new(Opcode::LoginResponse, fields.data, StatSnUse::Advance);
    let mut flags = (fields.current_stage as u8) << 2;
    if fields.transit {
        flags |= 0x80 | fields.next_stage as u8;
    }
    pdu.bhs.0[1] = flags;
    pdu.bhs.0[8..14].copy_from_slice(&fields.isid);
    pdu.bhs.set_u16(14, fields.tsih);
    pdu.bhs.set_itt(fields.itt);
    let (class, detail) = fields.status.code();
    pdu.bhs.0[36] = class;
    pdu.bhs.0[37] = detail;
    pdu
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(bhs: &Bhs, data: &[u8], hd: bool, dd: bool) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_slice(&bhs.0);
        if hd {
            out.put_slice(&digest::to_wire(digest::crc32c(&[&bhs.0])));
        }
        out.put_slice(data);
        out.put_slice(&digest::PADDING[..digest::pad_len(data.len())]);
        if dd && !data.is_empty() {
            out.put_slice(&digest::to_wire(digest::data_digest(data)));
        }
        out
    }

    fn decoder(hd: bool, dd: bool) -> FrameDecoder {
        FrameDecoder {
            header_digest: hd,
            data_digest: dd,
            max_data_segment: 8192,
        }
    }

    #[test]
    fn serial_numbers_compare_across_wraparound() {
        assert!(CmdSn(0xffff_fffe).precedes(CmdSn(1)));
        assert!(!CmdSn(1).precedes(CmdSn(0xffff_fffe)));
        assert!(CmdSn(5).precedes_or_eq(CmdSn(5)));
        assert_eq!(CmdSn(0xffff_ffff).next(), CmdSn(0));
        assert_eq!(CmdSn(0xffff_fff0).distance_to(CmdSn(0x10)), 0x20);
    }

    #[test]
    fn frame_with_digests_and_padding_is_decoded_whole() {
        let mut bhs = Bhs::new(Opcode::NopOut);
        bhs.set_data_segment_len(5);
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut buf = frame_bytes(&bhs, b"hello", hd, dd);
            buf.put_slice(b"next");
            let frame = decoder(hd, dd).decode(&mut buf).unwrap().unwrap();
            assert_eq!(&frame.data[..], b"hello");
            assert_eq!(&buf[..], b"next", "exactly one frame consumed (hd={hd} dd={dd})");
        }
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let mut bhs = Bhs::new(Opcode::NopOut);
        bhs.set_data_segment_len(100);
        let full = frame_bytes(&bhs, &[7; 100], false, false);
        for cut in [0, 10, 48, 147] {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(decoder(false, false).decode(&mut buf).unwrap(), None);
            assert_eq!(buf.len(), cut);
        }
    }

    #[test]
    fn corrupted_digests_are_detected() {
        let mut bhs = Bhs::new(Opcode::NopOut);
        bhs.set_data_segment_len(4);
        let mut buf = frame_bytes(&bhs, b"ping", true, true);
        buf[52] ^= 1;
        assert!(matches!(
            decoder(true, true).decode(&mut buf),
            Err(PduError::DataDigest { .. })
        ));
        let mut buf = frame_bytes(&bhs, b"ping", true, true);
        buf[20] ^= 1;
        assert!(matches!(
            decoder(true, true).decode(&mut buf),
            Err(PduError::HeaderDigest { .. })
        ));
    }

    #[test]
    fn oversized_data_segment_is_refused_before_buffering() {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.set_data_segment_len(8193);
        let mut buf = BytesMut::from(&bhs.0[..]);
        assert_eq!(
            decoder(false, false).decode(&mut buf),
            Err(PduError::DataSegmentTooLong {
                len: 8193,
                limit: 8192
            })
        );
    }

    #[test]
    fn scsi_command_is_parsed_with_flags_and_cdb() {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.0[1] = 0x80 | 0x20 | 0x01;
        bhs.set_lun(Lun::from_number(0));
        bhs.set_itt(Itt(42));
        bhs.set_u32(20, 4096);
        bhs.set_u32(24, 7);
        bhs.0[32] = 0x2a;
        let req = Request::parse(Frame {
            bhs,
            ahs: Bytes::new(),
            data: Bytes::from_static(b"abcd"),
        })
        .unwrap();
        let Request::ScsiCommand(cmd) = req else {
            panic!("not a command: {req:?}")
        };
        assert!(cmd.write && !cmd.read && cmd.final_bit);
        assert_eq!(cmd.attribute, TaskAttribute::Simple);
        assert_eq!(
            (cmd.itt, cmd.cmdsn, cmd.expected_transfer_len),
            (Itt(42), CmdSn(7), 4096)
        );
        assert_eq!(cmd.cdb.len(), 16);
        assert_eq!(cmd.cdb[0], 0x2a);
    }

    #[test]
    fn extended_cdb_ahs_lengthens_the_cdb() {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.0[4] = 2; // 8 bytes of AHS
        let ahs = Bytes::from_static(&[0, 5, 1, 0, 0xa, 0xb, 0xc, 0xd]);
        let Request::ScsiCommand(cmd) = Request::parse(Frame {
            bhs,
            ahs,
            data: Bytes::new(),
        })
        .unwrap() else {
            panic!()
        };
        assert_eq!(cmd.cdb.len(), 20);
        assert_eq!(&cmd.cdb[16..], &[0xa, 0xb, 0xc, 0xd]);
    }

    #[test]
    fn target_opcodes_and_unknown_opcodes_are_errors() {
        let frame = |op: u8| Frame {
            bhs: {
                let mut b = Bhs::default();
                b.0[0] = op;
                b
            },
            ahs: Bytes::new(),
            data: Bytes::new(),
        };
        assert_eq!(
            Request::parse(frame(0x21)),
            Err(PduError::NotAnInitiatorOpcode(Opcode::ScsiResponse))
        );
        assert_eq!(Request::parse(frame(0x1c)), Err(PduError::UnknownOpcode(0x1c)));
    }

    #[test]
    fn lun_numbers_decode_peripheral_and_flat_addressing() {
        assert_eq!(Lun::from_number(0).number(), 0);
        assert_eq!(Lun::from_number(5).number(), 5);
        assert_eq!(Lun::from_number(300).number(), 300);
        assert_eq!(Lun([0x40, 0x01, 0, 0, 0, 0, 0, 0]).number(), 1);
        assert_eq!(Lun([0xc0, 0, 0, 0, 0, 0, 0, 1]).number(), 0xc000_0000_0000_0001);
    }

    #[test]
    fn residuals_set_u_and_o_bits() {
        let pdu = scsi_response(Itt(1), ScsiStatus::Good, Residual::of(4096, 512), None);
        assert_eq!(pdu.bhs.0[1], 0x82);
        assert_eq!(pdu.bhs.u32_at(44), 3584);
        let pdu = scsi_response(Itt(1), ScsiStatus::Good, Residual::of(512, 4096), None);
        assert_eq!(pdu.bhs.0[1], 0x84);
        assert_eq!(pdu.bhs.u32_at(44), 3584);
    }

    #[test]
    fn stamping_leaves_reserved_statsn_alone() {
        let mut pdu = data_in(Itt(1), Bytes::from_static(b"x"), DataSn(0), 0, false, None);
        pdu.stamp(StatSn(9), CmdSn(10), CmdSn(20));
        assert_eq!(pdu.bhs.u32_at(24), 0);
        assert_eq!((pdu.bhs.u32_at(28), pdu.bhs.u32_at(32)), (10, 20));
    }
}
