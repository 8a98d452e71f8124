//! The fault-injection harness: a verifier that knows exactly what the volume acknowledged, and a driver
//! that breaks the volume's pieces one at a time while the verifier writes.
//!
//! ```text
//!   initiator.rs  a minimal iSCSI initiator: many commands in flight, each resolved to an exact outcome
//!   ledger.rs     self-describing 4 KiB blocks; what was acknowledged, attempted and flushed; the rule
//!   workload.rs   writes + flushes at queue depth through the initiator; whole-volume read-back check
//!   proxy.rs      a TCP proxy per replica: Up / Cut / Blackhole (the network the test controls)
//!   fixture.rs    FaultVolume: 3 replicas behind proxies, a controller, every fault as a method; audits
//!                 (stop all, `basalt replica export`, compare the images block for block)
//!   clone.rs      the clone episode: a clone of a snapshot taken under load, checked against the ledger
//!   soak.rs       the seeded fault driver: episodes, the CI run and the long soak, the report
//! ```
//!
//! The rule every check applies (see `ledger`): a block holds its last acknowledged generation or one
//! attempted after it; never older data, never another block's, never a torn mix. A loss of a write that a
//! completed flush covered is reported as such. Losses are data in the report, never panics: the test
//! decides (and must see zero).

pub mod clone;
pub mod fixture;
pub mod initiator;
pub mod ledger;
pub mod proxy;
pub mod soak;
pub mod workload;

use std::time::Duration;

pub use fixture::FaultVolume;
pub use initiator::{capacity_blocks, CommandOutcome, InitiatorError, Session};
pub use ledger::{BlockIndex, Generation, Ledger, Loss, LossKind};
pub use proxy::{Link, Proxy};
pub use soak::{FaultKind, Plan, Schedule, SoakConfig, SoakReport};
pub use workload::{IoStats, ReadBack, Workload, WorkloadConfig};

/// Everything that can stop a fault run (data losses are not errors: they are in the report).
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Harness(#[from] crate::HarnessError),
    #[error(transparent)]
    Initiator(#[from] InitiatorError),
    #[error("the fault volume has no controller running; start one with FaultVolume::start_controller")]
    NoController,
    #[error(
        "the volume did not heal within {waited:?}: not every replica became read-write again \
         (last `volume info`: {info}); look at the controller's log for the rebuild"
    )]
    NotHealed { waited: Duration, info: String },
    #[error("replica audit failed: {0}")]
    Audit(String),
    #[error(
        "{what} did not happen within {waited:?} (workload so far: {stats}; last `volume info`: {info})"
    )]
    NoProgress {
        what: String,
        waited: Duration,
        stats: String,
        info: String,
    },
    #[error("seed {seed:#x}, episode {episode} [{plan}]: {source}; replay with BASALT_FAULT_SEED={seed:#x}")]
    Episode {
        seed: u64,
        episode: u64,
        plan: String,
        #[source]
        source: Box<FaultError>,
    },
}
