//! Arbitrary bytes as a PDU stream: framing, digests, typed parsing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    basalt_target::iscsi::fuzz::pdu_stream(data);
});
