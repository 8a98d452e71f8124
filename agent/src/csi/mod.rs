//! The CSI driver (Container Storage Interface v1, package `csi.v1`): the Identity, Controller and Node
//! services a container orchestrator calls, served over gRPC on unix sockets by the agent.
//!
//! ```text
//!   CO sidecar ──unix socket──► tonic ──► identity.rs   (plugin name, capabilities, Probe: the store answers)
//!                                     ├─► controller.rs ──► api::volumes / api::snapshots / api::nodes ──► Store
//!                                     │                      (the REST API's own functions: one place per concept)
//!                                     └─► node.rs       ──► host attach, mount (built on `agent/src/host`)
//! ```
//!
//! The driver adds no second model: a CSI volume *is* a Basalt volume (its `volume_id` is the volume's
//! name), a snapshot id is `VOLUME/SNAPSHOT` as the REST API writes it, a node id is the agent's node
//! name, and topology segments are the nodes' labels under [`TOPOLOGY_PREFIX`]. What CSI needs beyond
//! the volume record (the request a name was created with, for idempotency; which snapshots the CO
//! made) lives under `/basalt/csi/` ([`records`]), written with the store's revision checks like every
//! other control-plane change.
//!
//! Requests are checked first, with the spec's error code for every case it names (a missing field is
//! `INVALID_ARGUMENT`, an unknown volume `NOT_FOUND`, ...); every call is logged with its duration and
//! outcome, its secrets redacted ([`logged`]).

pub mod controller;
pub mod identity;
pub mod ids;
pub mod node;
pub mod params;
pub mod records;
pub mod serve;
pub mod staged;
pub mod status;
pub mod topology;

use std::time::Instant;

/// The generated messages and service traits of `csi.v1` (`proto/csi/csi.proto`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

/// The driver's name (GetPluginInfo; the `CSIDriver` object and StorageClasses name it).
pub const PLUGIN_NAME: &str = "basalt.csi.io";

/// Topology keys are node labels under this prefix (`topology.basalt.csi.io/zone`): one prefix for
/// every key, as the spec requires, and one a CO cannot confuse with another driver's.
pub const TOPOLOGY_PREFIX: &str = "topology.basalt.csi.io/";

/// A request as the log shows it: its fields, with every secret replaced.
pub trait Redact {
    fn redacted(&self) -> String;
}

/// Requests carrying a `secrets` map (the spec marks it `csi_secret`): logged with the values replaced.
macro_rules! redact_secrets {
    ($($t:ty),* $(,)?) => {$(
        impl Redact for $t {
            fn redacted(&self) -> String {
                let mut shown = self.clone();
                for value in shown.secrets.values_mut() {
                    *value = "<redacted>".into();
                }
                format!("{shown:?}")
            }
        }
    )*};
}

/// Requests without secrets: logged as they are.
macro_rules! redact_nothing {
    ($($t:ty),* $(,)?) => {$(
        impl Redact for $t {
            fn redacted(&self) -> String {
                format!("{self:?}")
            }
        }
    )*};
}

redact_secrets!(
    pb::CreateVolumeRequest,
    pb::DeleteVolumeRequest,
    pb::ControllerPublishVolumeRequest,
    pb::ControllerUnpublishVolumeRequest,
    pb::ValidateVolumeCapabilitiesRequest,
    pb::CreateSnapshotRequest,
    pb::DeleteSnapshotRequest,
    pb::ListSnapshotsRequest,
    pb::ControllerExpandVolumeRequest,
    pb::ControllerModifyVolumeRequest,
    pb::NodeStageVolumeRequest,
    pb::NodePublishVolumeRequest,
    pb::NodeExpandVolumeRequest,
);

redact_nothing!(
    pb::GetPluginInfoRequest,
    pb::GetPluginCapabilitiesRequest,
    pb::ProbeRequest,
    pb::ListVolumesRequest,
    pb::GetCapacityRequest,
    pb::ControllerGetCapabilitiesRequest,
    pb::ControllerGetVolumeRequest,
    pb::NodeUnstageVolumeRequest,
    pb::NodeUnpublishVolumeRequest,
    pb::NodeGetVolumeStatsRequest,
    pb::NodeGetCapabilitiesRequest,
    pb::NodeGetInfoRequest,
);

/// Runs one RPC and logs it: the method, the request (secrets redacted), how long it took and how it
/// ended. Failures a caller caused are logged at `info` (a CO retries them routinely); the rest at `warn`.
pub async fn logged<Req: Redact, Resp>(
    method: &'static str,
    request: tonic::Request<Req>,
    handler: impl AsyncFnOnce(Req) -> Result<Resp, tonic::Status>,
) -> Result<tonic::Response<Resp>, tonic::Status> {
    let started = Instant::now();
    let shown = request.get_ref().redacted();
    let result = handler(request.into_inner()).await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    match &result {
        Ok(_) => tracing::info!(method, request = %shown, elapsed_ms, "CSI call succeeded"),
        Err(s) if status::callers_fault(s.code()) => {
            tracing::info!(method, request = %shown, elapsed_ms, code = ?s.code(), message = s.message(), "CSI call refused")
        }
        Err(s) => {
            tracing::warn!(method, request = %shown, elapsed_ms, code = ?s.code(), message = s.message(), "CSI call failed")
        }
    }
    result.map(tonic::Response::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_reach_the_log() {
        let req = pb::CreateVolumeRequest {
            name: "pvc-1".into(),
            secrets: [("password".to_string(), "hunter2-secret".to_string())].into(),
            ..Default::default()
        };
        let shown = req.redacted();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password") && shown.contains("<redacted>") && shown.contains("pvc-1"));
    }
}
