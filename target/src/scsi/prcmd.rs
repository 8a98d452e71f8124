//! PERSISTENT RESERVE IN / OUT: CDB and parameter-list parsing around the
//! state machine in `scsi/pr.rs`, and the IN data formats (SPC-4 §6.15,
//! §6.16).

use bytes::Bytes;

use crate::device::BlockDevice;
use crate::lu::{ItNexus, ScsiCommand};
use crate::scsi::pr::{PrError, PrType, ReservationKey};
use crate::scsi::sense::{Asc, Failure};
use crate::scsi::{be, truncate, ScsiLogicalUnit};

/// PR OUT's basic parameter list (no SPEC_I_PT, no REGISTER AND MOVE).
const PR_OUT_PARAMS_LEN: usize = 24;

impl From<PrError> for Failure {
    fn from(e: PrError) -> Failure {
        match e {
            PrError::Conflict => Failure::ReservationConflict,
            PrError::InvalidParam(byte) => Failure::invalid_param_field(byte, None),
            PrError::InvalidCdb(byte) => Failure::invalid_cdb_field(byte, None),
            PrError::InvalidRelease => Failure::illegal(Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION),
        }
    }
}

/// An iSCSI initiator port TransportID (SPC-4 §7.6.4.6, format 01b):
/// `name,i,0x<isid>`, NUL-terminated, padded to a multiple of 4.
fn transport_id(nexus: &ItNexus) -> Vec<u8> {
    let isid: String = nexus.isid.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = format!("{},i,0x{isid}", nexus.initiator_name).into_bytes();
    name.push(0);
    while name.len() % 4 != 0 || name.len() < 20 {
        name.push(0);
    }
    let mut id = vec![0x40 | 0x05, 0];
    id.extend_from_slice(&(name.len() as u16).to_be_bytes());
    id.extend(name);
    id
}

impl<D: BlockDevice> ScsiLogicalUnit<D> {
    pub(super) fn persistent_reserve_in(&self, cmd: &ScsiCommand) -> Result<Bytes, Failure> {
        let cdb = &cmd.cdb[..];
        let alloc = be(cdb, 7, 2);
        let st = self.state();
        let pr = &st.pr;
        let mut d = pr.generation.to_be_bytes().to_vec();
        match cdb[1] & 0x1F {
            // READ KEYS
            0x00 => {
                d.extend_from_slice(&((pr.registrations.len() * 8) as u32).to_be_bytes());
                for r in &pr.registrations {
                    d.extend_from_slice(&r.key.0.to_be_bytes());
                }
            }
            // READ RESERVATION
            0x01 => match &pr.reservation {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    // All-registrants reservations report key 0.
                    let key = match r.ty {
                        PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants => 0,
                        _ => pr.key_of(&r.holder).map_or(0, |k| k.0),
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, r.ty.code(), 0, 0]);
                }
            },
            // REPORT CAPABILITIES
            0x02 => {
                d = vec![0u8; 8];
                d[1] = 8;
                // CRH: RESERVE(6/10) conflicts with registrations.
                d[2] = 0x10;
                // TMV: the type mask is valid; ALLOW COMMANDS 0.
                d[3] = 0x80;
                // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
                d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
                d[5] = 0x01;
            }
            // READ FULL STATUS
            0x03 => {
                let mut descs = Vec::new();
                for r in &pr.registrations {
                    let holder = pr.is_holder(&r.nexus);
                    let mut desc = r.key.0.to_be_bytes().to_vec();
                    desc.extend_from_slice(&[0; 4]);
                    desc.push(if holder { 0x01 } else { 0 });
                    desc.push(match (&pr.reservation, holder) {
                        (Some(res), true) => res.ty.code(),
                        _ => 0,
                    });
                    desc.extend_from_slice(&[0; 4]);
                    // Relative target port identifier.
                    desc.extend_from_slice(&r.nexus.tpgt.to_be_bytes());
                    let tid = transport_id(&r.nexus);
                    desc.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    desc.extend(tid);
                    descs.extend(desc);
                }
                d.extend_from_slice(&(descs.len() as u32).to_be_bytes());
                d.extend(descs);
            }
            _ => return Err(Failure::invalid_cdb_field(1, Some(4))),
        }
        Ok(truncate(d, alloc))
    }

    pub(super) fn persistent_reserve_out(&self, cmd: &ScsiCommand, params: &[u8]) -> Result<Bytes, Failure> {
        let cdb = &cmd.cdb[..];
        let service_action = cdb[1] & 0x1F;
        let scope = cdb[2] >> 4;
        let type_code = cdb[2] & 0x0F;
        if params.len() != PR_OUT_PARAMS_LEN || be(cdb, 5, 4) != PR_OUT_PARAMS_LEN as u64 {
            return Err(Failure::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let key = ReservationKey(be(params, 0, 8));
        let sa_key = ReservationKey(be(params, 8, 8));
        let flags = params[20];
        if flags & 0x08 != 0 {
            // SPEC_I_PT: registering other initiator ports is not offered.
            return Err(Failure::invalid_param_field(20, Some(3)));
        }
        if flags & 0x04 != 0 {
            // ALL_TG_PT: there is one target port group; not offered (ATP_C=0).
            return Err(Failure::invalid_param_field(20, Some(2)));
        }
        if flags & 0x01 != 0 {
            // APTPL: registrations do not survive a restart (PTPL_C=0).
            return Err(Failure::invalid_param_field(20, Some(0)));
        }
        let needs_type = matches!(service_action, 0x01 | 0x02 | 0x04 | 0x05);
        let ty = if needs_type {
            if scope != 0 {
                return Err(Failure::invalid_cdb_field(2, Some(7)));
            }
            match PrType::from_code(type_code) {
                Some(t) => Some(t),
                None => return Err(Failure::invalid_cdb_field(2, Some(3))),
            }
        } else {
            None
        };
        let nexus = &*cmd.nexus;
        let mut st = self.state();
        let attentions = match (service_action, ty) {
            (0x00, _) => st.pr.register(nexus, key, sa_key, false)?,
            (0x06, _) => st.pr.register(nexus, key, sa_key, true)?,
            (0x01, Some(ty)) => {
                st.pr.reserve(nexus, key, ty)?;
                Vec::new()
            }
            (0x02, Some(ty)) => st.pr.release(nexus, key, ty)?,
            (0x03, _) => st.pr.clear(nexus, key)?,
            (0x04 | 0x05, Some(ty)) => st.pr.preempt(nexus, key, sa_key, ty)?,
            // REGISTER AND MOVE (0x07) is optional and not offered.
            _ => return Err(Failure::invalid_cdb_field(1, Some(4))),
        };
        for (n, asc) in attentions {
            st.queue_attention(&n, asc);
        }
        Ok(Bytes::new())
    }
}
