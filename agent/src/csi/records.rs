//! What the CSI driver keeps in the cluster store beside the volume records, under `/basalt/csi/`:
//! * per volume it created, the request that made it ([`CsiVolume`]): a CreateVolume of the same name
//!   is answered from it (idempotency), and one with other parameters refused (ALREADY_EXISTS);
//! * per snapshot a CO asked for ([`CsiSnapshot`]), by CSI name: the same for CreateSnapshot, and what
//!   DeleteVolume checks (a volume's snapshots die with it in Basalt, so it refuses while it has some);
//! * per clone of a volume (a `VolumeSource`), the snapshot taken of the source to clone it from
//!   ([`CloneSource`]), released once the clone no longer needs it.
//!
//! Every write carries a revision check (`Expect::Absent` or `Expect::Revision`).

use std::collections::BTreeMap;

use basalt_engine::name::VolumeName;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{SnapshotRef, TopologyRule};

pub const VOLUMES: &str = "/basalt/csi/volumes/";
pub const SNAPSHOTS: &str = "/basalt/csi/snapshots/";
pub const CLONE_SOURCES: &str = "/basalt/csi/clone-sources/";

pub fn volume_key(name: &VolumeName) -> String {
    format!("{VOLUMES}{name}")
}

/// Snapshots are keyed by a digest of their CSI name (any Unicode string; keys stay plain).
pub fn snapshot_key(csi_name: &str) -> String {
    let digest = Sha256::digest(csi_name.as_bytes());
    format!("{SNAPSHOTS}{}", basalt_proto::auth::hex(&digest[..16]))
}

pub fn clone_source_key(clone: &VolumeName) -> String {
    format!("{CLONE_SOURCES}{clone}")
}

/// Where a volume's data came from, as the CO named it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

/// The CreateVolume request a volume was made by (what idempotency compares).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsiVolume {
    pub csi_name: String,
    /// The StorageClass parameters, the sidecars' own left out.
    pub parameters: BTreeMap<String, String>,
    pub content_source: Option<ContentSource>,
    pub topology: TopologyRule,
    /// Handed back as `volume_context` (the filesystem NodeStage makes).
    pub volume_context: BTreeMap<String, String>,
}

/// A snapshot the CO asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CsiSnapshot {
    pub csi_name: String,
    pub snapshot: SnapshotRef,
    /// The source volume's size when it was taken.
    pub size_bytes: u64,
    /// Unix seconds; 0 until the snapshot is taken.
    pub created_unix: i64,
}

/// The snapshot of a source volume a clone of it (a `VolumeSource`) was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSource {
    pub snapshot: SnapshotRef,
}
