//! Units of the store: blocks versus bytes, and layer identities.
//!
//! The API speaks bytes (512-byte aligned, as SCSI does); everything inside speaks 4 KiB blocks. The
//! newtypes make it a compile error to pass a byte offset where a block index is expected.

use std::fmt;

pub use basalt_proto::BLOCK_SIZE;

/// [`BLOCK_SIZE`] as a `usize`, for buffer arithmetic.
pub const BLOCK: usize = BLOCK_SIZE as usize;
/// The alignment required of every offset and length at the API: the SCSI logical block size we
/// advertise. Sub-block writes are read-modify-write of the whole 4 KiB block.
pub const SECTOR_SIZE: u64 = 512;

/// A block index: block `n` covers bytes `[n * 4096, (n + 1) * 4096)` of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lba(pub u64);

impl Lba {
    /// The block holding byte `offset`.
    pub fn containing(offset: u64) -> Lba {
        Lba(offset / BLOCK_SIZE)
    }

    /// The volume byte offset where this block starts (also its offset in a layer's data object).
    pub fn byte_offset(self) -> u64 {
        self.0 * BLOCK_SIZE
    }
}

impl fmt::Display for Lba {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// The identity of one layer (a snapshot or the head). Ids only grow, and a new layer is always put
/// on top of the chain, so along the chain ids increase from oldest to newest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct LayerId(pub u32);

impl LayerId {
    /// Name of the layer's sparse data object.
    pub fn data_object(self) -> String {
        format!("layer-{:08}.data", self.0)
    }

    /// Name of the layer's index log object.
    pub fn log_object(self) -> String {
        format!("layer-{:08}.idx", self.0)
    }

    /// The layer an object name belongs to, if it is a layer object.
    pub fn of_object(name: &str) -> Option<LayerId> {
        let rest = name.strip_prefix("layer-")?;
        let (id, kind) = rest.split_once('.')?;
        if kind != "data" && kind != "idx" {
            return None;
        }
        id.parse().ok().map(LayerId)
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {}", self.0)
    }
}
