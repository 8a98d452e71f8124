//! # basalt-replica: bytes on disk
//!
//! * [`store`]: the crash-safe replica store: a live head over a chain of
//!   immutable sparse snapshots, per-block CRC32, durable on flush.
//! * [`server`]: serves one store over the data-path protocol of
//!   `basalt-proto` on one TCP address.

pub mod server;
pub mod store;
