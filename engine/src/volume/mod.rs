//! The replicated volume: a state machine ([`core`]) that owns the volume's
//! state, and the driver that connects it to replicas and to the initiator.

pub mod core;
