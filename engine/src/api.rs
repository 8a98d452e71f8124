//! The controller's management API: `ControllerService` over gRPC (tonic),
//! served on `--api`. The CLI (`basalt volume info`, ...) is its client.

use std::sync::Arc;

use basalt_proto::pb::controller as pb;
use basalt_proto::pb::controller::controller_service_server::{ControllerService, ControllerServiceServer};
use tonic::{Request, Response, Status};

use crate::volume::core::ReplicaMode;
use crate::volume::Volume;

/// Reports sessions logged in to the volume's iSCSI target.
pub type SessionCount = Arc<dyn Fn() -> usize + Send + Sync>;

pub struct Api {
    volume: Volume,
    iqn: String,
    sessions: SessionCount,
}

impl Api {
    pub fn new(volume: Volume, iqn: String, sessions: SessionCount) -> ControllerServiceServer<Api> {
        ControllerServiceServer::new(Api {
            volume,
            iqn,
            sessions,
        })
    }
}

#[tonic::async_trait]
impl ControllerService for Api {
    async fn volume_info(
        &self,
        _: Request<pb::VolumeInfoRequest>,
    ) -> Result<Response<pb::VolumeInfoReply>, Status> {
        let status = self
            .volume
            .status()
            .await
            .ok_or_else(|| Status::unavailable("the volume is shutting down"))?;
        let spec = self.volume.spec();
        let m = &self.volume.metrics;
        let replicas = status
            .replicas
            .iter()
            .map(|r| pb::ReplicaStatus {
                address: r.address.clone(),
                mode: r.mode.label().to_string(),
                cause: match &r.mode {
                    ReplicaMode::Error { cause } => cause.clone(),
                    _ => String::new(),
                },
                revision: r.revision,
                outstanding: r.outstanding as u32,
                errors: m.replica_errors.with_label_values(&[&r.address]).get(),
            })
            .collect();
        let io = pb::IoCounters {
            reads: m.counter(&m.ops, "read"),
            writes: m.counter(&m.ops, "write"),
            flushes: m.counter(&m.ops, "flush"),
            unmaps: m.counter(&m.ops, "unmap"),
            bytes_read: m.counter(&m.bytes, "read"),
            bytes_written: m.counter(&m.bytes, "write"),
            errors: ["read", "write", "flush", "unmap"]
                .iter()
                .map(|op| m.counter(&m.errors, op))
                .sum(),
            in_flight: status.in_flight as u32,
        };
        let state = if status.healthy >= status.min_healthy {
            "serving"
        } else {
            "degraded"
        };
        Ok(Response::new(pb::VolumeInfoReply {
            name: spec.name.clone(),
            iqn: self.iqn.clone(),
            volume_uuid: spec.volume.0.as_bytes().to_vec(),
            size_bytes: spec.size_bytes,
            epoch: spec.epoch.0,
            state: state.to_string(),
            min_healthy: status.min_healthy as u32,
            replicas,
            io: Some(io),
            sessions: (self.sessions)() as u32,
        }))
    }
}
