//! A StorageClass's `parameters` (CreateVolume, GetCapacity, ValidateVolumeCapabilities), parsed into
//! what the REST API's create takes (a pure function).
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `replicas` | copies of the data, 1 to 16 | 3 |
//! | `minHealthy` | fewest in-sync replicas that serve I/O | a majority |
//! | `selector` | node labels every replica's node carries, `zone=a,disk=ssd` | none |
//! | `spreadKey` | the label replicas spread over | `zone` |
//! | `fsType` | the filesystem NodeStage makes when the capability names none | `ext4` |
//! | `readIops` `writeIops` `iops` `readBps` `writeBps` `bps` | QoS limits | none |
//!
//! Keys under `csi.storage.k8s.io/` are the Kubernetes sidecars' own (`--extra-create-metadata`: the
//! PVC's name and namespace) and are accepted and ignored. Any other key is refused by name: a
//! misspelt `replica: "3"` must not quietly give a volume of the default.

use std::collections::BTreeMap;
use std::collections::HashMap;

use crate::model::QosSpec;

/// Filesystems NodeStage can make and grow.
pub const FILESYSTEMS: &[&str] = &["ext4", "xfs"];
/// The filesystem when neither the capability nor the StorageClass names one.
pub const DEFAULT_FS: &str = "ext4";

/// Parameters the sidecars add, not the StorageClass's author.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// The parameters, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    pub replicas: Option<u8>,
    pub min_healthy: Option<u8>,
    pub selector: BTreeMap<String, String>,
    pub spread_key: Option<String>,
    pub fs_type: Option<String>,
    pub qos: QosSpec,
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("parameter {key}={value:?} is not a whole number"))
}

/// `zone=a,disk=ssd`.
fn labels(key: &str, value: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| format!("parameter {key}: {pair:?} is not LABEL=VALUE (e.g. zone=a,disk=ssd)"))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Parse the StorageClass parameters; an unknown key or a bad value names itself.
pub fn parse(parameters: &HashMap<String, String>) -> Result<Params, String> {
    let mut p = Params::default();
    let mut keys: Vec<&String> = parameters.keys().collect();
    keys.sort();
    for key in keys {
        let value = &parameters[key];
        match key.as_str() {
            "replicas" => p.replicas = Some(number(key, value)?),
            "minHealthy" => p.min_healthy = Some(number(key, value)?),
            "selector" => p.selector = labels(key, value)?,
            "spreadKey" => p.spread_key = Some(value.trim().to_string()),
            "fsType" => {
                let fs = value.trim();
                if !FILESYSTEMS.contains(&fs) {
                    return Err(format!(
                        "parameter fsType={fs:?}: this plugin makes {} filesystems",
                        FILESYSTEMS.join(" or ")
                    ));
                }
                p.fs_type = Some(fs.to_string());
            }
            "readIops" => p.qos.read_iops = Some(number(key, value)?),
            "writeIops" => p.qos.write_iops = Some(number(key, value)?),
            "iops" => p.qos.total_iops = Some(number(key, value)?),
            "readBps" => p.qos.read_bytes_per_sec = Some(number(key, value)?),
            "writeBps" => p.qos.write_bytes_per_sec = Some(number(key, value)?),
            "bps" => p.qos.total_bytes_per_sec = Some(number(key, value)?),
            other if other.starts_with(SIDECAR_PREFIX) => {}
            other => {
                return Err(format!(
                "unknown parameter {other:?}: this plugin takes replicas, minHealthy, selector, spreadKey, \
                     fsType, readIops, writeIops, iops, readBps, writeBps and bps"
            ))
            }
        }
    }
    Ok(p)
}

/// The parameters that shape the volume (the sidecars' own left out), for comparing two requests of
/// one name: the same name with other parameters is another volume (ALREADY_EXISTS).
pub fn significant(parameters: &HashMap<String, String>) -> BTreeMap<String, String> {
    parameters
        .iter()
        .filter(|(k, _)| !k.starts_with(SIDECAR_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_storage_class_becomes_a_create_request() {
        let p = parse(&map(&[
            ("replicas", "3"),
            ("minHealthy", "2"),
            ("selector", "zone=a, disk=ssd"),
            ("spreadKey", "rack"),
            ("fsType", "xfs"),
            ("writeIops", "500"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(p.replicas, Some(3));
        assert_eq!(p.min_healthy, Some(2));
        assert_eq!(p.selector.get("disk").map(String::as_str), Some("ssd"));
        assert_eq!(p.spread_key.as_deref(), Some("rack"));
        assert_eq!(p.fs_type.as_deref(), Some("xfs"));
        assert_eq!(p.qos.write_iops, Some(500));
        assert_eq!(parse(&HashMap::new()).unwrap(), Params::default());
    }

    #[test]
    fn bad_parameters_name_themselves() {
        for (pairs, want) in [
            (vec![("replica", "3")], "unknown parameter \"replica\""),
            (vec![("replicas", "three")], "replicas"),
            (vec![("replicas", "300")], "replicas"),
            (vec![("selector", "zone")], "LABEL=VALUE"),
            (vec![("fsType", "btrfs")], "fsType"),
            (vec![("bps", "-1")], "bps"),
        ] {
            let e = parse(&map(&pairs)).unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn the_sidecars_parameters_do_not_make_another_volume() {
        let a = map(&[("replicas", "1"), ("csi.storage.k8s.io/pvc/name", "x")]);
        let b = map(&[("replicas", "1"), ("csi.storage.k8s.io/pvc/name", "y")]);
        assert_eq!(significant(&a), significant(&b));
    }
}
