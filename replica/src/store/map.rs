//! The merged volume map: for every block ever written, the newest layer that holds it.
//!
//! A read is one lookup here, whatever the depth of the chain (Longhorn and Jiva keep one byte or two
//! per block of the *volume*, 256 MiB per TiB, and cap the chain at 254/1024 layers). Memory follows
//! what was written: a `BTreeMap` entry (~30 bytes with node overhead) per written or discarded block,
//! nothing for blocks never touched, so a 64 TiB thin volume with 1 GiB written needs about 8 MiB.
//!
//! The CRC is kept here so a read can verify a block without touching the index log.

use std::collections::BTreeMap;
use std::ops::Range;

use super::log::BlockState;
use super::types::LayerId;

/// The newest state of one block and the layer that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub layer: LayerId,
    pub state: BlockState,
}

/// `lba -> Entry` for every block some layer holds.
#[derive(Debug, Default)]
pub(crate) struct VolumeMap {
    entries: BTreeMap<u64, Entry>,
}

impl VolumeMap {
    pub fn get(&self, lba: u64) -> Option<Entry> {
        self.entries.get(&lba).copied()
    }

    /// Sets the entry of `lba`, returning the previous one.
    pub fn insert(&mut self, lba: u64, entry: Entry) -> Option<Entry> {
        self.entries.insert(lba, entry)
    }

    pub fn range(&self, blocks: Range<u64>) -> impl Iterator<Item = (u64, Entry)> + '_ {
        self.entries.range(blocks).map(|(&lba, &e)| (lba, e))
    }

    /// Puts a newer layer's blocks on top (used when building the map oldest layer first).
    pub fn overlay(&mut self, layer: LayerId, blocks: &BTreeMap<u64, BlockState>) {
        for (&lba, &state) in blocks {
            self.entries.insert(lba, Entry { layer, state });
        }
    }

    /// The blocks of `layer` as the map sees them (for the head, all it holds).
    pub fn blocks_of(&self, layer: LayerId) -> impl Iterator<Item = (u64, BlockState)> + '_ {
        self.entries
            .iter()
            .filter(move |(_, e)| e.layer == layer)
            .map(|(&lba, e)| (lba, e.state))
    }

    /// Coalesced ranges of blocks that hold data in the merged view (tombstones excluded).
    pub fn allocated_blocks(&self) -> Vec<Range<u64>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for (&lba, e) in &self.entries {
            if !matches!(e.state, BlockState::Data { .. }) {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if last.end == lba => last.end = lba + 1,
                _ => ranges.push(lba..lba + 1),
            }
        }
        ranges
    }
}
