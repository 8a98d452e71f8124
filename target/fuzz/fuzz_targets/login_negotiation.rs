//! Arbitrary login requests: the login state machine, CHAP and key=value
//! negotiation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    basalt_target::iscsi::fuzz::login_negotiation(data);
});
