//! CSI topology and Basalt's node labels (pure functions).
//!
//! A node's topology is its labels, each key under [`TOPOLOGY_PREFIX`] (`zone=a` is
//! `topology.basalt.csi.io/zone: a`). A CreateVolume's `requisite` and `preferred` topologies become a
//! [`TopologyRule`] that placement obeys; the volume's `accessible_topology` is then the requisite (or,
//! without one, preferred) topologies that hold one of its replicas: a Basalt volume is reachable over
//! the network from every node, so without requirements it reports none (the spec: accessible from
//! everywhere), and with them it reports the segments its data actually lives in.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::pb;
use super::TOPOLOGY_PREFIX;
use crate::model::{matches_term, TopologyRule};

/// A CSI topology as node labels; a key outside our prefix is refused (we never advertised it).
pub fn to_labels(topology: &pb::Topology) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for (key, value) in &topology.segments {
        let label = key.strip_prefix(TOPOLOGY_PREFIX).filter(|l| !l.is_empty()).ok_or_else(|| {
            format!(
                "topology key {key:?} is not this plugin's: its keys are {TOPOLOGY_PREFIX}LABEL, from NodeGetInfo"
            )
        })?;
        if value.is_empty() {
            return Err(format!("topology key {key:?} has an empty value"));
        }
        labels.insert(label.to_string(), value.clone());
    }
    Ok(labels)
}

/// Node labels as a CSI topology.
pub fn from_labels(labels: &BTreeMap<String, String>) -> pb::Topology {
    pb::Topology {
        segments: labels
            .iter()
            .map(|(k, v)| (format!("{TOPOLOGY_PREFIX}{k}"), v.clone()))
            .collect::<HashMap<_, _>>(),
    }
}

/// A CreateVolume's accessibility requirements as a placement rule.
pub fn rule(requirement: Option<&pb::TopologyRequirement>) -> Result<TopologyRule, String> {
    let Some(req) = requirement else {
        return Ok(TopologyRule::default());
    };
    let terms = |field: &str, list: &[pb::Topology]| -> Result<Vec<BTreeMap<String, String>>, String> {
        list.iter()
            .enumerate()
            .map(|(i, t)| {
                let labels =
                    to_labels(t).map_err(|e| format!("accessibility_requirements.{field}[{i}]: {e}"))?;
                if labels.is_empty() {
                    return Err(format!("accessibility_requirements.{field}[{i}] has no segments"));
                }
                Ok(labels)
            })
            .collect()
    };
    let requisite = terms("requisite", &req.requisite)?;
    let preferred = terms("preferred", &req.preferred)?;
    if !requisite.is_empty() {
        if let Some(p) = preferred.iter().find(|p| !requisite.contains(p)) {
            return Err(format!(
                "accessibility_requirements: preferred topology {p:?} is not among the requisite ones (the spec \
                 requires every preferred topology to be requisite too)"
            ));
        }
    }
    Ok(TopologyRule { requisite, preferred })
}

/// Where a volume whose replicas are on nodes with `replica_labels` is accessible from, under `rule`.
pub fn accessible(rule: &TopologyRule, replica_labels: &[&BTreeMap<String, String>]) -> Vec<pb::Topology> {
    let terms = if rule.requisite.is_empty() {
        &rule.preferred
    } else {
        &rule.requisite
    };
    let held: BTreeSet<&BTreeMap<String, String>> = terms
        .iter()
        .filter(|term| replica_labels.iter().any(|labels| matches_term(term, labels)))
        .collect();
    held.into_iter().map(from_labels).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn topo(pairs: &[(&str, &str)]) -> pb::Topology {
        pb::Topology {
            segments: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_outside_the_prefix_are_refused() {
        assert!(to_labels(&topo(&[("kubernetes.io/hostname", "a")]))
            .unwrap_err()
            .contains("not this plugin's"));
        assert!(to_labels(&topo(&[("topology.basalt.csi.io/", "a")])).is_err());
        assert_eq!(
            to_labels(&topo(&[("topology.basalt.csi.io/zone", "a")])).unwrap(),
            labels(&[("zone", "a")])
        );
    }

    #[test]
    fn preferred_must_be_requisite() {
        let req = pb::TopologyRequirement {
            requisite: vec![topo(&[("topology.basalt.csi.io/zone", "a")])],
            preferred: vec![topo(&[("topology.basalt.csi.io/zone", "b")])],
        };
        assert!(rule(Some(&req)).unwrap_err().contains("preferred"));
        assert!(rule(None).unwrap().is_any());
    }

    #[test]
    fn accessible_topology_names_the_segments_holding_replicas() {
        let r = TopologyRule {
            requisite: vec![
                labels(&[("zone", "a")]),
                labels(&[("zone", "b")]),
                labels(&[("zone", "c")]),
            ],
            preferred: vec![],
        };
        let a = labels(&[("zone", "a"), ("rack", "1")]);
        let c = labels(&[("zone", "c")]);
        let got = accessible(&r, &[&a, &c, &a]);
        assert_eq!(
            got,
            vec![
                from_labels(&labels(&[("zone", "a")])),
                from_labels(&labels(&[("zone", "c")]))
            ]
        );
        assert!(accessible(&TopologyRule::default(), &[&a]).is_empty());
    }

    proptest! {
        #[test]
        fn labels_round_trip_through_topology(pairs in proptest::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{1,8}", 0..5)) {
            prop_assert_eq!(to_labels(&from_labels(&pairs)).unwrap(), pairs);
        }
    }
}
