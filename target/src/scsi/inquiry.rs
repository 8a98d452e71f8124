//! INQUIRY: standard data and the vital product data pages (SPC-4 §6.6,
//! §7.8; SBC-3 §6.5).
//!
//! | page | contents                                                          |
//! |------|-------------------------------------------------------------------|
//! | 0x00 | supported pages                                                   |
//! | 0x80 | unit serial number                                                |
//! | 0x83 | NAA 6 + T10 vendor id (the LU), relative target port              |
//! | 0xB0 | block limits (transfer, UNMAP, WRITE SAME, CAW limits)           |
//! | 0xB1 | block device characteristics (non-rotating)                       |
//! | 0xB2 | logical block provisioning (thin: LBPU, LBPWS, LBPWS10, LBPRZ)   |
//!
//! The NAA designator is derived from the serial number (NAA 6 with the
//! MD5 of the serial in the OUI and vendor-specific bits): Basalt has no
//! IEEE OUI, and what initiators (multipath) need is that the id is stable
//! for a volume and different between volumes.

use bytes::Bytes;
use md5::{Digest, Md5};

use crate::device::BlockDevice;
use crate::lu::ScsiCommand;
use crate::scsi::sense::Failure;
use crate::scsi::{
    be, truncate, ScsiLogicalUnit, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES, MAX_UNMAP_BYTES,
    MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS,
};

const SUPPORTED_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// Version descriptors (SPC-4 table 32): SAM-5, SPC-4, SBC-3, iSCSI.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0460, 0x04C0, 0x0960];

/// Peripheral qualifier 011b, device type 1Fh: "no logical unit here".
const NO_LOGICAL_UNIT: u8 = 0x7F;

fn ascii_field(out: &mut [u8], text: &str) {
    out.fill(b' ');
    for (o, c) in out
        .iter_mut()
        .zip(text.bytes().filter(|c| c.is_ascii_graphic() || *c == b' '))
    {
        *o = c;
    }
}

impl<D: BlockDevice> ScsiLogicalUnit<D> {
    pub(super) fn inquiry(&self, cmd: &ScsiCommand) -> Result<Bytes, Failure> {
        let cdb = &cmd.cdb[..];
        let evpd = cdb[1] & 0x01 != 0;
        let page_code = cdb[2];
        let alloc = be(cdb, 3, 2);
        let present = self.addresses_us(cmd.lun);
        if !evpd {
            if page_code != 0 {
                return Err(Failure::invalid_cdb_field(2, Some(7)));
            }
            return Ok(truncate(self.standard_inquiry(present), alloc));
        }
        let page = match page_code {
            0x00 => {
                let mut p = vec![0u8; 4];
                p.extend_from_slice(&SUPPORTED_PAGES);
                p
            }
            0x80 => {
                let mut p = vec![0u8; 4];
                p.extend(self.config.serial.bytes().filter(u8::is_ascii_graphic));
                p
            }
            0x83 => self.device_identification(),
            0xB0 => self.block_limits(),
            0xB1 => {
                let mut p = vec![0u8; 64];
                // MEDIUM ROTATION RATE 1: non-rotating medium.
                p[5] = 0x01;
                p
            }
            0xB2 => self.provisioning_page(),
            _ => return Err(Failure::invalid_cdb_field(2, Some(7))),
        };
        let mut page = page;
        page[0] = if present { 0x00 } else { NO_LOGICAL_UNIT };
        page[1] = page_code;
        let len = (page.len() - 4) as u16;
        page[2..4].copy_from_slice(&len.to_be_bytes());
        Ok(truncate(page, alloc))
    }

    fn standard_inquiry(&self, present: bool) -> Vec<u8> {
        let mut d = vec![0u8; 74];
        d[0] = if present { 0x00 } else { NO_LOGICAL_UNIT };
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HISUP, response data format 2
        d[4] = (d.len() - 5) as u8;
        d[7] = 0x02; // CMDQUE
        ascii_field(&mut d[8..16], &self.config.vendor);
        ascii_field(&mut d[16..32], &self.config.product);
        ascii_field(&mut d[32..36], &self.config.revision);
        for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        d
    }

    /// The 16-byte NAA IEEE Registered Extended designator.
    pub(super) fn naa_id(&self) -> [u8; 16] {
        let digest = Md5::digest(self.config.serial.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest);
        id[0] = 0x60 | (id[0] & 0x0F);
        id
    }

    fn device_identification(&self) -> Vec<u8> {
        let mut p = vec![0u8; 4];
        // NAA, binary, associated with the LU.
        p.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
        p.extend_from_slice(&self.naa_id());
        // T10 vendor id, ASCII: vendor (8 bytes) + serial.
        let mut t10 = vec![b' '; 8];
        ascii_field(&mut t10, &self.config.vendor);
        t10.extend(self.config.serial.bytes().filter(u8::is_ascii_graphic));
        p.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
        p.extend_from_slice(&t10);
        // Relative target port 1, iSCSI (protocol 5), PIV, port association.
        p.extend_from_slice(&[0x51, 0x94, 0x00, 4, 0, 0, 0, 1]);
        p
    }

    fn block_limits(&self) -> Vec<u8> {
        let bs = self.block_size();
        let mut p = vec![0u8; 64];
        p[5] = MAX_COMPARE_AND_WRITE_BLOCKS;
        let granularity: u16 = 1 << self.geometry().physical_block_exponent;
        p[6..8].copy_from_slice(&granularity.to_be_bytes());
        let max_transfer = (u64::from(MAX_TRANSFER_BYTES) / bs) as u32;
        p[8..12].copy_from_slice(&max_transfer.to_be_bytes());
        p[12..16].copy_from_slice(&max_transfer.to_be_bytes());
        if self.geometry().thin {
            p[20..24].copy_from_slice(&((MAX_UNMAP_BYTES / bs) as u32).to_be_bytes());
            p[24..28].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            p[28..32].copy_from_slice(&u32::from(granularity).to_be_bytes());
        }
        p[36..44].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
        p
    }

    fn provisioning_page(&self) -> Vec<u8> {
        let mut p = vec![0u8; 8];
        if self.geometry().thin {
            // LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read as zeros).
            p[5] = 0x80 | 0x40 | 0x20 | 0x04;
            // PROVISIONING TYPE 2: thin.
            p[6] = 0x02;
        }
        p
    }
}
