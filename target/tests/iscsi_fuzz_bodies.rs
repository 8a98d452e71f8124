//! The cargo-fuzz bodies (`target/fuzz`) run as property tests on stable:
//! arbitrary bytes never panic the PDU parser or the login negotiation.

use basalt_target::iscsi::fuzz;
use basalt_target::iscsi::pdu::{Bhs, Opcode};
use basalt_target::iscsi::text;
use proptest::prelude::*;

/// Byte strings that start like a PDU often, so the parser gets past framing.
fn pdu_like() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        any::<u8>(),
        0u32..300,
        proptest::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(op, flags, len, mut tail)| {
            let mut bhs = Bhs::new(Opcode::NopOut);
            bhs.0[0] = op;
            bhs.0[1] = flags;
            bhs.set_data_segment_len(len);
            let mut out = bhs.0.to_vec();
            out.append(&mut tail);
            out
        })
}

fn login_like() -> impl Strategy<Value = Vec<u8>> {
    let keys = proptest::sample::select(vec![
        "InitiatorName=iqn.a",
        "TargetName=iqn.2026-11.io.basalt:fuzz",
        "SessionType=Discovery",
        "AuthMethod=CHAP,None",
        "AuthMethod=None",
        "CHAP_A=5",
        "CHAP_N=alice",
        "CHAP_R=0x00112233",
        "CHAP_I=7",
        "CHAP_C=0b AQID",
        "MaxBurstLength=0",
        "HeaderDigest=CRC32C",
        "X-junk=1",
        "=",
        "noequals",
    ]);
    proptest::collection::vec((any::<u8>(), proptest::collection::vec(keys, 0..5)), 0..6).prop_map(|reqs| {
        let mut out = vec![1u8];
        for (flags, keys) in reqs {
            let body: Vec<u8> = keys.iter().flat_map(|k| k.bytes().chain([0])).collect();
            out.push(flags);
            out.push(body.len().min(255) as u8);
            out.extend_from_slice(&body[..body.len().min(255)]);
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_pdu_parser(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        fuzz::pdu_stream(&data);
    }

    #[test]
    fn pdu_shaped_bytes_never_panic_the_pdu_parser(data in pdu_like()) {
        fuzz::pdu_stream(&data);
    }

    #[test]
    fn arbitrary_bytes_never_panic_login(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzz::login_negotiation(&data);
    }

    #[test]
    fn key_shaped_logins_never_panic(data in login_like()) {
        fuzz::login_negotiation(&data);
    }

    #[test]
    fn encoded_pairs_parse_back(pairs in proptest::collection::vec(("[A-Za-z][A-Za-z0-9.]{0,20}", "[ -~&&[^=]]{0,40}"), 0..8)) {
        let encoded = text::encode(&pairs);
        let parsed = text::parse(&encoded).unwrap();
        prop_assert_eq!(parsed, pairs);
    }
}
