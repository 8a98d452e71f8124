//! # Who may talk to a replica: the volume's secret and the Hello challenge
//!
//! Every volume has one secret, known to its controller and to each of its
//! replicas (from a file or the environment, never the command line). A
//! connection proves knowledge of it in both directions before the replica
//! does anything for it:
//!
//! ```text
//!   client                                              replica
//!     | -- Hello { client_nonce Nc, epoch, writer } ------> |  checks volume, version; changes nothing
//!     | <-- HelloOk { replica_nonce Nr,                     |
//!     |       proof R = HMAC(secret, "replica"    | vol | Nc | Nr) }
//!     |  checks R: a replica that does not know the         |
//!     |  secret is refused here, before any data goes to it |
//!     | -- Auth { proof C = HMAC(secret, "controller" | vol | Nc | Nr) } -->
//!     |                                                     |  checks C; only now: raise the epoch of
//!     | <-- AuthOk ---------------------------------------- |  the Hello, take the writer role, serve
//! ```
//!
//! * **Both nonces, fresh each time.** Each side picks 32 random bytes per
//!   connection and each proof covers both, so a recorded Hello/Auth pair is
//!   worthless on another connection: the replica's nonce differs, and the
//!   old proof no longer matches.
//! * **Direction labels.** The two proofs differ only in their label, so the
//!   replica's proof can never be reflected back as the client's.
//! * **The volume UUID.** A secret shared (by mistake) by two volumes still
//!   does not let one volume's controller in to the other's replicas.
//! * **Constant time.** Proofs are compared with [`subtle`]'s constant-time
//!   equality, so timing says nothing about how much of a guess was right.
//!
//! The secret never appears in `Debug` output, logs or error messages.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::VolumeId;

type HmacSha256 = Hmac<Sha256>;

/// Fewest bytes a volume secret may have: 16 bytes of a random secret are
/// 128 bits, beyond any guessing; a shorter one is most likely a mistake (an
/// empty file, a placeholder) and is refused rather than silently accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// Longest secret accepted: a secret is a key, not a document; a file this
/// large is the wrong file.
pub const MAX_SECRET_LEN: usize = 4096;

/// The volume's shared secret. Cheap to clone; never printed.
#[derive(Clone)]
pub struct VolumeSecret(Arc<[u8]>);

/// Why bytes cannot be a volume secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "the volume secret is {len} bytes; it must have at least {MIN_SECRET_LEN} (generate one with \
         `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`)"
    )]
    TooShort { len: usize },
    #[error(
        "the volume secret is {len} bytes; at most {MAX_SECRET_LEN} are accepted (is it the right file?)"
    )]
    TooLong { len: usize },
}

impl VolumeSecret {
    /// A secret from its bytes, as read from a file or the environment with
    /// trailing line breaks removed (an editor's final newline is not part of
    /// it).
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<VolumeSecret, SecretError> {
        let mut bytes = bytes.as_ref();
        while let [rest @ .., b'\n' | b'\r'] = bytes {
            bytes = rest;
        }
        match bytes.len() {
            len if len < MIN_SECRET_LEN => Err(SecretError::TooShort { len }),
            len if len > MAX_SECRET_LEN => Err(SecretError::TooLong { len }),
            _ => Ok(VolumeSecret(bytes.into())),
        }
    }

    /// A fresh random secret: 32 random bytes as 64 hex digits (printable,
    /// so it can be stored in a file, a Kubernetes Secret or an environment
    /// variable unchanged).
    pub fn generate() -> VolumeSecret {
        let bytes: [u8; 32] = rand::random();
        VolumeSecret(hex(&bytes).into_bytes().into())
    }

    /// The secret's bytes, to store it (0600) where it was generated.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for VolumeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeSecret(<redacted>)")
    }
}

/// Lower-case hex digits of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Bytes of a nonce or a proof: the size of an HMAC-SHA256 output, and 256
/// random bits for a nonce, so that no two connections ever share one.
pub const CHALLENGE_LEN: usize = 32;

/// One side's random challenge for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nonce(pub [u8; CHALLENGE_LEN]);

impl Nonce {
    /// A fresh random nonce (from the operating system's CSPRNG via `rand`).
    pub fn random() -> Nonce {
        Nonce(rand::random())
    }
}

/// An HMAC proof that its sender knows the volume's secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Proof(pub [u8; CHALLENGE_LEN]);

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A proof is single-use and reveals nothing, but there is no reason to log it either.
        f.write_str("Proof(..)")
    }
}

/// Which side a proof comes from; part of what is signed, so that one side's
/// proof is never valid as the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prover {
    /// The replica, answering Hello.
    Replica,
    /// The client (controller, rebuild, probe), in its Auth.
    Client,
}

impl Prover {
    fn label(self) -> &'static [u8] {
        match self {
            Prover::Replica => b"basalt v3 replica proof",
            Prover::Client => b"basalt v3 controller proof",
        }
    }
}

/// The nonces of one connection: the client's (from Hello) and the replica's
/// (from HelloOk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub volume: VolumeId,
    pub client: Nonce,
    pub replica: Nonce,
}

impl Challenge {
    /// `prover`'s proof for this connection.
    pub fn prove(&self, secret: &VolumeSecret, prover: Prover) -> Proof {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&secret.0).expect("HMAC takes keys of any length");
        // Fixed-length fields after a length-prefixed label: no two different
        // inputs encode alike.
        let label = prover.label();
        mac.update(&[label.len() as u8]);
        mac.update(label);
        mac.update(self.volume.0.as_bytes());
        mac.update(&self.client.0);
        mac.update(&self.replica.0);
        Proof(mac.finalize().into_bytes().into())
    }

    /// Whether `proof` is `prover`'s proof for this connection, compared in
    /// constant time.
    pub fn verify(&self, secret: &VolumeSecret, prover: Prover, proof: &Proof) -> bool {
        self.prove(secret, prover).0.ct_eq(&proof.0).into()
    }
}

/// The client's side of the handshake, shared by every client (the
/// controller's links, the rebuild's connections, probes): the Hello to send,
/// then the check of the replica's HelloOk, which gives the Auth to send.
#[derive(Clone, Copy, Debug)]
pub struct ClientHandshake {
    nonce: Nonce,
    volume: VolumeId,
}

/// Why a client refuses a replica during the handshake.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error(
        "the replica could not prove it knows the volume's secret: check --secret-file (or \
         BASALT_VOLUME_SECRET) on the replica and on this side"
    )]
    ReplicaNotProven,
    #[error("the replica serves volume {found}, not {expected}")]
    WrongVolume { expected: VolumeId, found: VolumeId },
    #[error("the replica answered Hello with {got}, not HelloOk")]
    Unexpected { got: &'static str },
}

impl ClientHandshake {
    /// A handshake for `volume` (nil: "who are you?"), with a fresh nonce.
    pub fn new(volume: VolumeId) -> ClientHandshake {
        ClientHandshake {
            nonce: Nonce::random(),
            volume,
        }
    }

    /// The Hello that opens the connection.
    pub fn hello(&self, writer: bool) -> crate::frame::Message {
        use crate::frame::ProtocolVersion;
        crate::frame::Message::Hello {
            volume: self.volume,
            min_version: ProtocolVersion::MIN_SUPPORTED,
            max_version: ProtocolVersion::CURRENT,
            writer,
            nonce: self.nonce,
        }
    }

    /// Checks the replica's answer to the Hello (its volume and its proof)
    /// and returns the Auth to send, with the version agreed.
    pub fn answer(
        &self,
        secret: &VolumeSecret,
        reply: crate::frame::Message,
    ) -> Result<(crate::frame::ProtocolVersion, crate::frame::Message), HandshakeError> {
        use crate::frame::Message;
        let Message::HelloOk {
            version,
            volume,
            nonce,
            proof,
        } = reply
        else {
            return Err(HandshakeError::Unexpected {
                got: reply.op().0.name(),
            });
        };
        if !self.volume.0.is_nil() && volume != self.volume {
            return Err(HandshakeError::WrongVolume {
                expected: self.volume,
                found: volume,
            });
        }
        let challenge = Challenge {
            volume,
            client: self.nonce,
            replica: nonce,
        };
        if !challenge.verify(secret, Prover::Replica, &proof) {
            return Err(HandshakeError::ReplicaNotProven);
        }
        let proof = challenge.prove(secret, Prover::Client);
        Ok((version, Message::Auth { proof }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge() -> Challenge {
        Challenge {
            volume: VolumeId::random(),
            client: Nonce::random(),
            replica: Nonce::random(),
        }
    }

    fn secret(s: &str) -> VolumeSecret {
        VolumeSecret::new(s).unwrap()
    }

    #[test]
    fn a_proof_verifies_only_with_the_same_secret_side_and_nonces() {
        let (c, s) = (challenge(), secret("0123456789abcdef-one"));
        let proof = c.prove(&s, Prover::Client);
        assert!(c.verify(&s, Prover::Client, &proof));
        assert!(!c.verify(&secret("0123456789abcdef-two"), Prover::Client, &proof));
        assert!(
            !c.verify(&s, Prover::Replica, &proof),
            "a proof is not valid for the other side"
        );
        let replayed = Challenge {
            replica: Nonce::random(),
            ..c
        };
        assert!(
            !replayed.verify(&s, Prover::Client, &proof),
            "a proof is bound to its nonces"
        );
        let other_volume = Challenge {
            volume: VolumeId::random(),
            ..c
        };
        assert!(!other_volume.verify(&s, Prover::Client, &proof));
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert_eq!(
            VolumeSecret::new("short\n").unwrap_err(),
            SecretError::TooShort { len: 5 }
        );
        assert_eq!(
            VolumeSecret::new("").unwrap_err(),
            SecretError::TooShort { len: 0 }
        );
        assert!(VolumeSecret::new(vec![b'x'; MAX_SECRET_LEN + 1]).is_err());
        let s = VolumeSecret::new("0123456789abcdef\r\n").unwrap();
        assert_eq!(
            s.expose(),
            b"0123456789abcdef",
            "trailing line breaks are not part of it"
        );
        assert!(!format!("{s:?}").contains("0123"));
        let generated = VolumeSecret::generate();
        assert_eq!(generated.expose().len(), 64);
        assert_ne!(generated.expose(), VolumeSecret::generate().expose());
    }
}
