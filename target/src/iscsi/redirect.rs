//! A login redirector: a portal that serves no target itself and answers
//! every login with "target moved temporarily" (RFC 7143 §11.13.5, status
//! 0x0101) and the address where the target runs now.
//!
//! Why it exists: a target can move. Basalt starts a volume's controller on
//! another host when the controller's host fails, and the new controller
//! listens at another address. An initiator keeps the portal address it was
//! configured with, and when its session drops it reconnects *there*: libiscsi
//! (qemu, fio) reconnects to the portal it was first given, and open-iscsi
//! keeps the node record's address as the session's persistent address.
//! Both follow a redirect during login. So an initiator configured with a
//! redirector's address instead of the target's finds the target wherever it
//! runs now, on every reconnect, and nobody has to reconfigure it.
//!
//! The redirector reads one Login Request, asks a [`Resolver`] where the
//! named target is, writes one Login Response and closes the connection. It
//! never reaches the full feature phase: it keeps no session state and
//! authenticates nobody. CHAP and allow-lists are checked by the target the
//! initiator is sent to, so a redirect only reveals an address.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::iscsi::connection::write_pdu;
use crate::iscsi::pdu::{
    self, FrameDecoder, LoginPdu, LoginResponseFields, LoginStatus, Request, StatSn, BHS_LEN,
};
use crate::iscsi::text;

/// How long a connection may take to send its first Login Request. A
/// redirector answers one PDU; a peer that sends nothing is dropped.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest login text accepted: the 8 KiB every iSCSI peer may send
/// during login (RFC 7143 §13.12, MaxRecvDataSegmentLength's default).
const MAX_LOGIN_DATA: u32 = 8192;

/// Where a target is, as a [`Resolver`] answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Log in at this address instead.
    At(SocketAddr),
    /// The target exists but is served nowhere at the moment (its host
    /// failed and its successor is starting): the initiator retries later.
    Unavailable,
    /// No target of that name.
    NotFound,
}

/// Where targets run now. The redirector asks once per login, so the answer
/// may change from one login to the next.
pub trait Resolver: Send + Sync + 'static {
    fn resolve<'a>(&'a self, target_name: &'a str) -> Pin<Box<dyn Future<Output = Destination> + Send + 'a>>;
}

/// Why one connection got no redirect (logged by [`serve`]; the initiator
/// sees the Login Response's status, or a closed connection).
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("sent nothing whole within {}s", LOGIN_TIMEOUT.as_secs())]
    Timeout,
    #[error("closed the connection before a whole Login Request")]
    Closed,
    #[error("sent an invalid PDU: {0}")]
    Pdu(#[from] pdu::PduError),
    #[error("sent a {0:#04x} PDU first; an iSCSI connection starts with a Login Request")]
    NotLogin(u8),
    #[error("sent login text that is not key=value pairs: {0}")]
    Text(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Accept connections on `listener` until `shutdown`, answering each with
/// one redirect (or the reason there is none).
pub async fn serve(listener: TcpListener, resolver: Arc<dyn Resolver>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: pause rather than spin.
                    tracing::warn!(error = %e, "the iSCSI redirector cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let resolver = resolver.clone();
        tasks.spawn(async move {
            match answer(stream, resolver.as_ref()).await {
                Ok((target, status)) => tracing::debug!(%peer, target, ?status, "login redirected"),
                Err(e) => tracing::info!(%peer, error = %e, "an initiator's login at the redirector failed"),
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// Answer the login on one connection: the target's name and the status sent.
pub async fn answer(
    mut stream: TcpStream,
    resolver: &dyn Resolver,
) -> Result<(String, LoginStatus), RedirectError> {
    let login = tokio::time::timeout(LOGIN_TIMEOUT, read_login(&mut stream))
        .await
        .map_err(|_| RedirectError::Timeout)??;
    let (target, status, keys) = match decide(&login) {
        Ok(target) => match resolver.resolve(&target).await {
            Destination::At(addr) => {
                // The portal group tag of every Basalt portal (PortalConfig's default).
                let address = format!("{addr},1");
                (
                    target,
                    LoginStatus::TargetMovedTemporarily,
                    vec![("TargetAddress", address)],
                )
            }
            Destination::Unavailable => (target, LoginStatus::ServiceUnavailable, Vec::new()),
            Destination::NotFound => (target, LoginStatus::NotFound, Vec::new()),
        },
        Err(status) => (String::new(), status, Vec::new()),
    };
    let mut response = pdu::login_response(LoginResponseFields {
        transit: false,
        current_stage: login.current_stage,
        next_stage: login.current_stage,
        isid: login.isid,
        tsih: 0,
        itt: login.itt,
        status,
        data: text::encode(&keys),
    });
    response.stamp(StatSn(0), login.cmdsn, login.cmdsn);
    write_pdu(&mut stream, &response).await?;
    let _ = stream.shutdown().await;
    Ok((target, status))
}

/// The target a login names, or the status that refuses it (a pure function
/// of the request).
pub fn decide(login: &LoginPdu) -> Result<String, LoginStatus> {
    if login.version_min > 0 {
        return Err(LoginStatus::UnsupportedVersion);
    }
    // Text split over several PDUs would need a conversation; every initiator
    // sends its first keys whole.
    if login.continue_bit {
        return Err(LoginStatus::InitiatorError);
    }
    let keys = text::parse(&login.data).map_err(|_| LoginStatus::InitiatorError)?;
    let key = |name: &str| keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if key("SessionType") == Some("Discovery") {
        return Err(LoginStatus::SessionTypeNotSupported);
    }
    match (key("InitiatorName"), key("TargetName")) {
        (Some(_), Some(target)) if !target.is_empty() => Ok(target.to_string()),
        _ => Err(LoginStatus::MissingParameter),
    }
}

async fn read_login(stream: &mut TcpStream) -> Result<LoginPdu, RedirectError> {
    let decoder = FrameDecoder {
        header_digest: false,
        data_digest: false,
        max_data_segment: MAX_LOGIN_DATA,
    };
    let mut buf = BytesMut::with_capacity(BHS_LEN);
    let frame = loop {
        if let Some(frame) = decoder.decode(&mut buf)? {
            break frame;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(RedirectError::Closed);
        }
    };
    let opcode = frame.bhs.opcode_value();
    match Request::parse(frame) {
        Ok(Request::Login(login)) => Ok(login),
        Ok(_) => Err(RedirectError::NotLogin(opcode)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::{Bhs, Opcode};
    use bytes::BufMut;

    struct Fixed;

    impl Resolver for Fixed {
        fn resolve<'a>(&'a self, target: &'a str) -> Pin<Box<dyn Future<Output = Destination> + Send + 'a>> {
            Box::pin(async move {
                match target {
                    "iqn.2026-11.io.basalt:here" => Destination::At("10.1.2.3:7100".parse().unwrap()),
                    "iqn.2026-11.io.basalt:moving" => Destination::Unavailable,
                    _ => Destination::NotFound,
                }
            })
        }
    }

    /// A first Login Request as libiscsi sends it.
    fn login(keys: &[(&str, &str)], version_min: u8, continue_bit: bool) -> Vec<u8> {
        let data = text::encode(keys);
        let mut bhs = Bhs::new(Opcode::LoginRequest);
        bhs.0[0] |= 0x40; // immediate
        bhs.0[1] = 0x80 | 0x01 | if continue_bit { 0x40 } else { 0 }; // T, CSG 0, NSG 1
        bhs.0[3] = version_min;
        bhs.0[8..14].copy_from_slice(&[0x80, 0, 0x12, 0x34, 0, 1]);
        bhs.set_itt(pdu::Itt(7));
        bhs.set_u32(24, 42); // CmdSN
        bhs.set_data_segment_len(data.len() as u32);
        let mut out = BytesMut::new();
        out.put_slice(&bhs.0);
        out.put_slice(&data);
        out.put_slice(&crate::iscsi::digest::PADDING[..crate::iscsi::digest::pad_len(data.len())]);
        out.to_vec()
    }

    /// Send `bytes` to a redirector and return what came back before it closed.
    async fn exchange(bytes: Vec<u8>) -> Vec<u8> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed), shutdown.clone()));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut answer))
            .await
            .expect("the redirector answers and closes");
        // A connection closed with bytes unread is reset rather than closed: no answer either way.
        if let Err(e) = read {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        shutdown.cancel();
        server.await.unwrap();
        answer
    }

    fn status_and_keys(answer: &[u8]) -> ((u8, u8), Vec<(String, String)>) {
        assert!(answer.len() >= BHS_LEN, "a whole Login Response: {answer:?}");
        assert_eq!(answer[0] & 0x3f, 0x23, "a Login Response");
        assert_eq!(&answer[8..14], &[0x80, 0, 0x12, 0x34, 0, 1], "the ISID echoed");
        assert_eq!(
            u32::from_be_bytes(answer[16..20].try_into().unwrap()),
            7,
            "the ITT echoed"
        );
        let len = u32::from_be_bytes([0, answer[5], answer[6], answer[7]]) as usize;
        let keys = text::parse(&answer[BHS_LEN..BHS_LEN + len]).unwrap();
        ((answer[36], answer[37]), keys)
    }

    const INITIATOR: (&str, &str) = ("InitiatorName", "iqn.2026-11.test:init");

    #[tokio::test]
    async fn a_login_is_sent_where_its_target_runs_now() {
        let answer = exchange(login(
            &[
                INITIATOR,
                ("TargetName", "iqn.2026-11.io.basalt:here"),
                ("SessionType", "Normal"),
            ],
            0,
            false,
        ))
        .await;
        let (status, keys) = status_and_keys(&answer);
        assert_eq!(status, (1, 1), "target moved temporarily");
        assert_eq!(
            keys,
            vec![("TargetAddress".to_string(), "10.1.2.3:7100,1".to_string())]
        );
    }

    #[tokio::test]
    async fn a_target_served_nowhere_or_unknown_or_a_bad_login_gets_its_status() {
        let cases: [(Vec<u8>, (u8, u8)); 6] = [
            (
                login(
                    &[INITIATOR, ("TargetName", "iqn.2026-11.io.basalt:moving")],
                    0,
                    false,
                ),
                (3, 1),
            ),
            (
                login(
                    &[INITIATOR, ("TargetName", "iqn.2026-11.io.basalt:gone")],
                    0,
                    false,
                ),
                (2, 3),
            ),
            (
                login(&[INITIATOR, ("SessionType", "Discovery")], 0, false),
                (2, 9),
            ),
            (login(&[INITIATOR], 0, false), (2, 7)),
            (
                login(
                    &[INITIATOR, ("TargetName", "iqn.2026-11.io.basalt:here")],
                    1,
                    false,
                ),
                (2, 5),
            ),
            (
                login(
                    &[INITIATOR, ("TargetName", "iqn.2026-11.io.basalt:here")],
                    0,
                    true,
                ),
                (2, 0),
            ),
        ];
        for (request, expected) in cases {
            let (status, keys) = status_and_keys(&exchange(request).await);
            assert_eq!(status, expected);
            assert!(keys.is_empty(), "no TargetAddress without a redirect: {keys:?}");
        }
    }

    #[tokio::test]
    async fn garbage_or_a_non_login_first_pdu_is_dropped_without_an_answer() {
        let mut nop = Bhs::new(Opcode::NopOut);
        nop.0[0] |= 0x40;
        for bytes in [
            vec![0xffu8; 48],
            nop.0.to_vec(),
            b"GET / HTTP/1.1\r\n\r\n".repeat(4),
        ] {
            assert!(exchange(bytes).await.is_empty());
        }
        // A data segment over the login limit is refused before it is read.
        let mut huge = login(&[INITIATOR], 0, false);
        huge[5..8].copy_from_slice(&[0x01, 0, 0]);
        assert!(exchange(huge).await.is_empty());
    }
}
