//! The file as written: serde structs that refuse unknown keys, and values
//! checked where they stand.
//!
//! Every check runs *inside* the YAML deserializer, so that the error it
//! raises carries the line and column of the value (a scalar: a size, a
//! port range, an address) or of the section it is about (a rule between
//! keys: a TLS certificate without its key). Two wrappers do it:
//! * [`Leaf`] reads a scalar through [`Scalar::parse`];
//! * [`Checked`] reads a section with its derived `Deserialize`, then runs
//!   [`Section::check`] before the deserializer returns.
//!
//! A check that ran after deserialization would only know the key path, not
//! the line. Defaults that depend on the host (its name, the current
//! directory) are filled in afterwards, in `super::Config::from_raw`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use basalt_engine::name::VolumeName;
use basalt_engine::units::{has_duration_unit, parse_duration, parse_size};
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{PoolConfig, PoolKindConfig};
use crate::model::{NodeName, PortRange};

/// A value written as one YAML scalar (a string or a number).
pub(super) trait Scalar: Sized {
    /// What the value should look like, for type errors ("expected ...").
    const EXPECTED: &'static str;
    /// The value, or a message saying what is wrong and what to write.
    fn parse(text: &str) -> Result<Self, String>;
    /// Why a YAML number is refused here, for values that are text: the
    /// reader hands over the number, not what was written (`01` arrives as
    /// 1), so the value could not be kept as written. `None`: a number is
    /// read as its decimal text.
    fn number_refused(_n: &str) -> Option<String> {
        None
    }
}

/// A [`Scalar`] read from the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Leaf<T>(pub T);

impl<'de, T: Scalar> Deserialize<'de> for Leaf<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LeafVisitor(PhantomData))
    }
}

struct LeafVisitor<T>(PhantomData<T>);

impl<T: Scalar> Visitor<'_> for LeafVisitor<T> {
    type Value = Leaf<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Leaf<T>, E> {
        T::parse(text).map(Leaf).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Leaf<T>, E> {
        self.visit_number(&n.to_string())
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Leaf<T>, E> {
        self.visit_number(&n.to_string())
    }
}

impl<T: Scalar> LeafVisitor<T> {
    fn visit_number<E: de::Error>(self, n: &str) -> Result<Leaf<T>, E> {
        match T::number_refused(n) {
            Some(reason) => Err(E::custom(reason)),
            None => self.visit_str(n),
        }
    }
}

/// A section with a rule between its keys.
pub(super) trait Section {
    fn check(&self) -> Result<(), String>;
}

/// A [`Section`] read from the file and checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Checked<T>(pub T);

impl<'de, T: Deserialize<'de> + Section> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(CheckedVisitor(PhantomData))
    }
}

struct CheckedVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de> + Section> Visitor<'de> for CheckedVisitor<T> {
    type Value = Checked<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a section of keys")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Checked<T>, A::Error> {
        let section = T::deserialize(MapAccessDeserializer::new(map))?;
        section.check().map_err(de::Error::custom)?;
        Ok(Checked(section))
    }
}

// ---------------------------------------------------------------------------
// Scalars.

impl Scalar for NodeName {
    const EXPECTED: &'static str = "a node name (a-z, 0-9, '-' and '.')";
    fn parse(text: &str) -> Result<Self, String> {
        NodeName::new(text)
    }
}

impl Scalar for IpAddr {
    const EXPECTED: &'static str = "an IP address like 10.0.0.5";
    fn parse(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|_| format!("`{text}` is not an IP address; expected one like 10.0.0.5 or fd00::5"))
    }
}

impl Scalar for SocketAddr {
    const EXPECTED: &'static str = "an address and port like 127.0.0.1:9700";
    fn parse(text: &str) -> Result<Self, String> {
        text.parse().map_err(|_| {
            format!("`{text}` is not an address and port; expected one like 127.0.0.1:9700 or [::1]:9700")
        })
    }
}

/// `endpoints.iscsi_redirector`: an address and port, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RedirectorSetting {
    At(SocketAddr),
    Off,
}

impl Scalar for RedirectorSetting {
    const EXPECTED: &'static str = "an address and port like 10.0.0.1:3260, or off";
    fn parse(text: &str) -> Result<Self, String> {
        if text == "off" {
            return Ok(RedirectorSetting::Off);
        }
        text.parse().map(RedirectorSetting::At).map_err(|_| {
            format!("`{text}` is not an address and port; expected one like 10.0.0.1:3260, or `off`")
        })
    }
}

impl Scalar for PortRange {
    const EXPECTED: &'static str = "a port range like 7100-7999";
    fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a port range; expected FIRST-LAST like 7100-7999");
        let (first, last) = text.split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 {
            return Err(format!(
                "`{text}` starts at port 0, which is not a port; start at 1 or above"
            ));
        }
        if first > last {
            return Err(format!(
                "`{text}` is empty: its first port is above its last; write the lower port first, like {last}-{first}"
            ));
        }
        Ok(PortRange { first, last })
    }
}

/// A label's value: text, kept as written. A YAML number (`zone: +1`) is
/// refused: the reader hands over the number (1), and placement would
/// compare it as "1" with another node's "+1".
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LabelValue(pub String);

impl Scalar for LabelValue {
    const EXPECTED: &'static str = "a label value (a string)";
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.contains(['=', ',']) || text.chars().any(char::is_whitespace) {
            return Err(format!(
                "`{text}` is not a label value: it must be non-empty, without spaces, `=` or `,`"
            ));
        }
        Ok(LabelValue(text.to_string()))
    }
    fn number_refused(n: &str) -> Option<String> {
        Some(format!(
            "a label value is text, and YAML reads this one as the number {n}, which need not be how it is written (+1, 0x10); quote it, like \"{n}\""
        ))
    }
}

/// A pool's name: the rules of a volume name (it appears in records,
/// messages and `--pool` flags).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct PoolName(pub String);

impl Scalar for PoolName {
    const EXPECTED: &'static str = "a pool name (a-z, 0-9, '-' and '.')";
    fn parse(text: &str) -> Result<Self, String> {
        VolumeName::new(text)
            .map(|_| PoolName(text.to_string()))
            .map_err(|e| e.to_string().replace("volume name", "pool name"))
    }
}

/// A path, relative ones taken from the agent's working directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AnyPath(pub PathBuf);

impl Scalar for AnyPath {
    const EXPECTED: &'static str = "a path";
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the path is empty; write a path or remove the key".to_string());
        }
        Ok(AnyPath(PathBuf::from(text)))
    }
}

/// An absolute path: what the store records (a pool's place) must mean the
/// same thing whatever directory the agent was started from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AbsolutePath(pub PathBuf);

impl Scalar for AbsolutePath {
    const EXPECTED: &'static str = "an absolute path";
    fn parse(text: &str) -> Result<Self, String> {
        let path = PathBuf::from(text);
        if !path.is_absolute() {
            return Err(format!(
                "`{text}` is not an absolute path; write it from the root, like /var/lib/basalt/pool"
            ));
        }
        Ok(AbsolutePath(path))
    }
}

/// A file that must exist now (a token, a certificate, a binary): better
/// refused with its line here than when the agent first opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ExistingFile(pub PathBuf);

impl Scalar for ExistingFile {
    const EXPECTED: &'static str = "the path of an existing file";
    fn parse(text: &str) -> Result<Self, String> {
        let AnyPath(path) = AnyPath::parse(text)?;
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(ExistingFile(path)),
            Ok(_) => Err(format!("`{text}` is not a regular file")),
            Err(e) => Err(format!(
                "`{text}` cannot be read ({e}); create it or fix the path"
            )),
        }
    }
}

/// A pool's capacity cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Capacity(pub u64);

impl Scalar for Capacity {
    const EXPECTED: &'static str = "a size like 100G";
    fn parse(text: &str) -> Result<Self, String> {
        match parse_size(text)? {
            0 => Err(format!("`{text}` is no room at all; give a size like 100G, or remove the key to use the whole filesystem")),
            bytes => Ok(Capacity(bytes)),
        }
    }
}

/// How long a node may be down before its replicas are replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Grace(pub Duration);

impl Scalar for Grace {
    const EXPECTED: &'static str = "a duration like 5m";
    fn parse(text: &str) -> Result<Self, String> {
        let grace = duration_with_unit(text, "5m")?;
        if grace < MIN_REPLICA_GRACE {
            return Err(format!(
                "`{text}` is shorter than {}s: replicas would be replaced on the first missed lease renewal; give at least {}s (the default, 5m, rides out a reboot)",
                MIN_REPLICA_GRACE.as_secs(),
                MIN_REPLICA_GRACE.as_secs()
            ));
        }
        Ok(Grace(grace))
    }
}

/// The shortest grace period accepted. Anything shorter replaces replicas
/// on a lease renewal that is merely late; tests of replacement use this
/// floor, operators the default.
pub(super) const MIN_REPLICA_GRACE: Duration = Duration::from_secs(1);

/// How long a node's lease outlives its last renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LeaseTtl(pub Duration);

impl Scalar for LeaseTtl {
    const EXPECTED: &'static str = "a duration like 10s";
    fn parse(text: &str) -> Result<Self, String> {
        let ttl = duration_with_unit(text, "10s")?;
        // etcd grants leases in whole seconds and rounds shorter ones up.
        if ttl < Duration::from_secs(1) {
            return Err(format!(
                "`{text}` is shorter than 1s, the shortest lease the store grants; give at least 1s"
            ));
        }
        Ok(LeaseTtl(ttl))
    }
}

/// A duration that says its unit: in a file read by people, `3600` could mean
/// seconds as easily as the milliseconds the engine's flags take, and a
/// grace period off by a factor of 1000 replaces replicas on a reboot.
fn duration_with_unit(text: &str, example: &str) -> Result<Duration, String> {
    if !has_duration_unit(text) {
        return Err(format!(
            "`{}` has no unit; write the unit, like {example} (units: ms, s, m, h)",
            text.trim()
        ));
    }
    parse_duration(text)
}

/// An etcd endpoint: `http(s)://HOST:PORT` or `HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EtcdEndpoint(pub String);

impl Scalar for EtcdEndpoint {
    const EXPECTED: &'static str = "an etcd endpoint like https://10.0.0.1:2379";
    fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .unwrap_or(text);
        let port_ok = rest
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok || rest.contains('/') || rest.chars().any(char::is_whitespace) {
            return Err(format!(
                "`{text}` is not an etcd endpoint; expected HOST:PORT with an optional http:// or https://, like https://10.0.0.1:2379"
            ));
        }
        Ok(EtcdEndpoint(text.to_string()))
    }
}

/// A container image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Image(pub String);

impl Scalar for Image {
    const EXPECTED: &'static str = "an image like basalt:latest";
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "`{text}` is not an image reference; expected one like basalt:latest"
            ));
        }
        Ok(Image(text.to_string()))
    }
}

// ---------------------------------------------------------------------------
// Sections.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub node: Checked<RawNode>,
    pub data_dir: Option<Leaf<AnyPath>>,
    pub pools: Option<Pools>,
    pub cluster: Checked<RawCluster>,
    pub endpoints: Checked<RawEndpoints>,
    pub runtime: Checked<RawRuntime>,
    pub failover: RawFailover,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNode {
    pub name: Option<Leaf<NodeName>>,
    pub address: Option<Leaf<IpAddr>>,
    pub labels: BTreeMap<String, Leaf<LabelValue>>,
    pub ports: Option<Leaf<PortRange>>,
}

impl Section for RawNode {
    fn check(&self) -> Result<(), String> {
        for key in self.labels.keys() {
            if key.is_empty() || key.contains(['=', ',']) || key.chars().any(char::is_whitespace) {
                return Err(format!(
                    "label `{key}` is not a label name: it must be non-empty, without spaces, `=` or `,`"
                ));
            }
        }
        if let Some(Leaf(address)) = &self.address {
            if address.is_unspecified() {
                return Err(format!(
                    "address {address} is where this host listens, not where others reach it; give this host's own address"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub name: Leaf<PoolName>,
    /// A directory pool.
    pub path: Option<Leaf<AbsolutePath>>,
    /// A block device pool.
    pub device: Option<Leaf<AbsolutePath>>,
    pub capacity: Option<Leaf<Capacity>>,
}

impl Section for RawPool {
    fn check(&self) -> Result<(), String> {
        let name = &self.name.0 .0;
        match (&self.path, &self.device) {
            (Some(_), Some(_)) => Err(format!(
                "pool {name} has both `path` and `device`; a pool is a directory (path) or a block device (device), not both"
            )),
            (None, None) => Err(format!(
                "pool {name} has neither `path` (a directory) nor `device` (a block device); give one"
            )),
            (Some(Leaf(AbsolutePath(path))), None) => directory_is_usable(path),
            (None, Some(Leaf(AbsolutePath(device)))) => device_is_usable(device),
        }
    }
}

/// A directory pool's path must be a directory, or be creatable: its
/// nearest existing ancestor is a directory.
fn directory_is_usable(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "{} exists and is not a directory; a pool's path is a directory (use `device` for a block device)",
            path.display()
        )),
        Err(_) => {
            let ancestor = path.ancestors().skip(1).find(|a| a.exists());
            match ancestor {
                Some(a) if a.is_dir() => Ok(()),
                Some(a) => Err(format!(
                    "{} cannot be created: {} is not a directory",
                    path.display(),
                    a.display()
                )),
                None => Err(format!("{} cannot be created: none of its parents exists", path.display())),
            }
        }
    }
}

fn device_is_usable(device: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(device) {
        Ok(meta) if meta.file_type().is_block_device() => Ok(()),
        Ok(_) => Err(format!(
            "{} is not a block device; use `path` for a directory pool",
            device.display()
        )),
        Err(e) => Err(format!(
            "block device {} cannot be opened ({e}); fix the path or attach the device",
            device.display()
        )),
    }
}

/// The pool list: at least one pool, names and places distinct.
#[derive(Debug)]
pub(super) struct Pools(pub Vec<PoolConfig>);

impl<'de> Deserialize<'de> for Pools {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(PoolsVisitor)
    }
}

struct PoolsVisitor;

impl<'de> Visitor<'de> for PoolsVisitor {
    type Value = Pools;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of pools, each with a name and a path or a device")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Pools, A::Error> {
        let mut pools = Vec::new();
        let mut names = BTreeMap::new();
        let mut places = BTreeSet::new();
        while let Some(Checked(pool)) = seq.next_element::<Checked<RawPool>>()? {
            let index = pools.len();
            let name = pool.name.0 .0;
            if let Some(first) = names.insert(name.clone(), index) {
                return Err(de::Error::custom(format!(
                    "pools[{first}] and pools[{index}] are both named `{name}`; pool names must differ"
                )));
            }
            let kind = match (pool.path, pool.device) {
                (Some(Leaf(AbsolutePath(path))), None) => PoolKindConfig::Directory(path),
                (None, Some(Leaf(AbsolutePath(device)))) => PoolKindConfig::BlockDevice(device),
                // RawPool::check lets through exactly one of the two.
                _ => {
                    return Err(de::Error::custom(format!(
                        "pool {name} needs one of `path` and `device`"
                    )))
                }
            };
            let place = match &kind {
                PoolKindConfig::Directory(p) | PoolKindConfig::BlockDevice(p) => p.clone(),
            };
            if !places.insert(place.clone()) {
                return Err(de::Error::custom(format!(
                    "pools[{index}] ({name}) uses {} again; each pool needs its own directory or device",
                    place.display()
                )));
            }
            pools.push(PoolConfig {
                name,
                kind,
                capacity_bytes: pool.capacity.map(|Leaf(Capacity(bytes))| bytes),
            });
        }
        if pools.is_empty() {
            return Err(de::Error::custom(
                "the pool list is empty; give at least one pool, or remove `pools` for the default one under data_dir",
            ));
        }
        shared_filesystems_capped(&pools).map_err(de::Error::custom)?;
        Ok(Pools(pools))
    }
}

/// Directory pools on one filesystem must each say their `capacity`.
///
/// A pool without one counts its filesystem's whole size; two such pools on
/// one filesystem would each promise all of it, and placement would give out
/// twice the room there is.
fn shared_filesystems_capped(pools: &[PoolConfig]) -> Result<(), String> {
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for (index, pool) in pools.iter().enumerate() {
        let PoolKindConfig::Directory(path) = &pool.kind else {
            continue;
        };
        let Some(device) = filesystem_of(path) else {
            continue;
        };
        let Some(&first) = seen.get(&device) else {
            seen.insert(device, index);
            continue;
        };
        let other = &pools[first];
        if other.capacity_bytes.is_none() || pool.capacity_bytes.is_none() {
            return Err(format!(
                "pools[{first}] ({}) and pools[{index}] ({}) are on the same filesystem, so each would count its whole size; give each a `capacity` (like `capacity: 100G`) that together fit, or put them on different filesystems",
                other.name, pool.name
            ));
        }
    }
    Ok(())
}

/// The filesystem (device number) a directory is or will be created on:
/// that of its nearest existing ancestor.
fn filesystem_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    path.ancestors()
        .find_map(|a| std::fs::metadata(a).ok())
        .map(|meta| meta.dev())
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum StoreKind {
    #[default]
    Embedded,
    Etcd,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCluster {
    pub store: StoreKind,
    pub etcd: Option<Checked<RawEtcd>>,
}

impl Section for RawCluster {
    fn check(&self) -> Result<(), String> {
        match (self.store, &self.etcd) {
            (StoreKind::Etcd, None) => Err(
                "store is etcd but there is no `etcd` section; add `etcd: { endpoints: [https://HOST:2379] }`".to_string(),
            ),
            (StoreKind::Embedded, Some(_)) => Err(
                "an `etcd` section is given but store is embedded; set `store: etcd`, or remove the etcd section".to_string(),
            ),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawEtcd {
    pub endpoints: Vec<Leaf<EtcdEndpoint>>,
    pub ca_file: Option<Leaf<ExistingFile>>,
    pub cert_file: Option<Leaf<ExistingFile>>,
    pub key_file: Option<Leaf<ExistingFile>>,
    pub lease_ttl: Option<Leaf<LeaseTtl>>,
}

impl Section for RawEtcd {
    fn check(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err(
                "etcd has no endpoints; list at least one, like `endpoints: [https://10.0.0.1:2379]`"
                    .to_string(),
            );
        }
        pair_complete("cert_file", &self.cert_file, "key_file", &self.key_file)
    }
}

/// A certificate needs its key and a key its certificate.
fn pair_complete<T>(a: &str, a_value: &Option<T>, b: &str, b_value: &Option<T>) -> Result<(), String> {
    match (a_value, b_value) {
        (Some(_), None) => Err(format!("{a} is given without {b}; give both or neither")),
        (None, Some(_)) => Err(format!("{b} is given without {a}; give both or neither")),
        _ => Ok(()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawEndpoints {
    pub api: ApiSetting,
    pub docker: Option<Leaf<AnyPath>>,
    /// The CSI driver with both its services on one socket.
    pub csi: Option<Leaf<AnyPath>>,
    /// The CSI controller service alone (the host that runs the cluster's
    /// provisioner).
    pub csi_controller: Option<Leaf<AnyPath>>,
    /// The CSI node service alone (every host that mounts volumes).
    pub csi_node: Option<Leaf<AnyPath>>,
    /// The iSCSI login redirector this host's initiators log in through.
    pub iscsi_redirector: Option<Leaf<RedirectorSetting>>,
}

impl Section for RawEndpoints {
    fn check(&self) -> Result<(), String> {
        let sockets = [
            ("docker", &self.docker),
            ("csi", &self.csi),
            ("csi_controller", &self.csi_controller),
            ("csi_node", &self.csi_node),
        ];
        for (i, (a, a_path)) in sockets.iter().enumerate() {
            for (b, b_path) in &sockets[i + 1..] {
                if let (Some(Leaf(AnyPath(p))), Some(Leaf(AnyPath(q)))) = (a_path, b_path) {
                    if p == q {
                        return Err(format!(
                            "{a} and {b} both use the socket {}; each endpoint needs its own socket",
                            p.display()
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The `api` key: a section (absent or empty: every default) or `off`.
///
/// An empty value is YAML's null; reading it as "no API" would let a file
/// whose keys under `api:` are all commented out turn the API off without
/// saying so, hence the explicit word.
#[derive(Debug)]
pub(super) enum ApiSetting {
    On(Checked<RawApi>),
    Off,
}

impl Default for ApiSetting {
    fn default() -> Self {
        ApiSetting::On(Checked(RawApi::default()))
    }
}

impl<'de> Deserialize<'de> for ApiSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ApiSettingVisitor)
    }
}

struct ApiSettingVisitor;

impl<'de> Visitor<'de> for ApiSettingVisitor {
    type Value = ApiSetting;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the API's section (listen, token_file, ...) or `off`")
    }

    fn visit_unit<E: de::Error>(self) -> Result<ApiSetting, E> {
        Ok(ApiSetting::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<ApiSetting, E> {
        Ok(ApiSetting::default())
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<ApiSetting, E> {
        match text {
            "off" => Ok(ApiSetting::Off),
            other => Err(E::custom(format!(
                "`{other}` is not a setting of the API; write `api: off` to turn it off, or give its keys (listen, token_file, ...)"
            ))),
        }
    }

    fn visit_bool<E: de::Error>(self, on: bool) -> Result<ApiSetting, E> {
        Err(E::custom(format!(
            "`api: {on}` is not a setting of the API; write `api: off` to turn it off, or leave it out (or empty) for the defaults"
        )))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ApiSetting, A::Error> {
        Checked::<RawApi>::deserialize(MapAccessDeserializer::new(map)).map(ApiSetting::On)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawApi {
    pub listen: Option<Leaf<SocketAddr>>,
    pub token_file: Option<Leaf<ExistingFile>>,
    pub tls_cert_file: Option<Leaf<ExistingFile>>,
    pub tls_key_file: Option<Leaf<ExistingFile>>,
}

impl Section for RawApi {
    fn check(&self) -> Result<(), String> {
        pair_complete(
            "tls_cert_file",
            &self.tls_cert_file,
            "tls_key_file",
            &self.tls_key_file,
        )
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RuntimeKind {
    #[default]
    Process,
    Docker,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRuntime {
    pub kind: RuntimeKind,
    pub binary: Option<Leaf<ExistingFile>>,
    pub docker_socket: Option<Leaf<AnyPath>>,
    pub image: Option<Leaf<Image>>,
}

impl Section for RawRuntime {
    fn check(&self) -> Result<(), String> {
        match self.kind {
            RuntimeKind::Process if self.docker_socket.is_some() || self.image.is_some() => Err(
                "docker_socket and image apply to `kind: docker`; this runtime is `process`: set `kind: docker` or remove them"
                    .to_string(),
            ),
            RuntimeKind::Docker if self.binary.is_some() => Err(
                "binary applies to `kind: process` (the image holds the binary of `kind: docker`); remove it or set `kind: process`"
                    .to_string(),
            ),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawFailover {
    pub replica_grace: Option<Leaf<Grace>>,
}
