//! Starting, stopping and supervising the per-volume services of one host.
//!
//! A [`Runtime`] runs services described by a [`ServiceSpec`]: `process`
//! ([`process`]: child processes of the agent) or `docker` ([`docker`]: one
//! container per service through the Docker Engine API). The reconciler
//! decides *what* runs; a runtime only makes it so and reports what it sees.

pub mod docker;
pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;

use basalt_engine::name::VolumeName;
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::model::{QosSpec, ServiceId, ServiceState};

/// Names one service on this host: the volume and which of its services.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub volume: VolumeName,
    pub service: ServiceId,
}

/// Everything needed to start one service. Secrets are passed as paths of
/// 0600 files the agent wrote, never as values: they must not appear on a
/// command line or in a container's inspect output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSpec {
    Replica(ReplicaSpec),
    Controller(ControllerSpec),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    pub volume_id: Uuid,
    pub size_bytes: u64,
    pub storage: ReplicaStorage,
    pub listen: SocketAddr,
    pub secret_file: PathBuf,
    pub clone: Option<CloneSource>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaStorage {
    Directory(PathBuf),
    BlockDevice(PathBuf),
}

/// A clone's source: replicas of the source volume and its snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneSource {
    pub replicas: Vec<SocketAddr>,
    pub snapshot: String,
    pub source_volume_id: Uuid,
    pub source_secret_file: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerSpec {
    pub name: VolumeName,
    pub volume_id: Uuid,
    pub size_bytes: u64,
    pub replicas: Vec<SocketAddr>,
    pub iscsi: SocketAddr,
    pub api: SocketAddr,
    pub min_healthy: Option<u8>,
    pub qos: QosSpec,
    pub secret_file: PathBuf,
    pub api_token_file: PathBuf,
    /// Start with a target nobody may log in to: the reconciler then lets in the node the volume is
    /// attached to (the same for the life of the volume, so an attach never restarts the controller).
    pub closed: bool,
}

/// What a runtime sees of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub state: ServiceState,
    pub restarts: u32,
    pub message: Option<String>,
}

/// Runs the services of one host.
pub trait Runtime: Send + Sync + 'static {
    /// Make `key` run as `spec`: start it if it is not running, restart it
    /// if it runs with another spec, leave it alone otherwise. Returns once
    /// it was started (not once it serves).
    fn ensure<'a>(&'a self, key: &'a ServiceKey, spec: &'a ServiceSpec) -> BoxFuture<'a, anyhow::Result<()>>;

    /// Stop `key` (SIGTERM, then SIGKILL after a grace period) and forget it.
    fn stop<'a>(&'a self, key: &'a ServiceKey) -> BoxFuture<'a, anyhow::Result<()>>;

    /// Every service this runtime runs or supervises, and what it sees of it.
    fn observe(&self) -> BoxFuture<'_, anyhow::Result<Vec<(ServiceKey, Observed)>>>;
}
