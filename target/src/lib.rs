//! # basalt-target: the iSCSI front door
//!
//! An iSCSI target (RFC 7143) and an SPC-4/SBC-3 logical unit, generic over
//! the [`device::BlockDevice`] trait. In this crate the device is a plain file
//! ([`file::FileDevice`]); the engine crate supplies the replicated volume.

pub mod device;
pub mod file;
pub mod iscsi;
pub mod lu;
pub mod scsi;
