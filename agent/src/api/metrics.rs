//! The agent's Prometheus metrics (`GET /metrics`): requests by route, method and status, their latency
//! as a histogram, and the volumes by phase (counted from the store at each scrape, so the number is
//! the cluster's, whichever agent is scraped).

use std::time::Duration;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::error::ApiResult;
use super::volumes::all_volumes;
use crate::model::VolumePhase;
use crate::store::Store;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    volumes: IntGaugeVec,
}

/// Every phase, so that a phase with no volume shows 0 rather than vanishing from the scrape.
const PHASES: [VolumePhase; 4] = [
    VolumePhase::Creating,
    VolumePhase::Ready,
    VolumePhase::Degraded,
    VolumePhase::Deleting,
];

fn phase_label(p: VolumePhase) -> &'static str {
    match p {
        VolumePhase::Creating => "creating",
        VolumePhase::Ready => "ready",
        VolumePhase::Degraded => "degraded",
        VolumePhase::Deleting => "deleting",
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Names and label sets are constants: creating and registering them cannot fail.
        let requests = IntCounterVec::new(
            Opts::new(
                "basalt_agent_api_requests_total",
                "API requests answered, by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("constant metric definition");
        // Store reads take microseconds to milliseconds; a controller call up to seconds.
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "basalt_agent_api_request_seconds",
                "API request latency, by route",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 4.0, 9).unwrap_or_default()),
            &["route"],
        )
        .expect("constant metric definition");
        let volumes = IntGaugeVec::new(
            Opts::new("basalt_agent_volumes", "Volumes in the cluster store, by phase"),
            &["phase"],
        )
        .expect("constant metric definition");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(volumes.clone()),
        ] {
            let _ = registry.register(c);
        }
        Metrics {
            registry,
            requests,
            latency,
            volumes,
        }
    }

    /// Count one answered request.
    pub fn observe(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
        self.latency
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }

    /// The exposition text, with the volume counts read now.
    pub async fn render(&self, store: &dyn Store) -> ApiResult<Vec<u8>> {
        let volumes = all_volumes(store).await?;
        for phase in PHASES {
            let n = volumes.iter().filter(|v| v.phase == phase).count();
            self.volumes
                .with_label_values(&[phase_label(phase)])
                .set(n as i64);
        }
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        Ok(out)
    }
}
