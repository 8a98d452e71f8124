//! The boundary between the iSCSI transport and the SCSI command set.
//!
//! ```text
//!   iscsi/ (PDUs, sessions, R2T, Data-In)        scsi/ (CDBs, sense, reservations)
//!   ───────────────────────────────────────      ──────────────────────────────────
//!   gathers all Data-Out for a command   ──►  ScsiCommand ──►  LogicalUnit::execute
//!   splits data_in into Data-In PDUs,    ◄──  ScsiResult  ◄──  (status, sense, data)
//!   computes residuals against EDTL
//! ```
//!
//! The transport knows nothing about CDBs beyond their bytes; the command set
//! knows nothing about PDUs. An I_T nexus ([`ItNexus`]) identifies the
//! initiator side for reservations and unit attentions.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

/// One I_T nexus: an iSCSI session as SCSI sees it (RFC 7143 §4.4.2: the
/// initiator port is the initiator name plus ISID; the target port is the
/// target portal group).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ItNexus {
    /// Initiator iSCSI name (`iqn....`).
    pub initiator_name: String,
    /// Initiator session id (6 bytes).
    pub isid: [u8; 6],
    /// Target portal group tag.
    pub tpgt: u16,
}

/// Direction of the data phase, from the SCSI Command PDU's R/W bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDirection {
    None,
    /// Data-In: target to initiator.
    Read,
    /// Data-Out: initiator to target.
    Write,
    /// Both (bidirectional commands); not offered by Basalt's command set.
    Bidirectional,
}

/// SAM task attribute from the SCSI Command PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskAttribute {
    Untagged,
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// A SCSI command as the transport hands it over: the whole Data-Out already
/// gathered.
#[derive(Clone, Debug)]
pub struct ScsiCommand {
    pub nexus: Arc<ItNexus>,
    pub lun: u64,
    /// The CDB (6 to 16 bytes; longer with AHS).
    pub cdb: Bytes,
    pub direction: DataDirection,
    pub attribute: TaskAttribute,
    /// Expected Data Transfer Length from the PDU.
    pub expected_transfer_len: u32,
    /// Every byte of Data-Out the initiator sent (at most
    /// `expected_transfer_len`). Empty for reads.
    pub data_out: Bytes,
}

/// SAM status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ScsiStatus {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    TaskAborted = 0x40,
}

/// What the command set answers.
#[derive(Clone, Debug)]
pub struct ScsiResult {
    pub status: ScsiStatus,
    /// Fixed-format sense data (SPC-4 §4.5.3) with CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In. The transport sends at most `expected_transfer_len` bytes of
    /// it and reports the rest as residual overflow, or the shortfall as
    /// residual underflow.
    pub data_in: Bytes,
    /// For commands with Data-Out: how many bytes the CDB called for, so the
    /// transport can report a residual against `expected_transfer_len`.
    pub data_out_len: u32,
}

/// Task-management functions that reach the command set (ABORT TASK and
/// ABORT TASK SET are handled by the transport cancelling its tasks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
}

/// A logical unit the transport can route commands to.
pub trait LogicalUnit: Send + Sync + 'static {
    /// Execute one command. Many run concurrently; each future may be dropped
    /// (task aborted), in which case the command's effect on the medium is
    /// undefined, as SAM allows.
    fn execute(&self, cmd: ScsiCommand) -> impl Future<Output = ScsiResult> + Send;

    /// A reset was performed by `by`: clear what SAM says the reset clears and
    /// queue unit attentions for the other nexuses.
    fn reset(&self, kind: ResetKind, by: &ItNexus);

    /// A new nexus logged in (queues the power-on/reset unit attention for it).
    fn nexus_added(&self, nexus: &ItNexus);

    /// A nexus ended (session logout or drop). Persistent reservations and
    /// registrations survive it; RESERVE(6/10) reservations do not.
    fn nexus_removed(&self, nexus: &ItNexus);
}
