//! Primary commands (SPC-4) other than INQUIRY and persistent reservations:
//! REQUEST SENSE, REPORT LUNS, REPORT SUPPORTED OPERATION CODES (generated
//! from the command table), REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS, MODE
//! SENSE/SELECT, RESERVE/RELEASE(6/10), START STOP UNIT and PREVENT ALLOW
//! MEDIUM REMOVAL.
//!
//! START STOP UNIT on this non-removable virtual disk never takes it out of
//! service: with START=0 it flushes the write cache (unless NO_FLUSH) and the
//! unit stays ready, because there is no spindle to spin down and refusing
//! I/O afterwards would only turn a shutdown script's courtesy into an outage.
//! LOEJ (eject) is refused while a nexus prevents medium removal.

use bytes::Bytes;

use crate::device::BlockDevice;
use crate::lu::ScsiCommand;
use crate::scsi::mode;
use crate::scsi::sense::{Asc, Failure, Sense, SenseKey, FIXED_SENSE_LEN};
use crate::scsi::table::{self, CommandSpec, COMMANDS};
use crate::scsi::{be, device_failure, truncate, ScsiLogicalUnit};

/// Nominal and recommended timeouts reported in command timeouts
/// descriptors, in seconds. A command to a replicated volume may wait for a
/// replica to time out and be dropped (about 30 s in the engine).
const NOMINAL_TIMEOUT_S: u32 = 1;
const RECOMMENDED_TIMEOUT_S: u32 = 60;

fn timeouts_descriptor() -> [u8; 12] {
    let mut d = [0u8; 12];
    d[1] = 0x0A;
    d[4..8].copy_from_slice(&NOMINAL_TIMEOUT_S.to_be_bytes());
    d[8..12].copy_from_slice(&RECOMMENDED_TIMEOUT_S.to_be_bytes());
    d
}

/// REPORT SUPPORTED OPERATION CODES, straight from [`COMMANDS`].
pub(super) fn report_supported_opcodes(cdb: &[u8]) -> Result<Bytes, Failure> {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let opcode = cdb[3];
    let sa = be(cdb, 4, 2);
    let alloc = be(cdb, 6, 4);
    let one = |spec: Option<&CommandSpec>| {
        let mut d = vec![0u8; 4];
        match spec {
            None => d[1] = 0x01, // SUPPORT 001b: not supported
            Some(spec) => {
                d[1] = 0x03 | if rctd { 0x80 } else { 0 };
                d[2..4].copy_from_slice(&(spec.cdb_len() as u16).to_be_bytes());
                d.extend_from_slice(spec.cdb_usage);
                if rctd {
                    d.extend_from_slice(&timeouts_descriptor());
                }
            }
        }
        d
    };
    let data = match options {
        0 => {
            let mut d = vec![0u8; 4];
            for spec in COMMANDS {
                let mut desc = [0u8; 8];
                desc[0] = spec.opcode;
                if let Some(sa) = spec.service_action {
                    desc[3] = sa;
                    desc[5] |= 0x01; // SERVACTV
                }
                if rctd {
                    desc[5] |= 0x02; // CTDP
                }
                desc[6..8].copy_from_slice(&(spec.cdb_len() as u16).to_be_bytes());
                d.extend_from_slice(&desc);
                if rctd {
                    d.extend_from_slice(&timeouts_descriptor());
                }
            }
            let len = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&len.to_be_bytes());
            d
        }
        1 => {
            if table::has_service_actions(opcode) {
                return Err(Failure::invalid_cdb_field(2, Some(2)));
            }
            one(table::find(opcode, None))
        }
        2 => {
            let has_sa = table::has_service_actions(opcode);
            let known = COMMANDS.iter().any(|c| c.opcode == opcode);
            if known && !has_sa {
                return Err(Failure::invalid_cdb_field(2, Some(2)));
            }
            one(u8::try_from(sa).ok().and_then(|sa| table::find(opcode, Some(sa))))
        }
        3 => {
            let spec = if table::has_service_actions(opcode) {
                u8::try_from(sa).ok().and_then(|sa| table::find(opcode, Some(sa)))
            } else {
                table::find(opcode, None)
            };
            one(spec)
        }
        _ => return Err(Failure::invalid_cdb_field(2, Some(2))),
    };
    Ok(truncate(data, alloc))
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS: what the iSCSI transport
/// implements (ABORT TASK, ABORT TASK SET, LOGICAL UNIT RESET, TARGET RESET).
pub(super) fn report_supported_tmfs(cdb: &[u8]) -> Result<Bytes, Failure> {
    let repd = cdb[2] & 0x80 != 0;
    let alloc = be(cdb, 6, 4);
    let mut d = vec![0u8; if repd { 16 } else { 4 }];
    d[0] = 0x80 | 0x40 | 0x08 | 0x02; // ATS, ATSS, LURS, TRS
    if repd {
        d[3] = 0x0C;
    }
    if alloc < 4 {
        return Err(Failure::invalid_cdb_field(6, None));
    }
    Ok(truncate(d, alloc))
}

impl<D: BlockDevice> ScsiLogicalUnit<D> {
    pub(super) fn request_sense(&self, cmd: &ScsiCommand) -> Result<Bytes, Failure> {
        let cdb = &cmd.cdb[..];
        if cdb[1] & 0x01 != 0 {
            // DESC: descriptor-format sense data is not offered.
            return Err(Failure::invalid_cdb_field(1, Some(0)));
        }
        let alloc = u64::from(cdb[4]);
        let sense = if !self.addresses_us(cmd.lun) {
            Sense::new(SenseKey::IllegalRequest, Asc::LOGICAL_UNIT_NOT_SUPPORTED)
        } else {
            match self.state().next_attention(&cmd.nexus) {
                Some(asc) => Sense::new(SenseKey::UnitAttention, asc),
                None => Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE),
            }
        };
        let mut d = sense.to_bytes().to_vec();
        debug_assert_eq!(d.len(), FIXED_SENSE_LEN);
        d.truncate(alloc as usize);
        Ok(Bytes::from(d))
    }

    pub(super) fn report_luns(&self, cdb: &[u8]) -> Result<Bytes, Failure> {
        let select = cdb[2];
        let alloc = be(cdb, 6, 4);
        if alloc < 16 {
            return Err(Failure::invalid_cdb_field(6, None));
        }
        let luns: Vec<u64> = match select {
            // All logical units / well-known: we have one, and no well-known LUs.
            0x00 | 0x02 => vec![self.config.lun],
            0x01 => vec![],
            0x10..=0x12 if self.config.lun == 0 => vec![self.config.lun],
            0x10..=0x12 => vec![],
            _ => return Err(Failure::invalid_cdb_field(2, Some(7))),
        };
        let mut d = vec![0u8; 8];
        d[0..4].copy_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
        for lun in luns {
            // Single-level flat (LUNs < 256: peripheral) addressing.
            let mut entry = [0u8; 8];
            if lun < 256 {
                entry[1] = lun as u8;
            } else {
                entry[0] = 0x40 | ((lun >> 8) as u8 & 0x3F);
                entry[1] = lun as u8;
            }
            d.extend_from_slice(&entry);
        }
        Ok(truncate(d, alloc))
    }

    pub(super) fn mode_sense(&self, cdb: &[u8]) -> Result<Bytes, Failure> {
        let ten = cdb[0] == 0x5A;
        let dbd = cdb[1] & 0x08 != 0;
        let llbaa = ten && cdb[1] & 0x10 != 0;
        let pc = mode::page_control(cdb[2])?;
        let page_code = cdb[2] & 0x3F;
        let subpage = cdb[3];
        let alloc = if ten { be(cdb, 7, 2) } else { u64::from(cdb[4]) };
        let state = self.state().mode;
        let write_protected = self.config.read_only || state.software_write_protect;
        let mut pages = Vec::new();
        match (page_code, subpage) {
            (mode::ALL_PAGES, 0x00 | 0xFF) => {
                for code in mode::PAGES {
                    pages.extend(mode::page(code, pc, state).expect("listed page exists"));
                }
            }
            (code, 0x00) => match mode::page(code, pc, state) {
                Some(p) => pages.extend(p),
                None => return Err(Failure::invalid_cdb_field(2, Some(5))),
            },
            _ => return Err(Failure::invalid_cdb_field(3, Some(7))),
        }
        let blocks = self.geometry().block_count();
        let bs = self.geometry().logical_block_size;
        let descriptor: Vec<u8> = if dbd {
            Vec::new()
        } else if llbaa {
            let mut d = vec![0u8; 16];
            d[0..8].copy_from_slice(&blocks.to_be_bytes());
            d[12..16].copy_from_slice(&bs.to_be_bytes());
            d
        } else {
            let mut d = vec![0u8; 8];
            d[0..4].copy_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            d[5..8].copy_from_slice(&bs.to_be_bytes()[1..4]);
            d
        };
        // Device-specific parameter: WP, DPOFUA (DPO and FUA are honoured).
        let device_specific = 0x10 | if write_protected { 0x80 } else { 0 };
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[3] = device_specific;
            if llbaa && !dbd {
                h[4] = 0x01;
            }
            h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
            h
        } else {
            vec![0, 0, device_specific, descriptor.len() as u8]
        };
        d.extend(descriptor);
        d.extend(pages);
        if ten {
            let len = (d.len() - 2) as u16;
            d[0..2].copy_from_slice(&len.to_be_bytes());
        } else {
            d[0] = (d.len() - 1).min(255) as u8;
        }
        Ok(truncate(d, alloc))
    }

    pub(super) fn mode_select(&self, cmd: &ScsiCommand, params: &[u8]) -> Result<Bytes, Failure> {
        let cdb = &cmd.cdb[..];
        let ten = cdb[0] == 0x55;
        if cdb[1] & 0x01 != 0 {
            // SP: pages cannot be saved.
            return Err(Failure::invalid_cdb_field(1, Some(0)));
        }
        if params.is_empty() {
            return Ok(Bytes::new());
        }
        let header_len = if ten { 8 } else { 4 };
        if params.len() < header_len {
            return Err(Failure::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let bdl = if ten {
            be(params, 6, 2) as usize
        } else {
            usize::from(params[3])
        };
        let long = ten && params[4] & 0x01 != 0;
        let pages_at = header_len + bdl;
        if params.len() < pages_at {
            return Err(Failure::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        // A block descriptor may only restate the block length we have.
        let descriptors = &params[header_len..pages_at];
        let desc_len = if long { 16 } else { 8 };
        if bdl % desc_len != 0 {
            return Err(Failure::invalid_param_field(if ten { 6 } else { 3 }, None));
        }
        for (i, desc) in descriptors.chunks(desc_len).enumerate() {
            let block_len = if long { be(desc, 12, 4) } else { be(desc, 5, 3) };
            if block_len != 0 && block_len != self.block_size() {
                let at = header_len + i * desc_len + if long { 12 } else { 5 };
                return Err(Failure::invalid_param_field(at as u16, None));
            }
        }
        let mut st = self.state();
        let next = mode::select(&params[pages_at..], pages_at, st.mode)?;
        if next != st.mode {
            st.mode = next;
            st.queue_for_others(&cmd.nexus, Asc::MODE_PARAMETERS_CHANGED);
        }
        Ok(Bytes::new())
    }

    pub(super) fn reserve(&self, cmd: &ScsiCommand) -> Result<Bytes, Failure> {
        let cdb = &cmd.cdb[..];
        if cdb[0] == 0x56 && cdb[1] & 0x12 != 0 {
            // Third-party reservations (3RDPTY, LONGID) are not supported.
            return Err(Failure::invalid_cdb_field(1, Some(4)));
        }
        let mut st = self.state();
        if !st.pr.registrations.is_empty() {
            // SPC-4 §5.12.1: with any persistent registration, RESERVE and
            // RELEASE conflict.
            return Err(Failure::ReservationConflict);
        }
        match &st.legacy_reservation {
            Some(holder) if holder != &*cmd.nexus => Err(Failure::ReservationConflict),
            _ => {
                st.legacy_reservation = Some((*cmd.nexus).clone());
                Ok(Bytes::new())
            }
        }
    }

    pub(super) fn release(&self, cmd: &ScsiCommand) -> Result<Bytes, Failure> {
        let cdb = &cmd.cdb[..];
        if cdb[0] == 0x57 && cdb[1] & 0x12 != 0 {
            return Err(Failure::invalid_cdb_field(1, Some(4)));
        }
        let mut st = self.state();
        if !st.pr.registrations.is_empty() {
            return Err(Failure::ReservationConflict);
        }
        // Releasing someone else's reservation (or none) succeeds and does
        // nothing (SPC-2 §7.23).
        if st.legacy_reservation.as_ref() == Some(&*cmd.nexus) {
            st.legacy_reservation = None;
        }
        Ok(Bytes::new())
    }

    pub(super) async fn start_stop_unit(&self, cmd: &ScsiCommand) -> Result<Bytes, Failure> {
        let cdb = &cmd.cdb[..];
        let no_flush = cdb[4] & 0x04 != 0;
        let loej = cdb[4] & 0x02 != 0;
        let start = cdb[4] & 0x01 != 0;
        let power_condition = cdb[4] >> 4;
        if power_condition == 0 && loej && !start && !self.state().removal_prevented.is_empty() {
            return Err(Failure::check(
                SenseKey::IllegalRequest,
                Asc::MEDIUM_REMOVAL_PREVENTED,
            ));
        }
        if power_condition == 0 && !start && !no_flush {
            self.device
                .flush()
                .await
                .map_err(|e| device_failure(e, self.block_size()))?;
        }
        Ok(Bytes::new())
    }

    pub(super) fn prevent_allow(&self, cmd: &ScsiCommand) -> Result<Bytes, Failure> {
        let mut st = self.state();
        match cmd.cdb[4] & 0x03 {
            0 => {
                st.removal_prevented.remove(&*cmd.nexus);
            }
            1 => {
                st.removal_prevented.insert((*cmd.nexus).clone());
            }
            // Medium changer prevention does not apply to a disk.
            _ => return Err(Failure::invalid_cdb_field(4, Some(1))),
        }
        Ok(Bytes::new())
    }
}
