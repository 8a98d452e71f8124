//! The controller's Prometheus metrics, in their own registry (served at
//! `/metrics` on `--metrics`). The same counters feed `basalt volume info`,
//! so the CLI and the dashboards can never disagree.

use std::time::Duration;

use prometheus::{
    Counter, CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use super::core::ReplicaMode;
use super::qos::{Direction, LimitKind, QosLimits};

/// Latency buckets from 50 µs (a page-cache hit over loopback) to 10 s (past
/// the replica timeout), so both fast paths and stalls are visible.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

pub struct VolumeMetrics {
    pub registry: Registry,
    pub ops: IntCounterVec,
    pub bytes: IntCounterVec,
    pub errors: IntCounterVec,
    pub latency: HistogramVec,
    pub in_flight: IntGauge,
    pub healthy: IntGauge,
    /// 1 for the replica's current mode, 0 for the others.
    pub replica_mode: IntGaugeVec,
    pub replica_errors: IntCounterVec,
    /// Rebuild progress of the replica being rebuilt, in bytes.
    pub rebuild_done: IntGaugeVec,
    pub rebuild_total: IntGaugeVec,
    /// Time initiator ops spent waiting for QoS tokens, by direction
    /// (the series, by [`Direction`] index: no label lookup per op).
    qos_throttled: [Counter; 2],
    /// Initiator ops waiting for QoS tokens now, by direction.
    qos_waiting: [IntGauge; 2],
    /// The QoS limits in force (rate per second, and burst), by limit; a
    /// limit not set has no series.
    pub qos_limit: IntGaugeVec,
    pub qos_burst: IntGaugeVec,
}

impl Default for VolumeMetrics {
    fn default() -> Self {
        VolumeMetrics::new()
    }
}

impl VolumeMetrics {
    pub fn new() -> VolumeMetrics {
        let registry = Registry::new();
        let ops = IntCounterVec::new(
            Opts::new("basalt_volume_ops_total", "Initiator I/Os completed, by op"),
            &["op"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new("basalt_volume_bytes_total", "Bytes read and written, by op"),
            &["op"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new("basalt_volume_errors_total", "Initiator I/Os that failed, by op"),
            &["op"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "basalt_volume_latency_seconds",
                "Initiator I/O latency through the controller",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("valid metric");
        let in_flight =
            IntGauge::new("basalt_volume_in_flight", "I/Os in flight in the volume core").expect("valid");
        let healthy = IntGauge::new("basalt_volume_healthy_replicas", "Read-write replicas").expect("valid");
        let replica_mode = IntGaugeVec::new(
            Opts::new(
                "basalt_replica_mode",
                "1 for the replica's current mode (RW, WO, ERR)",
            ),
            &["replica", "mode"],
        )
        .expect("valid metric");
        let replica_errors = IntCounterVec::new(
            Opts::new(
                "basalt_replica_errors_total",
                "Times a replica was dropped from the volume",
            ),
            &["replica"],
        )
        .expect("valid metric");
        let rebuild_done = IntGaugeVec::new(
            Opts::new(
                "basalt_rebuild_done_bytes",
                "Bytes copied so far by the replica's current rebuild",
            ),
            &["replica"],
        )
        .expect("valid metric");
        let rebuild_total = IntGaugeVec::new(
            Opts::new(
                "basalt_rebuild_total_bytes",
                "Bytes the replica's current rebuild has to copy",
            ),
            &["replica"],
        )
        .expect("valid metric");
        let qos_throttled = CounterVec::new(
            Opts::new(
                "basalt_volume_qos_throttled_seconds_total",
                "Time initiator I/Os waited for QoS tokens (summed over I/Os), by direction",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let qos_waiting = IntGaugeVec::new(
            Opts::new(
                "basalt_volume_qos_waiting",
                "Initiator I/Os waiting for QoS tokens, by direction",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let qos_limit = IntGaugeVec::new(
            Opts::new(
                "basalt_volume_qos_limit",
                "QoS limit in force: I/Os or bytes per second (read_iops, write_iops, iops, read_bps, ...)",
            ),
            &["limit"],
        )
        .expect("valid metric");
        let qos_burst = IntGaugeVec::new(
            Opts::new(
                "basalt_volume_qos_burst",
                "Burst of the QoS limit in force: I/Os or bytes",
            ),
            &["limit"],
        )
        .expect("valid metric");
        // Present from the start, at zero, so that dashboards and rate() see
        // the series before the first throttled I/O.
        let by_direction = Direction::ALL.map(|d| {
            (
                qos_throttled.with_label_values(&[d.label()]),
                qos_waiting.with_label_values(&[d.label()]),
            )
        });
        registry
            .register(Box::new(qos_throttled.clone()))
            .expect("unique metric");
        for g in [&qos_waiting, &qos_limit, &qos_burst] {
            registry.register(Box::new(g.clone())).expect("unique metric");
        }
        registry
            .register(Box::new(rebuild_done.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(rebuild_total.clone()))
            .expect("unique metric");
        for c in [&ops, &bytes, &errors, &replica_errors] {
            registry.register(Box::new(c.clone())).expect("unique metric");
        }
        registry
            .register(Box::new(latency.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(healthy.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(replica_mode.clone()))
            .expect("unique metric");
        VolumeMetrics {
            registry,
            ops,
            bytes,
            errors,
            latency,
            in_flight,
            healthy,
            replica_mode,
            replica_errors,
            rebuild_done,
            rebuild_total,
            qos_throttled: by_direction.clone().map(|(t, _)| t),
            qos_waiting: by_direction.map(|(_, w)| w),
            qos_limit,
            qos_burst,
        }
    }

    /// An op waited `waited` for its QoS tokens.
    pub fn observe_throttled(&self, direction: Direction, waited: Duration) {
        self.qos_throttled[direction.index()].inc_by(waited.as_secs_f64());
    }

    /// Seconds ops of `direction` spent throttled so far.
    pub fn throttled_seconds(&self, direction: Direction) -> f64 {
        self.qos_throttled[direction.index()].get()
    }

    pub fn set_qos_waiting(&self, direction: Direction, waiting: usize) {
        self.qos_waiting[direction.index()].set(waiting as i64);
    }

    pub fn qos_waiting(&self, direction: Direction) -> u64 {
        self.qos_waiting[direction.index()].get().max(0) as u64
    }

    /// Export the limits in force: one series per limit set.
    pub fn set_qos_limits(&self, limits: &QosLimits) {
        for kind in LimitKind::ALL {
            match limits.get(kind) {
                Some(l) => {
                    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    self.qos_limit
                        .with_label_values(&[kind.key()])
                        .set(clamp(l.rate()));
                    self.qos_burst
                        .with_label_values(&[kind.key()])
                        .set(clamp(l.burst()));
                }
                None => {
                    // Absent series mean "no limit" (an error only says it
                    // was not there to remove).
                    let _ = self.qos_limit.remove_label_values(&[kind.key()]);
                    let _ = self.qos_burst.remove_label_values(&[kind.key()]);
                }
            }
        }
    }

    /// Record one completed initiator I/O.
    pub fn observe(&self, op: &str, bytes: u64, elapsed: Duration, ok: bool) {
        if ok {
            self.ops.with_label_values(&[op]).inc();
            self.bytes.with_label_values(&[op]).inc_by(bytes);
        } else {
            self.errors.with_label_values(&[op]).inc();
        }
        let h: Histogram = self.latency.with_label_values(&[op]);
        h.observe(elapsed.as_secs_f64());
    }

    pub fn set_mode(&self, addr: &str, mode: &ReplicaMode) {
        for m in ["RW", "WO", "ERR"] {
            self.replica_mode
                .with_label_values(&[addr, m])
                .set(i64::from(m == mode.label()));
        }
    }

    pub fn counter(&self, c: &IntCounterVec, op: &str) -> u64 {
        c.with_label_values(&[op]).get()
    }

    /// The text exposition format, for `/metrics`.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
