//! `docker volume create -d basalt -o KEY=VALUE ...`: the options Docker passes to `VolumeDriver.Create`,
//! turned into the API's create request (whose own checks, in [`crate::api::volumes`], then apply: the
//! size's block multiple, replicas 1 to 16, min-healthy, QoS ranges) plus the filesystem to make.
//!
//! This module only reads the text: a number that is not a number, a size that is not a size, an
//! unknown option. Each refusal names the option and what it accepts, because the docker CLI shows it
//! to the user as it is.

use std::collections::BTreeMap;

use basalt_engine::units::parse_size;

use crate::api::views::CreateVolume;
use crate::host::Filesystem;

/// Every option, with what it takes, in the order messages list them.
pub const OPTIONS: &[(&str, &str)] = &[
    (
        "size",
        "the volume's size, e.g. 256M or 10G (required unless from-snapshot is given)",
    ),
    ("replicas", "how many replicas, 1 to 16 (default 3)"),
    (
        "min-healthy",
        "fewest healthy replicas that keep serving I/O (default: a majority)",
    ),
    ("fs", "ext4 (default) or xfs"),
    ("pool", "only nodes labelled pool=VALUE hold replicas"),
    (
        "selector",
        "node labels replicas require, KEY=VALUE[,KEY=VALUE...]",
    ),
    ("spread", "the node label replicas spread over (default zone)"),
    ("read-iops", "a limit in I/O per second"),
    ("write-iops", "a limit in I/O per second"),
    ("iops", "a limit in I/O per second (reads and writes together)"),
    ("read-bps", "a limit in bytes per second, e.g. 50M"),
    ("write-bps", "a limit in bytes per second, e.g. 50M"),
    (
        "bps",
        "a limit in bytes per second (reads and writes together), e.g. 50M",
    ),
    (
        "from-snapshot",
        "VOLUME/SNAPSHOT: the new volume is a clone of that snapshot",
    ),
];

/// A create request from Docker's options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    pub request: CreateVolume,
    pub fs: Filesystem,
}

fn known() -> String {
    OPTIONS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

fn refuse(key: &str, value: &str, why: &str) -> String {
    let accepts = OPTIONS.iter().find(|(k, _)| *k == key).map_or("", |(_, a)| *a);
    format!("option {key}={value:?}: {why}; {key} takes {accepts}")
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| refuse(key, value, "not a whole number"))
}

fn size(key: &str, value: &str) -> Result<u64, String> {
    parse_size(value).map_err(|e| refuse(key, value, &e))
}

/// Docker's `Opts` (absent: none) for a volume named `name`.
pub fn parse(name: &str, opts: &BTreeMap<String, String>) -> Result<CreateOptions, String> {
    let mut request = CreateVolume {
        name: name.to_string(),
        ..CreateVolume::default()
    };
    let mut fs = Filesystem::Ext4;
    let qos = &mut request.qos;
    for (key, value) in opts {
        match key.as_str() {
            "size" => request.size_bytes = Some(size(key, value)?),
            "replicas" => request.replicas = Some(number(key, value)?),
            "min-healthy" => request.min_healthy = Some(number(key, value)?),
            "fs" => fs = value.parse().map_err(|e: String| refuse(key, value, &e))?,
            "pool" => {
                if value.is_empty() {
                    return Err(refuse(key, value, "empty"));
                }
                request.selector.insert("pool".into(), value.clone());
            }
            "selector" => {
                for pair in value.split(',') {
                    let (k, v) = pair
                        .split_once('=')
                        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                        .ok_or_else(|| refuse(key, value, &format!("{pair:?} is not KEY=VALUE")))?;
                    request.selector.insert(k.to_string(), v.to_string());
                }
            }
            "spread" => request.spread_key = Some(value.clone()),
            "read-iops" => qos.0.read_iops = Some(number(key, value)?),
            "write-iops" => qos.0.write_iops = Some(number(key, value)?),
            "iops" => qos.0.total_iops = Some(number(key, value)?),
            "read-bps" => qos.0.read_bytes_per_sec = Some(size(key, value)?),
            "write-bps" => qos.0.write_bytes_per_sec = Some(size(key, value)?),
            "bps" => qos.0.total_bytes_per_sec = Some(size(key, value)?),
            "from-snapshot" => request.from_snapshot = Some(value.clone()),
            other => {
                return Err(format!(
                "unknown option {other:?}: Basalt volumes take {} (see `docker volume create -d basalt -o \
                     KEY=VALUE`)",
                known()
            ))
            }
        }
    }
    if request.size_bytes.is_none() && request.from_snapshot.is_none() {
        return Err(
            "option size is required (e.g. -o size=10G), unless -o from-snapshot=VOLUME/SNAPSHOT clones a snapshot"
                .into(),
        );
    }
    if !fs.available() {
        return Err(refuse(
            "fs",
            fs.as_str(),
            "its mkfs is not installed on this host (Debian: xfsprogs for xfs)",
        ));
    }
    Ok(CreateOptions { request, fs })
}

/// An API refusal of a create request, with the API's field names turned back into the options the user
/// typed, so that the message names what the user can change.
pub fn in_option_words(message: &str) -> String {
    [
        ("size_bytes", "size"),
        ("min_healthy", "min-healthy"),
        ("spread_key", "spread"),
        ("from_snapshot", "from-snapshot"),
        ("qos.read_iops", "read-iops"),
        ("qos.write_iops", "write-iops"),
        ("qos.total_iops", "iops"),
        ("qos.read_bytes_per_sec", "read-bps"),
        ("qos.write_bytes_per_sec", "write-bps"),
        ("qos.total_bytes_per_sec", "bps"),
    ]
    .iter()
    .fold(message.to_string(), |m, (api, option)| {
        m.replace(api, &format!("option {option}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_option_reaches_the_create_request() {
        let o = parse(
            "v1",
            &opts(&[
                ("size", "256M"),
                ("replicas", "3"),
                ("min-healthy", "2"),
                ("fs", "ext4"),
                ("pool", "fast"),
                ("selector", "zone=a,rack=r1"),
                ("spread", "rack"),
                ("read-iops", "100"),
                ("write-iops", "200"),
                ("iops", "300"),
                ("read-bps", "1M"),
                ("write-bps", "2M"),
                ("bps", "3M"),
            ]),
        )
        .unwrap();
        let r = &o.request;
        assert_eq!(r.name, "v1");
        assert_eq!(r.size_bytes, Some(256 << 20));
        assert_eq!((r.replicas, r.min_healthy), (Some(3), Some(2)));
        assert_eq!(o.fs, Filesystem::Ext4);
        assert_eq!(
            r.selector,
            [("pool", "fast"), ("zone", "a"), ("rack", "r1")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        );
        assert_eq!(r.spread_key.as_deref(), Some("rack"));
        let q = &r.qos.0;
        assert_eq!(
            (q.read_iops, q.write_iops, q.total_iops),
            (Some(100), Some(200), Some(300))
        );
        assert_eq!(
            (q.read_bytes_per_sec, q.write_bytes_per_sec, q.total_bytes_per_sec),
            (Some(1 << 20), Some(2 << 20), Some(3 << 20))
        );
        let clone = parse("v2", &opts(&[("from-snapshot", "v1/s1")])).unwrap();
        assert_eq!(clone.request.from_snapshot.as_deref(), Some("v1/s1"));
        assert_eq!(clone.request.size_bytes, None);
    }

    #[test]
    fn bad_options_are_refused_naming_the_option_and_what_it_takes() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (&[("size", "abc")], &["size=\"abc\"", "256M"]),
            (
                &[("size", "1G"), ("colour", "red")],
                &["unknown option \"colour\"", "size, replicas"],
            ),
            (
                &[("size", "1G"), ("replicas", "three")],
                &["replicas=\"three\"", "1 to 16"],
            ),
            (&[("size", "1G"), ("replicas", "300")], &["replicas=\"300\""]),
            (
                &[("size", "1G"), ("fs", "btrfs")],
                &["fs=\"btrfs\"", "ext4 (default) or xfs"],
            ),
            (
                &[("size", "1G"), ("selector", "zone")],
                &["selector", "KEY=VALUE"],
            ),
            (&[("size", "1G"), ("bps", "fast")], &["bps=\"fast\""]),
            (&[("replicas", "3")], &["size is required"]),
        ];
        for (o, wants) in cases {
            let e = parse("v", &opts(o)).unwrap_err();
            for want in *wants {
                assert!(e.contains(want), "{o:?}: {want:?} not in {e:?}");
            }
        }
    }

    #[test]
    fn api_field_names_become_option_names() {
        assert_eq!(
            in_option_words("size_bytes must be a non-zero multiple of 4096"),
            "option size must be a non-zero multiple of 4096"
        );
        assert_eq!(
            in_option_words("qos.read_iops: too low"),
            "option read-iops: too low"
        );
    }
}
