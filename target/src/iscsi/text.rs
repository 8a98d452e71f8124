//! Text keys: `key=value\0` parsing and the negotiation of operational
//! parameters (RFC 7143 §6.2, §13). Pure functions, so they can be fuzzed.
//!
//! Each key has a *result function* that combines the initiator's offer with
//! our own value:
//!
//! ```text
//!   list (HeaderDigest, DataDigest)   first offered value we support
//!   min  (MaxBurstLength, ...)        smaller of offer and ours
//!   max  (DefaultTime2Wait)           larger of offer and ours
//!   OR   (InitialR2T, *InOrder)       Yes if either says Yes
//!   AND  (ImmediateData, markers)     Yes only if both say Yes
//!   declarative (MaxRecvDataSegmentLength, names)   each side states its own
//! ```
//!
//! Unknown keys are answered `NotUnderstood`; known keys with a value that is
//! out of range or malformed are answered `Reject` and keep their default.
//!
//! Our own values are chosen for speed (unlike Jiva's InitialR2T=Yes,
//! MaxOutstandingR2T=1, 64 KiB bursts): we accept InitialR2T=No,
//! ImmediateData=Yes and whatever burst lengths the initiator proposes up to
//! the RFC's 16 MiB - 1 ceiling, and we declare a 256 KiB receive segment so a
//! 256 KiB write fits in the command PDU as immediate data.

use std::collections::HashSet;

use bytes::{BufMut, Bytes, BytesMut};

/// Longest key name (RFC 7143 §6.1: 63 bytes).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept. RFC 7143 limits most values to 255 bytes but
/// CHAP responses and challenges may be longer; 8 KiB is the size of one
/// login PDU.
pub const MAX_VALUE_LEN: usize = 8192;

/// Why a text segment is not a list of `key=value` pairs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text pair {index} is not valid UTF-8; keys and values must be UTF-8 (RFC 7143 §6.1)")]
    NotUtf8 { index: usize },
    #[error("text pair {index} ({pair:?}) has no '=': each pair must be key=value")]
    NoEquals { index: usize, pair: String },
    #[error("key {key:?} is empty, longer than 63 bytes or has characters outside [A-Za-z0-9.+@_-]")]
    BadKey { key: String },
    #[error("the value of {key} is {len} bytes, more than the {MAX_VALUE_LEN} allowed")]
    ValueTooLong { key: String, len: usize },
}

/// Parse a text data segment into pairs, in order. Empty entries (runs of
/// NULs, padding) are skipped; a final pair may lack its NUL.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut pairs = Vec::new();
    for (index, raw) in data.split(|&b| b == 0).filter(|p| !p.is_empty()).enumerate() {
        let pair = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8 { index })?;
        let (key, value) = pair.split_once('=').ok_or_else(|| TextError::NoEquals {
            index,
            pair: pair.to_string(),
        })?;
        let key_ok = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+@_-#".contains(&b));
        if !key_ok {
            return Err(TextError::BadKey { key: key.to_string() });
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong {
                key: key.to_string(),
                len: value.len(),
            });
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// Encode pairs as `key=value\0...`.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Bytes {
    let mut out = BytesMut::new();
    for (k, v) in pairs {
        out.put_slice(k.as_ref().as_bytes());
        out.put_u8(b'=');
        out.put_slice(v.as_ref().as_bytes());
        out.put_u8(0);
    }
    out.freeze()
}

/// The answer to a rejected or unknown key.
pub const REJECT: &str = "Reject";
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
pub const IRRELEVANT: &str = "Irrelevant";

/// Highest value of the 24-bit length keys (RFC 7143 §13.12-13.14).
pub const MAX_LENGTH_VALUE: u32 = (1 << 24) - 1;

/// Our side of the negotiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetOffer {
    /// The MaxRecvDataSegmentLength we declare.
    pub max_recv_data_segment_length: u32,
    /// Our MaxBurstLength (result: min).
    pub max_burst_length: u32,
    /// Our FirstBurstLength (result: min).
    pub first_burst_length: u32,
    /// Our MaxOutstandingR2T (result: min).
    pub max_outstanding_r2t: u16,
    /// Our DefaultTime2Wait (result: max).
    pub default_time2wait: u16,
}

impl Default for TargetOffer {
    fn default() -> Self {
        TargetOffer {
            // 256 KiB: a 256 KiB write arrives whole as immediate data, and
            // receive buffers stay small enough for hundreds of sessions.
            max_recv_data_segment_length: 256 * 1024,
            // Take whatever the initiator proposes up to the RFC ceiling:
            // large bursts mean fewer R2T round trips.
            max_burst_length: MAX_LENGTH_VALUE,
            first_burst_length: MAX_LENGTH_VALUE,
            // Enough R2Ts in flight to keep a 16 MiB write streaming with
            // 1 MiB bursts; the initiator's value (often 1) usually wins.
            max_outstanding_r2t: 16,
            // We keep nothing across a dropped connection (ErrorRecoveryLevel
            // 0), so the initiator need not wait long to reconnect.
            default_time2wait: 2,
        }
    }
}

/// The operational parameters of a session once negotiated (RFC 7143 §13),
/// starting from the RFC defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// What the initiator can receive: our Data-In and text segments must
    /// not be longer.
    pub initiator_max_recv_data_segment_length: u32,
    /// What we declared: the initiator's segments must not be longer.
    pub target_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            initiator_max_recv_data_segment_length: 8192,
            target_max_recv_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

impl SessionParams {
    /// How many bytes the initiator may send without an R2T: immediate data
    /// plus unsolicited Data-Out, capped by FirstBurstLength (RFC 7143 §13.14).
    pub fn unsolicited_limit(&self) -> u32 {
        if self.initial_r2t && !self.immediate_data {
            0
        } else {
            self.first_burst_length
        }
    }
}

/// What a key does in the operational negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyAnswer {
    /// Answer with this value.
    Answer(String),
    /// Accepted without an answer (declarative keys).
    Silent,
}

fn parse_number(value: &str) -> Option<u64> {
    if let Some(hex) = value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse().ok()
    } else {
        None
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

fn numeric(value: &str, range: std::ops::RangeInclusive<u64>) -> Option<u64> {
    parse_number(value).filter(|n| range.contains(n))
}

/// Negotiates the operational keys of one login (or one text exchange in full
/// feature phase) against our offer, accumulating the result.
#[derive(Clone, Debug)]
pub struct Negotiator {
    pub params: SessionParams,
    offer: TargetOffer,
    /// Keys already negotiated: offering one twice is a protocol error.
    seen: HashSet<String>,
}

/// A key offered twice in one negotiation (RFC 7143 §6.2).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("key {0} was negotiated twice; each key may be offered once per negotiation")]
pub struct DuplicateKey(pub String);

impl Negotiator {
    pub fn new(offer: TargetOffer) -> Negotiator {
        Negotiator {
            params: SessionParams::default(),
            offer,
            seen: HashSet::new(),
        }
    }

    pub fn offer(&self) -> &TargetOffer {
        &self.offer
    }

    /// Record that we declare our MaxRecvDataSegmentLength.
    pub fn declare_target_mrdsl(&mut self) -> String {
        self.params.target_max_recv_data_segment_length = self.offer.max_recv_data_segment_length;
        self.offer.max_recv_data_segment_length.to_string()
    }

    /// Negotiate one operational key offered by the initiator during login.
    pub fn login_key(&mut self, key: &str, value: &str) -> Result<KeyAnswer, DuplicateKey> {
        if !self.seen.insert(key.to_string()) {
            return Err(DuplicateKey(key.to_string()));
        }
        let p = &mut self.params;
        let o = &self.offer;
        let reject = || KeyAnswer::Answer(REJECT.to_string());
        let answer = match key {
            "HeaderDigest" | "DataDigest" => {
                // List: the first offered value we support.
                let choice = value.split(',').find_map(|v| match v {
                    "CRC32C" => Some(true),
                    "None" => Some(false),
                    _ => None,
                });
                match choice {
                    Some(crc) => {
                        if key == "HeaderDigest" {
                            p.header_digest = crc;
                        } else {
                            p.data_digest = crc;
                        }
                        KeyAnswer::Answer(if crc { "CRC32C" } else { "None" }.to_string())
                    }
                    None => reject(),
                }
            }
            "MaxConnections" => match numeric(value, 1..=65535) {
                // We serve one connection per session.
                Some(_) => {
                    p.max_connections = 1;
                    KeyAnswer::Answer("1".to_string())
                }
                None => reject(),
            },
            "InitialR2T" => match parse_bool(value) {
                // OR with our "No": the initiator's choice.
                Some(v) => {
                    p.initial_r2t = v;
                    KeyAnswer::Answer(yes_no(v))
                }
                None => reject(),
            },
            "ImmediateData" => match parse_bool(value) {
                // AND with our "Yes": the initiator's choice.
                Some(v) => {
                    p.immediate_data = v;
                    KeyAnswer::Answer(yes_no(v))
                }
                None => reject(),
            },
            "MaxRecvDataSegmentLength" => match numeric(value, 512..=u64::from(MAX_LENGTH_VALUE)) {
                Some(v) => {
                    p.initiator_max_recv_data_segment_length = v as u32;
                    KeyAnswer::Silent
                }
                None => reject(),
            },
            "MaxBurstLength" => match numeric(value, 512..=u64::from(MAX_LENGTH_VALUE)) {
                Some(v) => {
                    p.max_burst_length = (v as u32).min(o.max_burst_length);
                    p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
                    KeyAnswer::Answer(p.max_burst_length.to_string())
                }
                None => reject(),
            },
            "FirstBurstLength" => match numeric(value, 512..=u64::from(MAX_LENGTH_VALUE)) {
                Some(v) => {
                    // FirstBurstLength may not exceed MaxBurstLength.
                    p.first_burst_length = (v as u32).min(o.first_burst_length).min(p.max_burst_length);
                    KeyAnswer::Answer(p.first_burst_length.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Wait" => match numeric(value, 0..=3600) {
                Some(v) => {
                    p.default_time2wait = (v as u16).max(o.default_time2wait);
                    KeyAnswer::Answer(p.default_time2wait.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Retain" => match numeric(value, 0..=3600) {
                // min with our 0: nothing survives a dropped connection.
                Some(_) => {
                    p.default_time2retain = 0;
                    KeyAnswer::Answer("0".to_string())
                }
                None => reject(),
            },
            "MaxOutstandingR2T" => match numeric(value, 1..=65535) {
                Some(v) => {
                    p.max_outstanding_r2t = (v as u16).min(o.max_outstanding_r2t);
                    KeyAnswer::Answer(p.max_outstanding_r2t.to_string())
                }
                None => reject(),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(value) {
                // OR with our "Yes": always in order, which lets us reassemble
                // writes without a reorder map.
                Some(_) => KeyAnswer::Answer("Yes".to_string()),
                None => reject(),
            },
            "ErrorRecoveryLevel" => match numeric(value, 0..=2) {
                // min with our 0: session recovery only.
                Some(_) => {
                    p.error_recovery_level = 0;
                    KeyAnswer::Answer("0".to_string())
                }
                None => reject(),
            },
            // Markers (RFC 3720, obsolete in RFC 7143): AND with our No.
            "IFMarker" | "OFMarker" => match parse_bool(value) {
                Some(_) => KeyAnswer::Answer("No".to_string()),
                None => reject(),
            },
            "IFMarkInt" | "OFMarkInt" => KeyAnswer::Answer(IRRELEVANT.to_string()),
            // RFC 7144: min with our level 1 (RFC 7143 semantics).
            "iSCSIProtocolLevel" => match numeric(value, 0..=31) {
                Some(v) => KeyAnswer::Answer(v.min(1).to_string()),
                None => reject(),
            },
            // Keys only a target may send, or only in full feature phase.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => reject(),
            _ => KeyAnswer::Answer(NOT_UNDERSTOOD.to_string()),
        };
        Ok(answer)
    }
}

/// Answer one key of a Text Request in full feature phase, other than
/// SendTargets (handled by the session). Only MaxRecvDataSegmentLength may be
/// renegotiated there; the leading-only keys are rejected.
pub fn full_feature_key(params: &mut SessionParams, key: &str, value: &str) -> Option<(String, String)> {
    match key {
        "MaxRecvDataSegmentLength" => match numeric(value, 512..=u64::from(MAX_LENGTH_VALUE)) {
            Some(v) => {
                params.initiator_max_recv_data_segment_length = v as u32;
                None
            }
            None => Some((key.to_string(), REJECT.to_string())),
        },
        "HeaderDigest"
        | "DataDigest"
        | "MaxConnections"
        | "InitialR2T"
        | "ImmediateData"
        | "MaxBurstLength"
        | "FirstBurstLength"
        | "DefaultTime2Wait"
        | "DefaultTime2Retain"
        | "MaxOutstandingR2T"
        | "DataPDUInOrder"
        | "DataSequenceInOrder"
        | "ErrorRecoveryLevel"
        | "SessionType"
        | "InitiatorName"
        | "TargetName"
        | "AuthMethod"
        | "TargetAlias"
        | "TargetAddress"
        | "TargetPortalGroupTag" => Some((key.to_string(), REJECT.to_string())),
        _ => Some((key.to_string(), NOT_UNDERSTOOD.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiate(pairs: &[(&str, &str)]) -> (SessionParams, Vec<(String, KeyAnswer)>) {
        let mut n = Negotiator::new(TargetOffer::default());
        let answers = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), n.login_key(k, v).unwrap()))
            .collect();
        (n.params, answers)
    }

    fn answer(v: &str) -> KeyAnswer {
        KeyAnswer::Answer(v.to_string())
    }

    #[test]
    fn pairs_round_trip_and_padding_is_ignored() {
        let bytes = encode(&[("InitiatorName", "iqn.x"), ("MaxBurstLength", "1024")]);
        let mut padded = bytes.to_vec();
        padded.extend_from_slice(&[0, 0]);
        assert_eq!(
            parse(&padded).unwrap(),
            vec![
                ("InitiatorName".into(), "iqn.x".into()),
                ("MaxBurstLength".into(), "1024".into())
            ]
        );
        assert_eq!(parse(b"a=b").unwrap(), vec![("a".into(), "b".into())]);
        assert_eq!(parse(b"CHAP_C=").unwrap(), vec![("CHAP_C".into(), "".into())]);
    }

    #[test]
    fn malformed_text_is_an_error() {
        assert!(matches!(parse(b"novalue\0"), Err(TextError::NoEquals { .. })));
        assert!(matches!(parse(b"=x\0"), Err(TextError::BadKey { .. })));
        assert!(matches!(parse(b"a b=x\0"), Err(TextError::BadKey { .. })));
        assert!(matches!(
            parse(&[0xff, b'=', b'1']),
            Err(TextError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn fast_initiator_proposals_are_accepted() {
        let (p, answers) = negotiate(&[
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "262144"),
            ("MaxOutstandingR2T", "8"),
            ("MaxRecvDataSegmentLength", "262144"),
        ]);
        assert!(!p.initial_r2t && p.immediate_data);
        assert_eq!((p.max_burst_length, p.first_burst_length), (16_776_192, 262_144));
        assert_eq!(p.max_outstanding_r2t, 8);
        assert_eq!(p.initiator_max_recv_data_segment_length, 262_144);
        assert_eq!(answers[0].1, answer("No"));
        assert_eq!(
            answers[5].1,
            KeyAnswer::Silent,
            "MaxRecvDataSegmentLength is declarative"
        );
    }

    #[test]
    fn result_functions_follow_rfc_7143() {
        let (p, answers) = negotiate(&[
            ("InitialR2T", "Yes"),           // OR
            ("ImmediateData", "No"),         // AND
            ("DataPDUInOrder", "No"),        // OR with our Yes
            ("DefaultTime2Wait", "0"),       // max with our 2
            ("DefaultTime2Retain", "20"),    // min with our 0
            ("ErrorRecoveryLevel", "2"),     // min with our 0
            ("MaxOutstandingR2T", "100"),    // min with our 16
            ("MaxConnections", "8"),         // min with our 1
            ("HeaderDigest", "CRC32C,None"), // first we support
            ("DataDigest", "None,CRC32C"),
        ]);
        let values: Vec<_> = answers.into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            values,
            ["Yes", "No", "Yes", "2", "0", "0", "16", "1", "CRC32C", "None"]
                .map(answer)
                .to_vec()
        );
        assert!(p.initial_r2t && !p.immediate_data && p.header_digest && !p.data_digest);
        assert_eq!(p.unsolicited_limit(), 0);
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let (p, _) = negotiate(&[("MaxBurstLength", "65536"), ("FirstBurstLength", "262144")]);
        assert_eq!(p.first_burst_length, 65_536);
    }

    #[test]
    fn bad_values_are_rejected_and_unknown_keys_not_understood() {
        let (p, answers) = negotiate(&[
            ("MaxBurstLength", "100"),
            ("InitialR2T", "maybe"),
            ("HeaderDigest", "MD5"),
            ("X-com.example.Foo", "1"),
            ("Frobnicate", "Yes"),
            ("MaxRecvDataSegmentLength", "99999999999"),
        ]);
        let values: Vec<_> = answers.into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            values,
            [REJECT, REJECT, REJECT, NOT_UNDERSTOOD, NOT_UNDERSTOOD, REJECT]
                .map(answer)
                .to_vec()
        );
        assert_eq!(p, SessionParams::default(), "rejected keys keep their defaults");
    }

    #[test]
    fn a_key_offered_twice_is_a_protocol_error() {
        let mut n = Negotiator::new(TargetOffer::default());
        n.login_key("MaxBurstLength", "65536").unwrap();
        assert_eq!(
            n.login_key("MaxBurstLength", "65536"),
            Err(DuplicateKey("MaxBurstLength".into()))
        );
    }

    #[test]
    fn full_feature_phase_renegotiates_only_mrdsl() {
        let mut p = SessionParams::default();
        assert_eq!(
            full_feature_key(&mut p, "MaxRecvDataSegmentLength", "65536"),
            None
        );
        assert_eq!(p.initiator_max_recv_data_segment_length, 65_536);
        assert_eq!(
            full_feature_key(&mut p, "MaxBurstLength", "65536"),
            Some(("MaxBurstLength".into(), REJECT.into()))
        );
    }
}
