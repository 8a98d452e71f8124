//! What the QoS throttle costs per initiator op when no limit bites (`benches/README.md`, "QoS limits"):
//! one 4 KiB write offered to a throttle with no limit configured (the fast path every op takes on a volume
//! without limits), and with `--iops 10000000 --bps 100G` (every op goes through the buckets and the queue,
//! which it leaves at once). Simulated time advances 1 µs per op, far below both limits.
//!
//!     cargo bench -p basalt-benches --bench qos

use std::hint::black_box;
use std::time::{Duration, Instant};

use basalt_engine::volume::qos::{Cost, Limit, LimitKind, QosLimits, Throttle};
use criterion::{criterion_group, criterion_main, Criterion};

fn high() -> QosLimits {
    let mut limits = QosLimits::default();
    for (kind, rate) in [(LimitKind::Iops, 10_000_000), (LimitKind::Bps, 100 << 30)] {
        limits.set(kind, Some(Limit::new(kind, rate, None).expect("in range")));
    }
    limits
}

fn admit(c: &mut Criterion) {
    let mut group = c.benchmark_group("qos-admit-4k-write");
    for (name, limits) in [("none", QosLimits::default()), ("high", high())] {
        group.bench_function(name, |b| {
            let mut now = Instant::now();
            let mut throttle = Throttle::new(limits, now);
            let mut out = Vec::with_capacity(1);
            b.iter(|| {
                now += Duration::from_micros(1);
                throttle.offer(Cost::write(4096), 0u64, now, &mut out);
                black_box(out.pop().expect("admitted at once"));
            });
        });
    }
    group.finish();
}

criterion_group!(benches, admit);
criterion_main!(benches);
