//! Fixed-format sense data (SPC-4 §4.5.3) and the failures a command can end in.
//!
//! Every way a command can fail is a [`Failure`]: either CHECK CONDITION with a
//! [`Sense`] (sense key + additional sense code + optional INFORMATION and
//! sense-key-specific field pointer), or a status without sense (RESERVATION
//! CONFLICT, BUSY). Handlers return `Result<_, Failure>` and never build sense
//! bytes by hand, so the 18-byte layout exists in exactly one place.
//!
//! ```text
//!  byte 0   0x70 (current, fixed) | VALID (0x80) when INFORMATION is set
//!  byte 2   sense key
//!  3..7     INFORMATION (big-endian u32)
//!  byte 7   additional sense length = 10
//!  12, 13   ASC, ASCQ
//!  15..18   SKSV | C/D | BPV | bit pointer, field pointer (u16)
//! ```

use bytes::Bytes;

use crate::lu::{ScsiResult, ScsiStatus};

/// SPC-4 sense keys used by this command set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    AbortedCommand = 0xB,
    Miscompare = 0xE,
}

/// An additional sense code and qualifier (ASC/ASCQ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Asc(pub u8, pub u8);

impl Asc {
    pub const NO_ADDITIONAL_SENSE: Asc = Asc(0x00, 0x00);
    pub const NOT_READY_CAUSE_NOT_REPORTABLE: Asc = Asc(0x04, 0x00);
    pub const NOT_READY_INITIALIZING_COMMAND_REQUIRED: Asc = Asc(0x04, 0x02);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x11, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc(0x1A, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Asc = Asc(0x1D, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc(0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Asc = Asc(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x24, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Asc = Asc(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc(0x26, 0x00);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = Asc(0x26, 0x04);
    pub const WRITE_PROTECTED: Asc = Asc(0x27, 0x00);
    pub const SOFTWARE_WRITE_PROTECTED: Asc = Asc(0x27, 0x02);
    pub const POWER_ON_RESET_OCCURRED: Asc = Asc(0x29, 0x00);
    pub const BUS_DEVICE_RESET_OCCURRED: Asc = Asc(0x29, 0x03);
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc(0x2A, 0x01);
    pub const CAPACITY_DATA_HAS_CHANGED: Asc = Asc(0x2A, 0x09);
    pub const RESERVATIONS_PREEMPTED: Asc = Asc(0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: Asc = Asc(0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Asc = Asc(0x2A, 0x05);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc(0x39, 0x00);
    pub const MEDIUM_NOT_PRESENT: Asc = Asc(0x3A, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x44, 0x00);
    pub const INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT: Asc = Asc(0x0E, 0x03);
    pub const MEDIUM_REMOVAL_PREVENTED: Asc = Asc(0x53, 0x02);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = Asc(0x55, 0x04);
}

/// Where in the CDB or parameter list the offending field is (the
/// sense-key-specific FIELD POINTER of SPC-4 §4.5.2.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// true: the byte is in the CDB; false: in the parameter list.
    pub in_cdb: bool,
    pub byte: u16,
    /// The most significant bit of the field, when known.
    pub bit: Option<u8>,
}

/// The contents of fixed-format sense data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// The INFORMATION field (an LBA or an offset, depending on the error).
    pub information: Option<u64>,
    pub field: Option<FieldPointer>,
}

/// Length of the fixed-format sense data this crate produces.
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    pub const fn new(key: SenseKey, asc: Asc) -> Sense {
        Sense {
            key,
            asc,
            information: None,
            field: None,
        }
    }

    pub fn with_information(mut self, information: u64) -> Sense {
        self.information = Some(information);
        self
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        b[2] = self.key as u8;
        if let Some(info) = self.information {
            // INFORMATION is 4 bytes in fixed format; larger values (LBAs
            // beyond 2^32) are reported without VALID, as SPC-4 requires.
            if let Ok(info) = u32::try_from(info) {
                b[0] |= 0x80;
                b[3..7].copy_from_slice(&info.to_be_bytes());
            }
        }
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        b[12] = self.asc.0;
        b[13] = self.asc.1;
        if let Some(f) = self.field {
            b[15] = 0x80 | if f.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = f.bit {
                b[15] |= 0x08 | (bit & 0x07);
            }
            b[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        Bytes::copy_from_slice(&b)
    }
}

/// How a command failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Check(Sense),
    ReservationConflict,
}

impl Failure {
    /// ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at `byte` (and `bit`).
    pub fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Failure {
        let mut s = Sense::new(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB);
        s.field = Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        });
        Failure::Check(s)
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at `byte`.
    pub fn invalid_param_field(byte: u16, bit: Option<u8>) -> Failure {
        let mut s = Sense::new(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
        s.field = Some(FieldPointer {
            in_cdb: false,
            byte,
            bit,
        });
        Failure::Check(s)
    }

    pub fn illegal(asc: Asc) -> Failure {
        Failure::Check(Sense::new(SenseKey::IllegalRequest, asc))
    }

    pub fn lba_out_of_range() -> Failure {
        Failure::illegal(Asc::LBA_OUT_OF_RANGE)
    }

    pub fn check(key: SenseKey, asc: Asc) -> Failure {
        Failure::Check(Sense::new(key, asc))
    }

    /// The transport-level result for this failure.
    pub fn into_result(self, data_out_len: u32) -> ScsiResult {
        match self {
            Failure::Check(sense) => ScsiResult {
                status: ScsiStatus::CheckCondition,
                sense: Some(sense.to_bytes()),
                data_in: Bytes::new(),
                data_out_len,
            },
            Failure::ReservationConflict => ScsiResult {
                status: ScsiStatus::ReservationConflict,
                sense: None,
                data_in: Bytes::new(),
                data_out_len,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_field_sense_carries_cdb_field_pointer() {
        let Failure::Check(s) = Failure::invalid_cdb_field(2, Some(7)) else {
            panic!()
        };
        let b = s.to_bytes();
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(b[15], 0x80 | 0x40 | 0x08 | 7);
        assert_eq!(&b[16..18], &[0, 2]);
    }

    #[test]
    fn information_sets_valid_bit_only_when_it_fits_32_bits() {
        let s = Sense::new(SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY).with_information(513);
        let b = s.to_bytes();
        assert_eq!(b[0], 0xF0);
        assert_eq!(&b[3..7], &513u32.to_be_bytes());
        let big = Sense::new(SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR).with_information(1 << 40);
        assert_eq!(big.to_bytes()[0], 0x70);
    }
}
