//! Block commands (SBC-3): capacity, READ/WRITE in every CDB size, WRITE
//! AND VERIFY, VERIFY, SYNCHRONIZE CACHE, WRITE SAME, UNMAP, GET LBA STATUS
//! and COMPARE AND WRITE.
//!
//! Every handler first turns its CDB into an [`Extent`] (LBA + blocks, the
//! same layout for all 10/12/16-byte CDBs), checks it against the capacity
//! and the Block Limits it advertises, and then makes at most a few device
//! calls with byte offsets. Write payloads are slices of the transport's
//! Data-Out `Bytes` (no copy).
//!
//! FUA is honoured per command, and forced on every write while the
//! initiator has turned the write cache off (MODE SELECT, WCE=0). DPO is
//! accepted and ignored: there is no cache whose retention it could steer.

use bytes::Bytes;

use crate::device::{BlockDevice, Provisioning};
use crate::scsi::sense::{Asc, Failure, Sense, SenseKey};
use crate::scsi::{
    be, device_failure, truncate, ScsiLogicalUnit, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES,
    MAX_UNMAP_BYTES, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS,
};

/// A run of logical blocks named by a CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    lba: u64,
    blocks: u64,
}

/// LBA and transfer length for the READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE
/// CACHE layouts, chosen by CDB size (from the opcode's group).
fn extent(cdb: &[u8]) -> Extent {
    match cdb[0] >> 5 {
        0 => {
            let blocks = u64::from(cdb[4]);
            Extent {
                lba: be(cdb, 1, 3) & 0x1F_FFFF,
                // READ(6)/WRITE(6): 0 means 256 blocks.
                blocks: if blocks == 0 { 256 } else { blocks },
            }
        }
        1 | 2 => Extent {
            lba: be(cdb, 2, 4),
            blocks: be(cdb, 7, 2),
        },
        5 => Extent {
            lba: be(cdb, 2, 4),
            blocks: be(cdb, 6, 4),
        },
        _ => Extent {
            lba: be(cdb, 2, 8),
            blocks: be(cdb, 10, 4),
        },
    }
}

/// Offset of the transfer length field, for sense field pointers.
fn length_byte(cdb: &[u8]) -> u16 {
    match cdb[0] >> 5 {
        0 => 4,
        1 | 2 => 7,
        5 => 6,
        _ => 10,
    }
}

impl<D: BlockDevice> ScsiLogicalUnit<D> {
    fn check_range(&self, e: Extent) -> Result<(), Failure> {
        match e.lba.checked_add(e.blocks) {
            Some(end) if end <= self.geometry().block_count() => Ok(()),
            _ => Err(Failure::lba_out_of_range()),
        }
    }

    fn check_transfer(&self, cdb: &[u8], e: Extent) -> Result<(), Failure> {
        if e.blocks * self.block_size() > u64::from(MAX_TRANSFER_BYTES) {
            return Err(Failure::invalid_cdb_field(length_byte(cdb), None));
        }
        Ok(())
    }

    pub(super) fn check_writable(&self) -> Result<(), Failure> {
        if self.config.read_only {
            return Err(Failure::check(SenseKey::DataProtect, Asc::WRITE_PROTECTED));
        }
        if self.state().mode.software_write_protect {
            return Err(Failure::check(
                SenseKey::DataProtect,
                Asc::SOFTWARE_WRITE_PROTECTED,
            ));
        }
        Ok(())
    }

    /// RDPROTECT/WRPROTECT/VRPROTECT (byte 1 bits 7..5) must be zero: the
    /// LU has no protection information.
    fn check_no_protection(cdb: &[u8]) -> Result<(), Failure> {
        if cdb[0] >> 5 != 0 && cdb[1] & 0xE0 != 0 {
            return Err(Failure::invalid_cdb_field(1, Some(7)));
        }
        Ok(())
    }

    fn fua(&self, cdb: &[u8]) -> bool {
        let fua_bit = cdb[0] >> 5 != 0 && cdb[1] & 0x08 != 0;
        fua_bit || !self.state().mode.write_cache_enabled
    }

    fn fail(&self) -> impl Fn(crate::device::DeviceError) -> Failure {
        let bs = self.block_size();
        move |e| device_failure(e, bs)
    }

    pub(super) fn read_capacity10(&self, cdb: &[u8]) -> Result<Bytes, Failure> {
        if cdb[8] & 0x01 == 0 && be(cdb, 2, 4) != 0 {
            // An LBA without PMI is an error (SBC-3 §5.15).
            return Err(Failure::invalid_cdb_field(2, None));
        }
        let last = self.geometry().block_count() - 1;
        let mut d = u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes().to_vec();
        d.extend_from_slice(&self.geometry().logical_block_size.to_be_bytes());
        Ok(Bytes::from(d))
    }

    pub(super) fn read_capacity16(&self, cdb: &[u8]) -> Result<Bytes, Failure> {
        let alloc = be(cdb, 10, 4);
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&(self.geometry().block_count() - 1).to_be_bytes());
        d[8..12].copy_from_slice(&self.geometry().logical_block_size.to_be_bytes());
        d[13] = self.geometry().physical_block_exponent & 0x0F;
        if self.geometry().thin {
            d[14] = 0x80 | 0x40; // LBPME, LBPRZ
        }
        Ok(truncate(d, alloc))
    }

    pub(super) async fn read(&self, cdb: &[u8]) -> Result<Bytes, Failure> {
        Self::check_no_protection(cdb)?;
        let e = extent(cdb);
        self.check_range(e)?;
        self.check_transfer(cdb, e)?;
        if e.blocks == 0 {
            return Ok(Bytes::new());
        }
        let bs = self.block_size();
        self.device
            .read(e.lba * bs, (e.blocks * bs) as u32)
            .await
            .map_err(self.fail())
    }

    pub(super) async fn write(&self, cdb: &[u8], data: Bytes) -> Result<Bytes, Failure> {
        Self::check_no_protection(cdb)?;
        let e = extent(cdb);
        self.check_range(e)?;
        self.check_transfer(cdb, e)?;
        self.check_writable()?;
        // `data` may hold fewer blocks than the CDB names when the initiator
        // sent less (see `ScsiLogicalUnit::run`): write what came.
        if e.blocks == 0 || data.is_empty() {
            return Ok(Bytes::new());
        }
        let fua = self.fua(cdb);
        self.device
            .write(e.lba * self.block_size(), data, fua)
            .await
            .map_err(self.fail())?;
        Ok(Bytes::new())
    }

    /// WRITE AND VERIFY: write through to the medium, then (BYTCHK=1) read
    /// it back and compare.
    pub(super) async fn write_and_verify(&self, cdb: &[u8], data: Bytes) -> Result<Bytes, Failure> {
        Self::check_no_protection(cdb)?;
        let e = extent(cdb);
        self.check_range(e)?;
        self.check_transfer(cdb, e)?;
        self.check_writable()?;
        if e.blocks == 0 {
            return Ok(Bytes::new());
        }
        let offset = e.lba * self.block_size();
        self.device
            .write(offset, data.clone(), true)
            .await
            .map_err(self.fail())?;
        if cdb[1] & 0x02 != 0 {
            let back = self
                .device
                .read(offset, data.len() as u32)
                .await
                .map_err(self.fail())?;
            if let Some(at) = back.iter().zip(data.iter()).position(|(a, b)| a != b) {
                return Err(miscompare(at as u64));
            }
        }
        Ok(Bytes::new())
    }

    pub(super) async fn verify(&self, cdb: &[u8], data: Bytes) -> Result<Bytes, Failure> {
        Self::check_no_protection(cdb)?;
        let e = extent(cdb);
        let byte_check = (cdb[1] >> 1) & 0x03;
        if byte_check == 0b10 {
            return Err(Failure::invalid_cdb_field(1, Some(2)));
        }
        self.check_range(e)?;
        self.check_transfer(cdb, e)?;
        if e.blocks == 0 {
            return Ok(Bytes::new());
        }
        let bs = self.block_size();
        // BYTCHK=00 is a medium verification: reading the blocks proves
        // they are readable.
        let medium = self
            .device
            .read(e.lba * bs, (e.blocks * bs) as u32)
            .await
            .map_err(self.fail())?;
        let first_difference = match byte_check {
            0b01 => medium.iter().zip(data.iter()).position(|(a, b)| a != b),
            0b11 => medium.chunks(bs as usize).enumerate().find_map(|(i, block)| {
                block
                    .iter()
                    .zip(data.iter())
                    .position(|(a, b)| a != b)
                    .map(|at| i * bs as usize + at)
            }),
            _ => None,
        };
        match first_difference {
            Some(at) => Err(miscompare(at as u64)),
            None => Ok(Bytes::new()),
        }
    }

    pub(super) async fn synchronize_cache(&self, cdb: &[u8]) -> Result<Bytes, Failure> {
        let e = extent(cdb);
        // NUMBER OF LOGICAL BLOCKS 0 means "to the end of the medium".
        self.check_range(Extent {
            lba: e.lba,
            blocks: e.blocks,
        })?;
        self.device.flush().await.map_err(self.fail())?;
        Ok(Bytes::new())
    }

    pub(super) async fn write_same(&self, cdb: &[u8], data: Bytes) -> Result<Bytes, Failure> {
        Self::check_no_protection(cdb)?;
        let sixteen = cdb[0] == 0x93;
        let anchor = cdb[1] & 0x10 != 0;
        let unmap = cdb[1] & 0x08 != 0;
        let ndob = sixteen && cdb[1] & 0x01 != 0;
        if anchor {
            // ANC_SUP=0: anchored (allocated, unmapped) state is not offered.
            return Err(Failure::invalid_cdb_field(1, Some(4)));
        }
        let mut e = extent(cdb);
        let count = self.geometry().block_count();
        if e.blocks == 0 {
            // WSNZ=0: zero blocks means "to the end of the medium".
            if e.lba > count {
                return Err(Failure::lba_out_of_range());
            }
            e.blocks = count - e.lba;
        }
        self.check_range(e)?;
        let bs = self.block_size();
        if e.blocks > MAX_WRITE_SAME_BLOCKS {
            return Err(Failure::invalid_cdb_field(length_byte(cdb), None));
        }
        self.check_writable()?;
        let offset = e.lba * bs;
        let len = e.blocks * bs;
        // With UNMAP on a thin device the blocks are deallocated whatever
        // the data (as Linux LIO does): LBPRZ tells the initiator they now
        // read as zeros, and libiscsi's WriteSame.UnmapUntilEnd expects it.
        if unmap && self.geometry().thin {
            self.device.unmap(offset, len).await.map_err(self.fail())?;
        } else {
            let pattern = if ndob {
                Bytes::from(vec![0u8; bs as usize])
            } else {
                data
            };
            self.device
                .write_same(offset, len, pattern)
                .await
                .map_err(self.fail())?;
        }
        if self.fua(cdb) {
            self.device.flush().await.map_err(self.fail())?;
        }
        Ok(Bytes::new())
    }

    pub(super) async fn unmap(&self, cdb: &[u8], params: &[u8]) -> Result<Bytes, Failure> {
        if !self.geometry().thin {
            return Err(Failure::illegal(Asc::INVALID_COMMAND_OPERATION_CODE));
        }
        if cdb[1] & 0x01 != 0 {
            // ANCHOR: not offered (ANC_SUP=0).
            return Err(Failure::invalid_cdb_field(1, Some(0)));
        }
        if params.is_empty() {
            return Ok(Bytes::new());
        }
        if params.len() < 8 {
            return Err(Failure::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let descriptors_len = be(params, 2, 2) as usize;
        let available = (params.len() - 8).min(descriptors_len) / 16;
        if available as u32 > MAX_UNMAP_DESCRIPTORS {
            return Err(Failure::invalid_param_field(2, None));
        }
        let bs = self.block_size();
        let mut extents = Vec::with_capacity(available);
        let mut total = 0u64;
        for i in 0..available {
            let d = &params[8 + 16 * i..8 + 16 * (i + 1)];
            let e = Extent {
                lba: be(d, 0, 8),
                blocks: be(d, 8, 4),
            };
            self.check_range(e)?;
            total += e.blocks;
            extents.push(e);
        }
        if total * bs > MAX_UNMAP_BYTES {
            return Err(Failure::invalid_param_field(8 + 8, None));
        }
        self.check_writable()?;
        for e in extents.into_iter().filter(|e| e.blocks > 0) {
            self.device
                .unmap(e.lba * bs, e.blocks * bs)
                .await
                .map_err(self.fail())?;
        }
        Ok(Bytes::new())
    }

    pub(super) async fn get_lba_status(&self, cdb: &[u8]) -> Result<Bytes, Failure> {
        let lba = be(cdb, 2, 8);
        let alloc = be(cdb, 10, 4);
        let count = self.geometry().block_count();
        if lba >= count {
            return Err(Failure::lba_out_of_range());
        }
        let bs = self.block_size();
        // Room for as many descriptors as the allocation length holds, but
        // at least one (the first descriptor is required).
        let max_descriptors = (alloc.saturating_sub(8) / 16).clamp(1, 256);
        let mut d = vec![0u8; 8];
        let mut next = lba;
        let mut n = 0;
        while next < count && n < max_descriptors {
            let remaining = (count - next).min(u64::from(u32::MAX));
            let (state, len) = self
                .device
                .provisioning(next * bs, remaining * bs)
                .await
                .map_err(self.fail())?;
            // A hole smaller than a block leaves the block mapped; a run
            // that ends mid-block owns that block.
            let (state, blocks) = match state {
                Provisioning::Deallocated if len >= bs => (state, len / bs),
                Provisioning::Deallocated => (Provisioning::Mapped, 1),
                Provisioning::Mapped => (state, len.div_ceil(bs).max(1)),
            };
            let blocks = blocks.min(remaining);
            d.extend_from_slice(&next.to_be_bytes());
            d.extend_from_slice(&(blocks as u32).to_be_bytes());
            d.push(match state {
                Provisioning::Mapped => 0,
                Provisioning::Deallocated => 1,
            });
            d.extend_from_slice(&[0; 3]);
            next += blocks;
            n += 1;
        }
        let len = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&len.to_be_bytes());
        Ok(truncate(d, alloc))
    }

    pub(super) async fn compare_and_write(&self, cdb: &[u8], data: Bytes) -> Result<Bytes, Failure> {
        Self::check_no_protection(cdb)?;
        let blocks = u64::from(cdb[13]);
        let e = Extent {
            lba: be(cdb, 2, 8),
            blocks,
        };
        if blocks > u64::from(MAX_COMPARE_AND_WRITE_BLOCKS) {
            return Err(Failure::invalid_cdb_field(13, None));
        }
        self.check_range(e)?;
        self.check_writable()?;
        if blocks == 0 {
            return Ok(Bytes::new());
        }
        let half = (blocks * self.block_size()) as usize;
        let compare = data.slice(..half);
        let write = data.slice(half..2 * half);
        let offset = e.lba * self.block_size();
        self.device
            .compare_and_write(offset, compare, write)
            .await
            .map_err(self.fail())?;
        if self.fua(cdb) {
            self.device.flush().await.map_err(self.fail())?;
        }
        Ok(Bytes::new())
    }
}

/// MISCOMPARE with the offset of the first differing byte in INFORMATION.
fn miscompare(offset: u64) -> Failure {
    Failure::Check(Sense::new(SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY).with_information(offset))
}
