//! The node operations: list, inspect, cordon, uncordon, drain; and instance discovery.
//!
//! Cordon and drain only record the operator's wish in the node's record (with a revision check); the
//! placement function skips cordoned nodes and the reconcilers move replicas off draining ones.

use std::net::IpAddr;

use hyper::StatusCode;

use super::error::{ApiError, ApiResult};
use super::views::{HeldReplica, InstanceView, NodeList, NodeView, PoolView};
use super::volumes::{all_volumes, node_views, parse_node_name};
use super::ApiContext;
use crate::model::{keys, NodeName, NodeRecord, VolumeRecord};
use crate::placement::{self, Usage};
use crate::store::{self, Expect, StoreError};

/// See `volumes::UPDATE_ATTEMPTS`: the node's own agent may be re-registering at the same moment.
const UPDATE_ATTEMPTS: usize = 5;

/// The view of one node, from what placement has given out and its down mark (a pure function).
pub fn view_of(
    node: &placement::NodeView,
    volumes: &[VolumeRecord],
    usage: &Usage,
    down_since_unix: Option<u64>,
) -> NodeView {
    let r = &node.record;
    let pools = r
        .pools
        .iter()
        .map(|p| {
            let used = usage
                .bytes
                .get(&(r.name.clone(), p.name.clone()))
                .copied()
                .unwrap_or(0);
            PoolView {
                name: p.name.clone(),
                kind: p.kind.clone(),
                capacity_bytes: p.capacity_bytes,
                used_bytes: used,
                free_bytes: p.capacity_bytes.saturating_sub(used),
                fs_free_bytes: p.free_bytes,
            }
        })
        .collect();
    let mut replicas = Vec::new();
    let mut controllers = Vec::new();
    for v in volumes {
        for slot in v.placement.replicas.iter().filter(|s| s.node == r.name) {
            replicas.push(HeldReplica {
                volume: v.spec.name.to_string(),
                id: slot.id,
                pool: slot.pool.clone(),
                port: slot.port,
            });
        }
        if v.placement.controller.as_ref().is_some_and(|c| c.node == r.name) {
            controllers.push(v.spec.name.to_string());
        }
    }
    NodeView {
        name: r.name.clone(),
        address: r.address.to_string(),
        api_url: r.api_url.clone(),
        labels: r.labels.clone(),
        pools,
        ports: r.ports,
        up: node.up,
        down_since_unix: down_since_unix.filter(|_| !node.up),
        cordoned: r.cordoned,
        draining: r.draining,
        initiator: r.initiator_name(),
        replicas,
        controllers,
    }
}

/// `GET /v1/nodes`.
pub async fn list(ctx: &ApiContext) -> ApiResult<NodeList> {
    let nodes = node_views(&*ctx.store).await?;
    let volumes = all_volumes(&*ctx.store).await?;
    let usage = placement::usage(&volumes);
    let down = down_marks(&*ctx.store).await?;
    Ok(NodeList {
        nodes: nodes
            .iter()
            .map(|n| view_of(n, &volumes, &usage, down.get(&n.record.name).copied()))
            .collect(),
    })
}

fn no_such_node(name: &NodeName) -> ApiError {
    ApiError::not_found(format!(
        "no node named {:?} is registered; list them with GET /v1/nodes (`basalt node ls`)",
        name.as_str()
    ))
}

/// `GET /v1/nodes/{name}`.
pub async fn inspect(ctx: &ApiContext, name: &str) -> ApiResult<NodeView> {
    let name = parse_node_name(name)?;
    let nodes = node_views(&*ctx.store).await?;
    let node = nodes
        .iter()
        .find(|n| n.record.name == name)
        .ok_or_else(|| no_such_node(&name))?;
    let volumes = all_volumes(&*ctx.store).await?;
    let down = down_marks(&*ctx.store).await?;
    Ok(view_of(
        node,
        &volumes,
        &placement::usage(&volumes),
        down.get(&name).copied(),
    ))
}

/// Every node's down mark: when it was found down, in Unix seconds.
async fn down_marks(store: &dyn store::Store) -> ApiResult<std::collections::BTreeMap<NodeName, u64>> {
    let (alive, _) = store.list(keys::NODES_ALIVE).await?;
    Ok(crate::reconcile::read_liveness(&alive).1)
}

/// What an operator asks of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAction {
    /// No new replica or controller lands here.
    Cordon,
    /// Back to normal: placement may use it, nothing moves away.
    Uncordon,
    /// Cordoned, and its replicas move elsewhere.
    Drain,
}

/// The node's flags after `action` (a pure function).
pub fn apply(action: NodeAction, record: &mut NodeRecord) {
    let (cordoned, draining) = match action {
        NodeAction::Cordon => (true, record.draining),
        NodeAction::Uncordon => (false, false),
        NodeAction::Drain => (true, true),
    };
    record.cordoned = cordoned;
    record.draining = draining;
}

/// `POST /v1/nodes/{name}/cordon|uncordon|drain`.
pub async fn act(ctx: &ApiContext, name: &str, action: NodeAction) -> ApiResult<NodeView> {
    let name = parse_node_name(name)?;
    let key = keys::node(&name);
    let store = &*ctx.store;
    for _ in 0..UPDATE_ATTEMPTS {
        let current = store::get_json::<NodeRecord>(store, &key)
            .await?
            .ok_or_else(|| no_such_node(&name))?;
        let mut record = current.value.clone();
        apply(action, &mut record);
        if record != current.value {
            match store::put_json(store, &key, &record, Expect::Revision(current.revision), None).await {
                Ok(_) => {}
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
            tracing::info!(node = %name, ?action, "node flags changed");
        }
        return inspect(ctx, name.as_str()).await;
    }
    Err(ApiError::conflict(format!(
        "node {:?} kept changing while this request tried to update it; retry the request",
        name.as_str()
    )))
}

/// `GET /v1/instance[?address=IP]`: this agent's node, and the node of the caller (the one whose address
/// is `address`, or else the address the request came from).
pub async fn instance(
    ctx: &ApiContext,
    query: &[(String, String)],
    peer: Option<IpAddr>,
) -> ApiResult<InstanceView> {
    let mut asked = None;
    for (k, v) in query {
        match k.as_str() {
            "address" => {
                asked = Some(v.parse::<IpAddr>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "address={v:?} is not an IP address (e.g. address=10.0.0.5)"
                    ))
                })?)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}: GET /v1/instance takes address"
                )))
            }
        }
    }
    let caller_address = asked.or(peer).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the caller's address is unknown: pass ?address=IP",
        )
    })?;
    let nodes = node_views(&*ctx.store).await?;
    let me = nodes.iter().find(|n| n.record.name == ctx.node);
    let caller = nodes
        .iter()
        .find(|n| n.record.address == caller_address)
        .map(|n| n.record.name.clone());
    Ok(InstanceView {
        node: ctx.node.clone(),
        address: me.map(|n| n.record.address.to_string()),
        caller,
        caller_address: caller_address.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PortRange;

    fn node() -> NodeRecord {
        NodeRecord {
            name: NodeName::new("n1").unwrap(),
            address: "127.0.0.1".parse().unwrap(),
            api_url: "http://127.0.0.1:9700".into(),
            labels: Default::default(),
            pools: vec![],
            ports: PortRange { first: 1, last: 2 },
            cordoned: false,
            draining: false,
            initiator: None,
        }
    }

    #[test]
    fn drain_implies_cordon_and_uncordon_clears_both() {
        let mut n = node();
        apply(NodeAction::Drain, &mut n);
        assert!(n.cordoned && n.draining);
        apply(NodeAction::Cordon, &mut n);
        assert!(
            n.cordoned && n.draining,
            "cordoning a draining node does not stop the drain"
        );
        apply(NodeAction::Uncordon, &mut n);
        assert!(!n.cordoned && !n.draining);
        apply(NodeAction::Cordon, &mut n);
        assert!(n.cordoned && !n.draining);
    }
}
