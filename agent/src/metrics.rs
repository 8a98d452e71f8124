//! The agent's own Prometheus metrics, in their own registry: volumes by
//! phase, reconcile passes (latency histogram, errors) and the age of the
//! node's lease (time since its last successful renewal: a value nearing
//! the lease's TTL means the node is about to be seen as down).

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};

use crate::model::VolumePhase;

/// Pass latency buckets from 1 ms (nothing to do) to 2 min (an expansion
/// waits for every replica to grow durably).
const PASS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

const PHASES: [(VolumePhase, &str); 4] = [
    (VolumePhase::Creating, "creating"),
    (VolumePhase::Ready, "ready"),
    (VolumePhase::Degraded, "degraded"),
    (VolumePhase::Deleting, "deleting"),
];

pub struct AgentMetrics {
    pub registry: Registry,
    /// Volumes in the store by phase, as of the last pass.
    pub volumes: IntGaugeVec,
    pub reconcile_seconds: Histogram,
    /// Reconcile steps (and whole passes) that failed.
    pub reconcile_errors: IntCounter,
    pub lease_age_seconds: Gauge,
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let registry = Registry::new();
        let volumes = IntGaugeVec::new(
            Opts::new("basalt_agent_volumes", "Volumes in the cluster store, by phase"),
            &["phase"],
        )
        .expect("valid metric");
        let reconcile_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "basalt_agent_reconcile_seconds",
                "Time a reconcile pass of this node took",
            )
            .buckets(PASS_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let reconcile_errors = IntCounter::new(
            "basalt_agent_reconcile_errors_total",
            "Reconcile steps or passes that failed (retried at the next pass)",
        )
        .expect("valid metric");
        let lease_age_seconds = Gauge::new(
            "basalt_agent_lease_age_seconds",
            "Seconds since this node's lease was last renewed",
        )
        .expect("valid metric");
        for m in [
            Box::new(volumes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_seconds.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(lease_age_seconds.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        AgentMetrics {
            registry,
            volumes,
            reconcile_seconds,
            reconcile_errors,
            lease_age_seconds,
        }
    }

    /// Sets the per-phase volume counts (every phase has a series, 0 too).
    pub fn set_volume_phases(&self, phases: impl IntoIterator<Item = VolumePhase>) {
        let mut counts = [0i64; 4];
        for p in phases {
            if let Some(i) = PHASES.iter().position(|(q, _)| *q == p) {
                counts[i] += 1;
            }
        }
        for (i, (_, label)) in PHASES.iter().enumerate() {
            self.volumes.with_label_values(&[label]).set(counts[i]);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_is_counted_and_rendered() {
        let m = AgentMetrics::new();
        m.set_volume_phases([VolumePhase::Ready, VolumePhase::Ready, VolumePhase::Deleting]);
        let text = m.render();
        assert!(text.contains("basalt_agent_volumes{phase=\"ready\"} 2"), "{text}");
        assert!(
            text.contains("basalt_agent_volumes{phase=\"deleting\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("basalt_agent_volumes{phase=\"creating\"} 0"),
            "{text}"
        );
        m.set_volume_phases([]);
        assert!(m.render().contains("basalt_agent_volumes{phase=\"ready\"} 0"));
    }
}
