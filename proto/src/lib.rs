//! # basalt-proto: what crosses the wire
//!
//! Two wire formats live here, with the client side of the data path:
//!
//! * [`frame`]: the controller <-> replica **data path**: length-prefixed,
//!   CRC-protected binary frames carrying the sender's [`Epoch`], pipelined and
//!   answered out of order.
//! * [`pb`]: protobuf messages compiled from `protos/` with protox (no
//!   `protoc` needed): the replica control payloads and the controller's gRPC
//!   management API.
//!
//! [`auth`] holds the volume secret and the challenge-response every
//! data-path connection passes before it is served; [`client`] is the
//! controller's end of the data path ([`client::ReplicaClient`]), and
//! [`peer`] the dead-peer detection both ends turn on, so a controller
//! speaks to replicas without depending on the replica's store.
//!
//! Replica control operations (info, snapshots, SetEpoch) are ops of the
//! data-path frame enum, with protobuf payloads, not a second service: one
//! address, one connection, one epoch check, and a snapshot is ordered
//! exactly with respect to the writes on the same stream, so a controller can
//! drain and snapshot without a second channel racing the data path (see
//! [`frame`]).
//!
//! The domain newtypes shared by every crate ([`Epoch`], [`Revision`],
//! [`VolumeId`]) and the units both ends of the data path agree on
//! ([`BLOCK_SIZE`], [`MAX_VOLUME_BYTES`]) are defined here because this is
//! the lowest crate in the dependency graph.

pub mod auth;
pub mod client;
pub mod frame;
pub mod peer;
pub mod types;

pub use types::{Epoch, Revision, VolumeId, BLOCK_SIZE, MAX_VOLUME_BYTES};

/// Protobuf messages and gRPC services generated from `protos/`.
pub mod pb {
    /// Replica control payloads (`basalt.replica.v1`).
    pub mod replica {
        tonic::include_proto!("basalt.replica.v1");
    }
    /// The controller's gRPC management API (`basalt.controller.v1`).
    pub mod controller {
        tonic::include_proto!("basalt.controller.v1");
    }
}
