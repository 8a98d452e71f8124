//! The agent's own Prometheus metrics, in their own registry: reconcile
//! passes (latency histogram, errors) and the age of the node's lease (time
//! since its last successful renewal: a value nearing the lease's TTL means
//! the node is about to be seen as down). Served after the API's own at
//! `GET /metrics` (which counts the volumes by phase from the store).

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, Registry};

/// Pass latency buckets from 1 ms (nothing to do) to 2 min (an expansion
/// waits for every replica to grow durably).
const PASS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub struct AgentMetrics {
    pub registry: Registry,
    pub reconcile_seconds: Histogram,
    /// Reconcile steps (and whole passes) that failed.
    pub reconcile_errors: IntCounter,
    pub lease_age_seconds: Gauge,
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let registry = Registry::new();
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
            Box::new(reconcile_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(lease_age_seconds.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        AgentMetrics {
            registry,
            reconcile_seconds,
            reconcile_errors,
            lease_age_seconds,
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
    fn passes_errors_and_the_lease_age_are_rendered() {
        let m = AgentMetrics::new();
        m.reconcile_seconds.observe(0.02);
        m.reconcile_errors.inc();
        m.lease_age_seconds.set(3.0);
        let text = m.render();
        assert!(text.contains("basalt_agent_reconcile_seconds_count 1"), "{text}");
        assert!(text.contains("basalt_agent_reconcile_errors_total 1"), "{text}");
        assert!(text.contains("basalt_agent_lease_age_seconds 3"), "{text}");
    }
}
