//! Fuzz bodies: the pure parts of the transport driven by arbitrary bytes.
//! `target/fuzz` (cargo-fuzz) calls them, and `tests/iscsi_fuzz_bodies.rs`
//! runs them as proptests on stable. Each must return normally for every
//! input: a panic is a bug.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::iscsi::login::{
    AllowList, AuthPolicy, ChapCredentials, ChapSecret, LoginEnv, LoginMachine, LoginStep, TargetPolicy,
};
use crate::iscsi::pdu::{CmdSn, FrameDecoder, Itt, LoginPdu, LoginStage, Request, StatSn};
use crate::iscsi::text::{self, Negotiator, TargetOffer};

/// Cut frames from `data` (with and without digests) and type each one.
pub fn pdu_stream(data: &[u8]) {
    for (header_digest, data_digest) in [(false, false), (true, true)] {
        let decoder = FrameDecoder {
            header_digest,
            data_digest,
            max_data_segment: 64 * 1024,
        };
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = decoder.decode(&mut buf) {
            let _ = Request::parse(frame);
        }
    }
}

struct FuzzEnv {
    target: Arc<TargetPolicy>,
    counter: u8,
}

impl LoginEnv for FuzzEnv {
    fn target(&self, name: &str) -> Option<Arc<TargetPolicy>> {
        (name == self.target.name).then(|| self.target.clone())
    }
    fn session_exists(&self, tsih: u16) -> bool {
        tsih % 2 == 1
    }
    fn tpgt(&self) -> u16 {
        1
    }
    fn random(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.counter = self.counter.wrapping_add(37);
            *b = self.counter;
        }
    }
}

/// Drive login (with a CHAP target when the first byte is odd) through
/// requests whose flags and text come from `data`; also run the key=value
/// parser and negotiator on every segment.
pub fn login_negotiation(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let auth = if mode % 2 == 1 {
        let creds = |u: &str, s: &str| ChapCredentials::new(u, ChapSecret::new(s)).expect("long secret");
        AuthPolicy::chap(
            creds("alice", "alice-secret-123"),
            Some(creds("basalt", "target-secret-456")),
        )
        .expect("different secrets")
    } else {
        AuthPolicy::None
    };
    let target = Arc::new(TargetPolicy {
        name: "iqn.2026-11.io.basalt:fuzz".into(),
        alias: None,
        auth,
        allow: if mode & 2 == 2 {
            AllowList::Only(vec!["iqn.a".into()])
        } else {
            AllowList::Any
        },
    });
    let mut env = FuzzEnv { target, counter: 0 };
    let mut machine = LoginMachine::new(TargetOffer::default());
    // Each request: one flag byte, one length byte, then the text.
    let mut input = rest;
    while input.len() >= 2 {
        let (flags, len) = (input[0], usize::from(input[1]));
        let text_bytes = &input[2..(2 + len).min(input.len())];
        input = &input[(2 + len).min(input.len())..];
        if let Ok(pairs) = text::parse(text_bytes) {
            let mut negotiator = Negotiator::new(TargetOffer::default());
            for (k, v) in &pairs {
                let _ = negotiator.login_key(k, v);
            }
        }
        let stage = |code: u8| match code & 3 {
            0 => LoginStage::SecurityNegotiation,
            1 => LoginStage::OperationalNegotiation,
            _ => LoginStage::FullFeature,
        };
        let pdu = LoginPdu {
            transit: flags & 0x80 != 0,
            continue_bit: flags & 0x40 != 0,
            current_stage: stage(flags >> 2),
            next_stage: stage(flags),
            version_max: 0,
            version_min: (flags >> 4) & 1,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: u16::from(flags >> 5 & 1),
            itt: Itt(1),
            cid: 0,
            cmdsn: CmdSn(1),
            exp_statsn: StatSn(0),
            data: Bytes::copy_from_slice(text_bytes),
        };
        match machine.step(&pdu, &mut env) {
            LoginStep::Continue(_) => {}
            LoginStep::Complete(..) | LoginStep::Fail(_) => return,
        }
    }
}
