//! Fuzz target: the frame decoder must return (frames or an error) on any
//! input, never panic, and never allocate past `MAX_PAYLOAD`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = basalt_proto::frame::decode_all(data);
});
