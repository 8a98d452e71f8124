//! QoS limits on the command line: the `--qos-*` flags of `basalt controller`
//! and `basalt volume up`, and `basalt volume qos`, which changes a running
//! volume's limits through its management API.
//!
//! The same six limits (see `basalt_engine::volume::qos`) appear as
//! `--qos-read-iops` on the roles that start a volume and as `--read-iops`
//! on `volume qos`; one flag table serves both spellings. `volume qos NAME`
//! changes a cluster volume's limits through the node agent instead, which
//! keeps them in the volume's record (rates only: the agent has no bursts).

use anyhow::Context;
use basalt_agent::model::QosSpec;
use basalt_engine::api::{qos_from_pb, qos_to_pb};
use basalt_engine::volume::qos::{Limit, LimitKind, Part, QosError, QosLimits, Unit};
use basalt_proto::pb::controller as pb;
use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches};

use super::args::parse_size;

/// Each limit's flags: (kind, rate and burst with the `qos-` prefix, rate and
/// burst without). Flag names must be `'static` for clap.
const FLAGS: [(LimitKind, [&str; 4]); 6] = [
    (
        LimitKind::ReadIops,
        [
            "qos-read-iops",
            "qos-read-iops-burst",
            "read-iops",
            "read-iops-burst",
        ],
    ),
    (
        LimitKind::WriteIops,
        [
            "qos-write-iops",
            "qos-write-iops-burst",
            "write-iops",
            "write-iops-burst",
        ],
    ),
    (
        LimitKind::Iops,
        ["qos-iops", "qos-iops-burst", "iops", "iops-burst"],
    ),
    (
        LimitKind::ReadBps,
        ["qos-read-bps", "qos-read-bps-burst", "read-bps", "read-bps-burst"],
    ),
    (
        LimitKind::WriteBps,
        [
            "qos-write-bps",
            "qos-write-bps-burst",
            "write-bps",
            "write-bps-burst",
        ],
    ),
    (LimitKind::Bps, ["qos-bps", "qos-bps-burst", "bps", "bps-burst"]),
];

/// The QoS flags, spelled `--qos-read-iops` when `PREFIXED`, `--read-iops`
/// otherwise. Holds what was given, unchecked across flags until
/// [`QosFlags::limits`].
#[derive(Clone, Debug, Default)]
pub struct QosFlags<const PREFIXED: bool> {
    /// (kind, rate, burst) for each limit given.
    given: Vec<(LimitKind, u64, Option<u64>)>,
}

impl<const PREFIXED: bool> QosFlags<PREFIXED> {
    fn names(kind: LimitKind) -> (&'static str, &'static str) {
        let (_, names) = FLAGS
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("every kind has flags");
        if PREFIXED {
            (names[0], names[1])
        } else {
            (names[2], names[3])
        }
    }

    /// The flag that a limit's error is about.
    fn flag_of(e: &QosError) -> &'static str {
        let (rate, burst) = Self::names(e.kind());
        match e.part() {
            Part::Rate => rate,
            Part::Burst => burst,
        }
    }

    /// The limits given, each checked; an error names its flag and the
    /// accepted range.
    pub fn limits(&self) -> anyhow::Result<QosLimits> {
        let mut limits = QosLimits::default();
        for &(kind, rate, burst) in &self.given {
            let limit =
                Limit::new(kind, rate, burst).map_err(|e| anyhow::anyhow!("--{}: {e}", Self::flag_of(&e)))?;
            limits.set(kind, Some(limit));
        }
        Ok(limits)
    }

    /// `base` with the given rates in place, as the node agent keeps limits:
    /// a rate per kind and no burst, so a burst flag is refused by name
    /// rather than dropped.
    pub fn agent_spec(&self, base: QosSpec) -> anyhow::Result<QosSpec> {
        let mut spec = base;
        for &(kind, rate, burst) in &self.given {
            if burst.is_some() {
                anyhow::bail!(
                    "--{}: a cluster volume's limits have no burst (the controller's default burst applies); \
                     drop the flag, or use --api ADDR to set a burst on one controller",
                    Self::names(kind).1
                );
            }
            let field = match kind {
                LimitKind::ReadIops => &mut spec.read_iops,
                LimitKind::WriteIops => &mut spec.write_iops,
                LimitKind::Iops => &mut spec.total_iops,
                LimitKind::ReadBps => &mut spec.read_bytes_per_sec,
                LimitKind::WriteBps => &mut spec.write_bytes_per_sec,
                LimitKind::Bps => &mut spec.total_bytes_per_sec,
            };
            *field = Some(rate);
        }
        Ok(spec)
    }

    pub fn is_empty(&self) -> bool {
        self.given.is_empty()
    }

    /// The same flags as arguments for a child process (`volume up` passes
    /// them to its controller); bandwidths in plain bytes.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for &(kind, rate, burst) in &self.given {
            let (rate_flag, burst_flag) = Self::names(kind);
            args.extend([format!("--{rate_flag}"), rate.to_string()]);
            if let Some(b) = burst {
                args.extend([format!("--{burst_flag}"), b.to_string()]);
            }
        }
        args
    }
}

/// A rate or burst value: a count for I/Os, a size (50M, 1GiB) for bytes;
/// checked against the range the limit accepts whatever the other flags
/// (a burst against its rate is checked by [`QosFlags::limits`]).
fn parse_value(kind: LimitKind, part: Part, text: &str) -> Result<u64, String> {
    let value = match kind.unit() {
        Unit::Ops => text
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("`{text}` is not a number of I/Os"))?,
        Unit::Bytes => parse_size(text)?,
    };
    match part {
        Part::Rate => kind.check_rate(value),
        Part::Burst => kind.check_burst(value),
    }
    .map_err(|e| e.to_string())
}

fn help(kind: LimitKind, part: Part) -> String {
    let rates = kind.rate_range();
    match (kind.unit(), part) {
        (Unit::Ops, Part::Rate) => format!(
            "Limit the volume's {kind}: I/Os per second, {} to {}",
            rates.start(),
            rates.end()
        ),
        (Unit::Bytes, Part::Rate) => format!(
            "Limit the volume's {kind}: bytes per second, with an optional unit (50M = 50 MiB/s), 4K to 100G"
        ),
        (_, Part::Burst) => format!(
            "Burst allowed above the {kind} limit, in {} (default: one second's worth of the limit)",
            kind.unit()
        ),
    }
}

impl<const PREFIXED: bool> clap::Args for QosFlags<PREFIXED> {
    fn augment_args(mut cmd: Command) -> Command {
        for (kind, _) in FLAGS {
            let (rate, burst) = Self::names(kind);
            let value_name = match kind.unit() {
                Unit::Ops => "IOPS",
                Unit::Bytes => "BYTES",
            };
            cmd = cmd
                .arg(
                    Arg::new(rate)
                        .long(rate)
                        .value_name(value_name)
                        .action(ArgAction::Set)
                        .allow_negative_numbers(true)
                        .value_parser(move |t: &str| parse_value(kind, Part::Rate, t))
                        .help(help(kind, Part::Rate)),
                )
                .arg(
                    Arg::new(burst)
                        .long(burst)
                        .value_name(value_name)
                        .action(ArgAction::Set)
                        .allow_negative_numbers(true)
                        .requires(rate)
                        .value_parser(move |t: &str| parse_value(kind, Part::Burst, t))
                        .help(help(kind, Part::Burst)),
                );
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<const PREFIXED: bool> FromArgMatches for QosFlags<PREFIXED> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = QosFlags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.given.clear();
        for (kind, _) in FLAGS {
            let (rate, burst) = Self::names(kind);
            if let Some(&r) = matches.get_one::<u64>(rate) {
                self.given.push((kind, r, matches.get_one::<u64>(burst).copied()));
            }
        }
        Ok(())
    }
}

/// Arguments of `basalt volume qos`.
#[derive(clap::Args)]
pub struct QosArgs {
    /// NAME (its limits kept by the node agent) or `--api`.
    #[command(flatten)]
    pub target: super::cluster::VolumeTarget,
    /// Remove every limit not given here (alone: remove all limits).
    #[arg(long)]
    pub clear: bool,
    #[command(flatten)]
    pub limits: QosFlags<false>,
    #[command(flatten)]
    pub auth: super::secrets::ApiClientArgs,
}

/// `basalt volume qos`: change the limits (if any flag is given), then print
/// the limits in force.
pub fn run(a: QosArgs) -> anyhow::Result<()> {
    // Checked here first, so that a bad value names its flag and the
    // controller is not asked at all.
    let set = a.limits.limits()?;
    if let Some(name) = &a.target.name {
        let agent = a.target.agent_args();
        return super::cluster::volume::qos(name, a.clear, &a.limits, &agent);
    }
    let api = a.target.api();
    let limits = super::client::block_on(async {
        let mut client = super::client::connect(api, &a.auth).await?;
        if a.clear || !a.limits.is_empty() {
            let reply = client
                .volume_set_qos(pb::VolumeSetQosRequest {
                    limits: Some(qos_to_pb(&set)),
                    clear: a.clear,
                })
                .await
                .map_err(super::client::status_message)?;
            Ok(reply.into_inner().limits.unwrap_or_default())
        } else {
            let reply = client
                .volume_info(pb::VolumeInfoRequest {})
                .await
                .map_err(super::client::status_message)?;
            Ok(reply.into_inner().qos.unwrap_or_default())
        }
    })?;
    println!("QoS limits in force: {}", describe(&limits)?);
    Ok(())
}

/// Limits as a person reads them: `write-iops 200/s (burst 200), bps 50
/// MiB/s (burst 50 MiB)`, or `none`.
pub fn describe(limits: &pb::QosLimits) -> anyhow::Result<String> {
    let limits = qos_from_pb(limits).context("the controller reported a limit out of range")?;
    if limits.is_empty() {
        return Ok("none".into());
    }
    let parts: Vec<String> = limits
        .iter()
        .map(|(kind, l)| {
            format!(
                "{} {}/s (burst {})",
                kind.flag(),
                amount(kind, l.rate()),
                amount(kind, l.burst())
            )
        })
        .collect();
    Ok(parts.join(", "))
}

/// Limits as JSON: `{"write_iops": {"rate": 200, "burst": 200}, ...}`.
pub fn to_json(limits: &pb::QosLimits) -> serde_json::Value {
    let limits = qos_from_pb(limits).unwrap_or_default();
    let map: serde_json::Map<String, serde_json::Value> = limits
        .iter()
        .map(|(kind, l)| {
            (
                kind.key().to_string(),
                serde_json::json!({ "rate": l.rate(), "burst": l.burst() }),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}

/// A count of I/Os, or bytes in the largest binary unit that divides them.
fn amount(kind: LimitKind, value: u64) -> String {
    if kind.unit() == Unit::Ops {
        return value.to_string();
    }
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if value >= 1 << shift && value.is_multiple_of(1 << shift) {
            return format!("{} {unit}", value >> shift);
        }
    }
    format!("{value} B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        qos: QosFlags<true>,
    }

    fn parse(args: &[&str]) -> Result<QosFlags<true>, clap::Error> {
        Cli::try_parse_from(std::iter::once("basalt").chain(args.iter().copied())).map(|c| c.qos)
    }

    #[test]
    fn flags_take_counts_and_sizes_and_pass_on_to_a_child() {
        let flags = parse(&[
            "--qos-write-iops",
            "200",
            "--qos-bps",
            "50M",
            "--qos-bps-burst",
            "100MiB",
        ])
        .unwrap();
        let limits = flags.limits().unwrap();
        assert_eq!(limits.get(LimitKind::WriteIops).unwrap().rate(), 200);
        assert_eq!(limits.get(LimitKind::Bps).unwrap().rate(), 50 << 20);
        assert_eq!(limits.get(LimitKind::Bps).unwrap().burst(), 100 << 20);
        let again = parse(&flags.to_args().iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert_eq!(again.limits().unwrap(), limits);
    }

    #[test]
    fn bad_values_name_the_flag_and_the_range() {
        let e = parse(&["--qos-write-iops", "0"]).unwrap_err().to_string();
        assert!(
            e.contains("--qos-write-iops") && e.contains("1 to 10000000"),
            "{e}"
        );
        let e = parse(&["--qos-bps", "200G"]).unwrap_err().to_string();
        assert!(e.contains("--qos-bps") && e.contains("to 107374182400"), "{e}");
        let e = parse(&["--qos-read-iops", "-5"]).unwrap_err().to_string();
        assert!(e.contains("--qos-read-iops"), "{e}");
        let e = parse(&["--qos-iops-burst", "10"]).unwrap_err().to_string();
        assert!(e.contains("--qos-iops"), "a burst needs its limit: {e}");
        let e = parse(&["--qos-iops", "100000", "--qos-iops-burst", "10"])
            .unwrap()
            .limits()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--qos-iops-burst:") && e.contains("at least 1000"),
            "{e}"
        );
    }

    #[test]
    fn limits_read_as_rates_and_bursts_in_binary_units() {
        let flags = parse(&["--qos-write-iops", "200", "--qos-bps", "50M"]).unwrap();
        let text = describe(&qos_to_pb(&flags.limits().unwrap())).unwrap();
        assert_eq!(text, "write-iops 200/s (burst 200), bps 50 MiB/s (burst 50 MiB)");
        assert_eq!(describe(&pb::QosLimits::default()).unwrap(), "none");
    }

    #[derive(Parser)]
    struct VolumeQos {
        #[command(flatten)]
        args: QosArgs,
    }

    fn parse_volume_qos(args: &[&str]) -> Result<QosArgs, clap::Error> {
        VolumeQos::try_parse_from(std::iter::once("qos").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn a_cluster_volume_takes_rates_over_its_own_and_refuses_bursts() {
        let a = parse_volume_qos(&["vol", "--read-iops", "500", "--write-bps", "1M"]).unwrap();
        assert_eq!(a.target.name.as_deref(), Some("vol"));
        let base = QosSpec {
            read_iops: Some(10),
            total_iops: Some(900),
            ..QosSpec::default()
        };
        let spec = a.limits.agent_spec(base).unwrap();
        assert_eq!(
            spec,
            QosSpec {
                read_iops: Some(500),
                total_iops: Some(900),
                write_bytes_per_sec: Some(1 << 20),
                ..QosSpec::default()
            }
        );
        let a = parse_volume_qos(&["vol", "--iops", "100", "--iops-burst", "200"]).unwrap();
        let e = a.limits.agent_spec(QosSpec::default()).unwrap_err().to_string();
        assert!(e.starts_with("--iops-burst:"), "{e}");
    }

    #[test]
    fn a_controller_is_still_reached_at_its_api_address_and_not_with_a_name() {
        let a = parse_volume_qos(&["--api", "127.0.0.1:9700", "--read-iops", "5"]).unwrap();
        assert_eq!(a.target.name, None);
        assert_eq!(a.target.api(), "127.0.0.1:9700");
        assert!(parse_volume_qos(&["vol", "--api", "127.0.0.1:9700"]).is_err());
    }
}
