//! The command set as one table.
//!
//! Every command the logical unit understands is one [`CommandSpec`] row in
//! [`COMMANDS`]: opcode (and service action), name, handler, how long its
//! data phase is, how persistent and SPC-2 reservations affect it, and the CDB
//! usage bitmap that REPORT SUPPORTED OPERATION CODES returns. The dispatcher
//! (`scsi/mod.rs`) looks a CDB up here, applies the reservation rules from the
//! row, and calls the handler named by [`Handler`]; nothing else decides
//! whether a command exists or conflicts. This is tgt's
//! `sbc_template.ops[256]`, typed.

/// Which handler runs a command (matched in `ScsiLogicalUnit::dispatch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handler {
    TestUnitReady,
    RequestSense,
    Inquiry,
    ReportLuns,
    ReportSupportedOpcodes,
    ReportSupportedTmfs,
    ModeSense,
    ModeSelect,
    ReadCapacity10,
    ReadCapacity16,
    Read,
    Write,
    WriteAndVerify,
    Verify,
    SynchronizeCache,
    WriteSame,
    Unmap,
    GetLbaStatus,
    CompareAndWrite,
    PersistentReserveIn,
    PersistentReserveOut,
    Reserve,
    Release,
    StartStopUnit,
    PreventAllowMediumRemoval,
}

/// A big-endian length field in the CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LenField {
    pub byte: usize,
    pub width: usize,
}

/// How many bytes the data phase of a command carries, as the CDB says.
/// The dispatcher uses it to fill `ScsiResult::data_out_len` and to reject
/// commands whose Data-Out is shorter than the CDB asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// No data phase.
    NoData,
    /// Data-In, at most the allocation length (the handler truncates).
    In,
    /// Data-Out of `blocks × block size`; a 6-byte CDB's 0 means 256 blocks.
    OutBlocks(LenField),
    /// Data-Out of a parameter list whose length is in the CDB.
    OutParams(LenField),
    /// WRITE SAME: one block, or nothing with NDOB.
    OutOneBlock,
    /// COMPARE AND WRITE: the verify data and the write data, `2 × blocks`.
    OutCompareAndWrite,
    /// VERIFY: nothing with BYTCHK=00, `blocks` with 01, one block with 11.
    OutIfByteCheck(LenField),
}

impl Transfer {
    pub fn is_data_out(self) -> bool {
        !matches!(self, Transfer::NoData | Transfer::In)
    }

    /// The Data-Out must be exactly as long as the CDB says (a longer one
    /// is an error, not a residual).
    pub fn is_exact(self) -> bool {
        matches!(self, Transfer::OutOneBlock | Transfer::OutCompareAndWrite)
    }
}

/// How a command fares against another initiator's reservation. Which
/// nexuses a reservation blocks depends on its type (see `scsi/pr.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrAccess {
    /// Never conflicts (INQUIRY, REPORT LUNS, PR IN/OUT, ...): SPC-4 table
    /// 66 "Allowed" in every column.
    Allowed,
    /// Reads the medium: blocked by Exclusive Access types only.
    Read,
    /// Changes the medium or the LU's state: blocked by every type.
    Write,
}

/// How a command fares against another initiator's SPC-2 RESERVE(6/10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyAccess {
    Allowed,
    Conflict,
}

/// One row of the command table.
#[derive(Debug)]
pub struct CommandSpec {
    pub opcode: u8,
    /// Service action (in CDB byte 1, bits 4..0) for opcodes that have them.
    pub service_action: Option<u8>,
    pub name: &'static str,
    pub handler: Handler,
    pub transfer: Transfer,
    pub pr: PrAccess,
    pub legacy: LegacyAccess,
    /// CDB USAGE DATA (SPC-4 §6.35.3): byte 0 is the opcode, the others mark
    /// the bits the device server looks at. Its length is the CDB length.
    pub cdb_usage: &'static [u8],
}

impl CommandSpec {
    pub fn cdb_len(&self) -> usize {
        self.cdb_usage.len()
    }
}

const fn len(byte: usize, width: usize) -> LenField {
    LenField { byte, width }
}

/// The 6-byte READ/WRITE transfer length (byte 4, 0 means 256).
pub const LEN6: LenField = len(4, 1);
const LEN10: LenField = len(7, 2);
const LEN12: LenField = len(6, 4);
const LEN16: LenField = len(10, 4);

use Handler as H;
use LegacyAccess::{Allowed as LegacyOk, Conflict as LegacyConflict};
use PrAccess::{Allowed, Read, Write};
use Transfer::*;

macro_rules! spec {
    ($op:expr, $sa:expr, $name:expr, $h:expr, $t:expr, $pr:expr, $legacy:expr, $usage:expr) => {
        CommandSpec {
            opcode: $op,
            service_action: $sa,
            name: $name,
            handler: $h,
            transfer: $t,
            pr: $pr,
            legacy: $legacy,
            cdb_usage: $usage,
        }
    };
}

const FF: u8 = 0xFF;

/// The command set, sorted by opcode and service action.
#[rustfmt::skip]
pub static COMMANDS: &[CommandSpec] = &[
    //    opcode SA        name                              handler                  transfer                      PR      SPC-2 reserve
    spec!(0x00, None,       "TEST UNIT READY",                H::TestUnitReady,        NoData,                         Allowed, LegacyConflict,
          &[0x00, 0, 0, 0, 0, 0]),
    spec!(0x03, None,       "REQUEST SENSE",                  H::RequestSense,         In,                           Allowed, LegacyOk,
          &[0x03, 0x01, 0, 0, FF, 0]),
    spec!(0x08, None,       "READ(6)",                        H::Read,                 In,                           Read,    LegacyConflict,
          &[0x08, 0x1F, FF, FF, FF, 0]),
    spec!(0x0A, None,       "WRITE(6)",                       H::Write,                OutBlocks(LEN6),              Write,   LegacyConflict,
          &[0x0A, 0x1F, FF, FF, FF, 0]),
    spec!(0x12, None,       "INQUIRY",                        H::Inquiry,              In,                           Allowed, LegacyOk,
          &[0x12, 0x01, FF, FF, FF, 0]),
    spec!(0x15, None,       "MODE SELECT(6)",                 H::ModeSelect,           OutParams(len(4, 1)),         Write,   LegacyConflict,
          &[0x15, 0x11, 0, 0, FF, 0]),
    spec!(0x16, None,       "RESERVE(6)",                     H::Reserve,              NoData,                         Write,   LegacyConflict,
          &[0x16, 0, 0, 0, 0, 0]),
    spec!(0x17, None,       "RELEASE(6)",                     H::Release,              NoData,                         Write,   LegacyOk,
          &[0x17, 0, 0, 0, 0, 0]),
    spec!(0x1A, None,       "MODE SENSE(6)",                  H::ModeSense,            In,                           Write,   LegacyConflict,
          &[0x1A, 0x08, FF, FF, FF, 0]),
    spec!(0x1B, None,       "START STOP UNIT",                H::StartStopUnit,        NoData,                         Write,   LegacyConflict,
          &[0x1B, 0x01, 0, 0x0F, 0xF7, 0]),
    spec!(0x1E, None,       "PREVENT ALLOW MEDIUM REMOVAL",   H::PreventAllowMediumRemoval, NoData,                    Write,   LegacyConflict,
          &[0x1E, 0, 0, 0, 0x03, 0]),
    spec!(0x25, None,       "READ CAPACITY(10)",              H::ReadCapacity10,       In,                           Allowed, LegacyConflict,
          &[0x25, 0, FF, FF, FF, FF, 0, 0, 0x01, 0]),
    spec!(0x28, None,       "READ(10)",                       H::Read,                 In,                           Read,    LegacyConflict,
          &[0x28, 0x18, FF, FF, FF, FF, 0, FF, FF, 0]),
    spec!(0x2A, None,       "WRITE(10)",                      H::Write,                OutBlocks(LEN10),             Write,   LegacyConflict,
          &[0x2A, 0x18, FF, FF, FF, FF, 0, FF, FF, 0]),
    spec!(0x2E, None,       "WRITE AND VERIFY(10)",           H::WriteAndVerify,       OutBlocks(LEN10),             Write,   LegacyConflict,
          &[0x2E, 0x12, FF, FF, FF, FF, 0, FF, FF, 0]),
    spec!(0x2F, None,       "VERIFY(10)",                     H::Verify,               OutIfByteCheck(LEN10),        Read,    LegacyConflict,
          &[0x2F, 0x16, FF, FF, FF, FF, 0, FF, FF, 0]),
    spec!(0x35, None,       "SYNCHRONIZE CACHE(10)",          H::SynchronizeCache,     NoData,                         Write,   LegacyConflict,
          &[0x35, 0x02, FF, FF, FF, FF, 0, FF, FF, 0]),
    spec!(0x41, None,       "WRITE SAME(10)",                 H::WriteSame,            OutOneBlock,                  Write,   LegacyConflict,
          &[0x41, 0x18, FF, FF, FF, FF, 0, FF, FF, 0]),
    spec!(0x42, None,       "UNMAP",                          H::Unmap,                OutParams(len(7, 2)),         Write,   LegacyConflict,
          &[0x42, 0x01, 0, 0, 0, 0, 0, FF, FF, 0]),
    spec!(0x55, None,       "MODE SELECT(10)",                H::ModeSelect,           OutParams(len(7, 2)),         Write,   LegacyConflict,
          &[0x55, 0x11, 0, 0, 0, 0, 0, FF, FF, 0]),
    spec!(0x56, None,       "RESERVE(10)",                    H::Reserve,              NoData,                         Write,   LegacyConflict,
          &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    spec!(0x57, None,       "RELEASE(10)",                    H::Release,              NoData,                         Write,   LegacyOk,
          &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    spec!(0x5A, None,       "MODE SENSE(10)",                 H::ModeSense,            In,                           Write,   LegacyConflict,
          &[0x5A, 0x18, FF, FF, 0, 0, 0, FF, FF, 0]),
    spec!(0x5E, None,       "PERSISTENT RESERVE IN",          H::PersistentReserveIn,  In,                           Allowed, LegacyConflict,
          &[0x5E, 0x1F, 0, 0, 0, 0, 0, FF, FF, 0]),
    spec!(0x5F, None,       "PERSISTENT RESERVE OUT",         H::PersistentReserveOut, OutParams(len(5, 4)),         Allowed, LegacyConflict,
          &[0x5F, 0x1F, FF, 0, 0, FF, FF, FF, FF, 0]),
    spec!(0x88, None,       "READ(16)",                       H::Read,                 In,                           Read,    LegacyConflict,
          &[0x88, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0x89, None,       "COMPARE AND WRITE",              H::CompareAndWrite,      OutCompareAndWrite,           Write,   LegacyConflict,
          &[0x89, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0, 0]),
    spec!(0x8A, None,       "WRITE(16)",                      H::Write,                OutBlocks(LEN16),             Write,   LegacyConflict,
          &[0x8A, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0x8E, None,       "WRITE AND VERIFY(16)",           H::WriteAndVerify,       OutBlocks(LEN16),             Write,   LegacyConflict,
          &[0x8E, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0x8F, None,       "VERIFY(16)",                     H::Verify,               OutIfByteCheck(LEN16),        Read,    LegacyConflict,
          &[0x8F, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0x91, None,       "SYNCHRONIZE CACHE(16)",          H::SynchronizeCache,     NoData,                         Write,   LegacyConflict,
          &[0x91, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0x93, None,       "WRITE SAME(16)",                 H::WriteSame,            OutOneBlock,                  Write,   LegacyConflict,
          &[0x93, 0x19, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0x9E, Some(0x10), "READ CAPACITY(16)",              H::ReadCapacity16,       In,                           Allowed, LegacyConflict,
          &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0]),
    spec!(0x9E, Some(0x12), "GET LBA STATUS",                 H::GetLbaStatus,         In,                           Read,    LegacyConflict,
          &[0x9E, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0xA0, None,       "REPORT LUNS",                    H::ReportLuns,           In,                           Allowed, LegacyOk,
          &[0xA0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0]),
    spec!(0xA3, Some(0x0C), "REPORT SUPPORTED OPERATION CODES", H::ReportSupportedOpcodes, In,                       Allowed, LegacyConflict,
          &[0xA3, 0x0C, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0xA3, Some(0x0D), "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", H::ReportSupportedTmfs, In,                Allowed, LegacyConflict,
          &[0xA3, 0x0D, 0x80, 0, 0, 0, FF, FF, FF, FF, 0, 0]),
    spec!(0xA8, None,       "READ(12)",                       H::Read,                 In,                           Read,    LegacyConflict,
          &[0xA8, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0xAA, None,       "WRITE(12)",                      H::Write,                OutBlocks(LEN12),             Write,   LegacyConflict,
          &[0xAA, 0x18, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0xAE, None,       "WRITE AND VERIFY(12)",           H::WriteAndVerify,       OutBlocks(LEN12),             Write,   LegacyConflict,
          &[0xAE, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
    spec!(0xAF, None,       "VERIFY(12)",                     H::Verify,               OutIfByteCheck(LEN12),        Read,    LegacyConflict,
          &[0xAF, 0x16, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]),
];

/// What looking a CDB up in the table found.
#[derive(Debug)]
pub enum Lookup {
    Found(&'static CommandSpec),
    /// No command with this opcode.
    UnknownOpcode,
    /// The opcode exists, but not with this service action.
    UnknownServiceAction,
}

/// Whether any row has this opcode with a service action.
pub fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// Find the row for `cdb` (which must be non-empty).
pub fn lookup(cdb: &[u8]) -> Lookup {
    let opcode = cdb[0];
    let mut rows = COMMANDS.iter().filter(|c| c.opcode == opcode).peekable();
    if rows.peek().is_none() {
        return Lookup::UnknownOpcode;
    }
    let sa = cdb.get(1).map(|b| b & 0x1F);
    for row in rows {
        match row.service_action {
            None => return Lookup::Found(row),
            Some(want) if Some(want) == sa => return Lookup::Found(row),
            Some(_) => {}
        }
    }
    Lookup::UnknownServiceAction
}

/// Find the row for an opcode and (for opcodes that have them) a service
/// action, as REPORT SUPPORTED OPERATION CODES asks.
pub fn find(opcode: u8, service_action: Option<u8>) -> Option<&'static CommandSpec> {
    COMMANDS
        .iter()
        .find(|c| c.opcode == opcode && c.service_action == service_action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_has_no_duplicate_rows() {
        for w in COMMANDS.windows(2) {
            let a = (w[0].opcode, w[0].service_action);
            let b = (w[1].opcode, w[1].service_action);
            assert!(a < b, "{} must come before {}", w[0].name, w[1].name);
        }
    }

    #[test]
    fn cdb_usage_starts_with_the_opcode_and_has_the_group_length() {
        for c in COMMANDS {
            assert_eq!(c.cdb_usage[0], c.opcode, "{}", c.name);
            let group_len = match c.opcode >> 5 {
                0 => 6,
                1 | 2 => 10,
                4 => 16,
                5 => 12,
                g => panic!("{}: group {g} not used", c.name),
            };
            assert_eq!(c.cdb_len(), group_len, "{}", c.name);
            if let Some(sa) = c.service_action {
                assert_eq!(c.cdb_usage[1], sa, "{}", c.name);
            }
        }
    }
}
