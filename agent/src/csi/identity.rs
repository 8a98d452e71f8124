//! The Identity service: who the plugin is, what it can do, and whether it is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::{self, identity_server::Identity};
use super::{logged, PLUGIN_NAME};
use crate::model::{keys, NodeName};
use crate::store::Store;

pub struct IdentityService {
    pub store: Arc<dyn Store>,
    pub node: NodeName,
}

fn service(t: pb::plugin_capability::service::Type) -> pb::PluginCapability {
    pb::PluginCapability {
        r#type: Some(pb::plugin_capability::Type::Service(
            pb::plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

/// What the plugin as a whole offers (the spec: the same from every instance, whatever it serves).
pub fn capabilities() -> Vec<pb::PluginCapability> {
    use pb::plugin_capability::service::Type;
    vec![
        service(Type::ControllerService),
        service(Type::VolumeAccessibilityConstraints),
        pb::PluginCapability {
            r#type: Some(pb::plugin_capability::Type::VolumeExpansion(
                pb::plugin_capability::VolumeExpansion {
                    r#type: pb::plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        },
    ]
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        request: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        logged("GetPluginInfo", request, async |_| {
            Ok(pb::GetPluginInfoResponse {
                name: PLUGIN_NAME.into(),
                vendor_version: env!("CARGO_PKG_VERSION").into(),
                manifest: [("node".to_string(), self.node.to_string())].into(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        request: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        logged("GetPluginCapabilities", request, async |_| {
            Ok(pb::GetPluginCapabilitiesResponse {
                capabilities: capabilities(),
            })
        })
        .await
    }

    /// Ready when the cluster store answers: every Controller and Node call needs it. A store that
    /// does not answer is FAILED_PRECONDITION, the spec's "plugin not healthy".
    async fn probe(&self, request: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        logged("Probe", request, async |_| {
            match self.store.get(&keys::node(&self.node)).await {
                Ok(_) => Ok(pb::ProbeResponse { ready: Some(true) }),
                Err(e) => Err(Status::failed_precondition(format!(
                    "the cluster store does not answer ({e}); the plugin cannot serve until it does"
                ))),
            }
        })
        .await
    }
}
