//! Where a volume's controller runs now, for this host's iSCSI login
//! redirector (`endpoints.iscsi_redirector`, [`basalt_target::iscsi::redirect`]).
//!
//! The volumes this host attaches (Docker plugin, CSI node) log in through
//! the redirector instead of at their controller's address. When the
//! controller's host fails, another agent takes the volume's lease and starts
//! the controller at its own address; the initiator's session drops, the
//! initiator reconnects to the redirector it was configured with, and the
//! redirector sends it to the new controller. Nothing on this host has to
//! notice the move.
//!
//! The answer follows the volume's lease ([`keys::volume_lease`]), the one
//! place that says who runs the controller: while no agent holds it for the
//! controller slot the record names (the old host's lease lapsed and its
//! successor has not started yet), the initiator is told to retry later
//! rather than sent to an address that swallows its packets.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use basalt_engine::name::VolumeName;
use basalt_target::iscsi::redirect::{Destination, Resolver};
use basalt_target::iscsi::IQN_PREFIX;

use crate::model::{keys, NodeRecord, VolumeLease, VolumeRecord};
use crate::store::{self, Store};

/// Answers the redirector from the cluster store.
pub struct StoreResolver {
    pub store: Arc<dyn Store>,
}

impl Resolver for StoreResolver {
    fn resolve<'a>(&'a self, target_name: &'a str) -> Pin<Box<dyn Future<Output = Destination> + Send + 'a>> {
        Box::pin(async move {
            let Some(name) = volume_of(target_name) else {
                return Destination::NotFound;
            };
            match self.lookup(&name).await {
                Ok(destination) => destination,
                Err(e) => {
                    // The store is unreachable: the initiator retries, and by
                    // then the store may answer.
                    tracing::warn!(volume = %name, error = %format!("{e:#}"), "cannot look up where the volume's controller runs");
                    Destination::Unavailable
                }
            }
        })
    }
}

impl StoreResolver {
    async fn lookup(&self, name: &VolumeName) -> anyhow::Result<Destination> {
        let store = self.store.as_ref();
        let Some(record) = store::get_json::<VolumeRecord>(store, &keys::volume(name)).await? else {
            return Ok(Destination::NotFound);
        };
        let lease = store::get_json::<VolumeLease>(store, &keys::volume_lease(name)).await?;
        let node = match &record.value.placement.controller {
            Some(slot) => store::get_json::<NodeRecord>(store, &keys::node(&slot.node)).await?,
            None => None,
        };
        Ok(destination(
            &record.value,
            lease.as_ref().map(|l| &l.value),
            node.as_ref().map(|n| &n.value),
        ))
    }
}

/// The volume a target name names (`iqn.2026-11.io.basalt:NAME`).
pub fn volume_of(target_name: &str) -> Option<VolumeName> {
    let name = target_name.strip_prefix(IQN_PREFIX)?.strip_prefix(':')?;
    VolumeName::new(name).ok()
}

/// Where an initiator of `record` logs in: its controller's address while an
/// agent holds the volume's lease for the controller slot the record names.
/// A pure function of what the store holds.
pub fn destination(
    record: &VolumeRecord,
    lease: Option<&VolumeLease>,
    node: Option<&NodeRecord>,
) -> Destination {
    let Some(slot) = &record.placement.controller else {
        return Destination::Unavailable;
    };
    match (lease, node) {
        (Some(lease), Some(node))
            if lease.node == slot.node && lease.generation == slot.generation && node.name == slot.node =>
        {
            Destination::At(SocketAddr::new(node.address, slot.iscsi_port))
        }
        _ => Destination::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ControllerSlot, NodeName, Placement, PortRange, VolumePhase, VolumeSpec};

    fn node(name: &str, octet: u8) -> NodeRecord {
        NodeRecord {
            name: NodeName::new(name).unwrap(),
            address: std::net::IpAddr::from([10, 0, 0, octet]),
            api_url: format!("http://10.0.0.{octet}:9700"),
            labels: Default::default(),
            pools: Vec::new(),
            ports: PortRange {
                first: 7100,
                last: 7199,
            },
            cordoned: false,
            draining: false,
            initiator: None,
        }
    }

    fn record(controller: Option<(&str, u64)>) -> VolumeRecord {
        VolumeRecord {
            spec: VolumeSpec {
                name: VolumeName::new("v").unwrap(),
                uuid: uuid::Uuid::nil(),
                size_bytes: 1 << 30,
                replicas: 3,
                min_healthy: None,
                selector: Default::default(),
                spread_key: "zone".into(),
                qos: Default::default(),
                source: None,
                topology: Default::default(),
                access: Default::default(),
            },
            placement: Placement {
                next_replica_id: 0,
                retired: Vec::new(),
                replicas: Vec::new(),
                controller: controller.map(|(n, generation)| ControllerSlot {
                    node: NodeName::new(n).unwrap(),
                    iscsi_port: 7110,
                    api_port: 7111,
                    generation,
                }),
            },
            phase: VolumePhase::Ready,
            attached_to: None,
        }
    }

    fn lease(n: &str, generation: u64) -> VolumeLease {
        VolumeLease {
            node: NodeName::new(n).unwrap(),
            generation,
        }
    }

    #[test]
    fn initiators_go_to_the_controller_whose_agent_holds_the_lease_and_wait_otherwise() {
        let b = node("b", 2);
        let at_b = Destination::At("10.0.0.2:7110".parse().unwrap());
        assert_eq!(
            destination(&record(Some(("b", 2))), Some(&lease("b", 2)), Some(&b)),
            at_b
        );
        let waits = [
            // Moved to b, whose agent has not taken the lease yet (a's lapsed with a's node).
            destination(&record(Some(("b", 2))), None, Some(&b)),
            // The lease is still the old generation's (a's agent stopping its controller).
            destination(&record(Some(("b", 2))), Some(&lease("a", 1)), Some(&b)),
            destination(&record(Some(("b", 2))), Some(&lease("b", 1)), Some(&b)),
            // b's registration is gone.
            destination(&record(Some(("b", 2))), Some(&lease("b", 2)), None),
            // No controller placed yet.
            destination(&record(None), None, None),
        ];
        for (i, d) in waits.into_iter().enumerate() {
            assert_eq!(d, Destination::Unavailable, "case {i}");
        }
    }

    #[test]
    fn target_names_map_to_volumes_and_others_to_none() {
        assert_eq!(
            volume_of("iqn.2026-11.io.basalt:pg-data").unwrap().as_str(),
            "pg-data"
        );
        for other in [
            "iqn.2026-11.io.basalt",
            "iqn.2026-11.io.basalt:",
            "iqn.2003-01.org.other:v1",
            "iqn.2026-11.io.basalt:Bad Name",
        ] {
            assert!(volume_of(other).is_none(), "{other}");
        }
    }
}
