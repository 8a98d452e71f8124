//! # basalt-engine: the volume controller
//!
//! The controller serves one volume over iSCSI and replicates it: every write
//! goes to all active replicas, every read to one. The write path, top-down:
//!
//! 1. `basalt_target::iscsi` — a SCSI Command PDU and its Data-Out arrive;
//! 2. `basalt_target::scsi` — the CDB becomes a `BlockDevice::write`;
//! 3. [`volume::core`] — the volume's state machine fans it out to replicas;
//! 4. `basalt_proto::frame` — one frame per replica, sharing one buffer, sent
//!    by a `basalt_proto::client::ReplicaClient`;
//! 5. `replica/src/store/write.rs` — each replica appends it to its head.
//!
//! The engine speaks to replicas only through `basalt_proto` (the frames,
//! the client, dead-peer detection): it does not link the replica's store.

pub mod api;
pub mod api_auth;
pub mod api_tls;
pub mod controller;
pub mod http;
pub mod name;
pub mod units;
pub mod volume;
