//! The replicated volume: a state machine ([`core`]) that owns the volume's
//! state, the driver task that runs it ([`driver`]), one link per replica
//! connection ([`link`]), online expansion ([`expand`]), the volume's metrics,
//! its QoS limits ([`qos`]), what GET LBA STATUS answers from the
//! replicas' allocation ([`allocation`]), and online rebuild ([`rebuild`]).

pub mod allocation;
pub mod core;
pub mod driver;
pub mod expand;
pub mod link;
pub mod metrics;
pub mod qos;
pub mod rebuild;

pub use driver::{StartReplica, Volume, VolumeSpec, VolumeStatus};
pub use expand::{ExpandError, Expansion};
