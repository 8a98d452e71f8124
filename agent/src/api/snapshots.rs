//! Operations the volume's controller performs: snapshots (create, list, delete, revert) and QoS limits.
//!
//! The handler finds the controller in the volume's placement (its node's address, the slot's API port),
//! calls its gRPC `ControllerService` with the volume's API token from the store, and answers with the
//! controller's result: these are fast, synchronous operations of one running volume, not desired state
//! for a reconciler. A controller that does not answer is a 503 that says to wait for phase `ready`.

use std::net::SocketAddr;
use std::time::Duration;

use basalt_engine::api_auth::{ApiToken, WithToken};
use basalt_engine::name::VolumeName;
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_proto::pb::controller::{SnapshotListRequest, SnapshotRequest, VolumeSetQosRequest};
use futures::future::BoxFuture;
use hyper::StatusCode;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::error::{ApiError, ApiResult};
use super::views::{CreateSnapshot, Qos, SnapshotList, SnapshotResult, SnapshotView, VolumeView};
use super::volumes::{check_qos, load_volume, qos_limits, update_volume, view};
use super::ApiContext;
use crate::model::{keys, NodeRecord, SnapshotRef, VolumePhase, VolumeSecrets};
use crate::store;

/// A client of one volume's controller, sending its token with every call.
pub type ControllerClient = ControllerServiceClient<InterceptedService<Channel, WithToken>>;

/// Makes controller clients: the real gRPC connection in the agent; the seam through which the API's
/// callers choose how the controller is reached.
pub trait ControllerConnector: Send + Sync + 'static {
    fn connect(
        &self,
        address: SocketAddr,
        token: ApiToken,
    ) -> BoxFuture<'_, Result<ControllerClient, String>>;
}

/// How long a request waits for a controller to accept a connection: a serving controller on a
/// reachable host answers in milliseconds; longer means it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects over plain gRPC (tonic).
pub struct GrpcConnector;

impl ControllerConnector for GrpcConnector {
    fn connect(
        &self,
        address: SocketAddr,
        token: ApiToken,
    ) -> BoxFuture<'_, Result<ControllerClient, String>> {
        Box::pin(async move {
            let endpoint = Channel::from_shared(format!("http://{address}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(CONNECT_TIMEOUT);
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            Ok(ControllerServiceClient::with_interceptor(
                channel,
                WithToken(token),
            ))
        })
    }
}

/// Longest snapshot name the replicas store.
const MAX_SNAPSHOT_NAME: usize = 128;

/// A snapshot name the replicas accept: 1 to 128 of `A-Z a-z 0-9 - _ .`, not starting with `.`.
pub fn check_snapshot_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SNAPSHOT_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid snapshot name {name:?}: use 1-{MAX_SNAPSHOT_NAME} characters from A-Z a-z 0-9 - _ . \
             (not starting with '.')"
        )))
    }
}

/// A connected client of `name`'s controller, or why there is none.
pub async fn controller(ctx: &ApiContext, name: &VolumeName) -> ApiResult<ControllerClient> {
    let store = &*ctx.store;
    let record = load_volume(store, name).await?.value;
    let not_serving = |why: String| {
        ApiError::controller_unavailable(format!(
            "the controller of volume {:?} is not serving ({why}); wait until `GET /v1/volumes/{}` shows phase \
             ready and retry",
            name.as_str(),
            name.as_str()
        ))
    };
    if record.phase == VolumePhase::Deleting {
        return Err(ApiError::conflict(format!(
            "volume {:?} is being deleted; its snapshots and limits can no longer be changed",
            name.as_str()
        )));
    }
    let slot = record
        .placement
        .controller
        .ok_or_else(|| not_serving("no controller is placed yet".into()))?;
    let node = store::get_json::<NodeRecord>(store, &keys::node(&slot.node))
        .await?
        .ok_or_else(|| not_serving(format!("its node {} is not registered", slot.node)))?
        .value;
    let secrets = store::get_json::<VolumeSecrets>(store, &keys::volume_secrets(name))
        .await?
        .ok_or_else(|| not_serving("its secrets are not in the store".into()))?
        .value;
    let token = ApiToken::new(&secrets.api_token).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_failed",
            format!(
                "the stored API token of volume {:?} is unusable: {e}",
                name.as_str()
            ),
        )
    })?;
    let address = SocketAddr::new(node.address, slot.api_port);
    ctx.controllers
        .connect(address, token)
        .await
        .map_err(|e| not_serving(format!("no answer at {address}: {e}")))
}

/// The controller's refusal or failure as an API error: its own words, with the status that fits.
fn from_status(name: &VolumeName, s: tonic::Status) -> ApiError {
    use tonic::Code;
    let (status, code) = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "bad_request"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => (StatusCode::CONFLICT, "conflict"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "controller_unavailable"),
        _ => (StatusCode::BAD_GATEWAY, "controller_failed"),
    };
    ApiError::new(
        status,
        code,
        format!("volume {:?}: {}", name.as_str(), s.message()),
    )
}

/// Refuse a clone of a snapshot its volume does not have: a clone of a misspelt snapshot would never
/// leave phase creating. Asks the source's controller, which must serve anyway for a clone to copy it.
pub(super) async fn check_clone_source(ctx: &ApiContext, source: &SnapshotRef) -> ApiResult<()> {
    let list = list(ctx, &source.volume).await?;
    if list.snapshots.iter().any(|s| s.name == source.snapshot) {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "from_snapshot: volume {:?} has no snapshot {:?}; list them with GET /v1/volumes/{}/snapshots",
        source.volume.as_str(),
        source.snapshot,
        source.volume.as_str()
    )))
}

/// `POST /v1/volumes/{name}/snapshots`.
pub async fn create(
    ctx: &ApiContext,
    name: &VolumeName,
    req: CreateSnapshot,
) -> ApiResult<(StatusCode, SnapshotResult)> {
    check_snapshot_name(&req.name)?;
    let reply = controller(ctx, name)
        .await?
        .snapshot_create(SnapshotRequest {
            name: req.name.clone(),
        })
        .await
        .map_err(|s| from_status(name, s))?
        .into_inner();
    Ok((StatusCode::CREATED, result(name, req.name, reply.dropped)))
}

fn result(name: &VolumeName, snapshot: String, dropped: Vec<String>) -> SnapshotResult {
    SnapshotResult {
        volume: name.to_string(),
        snapshot,
        dropped,
    }
}

/// `GET /v1/volumes/{name}/snapshots`.
pub async fn list(ctx: &ApiContext, name: &VolumeName) -> ApiResult<SnapshotList> {
    let reply = controller(ctx, name)
        .await?
        .snapshot_list(SnapshotListRequest {})
        .await
        .map_err(|s| from_status(name, s))?
        .into_inner();
    Ok(SnapshotList {
        snapshots: reply
            .snapshots
            .into_iter()
            .map(|s| SnapshotView {
                name: s.name,
                created_unix: s.created_unix,
                parent: s.parent,
                allocated_bytes: s.allocated_bytes,
            })
            .collect(),
        divergent: reply.divergent,
    })
}

/// `DELETE /v1/volumes/{name}/snapshots/{snapshot}`.
pub async fn delete(ctx: &ApiContext, name: &VolumeName, snapshot: &str) -> ApiResult<SnapshotResult> {
    check_snapshot_name(snapshot)?;
    let reply = controller(ctx, name)
        .await?
        .snapshot_delete(SnapshotRequest {
            name: snapshot.to_string(),
        })
        .await
        .map_err(|s| from_status(name, s))?
        .into_inner();
    Ok(result(name, snapshot.to_string(), reply.dropped))
}

/// `POST /v1/volumes/{name}/snapshots/{snapshot}/revert`.
pub async fn revert(ctx: &ApiContext, name: &VolumeName, snapshot: &str) -> ApiResult<SnapshotResult> {
    check_snapshot_name(snapshot)?;
    let reply = controller(ctx, name)
        .await?
        .snapshot_revert(SnapshotRequest {
            name: snapshot.to_string(),
        })
        .await
        .map_err(|s| from_status(name, s))?
        .into_inner();
    Ok(result(name, snapshot.to_string(), reply.dropped))
}

/// `PUT /v1/volumes/{name}/qos`: the limits replace the volume's (an absent field: no limit), at the
/// controller first (it refuses what it cannot enforce), then in the record, so that a restarted
/// controller starts with them.
pub async fn set_qos(ctx: &ApiContext, name: &VolumeName, qos: Qos) -> ApiResult<VolumeView> {
    let qos = qos.0;
    check_qos(&qos)?;
    controller(ctx, name)
        .await?
        .volume_set_qos(VolumeSetQosRequest {
            limits: Some(qos_limits(&qos)),
            clear: true,
        })
        .await
        .map_err(|s| from_status(name, s))?;
    let record = update_volume(&*ctx.store, name, |v| {
        let changed = v.spec.qos != qos;
        v.spec.qos = qos.clone();
        Ok(changed)
    })
    .await?;
    view(&*ctx.store, record).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_follow_the_replicas_rules() {
        for ok in ["s1", "before-upgrade_2.0", "A"] {
            assert!(check_snapshot_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(129);
        for bad in ["", ".hidden", "a/b", "a b", long.as_str()] {
            assert_eq!(
                check_snapshot_name(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn controller_refusals_keep_their_meaning() {
        let v = VolumeName::new("v").unwrap();
        assert_eq!(
            from_status(&v, tonic::Status::not_found("x")).status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            from_status(&v, tonic::Status::failed_precondition("x")).status,
            StatusCode::CONFLICT
        );
        assert_eq!(
            from_status(&v, tonic::Status::invalid_argument("x")).status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            from_status(&v, tonic::Status::internal("x")).status,
            StatusCode::BAD_GATEWAY
        );
    }
}
