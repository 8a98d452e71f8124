//! Frame codec micro-benchmarks: what one frame costs to encode and decode,
//! header-only, 4 KiB and 1 MiB payloads.
//!
//! Encoding renders the 52-byte header and computes the CRC over header and
//! payload; the payload itself is never copied (the `fan-out` case reuses a
//! payload CRC computed once, as a controller writing to three replicas
//! does). Decoding includes CRC verification and splitting the payload off
//! the read buffer (no copy). Run: `cargo bench -p basalt-benches --bench codec`.

use basalt_proto::frame::{payload_crc, Frame, FrameCodec, Message, RequestId};
use basalt_proto::Epoch;
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tokio_util::codec::Decoder;

fn frames() -> Vec<(&'static str, Frame)> {
    let write = |len: usize| Message::Write {
        offset: 1 << 20,
        data: Bytes::from(vec![0x5a; len]),
        fua: false,
    };
    vec![
        (
            "header-only",
            Frame::new(
                RequestId(1),
                Epoch(7),
                Message::Read {
                    offset: 4096,
                    len: 4096,
                },
            ),
        ),
        ("4KiB", Frame::new(RequestId(1), Epoch(7), write(4096))),
        ("1MiB", Frame::new(RequestId(1), Epoch(7), write(1 << 20))),
    ]
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, frame) in frames() {
        let encoded = frame.encode().unwrap();
        group.throughput(Throughput::Bytes(encoded.wire_len() as u64));
        group.bench_function(name, |b| b.iter(|| frame.encode().unwrap()));
        let crc = payload_crc(encoded.payload());
        group.bench_function(format!("{name}/fan-out"), |b| {
            b.iter(|| frame.encode_with_payload_crc(crc).unwrap())
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, frame) in frames() {
        let encoded = frame.encode().unwrap();
        let mut wire = BytesMut::new();
        wire.extend_from_slice(encoded.header());
        wire.extend_from_slice(encoded.payload());
        group.throughput(Throughput::Bytes(wire.len() as u64));
        // The copy into a fresh buffer is setup, not measured: a socket
        // reader fills that buffer anyway.
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| FrameCodec.decode(buf).unwrap().unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
