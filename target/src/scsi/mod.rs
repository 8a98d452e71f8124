//! # The SCSI command set: an SPC-4 / SBC-3 logical unit over a [`BlockDevice`]
//!
//! [`ScsiLogicalUnit`] implements the transport's [`LogicalUnit`]. One command
//! goes through the same steps, top to bottom in [`ScsiLogicalUnit::run`]:
//!
//! ```text
//!  CDB ─► LUN check ─► table lookup ─► CDB control byte ─► unit attention ─►
//!        (INQUIRY/REPORT LUNS        (scsi/table.rs)                (not for INQUIRY,
//!         answer any LUN)                                            REPORT LUNS, REQUEST SENSE)
//!      ─► reservations (SPC-2 RESERVE, then persistent: the row's columns)
//!      ─► Data-Out long enough? ─► handler (scsi/spc.rs, scsi/sbc.rs, scsi/prcmd.rs)
//! ```
//!
//! State shared between commands (unit attentions, reservations, mode
//! parameters) lives in one [`LuState`] behind a `std::sync::Mutex` that is
//! only held for short, synchronous sections and never across an `.await`;
//! the data path takes it once per command, to check attentions and
//! reservations, and then runs unlocked against the device.
//!
//! ## A capacity that grows
//!
//! The capacity is the device's, read per command ([`BlockDevice::geometry`]):
//! range checks, READ CAPACITY and the VPD pages always see the current size.
//! A device that grows (an online expansion) needs to tell nobody: while it
//! holds the state lock for the unit attention check, a command compares the
//! capacity with the one the LU last reported, and on a change queues CAPACITY
//! DATA HAS CHANGED (SPC-4, 2Ah/09h) for every nexus logged in, once each, so
//! each initiator learns of it on its next command and rescans. The device
//! needs no channel back into the LU, and the command set no knowledge of what
//! the device is.

mod inquiry;
pub mod mode;
pub mod pr;
mod prcmd;
mod sbc;
pub mod sense;
mod spc;
pub mod table;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::device::{BlockDevice, DeviceError, Geometry};
use crate::lu::{ItNexus, LogicalUnit, ResetKind, ScsiCommand, ScsiResult, ScsiStatus};
use mode::ModeState;
use pr::PersistentReservations;
use sense::{Asc, Failure, Sense, SenseKey};
use table::{Handler, LegacyAccess, Lookup, Transfer};

/// The largest READ/WRITE the LU accepts, in bytes (reported in the Block
/// Limits VPD page). The transport gathers a whole command's Data-Out in
/// memory before executing it, so this bounds the memory one command pins;
/// 8 MiB is well above what Linux issues (max_sectors_kb defaults to 512 KiB
/// to 4 MiB) and keeps 64 queued writes under 512 MiB.
pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;

/// The largest COMPARE AND WRITE, in blocks (Block Limits VPD). The whole
/// compare runs under the device's exclusive write lock, so it is kept small.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 16;

/// The largest WRITE SAME, in blocks: the largest count WRITE SAME(10) can
/// express. Filling is done in bounded chunks, so this only bounds the time
/// one command takes (32 MiB to 256 MiB of writes).
pub const MAX_WRITE_SAME_BLOCKS: u64 = 0xFFFF;

/// UNMAP limits (Block Limits VPD): descriptors per command, bytes per
/// command. Hole punching is cheap, so they are generous, but the block count
/// stays under 2^20 (libiscsi flags larger values as implausible).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
pub const MAX_UNMAP_BYTES: u64 = 256 << 20;

/// Unit attentions queued per nexus beyond this are dropped (SPC-4 lets a
/// device server lose attentions when it runs out of space); a queue that
/// long means the initiator is not reading them anyway.
const MAX_PENDING_ATTENTIONS: usize = 16;

/// Who this logical unit says it is.
#[derive(Clone, Debug)]
pub struct LuConfig {
    /// The LUN this unit answers on (flat number).
    pub lun: u64,
    /// T10 vendor identification (at most 8 ASCII characters).
    pub vendor: String,
    /// Product identification (at most 16 ASCII characters).
    pub product: String,
    /// Product revision level (at most 4 ASCII characters).
    pub revision: String,
    /// Unit serial number (VPD 0x80); also seeds the NAA designator.
    pub serial: String,
    /// Refuse every write with DATA PROTECT / WRITE PROTECTED.
    pub read_only: bool,
}

impl LuConfig {
    pub fn new(serial: impl Into<String>) -> LuConfig {
        LuConfig {
            lun: 0,
            vendor: "BASALT".into(),
            product: "Basalt volume".into(),
            revision: "0001".into(),
            serial: serial.into(),
            read_only: false,
        }
    }
}

/// Shared state of the LU: everything commands from different nexuses see.
#[derive(Debug, Default)]
struct LuState {
    /// Logged-in nexuses (for "tell every other nexus" attentions).
    nexuses: HashSet<ItNexus>,
    attentions: HashMap<ItNexus, VecDeque<Asc>>,
    pr: PersistentReservations,
    /// SPC-2 RESERVE(6/10) holder.
    legacy_reservation: Option<ItNexus>,
    mode: ModeState,
    /// Nexuses that sent PREVENT ALLOW MEDIUM REMOVAL with PREVENT=1.
    removal_prevented: HashSet<ItNexus>,
    /// The capacity in bytes initiators were last told of (see the module docs).
    reported_capacity: u64,
}

impl LuState {
    fn queue_attention(&mut self, nexus: &ItNexus, asc: Asc) {
        let q = self.attentions.entry(nexus.clone()).or_default();
        if !q.contains(&asc) && q.len() < MAX_PENDING_ATTENTIONS {
            q.push_back(asc);
        }
    }

    fn queue_for_others(&mut self, except: &ItNexus, asc: Asc) {
        let others: Vec<ItNexus> = self.nexuses.iter().filter(|n| *n != except).cloned().collect();
        for n in others {
            self.queue_attention(&n, asc);
        }
    }

    fn next_attention(&mut self, nexus: &ItNexus) -> Option<Asc> {
        self.attentions.get_mut(nexus).and_then(VecDeque::pop_front)
    }

    /// The device now holds `capacity` bytes: if that is news, every nexus
    /// gets CAPACITY DATA HAS CHANGED (queued once, however often it changed).
    fn note_capacity(&mut self, capacity: u64) {
        if capacity == self.reported_capacity {
            return;
        }
        tracing::info!(
            from = self.reported_capacity,
            to = capacity,
            "capacity changed; every initiator is told with a unit attention"
        );
        self.reported_capacity = capacity;
        let all: Vec<ItNexus> = self.nexuses.iter().cloned().collect();
        for n in all {
            self.queue_attention(&n, Asc::CAPACITY_DATA_HAS_CHANGED);
        }
    }
}

/// A SCSI block logical unit over a [`BlockDevice`].
pub struct ScsiLogicalUnit<D: BlockDevice> {
    device: Arc<D>,
    config: LuConfig,
    state: Mutex<LuState>,
}

/// What a handler produced: Data-In (already cut to the allocation length).
type Reply = Result<Bytes, Failure>;

impl<D: BlockDevice> ScsiLogicalUnit<D> {
    pub fn new(device: Arc<D>, config: LuConfig) -> ScsiLogicalUnit<D> {
        let state = LuState {
            reported_capacity: device.geometry().size_bytes,
            ..LuState::default()
        };
        ScsiLogicalUnit {
            device,
            config,
            state: Mutex::new(state),
        }
    }

    /// The device's shape now: the capacity may have grown since the last
    /// command (see the module docs).
    fn geometry(&self) -> Geometry {
        self.device.geometry()
    }

    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    fn state(&self) -> MutexGuard<'_, LuState> {
        // A panic while holding the lock cannot leave the state half-changed
        // in a way later commands could trip over (every update is a single
        // assignment or collection operation), so a poisoned lock is reused.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn block_size(&self) -> u64 {
        u64::from(self.geometry().logical_block_size)
    }

    /// Whether `lun` (flat, or in the 8-byte SAM encoding the transport may
    /// pass through) addresses this unit.
    fn addresses_us(&self, lun: u64) -> bool {
        let flat = if lun >> 48 != 0 { (lun >> 48) & 0x3FFF } else { lun };
        flat == self.config.lun
    }

    async fn run(&self, cmd: &ScsiCommand) -> ScsiResult {
        let cdb = &cmd.cdb[..];
        if cdb.is_empty() {
            return Failure::invalid_cdb_field(0, None).into_result(0);
        }
        let spec = match table::lookup(cdb) {
            Lookup::Found(spec) => spec,
            Lookup::UnknownOpcode => {
                return if self.addresses_us(cmd.lun) {
                    let mut s = Sense::new(SenseKey::IllegalRequest, Asc::INVALID_COMMAND_OPERATION_CODE);
                    s.field = Some(sense::FieldPointer {
                        in_cdb: true,
                        byte: 0,
                        bit: Some(7),
                    });
                    Failure::Check(s).into_result(0)
                } else {
                    Failure::illegal(Asc::LOGICAL_UNIT_NOT_SUPPORTED).into_result(0)
                };
            }
            Lookup::UnknownServiceAction => return Failure::invalid_cdb_field(1, Some(4)).into_result(0),
        };
        if cdb.len() < spec.cdb_len() {
            return Failure::illegal(Asc::INVALID_FIELD_IN_CDB).into_result(0);
        }
        let data_out_len = match self.data_out_len(spec.transfer, cdb) {
            Ok(n) => n,
            Err(f) => return f.into_result(0),
        };
        match self.admit(cmd, spec) {
            Ok(()) => {}
            Err(f) => return f.into_result(data_out_len),
        }
        let received = cmd.data_out.len() as u64;
        if spec.transfer.is_data_out() && received < u64::from(data_out_len) {
            // The initiator's Expected Data Transfer Length is shorter than
            // the CDB asks for. For block writes, FCP-4's choice (a): process
            // the command, but only with the whole blocks that came (libiscsi
            // 1.19's residual tests require it). A partial block or a short
            // parameter list: choice (b), refuse without touching anything.
            // Either way the full length goes back so the transport reports
            // the overflow.
            let whole_blocks =
                matches!(spec.transfer, Transfer::OutBlocks(_)) && received.is_multiple_of(self.block_size());
            if !whole_blocks {
                return Failure::illegal(Asc::INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
                    .into_result(data_out_len);
            }
        }
        if spec.transfer.is_exact() && cmd.expected_transfer_len != data_out_len {
            // WRITE SAME and COMPARE AND WRITE carry a buffer whose size the
            // CDB fixes; a different one means the CDB and the data disagree
            // (e.g. a block count that wrapped around in its one-byte field).
            return Failure::invalid_cdb_field(0, None).into_result(data_out_len);
        }
        let data = cmd
            .data_out
            .slice(..(data_out_len as usize).min(cmd.data_out.len()));
        match self.dispatch(spec.handler, cmd, data).await {
            Ok(data_in) => ScsiResult {
                status: ScsiStatus::Good,
                sense: None,
                data_in,
                data_out_len,
            },
            Err(f) => f.into_result(data_out_len),
        }
    }

    /// Everything before the handler: LUN, control byte, unit attention,
    /// reservations. Commands to other LUNs only get INQUIRY, REPORT LUNS
    /// and REQUEST SENSE answered (by their handlers).
    fn admit(&self, cmd: &ScsiCommand, spec: &table::CommandSpec) -> Result<(), Failure> {
        let cdb = &cmd.cdb[..];
        let control = cdb[spec.cdb_len() - 1];
        if control & 0x05 != 0 {
            // NACA and LINK are not supported.
            return Err(Failure::invalid_cdb_field((spec.cdb_len() - 1) as u16, Some(2)));
        }
        let lun_independent = matches!(
            spec.handler,
            Handler::Inquiry | Handler::ReportLuns | Handler::RequestSense
        );
        if !self.addresses_us(cmd.lun) {
            return if lun_independent {
                Ok(())
            } else {
                Err(Failure::illegal(Asc::LOGICAL_UNIT_NOT_SUPPORTED))
            };
        }
        let mut st = self.state();
        st.note_capacity(self.geometry().size_bytes);
        if !lun_independent {
            if let Some(asc) = st.next_attention(&cmd.nexus) {
                return Err(Failure::check(SenseKey::UnitAttention, asc));
            }
        }
        if let Some(holder) = &st.legacy_reservation {
            if holder != &*cmd.nexus && spec.legacy == LegacyAccess::Conflict {
                return Err(Failure::ReservationConflict);
            }
        }
        if !st.pr.allows(&cmd.nexus, spec.pr) {
            return Err(Failure::ReservationConflict);
        }
        Ok(())
    }

    /// How many bytes of Data-Out the CDB calls for.
    fn data_out_len(&self, transfer: Transfer, cdb: &[u8]) -> Result<u32, Failure> {
        let bs = self.block_size();
        let field = |f: table::LenField| be(cdb, f.byte, f.width);
        let bytes = match transfer {
            Transfer::NoData | Transfer::In => 0,
            Transfer::OutBlocks(f) if f == table::LEN6 => {
                let n = field(f);
                (if n == 0 { 256 } else { n }) * bs
            }
            Transfer::OutBlocks(f) => field(f) * bs,
            Transfer::OutParams(f) => field(f),
            Transfer::OutOneBlock => {
                let ndob = cdb[0] == 0x93 && cdb[1] & 0x01 != 0;
                if ndob {
                    0
                } else {
                    bs
                }
            }
            Transfer::OutCompareAndWrite => 2 * u64::from(cdb[13]) * bs,
            Transfer::OutIfByteCheck(f) => match (cdb[1] >> 1) & 0x03 {
                0b01 => field(f) * bs,
                0b11 => bs,
                _ => 0,
            },
        };
        // Lengths beyond what one command may carry are refused by the
        // handlers' own limits; here they only must fit the result field.
        u32::try_from(bytes).map_err(|_| Failure::invalid_cdb_field(0, None))
    }

    async fn dispatch(&self, handler: Handler, cmd: &ScsiCommand, data: Bytes) -> Reply {
        let cdb = &cmd.cdb[..];
        match handler {
            Handler::TestUnitReady => Ok(Bytes::new()),
            Handler::RequestSense => self.request_sense(cmd),
            Handler::Inquiry => self.inquiry(cmd),
            Handler::ReportLuns => self.report_luns(cdb),
            Handler::ReportSupportedOpcodes => spc::report_supported_opcodes(cdb),
            Handler::ReportSupportedTmfs => spc::report_supported_tmfs(cdb),
            Handler::ModeSense => self.mode_sense(cdb),
            Handler::ModeSelect => self.mode_select(cmd, &data),
            Handler::ReadCapacity10 => self.read_capacity10(cdb),
            Handler::ReadCapacity16 => self.read_capacity16(cdb),
            Handler::Read => self.read(cdb).await,
            Handler::Write => self.write(cdb, data).await,
            Handler::WriteAndVerify => self.write_and_verify(cdb, data).await,
            Handler::Verify => self.verify(cdb, data).await,
            Handler::SynchronizeCache => self.synchronize_cache(cdb).await,
            Handler::WriteSame => self.write_same(cdb, data).await,
            Handler::Unmap => self.unmap(cdb, &data).await,
            Handler::GetLbaStatus => self.get_lba_status(cdb).await,
            Handler::CompareAndWrite => self.compare_and_write(cdb, data).await,
            Handler::PersistentReserveIn => self.persistent_reserve_in(cmd),
            Handler::PersistentReserveOut => self.persistent_reserve_out(cmd, &data),
            Handler::Reserve => self.reserve(cmd),
            Handler::Release => self.release(cmd),
            Handler::StartStopUnit => self.start_stop_unit(cmd).await,
            Handler::PreventAllowMediumRemoval => self.prevent_allow(cmd),
        }
    }
}

/// A big-endian unsigned field of `width` bytes at `byte` (missing bytes read
/// as zero, so a short CDB never panics).
pub(crate) fn be(buf: &[u8], byte: usize, width: usize) -> u64 {
    (byte..byte + width).fold(0u64, |acc, i| {
        (acc << 8) | u64::from(buf.get(i).copied().unwrap_or(0))
    })
}

/// Cut Data-In to the allocation length.
pub(crate) fn truncate(mut data: Vec<u8>, allocation_len: u64) -> Bytes {
    data.truncate(usize::try_from(allocation_len).unwrap_or(usize::MAX));
    Bytes::from(data)
}

/// How a device error is reported. `lba_base` turns a byte offset into the
/// LBA for MEDIUM ERROR's INFORMATION field.
pub(crate) fn device_failure(err: DeviceError, block_size: u64) -> Failure {
    match err {
        DeviceError::Medium { offset, reason } => {
            tracing::warn!(offset, %reason, "unrecoverable read error");
            Failure::Check(
                Sense::new(SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR)
                    .with_information(offset / block_size),
            )
        }
        DeviceError::Miscompare { offset } => Failure::Check(
            Sense::new(SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY).with_information(offset),
        ),
        DeviceError::Unavailable(reason) => {
            tracing::warn!(%reason, "device unavailable");
            Failure::check(SenseKey::NotReady, Asc::NOT_READY_CAUSE_NOT_REPORTABLE)
        }
        DeviceError::Io(e) => {
            tracing::error!(error = %e, "device I/O error");
            Failure::check(SenseKey::HardwareError, Asc::INTERNAL_TARGET_FAILURE)
        }
    }
}

impl<D: BlockDevice> LogicalUnit for ScsiLogicalUnit<D> {
    async fn execute(&self, cmd: ScsiCommand) -> ScsiResult {
        self.run(&cmd).await
    }

    fn reset(&self, kind: ResetKind, by: &ItNexus) {
        let mut st = self.state();
        st.legacy_reservation = None;
        st.removal_prevented.clear();
        let asc = match kind {
            ResetKind::LogicalUnitReset => Asc::BUS_DEVICE_RESET_OCCURRED,
            ResetKind::TargetWarmReset | ResetKind::TargetColdReset => Asc::POWER_ON_RESET_OCCURRED,
        };
        if kind == ResetKind::TargetColdReset {
            // A cold reset is a power cycle: registrations without APTPL
            // (all of ours) and mode changes are lost (SPC-4 §5.12.4).
            st.pr = PersistentReservations::default();
            st.mode = ModeState::default();
        }
        // SAM-5: the nexus that asked for the reset knows about it; all
        // others get the attention.
        st.queue_for_others(by, asc);
    }

    fn nexus_added(&self, nexus: &ItNexus) {
        let mut st = self.state();
        st.nexuses.insert(nexus.clone());
        let q = st.attentions.entry(nexus.clone()).or_default();
        q.clear();
        q.push_back(Asc::POWER_ON_RESET_OCCURRED);
    }

    fn nexus_removed(&self, nexus: &ItNexus) {
        let mut st = self.state();
        st.nexuses.remove(nexus);
        st.attentions.remove(nexus);
        st.removal_prevented.remove(nexus);
        if st.legacy_reservation.as_ref() == Some(nexus) {
            st.legacy_reservation = None;
        }
    }
}
