//! The login phase (RFC 7143 §6): a pure state machine fed one Login Request
//! at a time, answering with the keys of the Login Response.
//!
//! ```text
//!    SecurityNegotiation ──T──► OperationalNegotiation ──T──► FullFeature
//!    (AuthMethod, CHAP_*)       (HeaderDigest, bursts, ...)
//!           └───────────────────────T (NSG=3) ─────────────────────┘
//!
//!   CHAP (RFC 1994 with MD5, CHAP_A=5), target side:
//!     I: AuthMethod=CHAP,None     T: AuthMethod=CHAP
//!     I: CHAP_A=5                 T: CHAP_A=5 CHAP_I=<id> CHAP_C=<16 random bytes>
//!     I: CHAP_N CHAP_R [CHAP_I CHAP_C]   (the last two ask for mutual CHAP)
//!                                 T: [CHAP_N CHAP_R]  -- or status 0x0201
//! ```
//!
//! Everything the machine needs from the outside (the targets, random bytes,
//! whether a TSIH names a session) comes through [`LoginEnv`], so tests and
//! the fuzzer drive it without sockets. Secrets live in [`ChapSecret`], whose
//! `Debug` prints nothing, and no failure message carries a secret or a
//! CHAP response.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use md5::{Digest, Md5};

use crate::iscsi::pdu::{LoginPdu, LoginStage, LoginStatus};
use crate::iscsi::text::{self, KeyAnswer, Negotiator, SessionParams, TargetOffer};

/// Shortest CHAP secret accepted: RFC 7143 §12.1.3 wants at least 96 bits of
/// randomness; shorter ones fall to offline dictionary attacks on a sniffed
/// exchange.
pub const MIN_CHAP_SECRET_LEN: usize = 12;

/// Length of our CHAP challenge: as long as the MD5 digest (RFC 7143 §12.1.3).
pub const CHAP_CHALLENGE_LEN: usize = 16;

/// Longest challenge we accept from an initiator asking for mutual CHAP.
pub const MAX_PEER_CHALLENGE_LEN: usize = 1024;

/// A login that needs more PDUs than this is not converging (a confused or
/// hostile initiator); it is failed rather than looping.
pub const MAX_LOGIN_PDUS: u32 = 64;

/// Invalid target configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "the CHAP secret for {user:?} is {len} bytes; use at least {MIN_CHAP_SECRET_LEN} \
         (RFC 7143 §12.1.3 asks for 96 bits)"
    )]
    SecretTooShort { user: String, len: usize },
    #[error(
        "the initiator and target CHAP secrets are equal; RFC 7143 §12.1.3 forbids reusing a secret \
         in both directions: configure a different target secret"
    )]
    SameSecretBothWays,
    #[error("environment variable {0} holding a CHAP secret is not set (or not UTF-8)")]
    MissingEnv(String),
    #[error("target name {0:?} is not a valid iSCSI name (expected iqn.YYYY-MM.domain:name)")]
    BadTargetName(String),
}

/// A CHAP secret. Never printed: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapSecret(Vec<u8>);

impl ChapSecret {
    pub fn new(secret: impl Into<Vec<u8>>) -> ChapSecret {
        ChapSecret(secret.into())
    }

    /// Read a secret from the environment variable `var`, so it never
    /// appears on a command line.
    pub fn from_env(var: &str) -> Result<ChapSecret, ConfigError> {
        std::env::var(var)
            .map(ChapSecret::new)
            .map_err(|_| ConfigError::MissingEnv(var.to_string()))
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for ChapSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChapSecret(<redacted>)")
    }
}

/// A CHAP name and secret.
#[derive(Clone, Debug)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: ChapSecret,
}

impl ChapCredentials {
    pub fn new(user: impl Into<String>, secret: ChapSecret) -> Result<ChapCredentials, ConfigError> {
        let user = user.into();
        if secret.0.len() < MIN_CHAP_SECRET_LEN {
            return Err(ConfigError::SecretTooShort {
                user,
                len: secret.0.len(),
            });
        }
        Ok(ChapCredentials { user, secret })
    }
}

/// How initiators authenticate to a target.
#[derive(Clone, Debug, Default)]
pub enum AuthPolicy {
    /// AuthMethod=None.
    #[default]
    None,
    /// CHAP is required. `target` credentials, when set, let initiators ask
    /// for mutual CHAP (the target proves itself too).
    Chap {
        initiator: ChapCredentials,
        target: Option<ChapCredentials>,
    },
}

impl AuthPolicy {
    /// One-way or mutual CHAP; the two secrets must differ.
    pub fn chap(
        initiator: ChapCredentials,
        target: Option<ChapCredentials>,
    ) -> Result<AuthPolicy, ConfigError> {
        if target.as_ref().is_some_and(|t| t.secret == initiator.secret) {
            return Err(ConfigError::SameSecretBothWays);
        }
        Ok(AuthPolicy::Chap { initiator, target })
    }
}

/// Which initiators may log in to a target.
#[derive(Clone, Debug, Default)]
pub enum AllowList {
    #[default]
    Any,
    /// Only these initiator names (compared case-insensitively, as iSCSI
    /// names are, RFC 7143 §4.2.7.2).
    Only(Vec<String>),
}

impl AllowList {
    pub fn allows(&self, initiator: &str) -> bool {
        match self {
            AllowList::Any => true,
            AllowList::Only(names) => names.iter().any(|n| n.eq_ignore_ascii_case(initiator)),
        }
    }
}

/// What login needs to know about a target.
#[derive(Clone, Debug)]
pub struct TargetPolicy {
    pub name: String,
    pub alias: Option<String>,
    pub auth: AuthPolicy,
    pub allow: AllowList,
}

/// Discovery or normal session (RFC 7143 §13.21).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// The world as login sees it.
pub trait LoginEnv {
    /// The target named `name`, if this portal serves it.
    fn target(&self, name: &str) -> Option<Arc<TargetPolicy>>;
    /// Whether `tsih` names a live session of this portal.
    fn session_exists(&self, tsih: u16) -> bool;
    /// Our target portal group tag.
    fn tpgt(&self) -> u16;
    /// Fill `buf` with unpredictable bytes (CHAP challenges).
    fn random(&mut self, buf: &mut [u8]);
}

/// The Login Response to send (besides ISID/TSIH/ITT, which the connection
/// fills in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginReply {
    pub transit: bool,
    pub current_stage: LoginStage,
    pub next_stage: LoginStage,
    pub keys: Vec<(String, String)>,
}

/// A finished login: everything full feature phase needs.
#[derive(Clone, Debug)]
pub struct LoginOutcome {
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub isid: [u8; 6],
    pub session_type: SessionType,
    /// `None` for discovery sessions.
    pub target: Option<Arc<TargetPolicy>>,
    pub params: SessionParams,
    pub cid: u16,
}

/// A failed login: the status for the Login Response and the reason for the
/// log (never a secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("login failed ({status:?}): {reason}")]
pub struct LoginFailure {
    pub status: LoginStatus,
    pub reason: String,
}

fn fail<T>(status: LoginStatus, reason: impl Into<String>) -> Result<T, LoginFailure> {
    Err(LoginFailure {
        status,
        reason: reason.into(),
    })
}

/// One step of login.
#[derive(Clone, Debug)]
pub enum LoginStep {
    /// Send the reply and wait for the next Login Request.
    Continue(LoginReply),
    /// Send the reply (T bit set, NSG full feature): the session starts.
    Complete(LoginReply, LoginOutcome),
    /// Send a Login Response with this status, then close the connection.
    Fail(LoginFailure),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum AuthState {
    /// No AuthMethod agreed yet.
    Pending,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    AwaitAlgorithm,
    /// Challenge sent; waiting for CHAP_N / CHAP_R.
    AwaitResponse {
        id: u8,
        challenge: [u8; CHAP_CHALLENGE_LEN],
    },
    /// Authenticated (or no authentication needed).
    Done,
}

/// Identity of the login fixed by its first PDU.
#[derive(Clone, Copy, Debug)]
struct Leading {
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
}

/// The target side of one login.
#[derive(Debug)]
pub struct LoginMachine {
    stage: LoginStage,
    leading: Option<Leading>,
    pdus: u32,
    /// Text of PDUs sent with the C bit, awaiting the rest.
    partial_text: BytesMut,
    initiator_name: Option<String>,
    initiator_alias: Option<String>,
    session_type: Option<SessionType>,
    target_name: Option<String>,
    target: Option<Arc<TargetPolicy>>,
    resolved: bool,
    auth: AuthState,
    negotiator: Negotiator,
    declared_portal_keys: bool,
    declared_mrdsl: bool,
}

impl LoginMachine {
    pub fn new(offer: TargetOffer) -> LoginMachine {
        LoginMachine {
            stage: LoginStage::SecurityNegotiation,
            leading: None,
            pdus: 0,
            partial_text: BytesMut::new(),
            initiator_name: None,
            initiator_alias: None,
            session_type: None,
            target_name: None,
            target: None,
            resolved: false,
            auth: AuthState::Pending,
            negotiator: Negotiator::new(offer),
            declared_portal_keys: false,
            declared_mrdsl: false,
        }
    }

    /// Feed one Login Request.
    pub fn step(&mut self, pdu: &LoginPdu, env: &mut dyn LoginEnv) -> LoginStep {
        match self.step_inner(pdu, env) {
            Ok(step) => step,
            Err(failure) => LoginStep::Fail(failure),
        }
    }

    fn requires_chap(&self) -> bool {
        matches!(
            self.target.as_deref(),
            Some(TargetPolicy {
                auth: AuthPolicy::Chap { .. },
                ..
            })
        )
    }

    fn step_inner(&mut self, pdu: &LoginPdu, env: &mut dyn LoginEnv) -> Result<LoginStep, LoginFailure> {
        use LoginStatus::*;
        self.pdus += 1;
        if self.pdus > MAX_LOGIN_PDUS {
            return fail(
                InitiatorError,
                format!("login did not finish within {MAX_LOGIN_PDUS} PDUs"),
            );
        }
        if pdu.version_min > 0 {
            return fail(
                UnsupportedVersion,
                format!(
                    "initiator needs iSCSI version >= {}; we speak version 0",
                    pdu.version_min
                ),
            );
        }
        match self.leading {
            None => {
                if pdu.tsih != 0 {
                    // MaxConnections is 1: a TSIH means adding a connection
                    // to a session, which we never allow.
                    let status = if env.session_exists(pdu.tsih) {
                        TooManyConnections
                    } else {
                        SessionDoesNotExist
                    };
                    return fail(
                        status,
                        format!("TSIH {} names a session; MaxConnections is 1", pdu.tsih),
                    );
                }
                self.leading = Some(Leading {
                    isid: pdu.isid,
                    tsih: pdu.tsih,
                    cid: pdu.cid,
                });
                if pdu.current_stage == LoginStage::OperationalNegotiation {
                    // The initiator skips security negotiation; checked
                    // against the target's policy once it is known.
                    self.stage = LoginStage::OperationalNegotiation;
                }
            }
            Some(lead) if lead.isid != pdu.isid || lead.tsih != pdu.tsih || lead.cid != pdu.cid => {
                return fail(
                    InitiatorError,
                    "ISID, TSIH or CID changed in the middle of a login",
                );
            }
            Some(_) => {}
        }
        if pdu.current_stage != self.stage {
            return fail(
                InitiatorError,
                format!(
                    "login request for stage {:?} while in stage {:?}",
                    pdu.current_stage, self.stage
                ),
            );
        }
        if pdu.transit && pdu.next_stage <= pdu.current_stage {
            return fail(
                InitiatorError,
                format!("cannot transit from {:?} to {:?}", self.stage, pdu.next_stage),
            );
        }

        self.partial_text.extend_from_slice(&pdu.data);
        if pdu.continue_bit {
            if pdu.transit {
                return fail(InitiatorError, "login request has both the T and C bits set");
            }
            // RFC 7143 §11.12.2: answer each partial PDU with an empty one.
            return Ok(LoginStep::Continue(self.reply(
                false,
                pdu.current_stage,
                Vec::new(),
            )));
        }
        let data = std::mem::take(&mut self.partial_text);
        let pairs = text::parse(&data).map_err(|e| LoginFailure {
            status: InitiatorError,
            reason: e.to_string(),
        })?;

        let mut answers = Vec::new();
        let mut security: HashMap<String, String> = HashMap::new();
        for (key, value) in pairs {
            match key.as_str() {
                "InitiatorName" => {
                    if value.is_empty() || self.initiator_name.as_ref().is_some_and(|n| *n != value) {
                        return fail(
                            InitiatorError,
                            format!("invalid or changed InitiatorName {value:?}"),
                        );
                    }
                    self.initiator_name = Some(value);
                }
                "InitiatorAlias" => self.initiator_alias = Some(value),
                "SessionType" => {
                    let kind = match value.as_str() {
                        "Discovery" => SessionType::Discovery,
                        "Normal" => SessionType::Normal,
                        _ => {
                            return fail(
                                InitiatorError,
                                format!("SessionType={value:?} is not Discovery/Normal"),
                            )
                        }
                    };
                    if self.resolved && Some(kind) != self.session_type {
                        return fail(InitiatorError, "SessionType changed during login");
                    }
                    self.session_type = Some(kind);
                }
                "TargetName" => {
                    if self.resolved && self.target_name.as_deref() != Some(value.as_str()) {
                        return fail(InitiatorError, "TargetName changed during login");
                    }
                    self.target_name = Some(value);
                }
                "AuthMethod" | "CHAP_A" | "CHAP_I" | "CHAP_C" | "CHAP_N" | "CHAP_R" => {
                    if self.stage != LoginStage::SecurityNegotiation {
                        return fail(
                            InitiatorError,
                            format!("{key} outside the security negotiation stage"),
                        );
                    }
                    security.insert(key, value);
                }
                _ => match self.negotiator.login_key(&key, &value) {
                    Ok(KeyAnswer::Answer(v)) => answers.push((key, v)),
                    Ok(KeyAnswer::Silent) => {}
                    Err(dup) => return fail(InitiatorError, dup.to_string()),
                },
            }
        }

        let mut keys = Vec::new();
        if !self.resolved {
            self.resolve(env)?;
            if let Some(target) = &self.target {
                if !self.declared_portal_keys {
                    // RFC 7143 §13.9: TargetPortalGroupTag in the first
                    // response of a normal session.
                    keys.push(("TargetPortalGroupTag".to_string(), env.tpgt().to_string()));
                    if let Some(alias) = &target.alias {
                        keys.push(("TargetAlias".to_string(), alias.clone()));
                    }
                    self.declared_portal_keys = true;
                }
            }
            if self.stage == LoginStage::OperationalNegotiation && self.requires_chap() {
                return fail(
                    AuthenticationFailure,
                    "the target requires CHAP; the initiator skipped security",
                );
            }
        }

        if self.stage == LoginStage::SecurityNegotiation {
            self.security(&security, &mut keys, env)?;
        }
        keys.extend(answers);
        if self.stage == LoginStage::OperationalNegotiation && !self.declared_mrdsl {
            let ours = self.negotiator.declare_target_mrdsl();
            keys.push(("MaxRecvDataSegmentLength".to_string(), ours));
            self.declared_mrdsl = true;
        }

        let mut transit = pdu.transit;
        if transit && self.stage == LoginStage::SecurityNegotiation && self.auth != AuthState::Done {
            if self.auth == AuthState::Pending && !self.requires_chap() {
                // No AuthMethod offered and none needed.
                self.auth = AuthState::Done;
            } else if self.auth == AuthState::Pending {
                return fail(
                    AuthenticationFailure,
                    "the target requires CHAP; the initiator offered no AuthMethod",
                );
            } else {
                // The CHAP exchange is not over: stay in this stage.
                transit = false;
            }
        }
        let current = self.stage;
        let reply = LoginReply {
            transit,
            current_stage: current,
            next_stage: pdu.next_stage,
            keys,
        };
        if !transit {
            return Ok(LoginStep::Continue(LoginReply {
                next_stage: current,
                ..reply
            }));
        }
        if pdu.next_stage == LoginStage::FullFeature {
            let lead = self.leading.expect("set by the first PDU");
            let outcome = LoginOutcome {
                initiator_name: self.initiator_name.clone().expect("checked by resolve"),
                initiator_alias: self.initiator_alias.clone(),
                isid: lead.isid,
                session_type: self.session_type.unwrap_or(SessionType::Normal),
                target: self.target.clone(),
                params: self.negotiator.params,
                cid: lead.cid,
            };
            return Ok(LoginStep::Complete(reply, outcome));
        }
        self.stage = pdu.next_stage;
        Ok(LoginStep::Continue(reply))
    }

    fn reply(&self, transit: bool, stage: LoginStage, keys: Vec<(String, String)>) -> LoginReply {
        LoginReply {
            transit,
            current_stage: stage,
            next_stage: stage,
            keys,
        }
    }

    /// After the first complete request: who logs in, to what, and may they.
    fn resolve(&mut self, env: &mut dyn LoginEnv) -> Result<(), LoginFailure> {
        use LoginStatus::*;
        let Some(initiator) = &self.initiator_name else {
            return fail(MissingParameter, "the first login request has no InitiatorName");
        };
        let session_type = *self.session_type.get_or_insert(SessionType::Normal);
        if session_type == SessionType::Normal {
            let Some(name) = &self.target_name else {
                return fail(MissingParameter, "a normal session needs TargetName");
            };
            let Some(target) = env.target(name) else {
                return fail(NotFound, format!("no target named {name:?} on this portal"));
            };
            if !target.allow.allows(initiator) {
                return fail(
                    AuthorizationFailure,
                    format!("initiator {initiator:?} is not in the allow-list of {name:?}"),
                );
            }
            self.target = Some(target);
        }
        self.resolved = true;
        Ok(())
    }

    /// Advance authentication with the security keys of one request.
    fn security(
        &mut self,
        keys: &HashMap<String, String>,
        out: &mut Vec<(String, String)>,
        env: &mut dyn LoginEnv,
    ) -> Result<(), LoginFailure> {
        use LoginStatus::*;
        let chap = match self.target.as_deref() {
            Some(TargetPolicy {
                auth: AuthPolicy::Chap { initiator, target },
                ..
            }) => Some((initiator.clone(), target.clone())),
            _ => None,
        };
        match self.auth.clone() {
            AuthState::Pending => {
                let Some(methods) = keys.get("AuthMethod") else {
                    if keys.is_empty() {
                        return Ok(());
                    }
                    return fail(InitiatorError, "CHAP keys sent before AuthMethod was agreed");
                };
                let offered = |m: &str| methods.split(',').any(|o| o == m);
                if chap.is_some() {
                    if !offered("CHAP") {
                        return fail(
                            AuthenticationFailure,
                            format!("the target requires CHAP; the initiator offered AuthMethod={methods}"),
                        );
                    }
                    out.push(("AuthMethod".to_string(), "CHAP".to_string()));
                    self.auth = AuthState::AwaitAlgorithm;
                } else if offered("None") {
                    out.push(("AuthMethod".to_string(), "None".to_string()));
                    self.auth = AuthState::Done;
                } else {
                    return fail(
                        AuthenticationFailure,
                        format!(
                            "the initiator offered AuthMethod={methods} but the target has no CHAP secret"
                        ),
                    );
                }
            }
            AuthState::AwaitAlgorithm => {
                let Some(algorithms) = keys.get("CHAP_A") else {
                    return fail(InitiatorError, "expected CHAP_A after AuthMethod=CHAP");
                };
                if !algorithms.split(',').any(|a| a == "5") {
                    return fail(
                        AuthenticationFailure,
                        format!("CHAP_A={algorithms}: only MD5 (5) is supported"),
                    );
                }
                let mut id = [0u8; 1];
                env.random(&mut id);
                let mut challenge = [0u8; CHAP_CHALLENGE_LEN];
                env.random(&mut challenge);
                out.push(("CHAP_A".to_string(), "5".to_string()));
                out.push(("CHAP_I".to_string(), id[0].to_string()));
                out.push(("CHAP_C".to_string(), format!("0x{}", hex_encode(&challenge))));
                self.auth = AuthState::AwaitResponse { id: id[0], challenge };
            }
            AuthState::AwaitResponse { id, challenge } => {
                let Some((initiator_creds, target_creds)) = chap else {
                    return fail(TargetError, "CHAP state without CHAP credentials");
                };
                let (Some(name), Some(response)) = (keys.get("CHAP_N"), keys.get("CHAP_R")) else {
                    return fail(
                        AuthenticationFailure,
                        "expected CHAP_N and CHAP_R in answer to the challenge",
                    );
                };
                let response = decode_binary(response).ok_or(LoginFailure {
                    status: AuthenticationFailure,
                    reason: "CHAP_R is not hex or base64".into(),
                })?;
                let expected = chap_response(id, initiator_creds.secret.bytes(), &challenge);
                if *name != initiator_creds.user || !constant_time_eq(&response, &expected) {
                    return fail(
                        AuthenticationFailure,
                        format!("CHAP response for user {name:?} is wrong"),
                    );
                }
                match (keys.get("CHAP_I"), keys.get("CHAP_C")) {
                    (None, None) => {}
                    (Some(peer_id), Some(peer_challenge)) => {
                        let Some(target_creds) = target_creds else {
                            return fail(
                                AuthenticationFailure,
                                "the initiator asked for mutual CHAP but the target has no target secret",
                            );
                        };
                        let peer_id: u8 = peer_id.parse().map_err(|_| LoginFailure {
                            status: AuthenticationFailure,
                            reason: format!("CHAP_I={peer_id} is not 0..255"),
                        })?;
                        let peer_challenge = decode_binary(peer_challenge)
                            .filter(|c| !c.is_empty() && c.len() <= MAX_PEER_CHALLENGE_LEN)
                            .ok_or(LoginFailure {
                                status: AuthenticationFailure,
                                reason: "CHAP_C from the initiator is empty, too long or not hex/base64"
                                    .into(),
                            })?;
                        if peer_challenge == challenge {
                            // A reflected challenge would make us answer our
                            // own question (RFC 7143 §12.1.3).
                            return fail(
                                AuthenticationFailure,
                                "the initiator reflected our CHAP challenge",
                            );
                        }
                        let answer = chap_response(peer_id, target_creds.secret.bytes(), &peer_challenge);
                        out.push(("CHAP_N".to_string(), target_creds.user.clone()));
                        out.push(("CHAP_R".to_string(), format!("0x{}", hex_encode(&answer))));
                    }
                    _ => return fail(AuthenticationFailure, "mutual CHAP needs both CHAP_I and CHAP_C"),
                }
                self.auth = AuthState::Done;
            }
            AuthState::Done => {
                if !keys.is_empty() {
                    return fail(InitiatorError, "security keys after authentication finished");
                }
            }
        }
        Ok(())
    }
}

/// CHAP with MD5 (RFC 1994 §4.1): MD5(identifier || secret || challenge).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update([id]);
    md5.update(secret);
    md5.update(challenge);
    md5.finalize().into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hex of `bytes`.
pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decode a binary value (RFC 7143 §6.1: `0x` hex or `0b` base64).
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if let Some(hex) = value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        // An odd number of digits has an implied leading zero.
        let padded = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex.to_string()
        };
        (0..padded.len())
            .step_by(2)
            .map(|i| padded.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
            .collect()
    } else if let Some(b64) = value.strip_prefix("0b").or_else(|| value.strip_prefix("0B")) {
        base64_decode(b64)
    } else {
        None
    }
}

fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let input = input.trim_end_matches('=');
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::Itt;
    use crate::iscsi::pdu::{CmdSn, StatSn};
    use bytes::Bytes;

    pub(crate) struct FakeEnv {
        pub targets: Vec<Arc<TargetPolicy>>,
        pub counter: u8,
    }

    impl LoginEnv for FakeEnv {
        fn target(&self, name: &str) -> Option<Arc<TargetPolicy>> {
            self.targets.iter().find(|t| t.name == name).cloned()
        }
        fn session_exists(&self, tsih: u16) -> bool {
            tsih == 7
        }
        fn tpgt(&self) -> u16 {
            1
        }
        fn random(&mut self, buf: &mut [u8]) {
            for b in buf {
                self.counter = self.counter.wrapping_add(1);
                *b = self.counter;
            }
        }
    }

    const TARGET: &str = "iqn.2026-11.io.basalt:vol";
    const INITIATOR: &str = "iqn.2026-11.org.example:host";

    fn env(auth: AuthPolicy, allow: AllowList) -> FakeEnv {
        FakeEnv {
            targets: vec![Arc::new(TargetPolicy {
                name: TARGET.into(),
                alias: Some("vol".into()),
                auth,
                allow,
            })],
            counter: 0,
        }
    }

    fn request(csg: LoginStage, nsg: Option<LoginStage>, keys: &[(&str, &str)]) -> LoginPdu {
        LoginPdu {
            transit: nsg.is_some(),
            continue_bit: false,
            current_stage: csg,
            next_stage: nsg.unwrap_or(csg),
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: Itt(1),
            cid: 0,
            cmdsn: CmdSn(1),
            exp_statsn: StatSn(0),
            data: text::encode(keys),
        }
    }

    fn key<'a>(reply: &'a LoginReply, k: &str) -> Option<&'a str> {
        reply
            .keys
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn creds(user: &str, secret: &str) -> ChapCredentials {
        ChapCredentials::new(user, ChapSecret::new(secret)).unwrap()
    }

    use LoginStage::*;

    #[test]
    fn login_without_auth_reaches_full_feature_phase() {
        let mut env = env(AuthPolicy::None, AllowList::Any);
        let mut m = LoginMachine::new(TargetOffer::default());
        let first = request(
            SecurityNegotiation,
            Some(OperationalNegotiation),
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", TARGET),
                ("AuthMethod", "None"),
            ],
        );
        let LoginStep::Continue(reply) = m.step(&first, &mut env) else {
            panic!("security step failed")
        };
        assert!(reply.transit);
        assert_eq!(key(&reply, "AuthMethod"), Some("None"));
        assert_eq!(key(&reply, "TargetPortalGroupTag"), Some("1"));
        let second = request(
            OperationalNegotiation,
            Some(FullFeature),
            &[
                ("InitialR2T", "No"),
                ("MaxBurstLength", "1048576"),
                ("MaxRecvDataSegmentLength", "65536"),
            ],
        );
        let LoginStep::Complete(reply, outcome) = m.step(&second, &mut env) else {
            panic!("no completion")
        };
        assert_eq!(key(&reply, "InitialR2T"), Some("No"));
        assert_eq!(key(&reply, "MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(outcome.params.max_burst_length, 1_048_576);
        assert_eq!(outcome.params.initiator_max_recv_data_segment_length, 65_536);
        assert_eq!(outcome.params.target_max_recv_data_segment_length, 262_144);
        assert_eq!(outcome.session_type, SessionType::Normal);
    }

    #[test]
    fn unknown_target_is_not_found_and_unlisted_initiator_is_unauthorized() {
        let mut e = env(AuthPolicy::None, AllowList::Only(vec!["iqn.other".into()]));
        let keys = [("InitiatorName", INITIATOR), ("TargetName", "iqn.nope")];
        let LoginStep::Fail(f) = LoginMachine::new(TargetOffer::default())
            .step(&request(SecurityNegotiation, None, &keys), &mut e)
        else {
            panic!()
        };
        assert_eq!(f.status, LoginStatus::NotFound);
        let keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET)];
        let LoginStep::Fail(f) = LoginMachine::new(TargetOffer::default())
            .step(&request(SecurityNegotiation, None, &keys), &mut e)
        else {
            panic!()
        };
        assert_eq!(f.status, LoginStatus::AuthorizationFailure);
    }

    #[test]
    fn missing_initiator_name_is_a_missing_parameter() {
        let mut e = env(AuthPolicy::None, AllowList::Any);
        let step = LoginMachine::new(TargetOffer::default()).step(
            &request(SecurityNegotiation, None, &[("TargetName", TARGET)]),
            &mut e,
        );
        assert!(matches!(
            step,
            LoginStep::Fail(LoginFailure {
                status: LoginStatus::MissingParameter,
                ..
            })
        ));
    }

    fn chap_login(
        policy: AuthPolicy,
        secret: &str,
        mutual: Option<(u8, &[u8])>,
    ) -> (LoginStep, Option<[u8; 16]>) {
        let mut e = env(policy, AllowList::Any);
        let mut m = LoginMachine::new(TargetOffer::default());
        let first = [
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP,None"),
        ];
        let LoginStep::Continue(r) = m.step(&request(SecurityNegotiation, None, &first), &mut e) else {
            panic!()
        };
        assert_eq!(key(&r, "AuthMethod"), Some("CHAP"));
        let LoginStep::Continue(r) =
            m.step(&request(SecurityNegotiation, None, &[("CHAP_A", "7,5")]), &mut e)
        else {
            panic!()
        };
        assert_eq!(key(&r, "CHAP_A"), Some("5"));
        let id: u8 = key(&r, "CHAP_I").unwrap().parse().unwrap();
        let challenge = decode_binary(key(&r, "CHAP_C").unwrap()).unwrap();
        assert_eq!(challenge.len(), CHAP_CHALLENGE_LEN);
        let response = format!(
            "0x{}",
            hex_encode(&chap_response(id, secret.as_bytes(), &challenge))
        );
        let mut keys = vec![
            ("CHAP_N".to_string(), "alice".to_string()),
            ("CHAP_R".to_string(), response),
        ];
        if let Some((mid, mc)) = mutual {
            keys.push(("CHAP_I".into(), mid.to_string()));
            keys.push(("CHAP_C".into(), format!("0x{}", hex_encode(mc))));
        }
        let mut pdu = request(SecurityNegotiation, Some(OperationalNegotiation), &[]);
        pdu.data = text::encode(&keys);
        let expected_mutual = mutual.map(|(mid, mc)| chap_response(mid, b"target-secret-0002", mc));
        (m.step(&pdu, &mut e), expected_mutual)
    }

    #[test]
    fn one_way_chap_with_the_right_secret_succeeds() {
        let policy = AuthPolicy::chap(creds("alice", "initiator-secret-1"), None).unwrap();
        let (step, _) = chap_login(policy, "initiator-secret-1", None);
        let LoginStep::Continue(reply) = step else {
            panic!("{step:?}")
        };
        assert!(reply.transit);
        assert_eq!(reply.next_stage, OperationalNegotiation);
    }

    #[test]
    fn chap_with_a_wrong_secret_is_an_authentication_failure() {
        let policy = AuthPolicy::chap(creds("alice", "initiator-secret-1"), None).unwrap();
        let (step, _) = chap_login(policy, "wrong-secret-xx", None);
        let LoginStep::Fail(f) = step else {
            panic!("{step:?}")
        };
        assert_eq!(f.status, LoginStatus::AuthenticationFailure);
        assert!(!f.reason.contains("initiator-secret-1"));
    }

    #[test]
    fn mutual_chap_answers_the_initiators_challenge() {
        let policy = AuthPolicy::chap(
            creds("alice", "initiator-secret-1"),
            Some(creds("basalt", "target-secret-0002")),
        )
        .unwrap();
        let (step, expected) = chap_login(policy, "initiator-secret-1", Some((9, b"initiator challenge")));
        let LoginStep::Continue(reply) = step else {
            panic!("{step:?}")
        };
        assert_eq!(key(&reply, "CHAP_N"), Some("basalt"));
        assert_eq!(
            decode_binary(key(&reply, "CHAP_R").unwrap()).unwrap(),
            expected.unwrap().to_vec()
        );
    }

    #[test]
    fn mutual_chap_without_a_target_secret_fails() {
        let policy = AuthPolicy::chap(creds("alice", "initiator-secret-1"), None).unwrap();
        let (step, _) = chap_login(policy, "initiator-secret-1", Some((9, b"initiator challenge")));
        assert!(matches!(
            step,
            LoginStep::Fail(LoginFailure {
                status: LoginStatus::AuthenticationFailure,
                ..
            })
        ));
    }

    #[test]
    fn chap_target_refuses_auth_method_none_and_skipping_security() {
        let policy = || AuthPolicy::chap(creds("alice", "initiator-secret-1"), None).unwrap();
        let mut e = env(policy(), AllowList::Any);
        let keys = [
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ];
        let step = LoginMachine::new(TargetOffer::default())
            .step(&request(SecurityNegotiation, None, &keys), &mut e);
        assert!(matches!(
            step,
            LoginStep::Fail(LoginFailure {
                status: LoginStatus::AuthenticationFailure,
                ..
            })
        ));
        let keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET)];
        let step = LoginMachine::new(TargetOffer::default())
            .step(&request(OperationalNegotiation, Some(FullFeature), &keys), &mut e);
        assert!(matches!(
            step,
            LoginStep::Fail(LoginFailure {
                status: LoginStatus::AuthenticationFailure,
                ..
            })
        ));
    }

    #[test]
    fn weak_or_reused_secrets_are_refused_at_configuration() {
        assert!(matches!(
            ChapCredentials::new("a", ChapSecret::new("short")),
            Err(ConfigError::SecretTooShort { .. })
        ));
        let same = AuthPolicy::chap(creds("a", "the-same-secret"), Some(creds("t", "the-same-secret")));
        assert!(matches!(same, Err(ConfigError::SameSecretBothWays)));
        assert_eq!(
            format!("{:?}", ChapSecret::new("hunter2hunter2")),
            "ChapSecret(<redacted>)"
        );
    }

    #[test]
    fn discovery_session_needs_no_target_name() {
        let mut e = env(AuthPolicy::None, AllowList::Any);
        let keys = [
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ];
        let mut m = LoginMachine::new(TargetOffer::default());
        let LoginStep::Complete(reply, outcome) =
            m.step(&request(SecurityNegotiation, Some(FullFeature), &keys), &mut e)
        else {
            panic!()
        };
        assert!(reply.transit);
        assert_eq!(outcome.session_type, SessionType::Discovery);
        assert!(outcome.target.is_none());
    }

    #[test]
    fn continued_text_is_answered_empty_then_processed_whole() {
        let mut e = env(AuthPolicy::None, AllowList::Any);
        let mut m = LoginMachine::new(TargetOffer::default());
        let whole = text::encode(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ]);
        let mut part1 = request(SecurityNegotiation, None, &[]);
        part1.continue_bit = true;
        part1.data = whole.slice(..10);
        let LoginStep::Continue(r) = m.step(&part1, &mut e) else {
            panic!()
        };
        assert!(r.keys.is_empty());
        let mut part2 = request(SecurityNegotiation, Some(OperationalNegotiation), &[]);
        part2.data = Bytes::copy_from_slice(&whole[10..]);
        let LoginStep::Continue(r) = m.step(&part2, &mut e) else {
            panic!()
        };
        assert_eq!(key(&r, "AuthMethod"), Some("None"));
    }

    #[test]
    fn a_tsih_asking_to_join_a_session_is_refused() {
        let mut e = env(AuthPolicy::None, AllowList::Any);
        let mut pdu = request(
            SecurityNegotiation,
            None,
            &[("InitiatorName", INITIATOR), ("TargetName", TARGET)],
        );
        pdu.tsih = 7;
        let LoginStep::Fail(f) = LoginMachine::new(TargetOffer::default()).step(&pdu, &mut e) else {
            panic!()
        };
        assert_eq!(f.status, LoginStatus::TooManyConnections);
        pdu.tsih = 8;
        let LoginStep::Fail(f) = LoginMachine::new(TargetOffer::default()).step(&pdu, &mut e) else {
            panic!()
        };
        assert_eq!(f.status, LoginStatus::SessionDoesNotExist);
    }

    #[test]
    fn binary_values_decode_from_hex_and_base64() {
        assert_eq!(decode_binary("0x0a0B"), Some(vec![0x0a, 0x0b]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("1234"), None);
    }
}
