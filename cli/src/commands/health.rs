//! `basalt health`: is a controller or a replica alive? For container
//! `HEALTHCHECK`s and Kubernetes probes.
//!
//! The probe is the binary itself: the images are `FROM scratch`, so there is
//! no curl, no shell and no `grpc_health_probe` in them. It speaks each role's
//! real protocol, so "healthy" means the role answers requests, not merely
//! that something accepts TCP connections on its port:
//!
//! ```text
//!   basalt health --api ADDR           controller: gRPC VolumeInfo answers        (liveness)
//!   basalt health --api ADDR --ready   ... and the volume is serving I/O          (readiness)
//!   basalt health --replica HOST:PORT  replica: data-path Hello, Auth, then Ping  (liveness and readiness)
//!   basalt health                      whichever role $BASALT_HEALTH_API or $BASALT_HEALTH_REPLICA names
//! ```
//!
//! The replica probe says Hello with the nil volume ("who are you?", the
//! volume is not checked) and epoch 0: a Hello whose epoch is lower than the
//! replica's changes nothing, so a probe can never raise an epoch and fence
//! the real controller. Like every client it authenticates with the volume's
//! secret (`--secret-file` or `BASALT_VOLUME_SECRET`, which the replica's
//! container already has) and checks the replica's proof, so "healthy" also
//! means "this replica holds the secret we expect". Auth answers from the
//! replica's store (identity and revision), Ping without touching the disk:
//! together they show the store is open and the connection loop is not stuck.
//! The controller probe sends the API token (`--token-file` or
//! `BASALT_API_TOKEN`), over TLS when given the API's CA (`--api-ca` or
//! `BASALT_API_CA`).
//!
//! Exit status 0 with one line on stdout when healthy; 1 with one line on
//! stderr saying what is wrong (from `main`) otherwise. Host names are
//! resolved with the system resolver (getaddrinfo), which is what makes this
//! command also the test that name resolution works inside the image.

use std::time::Duration;

use anyhow::Context;
use basalt_engine::api_auth::ApiToken;
use basalt_proto::auth::{ClientHandshake, HandshakeError, VolumeSecret};
use basalt_proto::frame::{Frame, FrameCodec, Message, ReplyError, RequestId};
use basalt_proto::pb::controller::VolumeInfoRequest;
use basalt_proto::{Epoch, VolumeId};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tonic::transport::ClientTlsConfig;

use super::args::parse_duration;

/// Arguments of `basalt health`.
///
/// The role to probe comes from the command line first and from the
/// container's environment only when the command line names none: the image
/// has one `HEALTHCHECK` (`basalt health`, no flag) and each container says
/// its own role in [`ENV_API`] or [`ENV_REPLICA`]. An operator who runs
/// `basalt health --replica replica3:9700` inside the controller's container
/// (the natural place to ask "can the controller reach that replica?") means
/// that replica, not the controller the environment names.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("role").args(["api", "replica"])))]
pub struct Args {
    /// Probe a controller through its management API (host:port or http://host:port).
    /// Without --api or --replica, the role comes from $BASALT_HEALTH_API or $BASALT_HEALTH_REPLICA.
    #[arg(long)]
    pub api: Option<String>,
    /// Probe a replica on its data-path port (host:port).
    #[arg(long)]
    pub replica: Option<String>,
    /// For a controller: healthy only if the volume serves I/O (enough
    /// read-write replicas), not merely if the controller answers. For
    /// readiness probes. A replica probe always checks readiness (its Hello
    /// and Ping run on the open store), so this changes nothing there.
    #[arg(long, env = "BASALT_HEALTH_READY")]
    pub ready: bool,
    /// Give up (unhealthy) after this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The volume's secret, for a replica probe.
    #[command(flatten)]
    pub secret: super::secrets::SecretArgs,
    /// The API token, for a controller probe.
    #[command(flatten)]
    pub auth: super::secrets::ApiClientArgs,
}

/// The controller a container's `HEALTHCHECK` probes when no flag says otherwise.
pub const ENV_API: &str = "BASALT_HEALTH_API";
/// The replica a container's `HEALTHCHECK` probes when no flag says otherwise.
pub const ENV_REPLICA: &str = "BASALT_HEALTH_REPLICA";

/// What one run of `basalt health` probes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Controller { api: String, ready: bool },
    Replica { addr: String },
}

impl Args {
    /// The target: a role flag if the command line has one (clap refuses
    /// both), else the one role variable the environment sets (`env` looks a
    /// variable up; empty counts as unset).
    fn target(&self, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Target> {
        let controller = |api: String| Target::Controller {
            api,
            ready: self.ready,
        };
        match (&self.api, &self.replica) {
            (Some(api), _) => return Ok(controller(api.clone())),
            (None, Some(addr)) => return Ok(Target::Replica { addr: addr.clone() }),
            (None, None) => {}
        }
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        match (env(ENV_API), env(ENV_REPLICA)) {
            (Some(api), None) => Ok(controller(api)),
            (None, Some(addr)) => Ok(Target::Replica { addr }),
            (Some(api), Some(addr)) => anyhow::bail!(
                "both {ENV_API}={api} and {ENV_REPLICA}={addr} are set: say what to probe with --api or \
                 --replica, or set only one of them"
            ),
            (None, None) => anyhow::bail!(
                "say what to probe: --api ADDR (controller) or --replica ADDR (replica), or set {ENV_API} or \
                 {ENV_REPLICA}"
            ),
        }
    }
}

/// Why a probe found its target unhealthy. Each message names the address and
/// says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    // `cause`, not `source`: the message already includes it, and a `source` would print it twice in the
    // CLI's `{:#}` error chain.
    #[error("cannot resolve {addr}: {cause} (is the host name right, and does the resolver work here?)")]
    Resolve { addr: String, cause: std::io::Error },
    #[error("{addr} resolves to no address")]
    NoAddress { addr: String },
    #[error("cannot connect to {addr}: {cause} (is the role running and listening there?)")]
    Connect { addr: String, cause: std::io::Error },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("replica {addr} closed the connection before answering {what}")]
    Closed { addr: String, what: &'static str },
    #[error(
        "replica {addr} sent an unreadable frame: {detail} (is that a Basalt replica's data-path port?)"
    )]
    Protocol { addr: String, detail: String },
    #[error("refusing replica {addr}: {source}")]
    NotProven {
        addr: String,
        #[source]
        source: HandshakeError,
    },
    #[error("replica {addr} refused {what}: {error}: {message}")]
    Refused {
        addr: String,
        what: &'static str,
        error: ReplyError,
        message: String,
    },
    #[error("replica {addr} answered {what} with an unexpected {answer}")]
    Unexpected {
        addr: String,
        what: &'static str,
        answer: String,
    },
    #[error("controller API {addr} is unreachable: {detail}")]
    ApiUnreachable { addr: String, detail: String },
    #[error("controller API {addr} failed VolumeInfo: {detail} (is {addr} the controller's --api address?)")]
    ApiFailed { addr: String, detail: String },
    #[error(
        "volume {name} is {state}: {healthy} of {replicas} replicas read-write, {min_healthy} needed to \
         serve I/O (see `basalt volume info --api {addr}`)"
    )]
    NotServing {
        addr: String,
        name: String,
        state: String,
        healthy: usize,
        replicas: usize,
        min_healthy: u32,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let target = args.target(|name| std::env::var(name).ok())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let line = runtime.block_on(async {
        match &target {
            Target::Controller { api, ready } => {
                let tls = args.auth.tls.load()?;
                probe_controller(api, &args.auth.load_token()?, tls, *ready, args.timeout).await
            }
            Target::Replica { addr } => probe_replica(addr, &args.secret.load()?, args.timeout).await,
        }
    })?;
    println!("{line}");
    Ok(())
}

/// Hello, Auth, then Ping on the replica's data-path port; the healthy line.
pub async fn probe_replica(addr: &str, secret: &VolumeSecret, timeout: Duration) -> anyhow::Result<String> {
    let probe = async {
        // Resolve first, separately, so that a resolver failure (the static-glibc NSS
        // trap, a wrong service name) is reported as such and not as "connection refused".
        let resolved: Vec<_> = tokio::net::lookup_host(addr)
            .await
            .map_err(|cause| HealthError::Resolve {
                addr: addr.to_string(),
                cause,
            })?
            .collect();
        if resolved.is_empty() {
            return Err(HealthError::NoAddress {
                addr: addr.to_string(),
            });
        }
        let stream = TcpStream::connect(&resolved[..])
            .await
            .map_err(|cause| HealthError::Connect {
                addr: addr.to_string(),
                cause,
            })?;
        let mut conn = Framed::new(stream, FrameCodec);
        let handshake = ClientHandshake::new(VolumeId(uuid::Uuid::nil()));
        // A probe must never take writing away from the controller.
        let hello = handshake.hello(false);
        // Hello at epoch 0 never raises the replica's epoch (a probe must not
        // fence the controller); the Ping then carries the epoch the replica
        // reported, because a replica refuses requests of an older epoch
        // than its own once a controller has raised it.
        let answer = call(&mut conn, addr, RequestId(1), Epoch(0), hello, "Hello").await?;
        let (version, auth) = handshake
            .answer(secret, answer)
            .map_err(|source| HealthError::NotProven {
                addr: addr.to_string(),
                source,
            })?;
        let identity = match call(&mut conn, addr, RequestId(2), Epoch(0), auth, "Auth").await? {
            Message::AuthOk { replica, .. } => (version, replica),
            other => return Err(unexpected(addr, "Auth", &other)),
        };
        let epoch = identity.1.epoch;
        match call(&mut conn, addr, RequestId(3), epoch, Message::Ping, "Ping").await? {
            Message::Pong => {}
            other => return Err(unexpected(addr, "Ping", &other)),
        }
        let (version, replica) = identity;
        Ok(format!(
            "healthy: replica {addr} ({}) serves volume {} ({} bytes), {}, {}, protocol {version}",
            resolved[0], replica.volume, replica.size_bytes, replica.epoch, replica.revision
        ))
    };
    let line = tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| HealthError::Timeout {
            addr: addr.to_string(),
            timeout,
        })??;
    Ok(line)
}

/// One request, one reply. Epoch 0: a probe never raises a replica's epoch.
async fn call(
    conn: &mut Framed<TcpStream, FrameCodec>,
    addr: &str,
    id: RequestId,
    epoch: Epoch,
    request: Message,
    what: &'static str,
) -> Result<Message, HealthError> {
    conn.send(Frame::new(id, epoch, request))
        .await
        .map_err(|e| HealthError::Protocol {
            addr: addr.to_string(),
            detail: e.to_string(),
        })?;
    match conn.next().await {
        None => Err(HealthError::Closed {
            addr: addr.to_string(),
            what,
        }),
        Some(Err(e)) => Err(HealthError::Protocol {
            addr: addr.to_string(),
            detail: e.to_string(),
        }),
        Some(Ok(reply)) if reply.id != id => Err(HealthError::Protocol {
            addr: addr.to_string(),
            detail: format!("reply to {} while waiting for {id}", reply.id),
        }),
        Some(Ok(reply)) => match reply.message {
            Message::Failed { error, message, .. } => Err(HealthError::Refused {
                addr: addr.to_string(),
                what,
                error,
                message,
            }),
            m => Ok(m),
        },
    }
}

fn unexpected(addr: &str, what: &'static str, m: &Message) -> HealthError {
    let (op, reply) = m.op();
    HealthError::Unexpected {
        addr: addr.to_string(),
        what,
        answer: format!("{op} {}", if reply { "reply" } else { "request" }),
    }
}

/// VolumeInfo through the controller's gRPC API, with the API token (over TLS when `tls` is set);
/// the healthy line.
pub async fn probe_controller(
    api: &str,
    token: &ApiToken,
    tls: Option<ClientTlsConfig>,
    ready: bool,
    timeout: Duration,
) -> anyhow::Result<String> {
    let probe = async {
        // The CLI's one way to connect to an API; its message says what to change.
        let mut client = super::client::connect_with(api, token.clone(), tls, timeout)
            .await
            .map_err(|e| HealthError::ApiUnreachable {
                addr: api.to_string(),
                detail: format!("{e:#}"),
            })?;
        let info = client
            .volume_info(VolumeInfoRequest {})
            .await
            .map_err(|s| HealthError::ApiFailed {
                addr: api.to_string(),
                detail: format!("{}: {}", s.code(), s.message()),
            })?
            .into_inner();
        let healthy = info.replicas.iter().filter(|r| r.mode == "RW").count();
        if ready && info.state != "serving" {
            return Err(HealthError::NotServing {
                addr: api.to_string(),
                name: info.name,
                state: info.state,
                healthy,
                replicas: info.replicas.len(),
                min_healthy: info.min_healthy,
            });
        }
        Ok(format!(
            "healthy: controller {api} volume {} is {}, epoch {}, {healthy} of {} replicas read-write \
             (min {}), {} session(s)",
            info.name,
            info.state,
            info.epoch,
            info.replicas.len(),
            info.min_healthy,
            info.sessions
        ))
    };
    let line = tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| HealthError::Timeout {
            addr: api.to_string(),
            timeout,
        })??;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> VolumeSecret {
        VolumeSecret::new("health-test-secret-0123").unwrap()
    }

    /// A listener that accepts and answers nothing: a hung role.
    async fn silent_listener() -> (tokio::net::TcpListener, String) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    #[tokio::test]
    async fn replica_probe_of_a_closed_port_says_connect_failed() {
        let (l, addr) = silent_listener().await;
        drop(l);
        let e = probe_replica(&addr, &secret(), Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot connect"), "{e}");
    }

    #[tokio::test]
    async fn replica_probe_of_an_unknown_host_says_resolve_failed() {
        let e = probe_replica("no-such-host.invalid:9700", &secret(), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot resolve"), "{e}");
    }

    #[tokio::test]
    async fn replica_probe_of_a_hung_peer_times_out() {
        let (l, addr) = silent_listener().await;
        let _keep = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let e = probe_replica(&addr, &secret(), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not answer within"), "{e}");
    }

    #[tokio::test]
    async fn replica_probe_of_a_non_basalt_peer_says_protocol() {
        use tokio::io::AsyncWriteExt;
        let (l, addr) = silent_listener().await;
        let _peer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&[b'H'; 64]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let e = probe_replica(&addr, &secret(), Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("unreadable frame"), "{e}");
    }

    /// A scripted replica: answers Hello and Ping like the real one.
    #[tokio::test]
    async fn replica_probe_says_hello_at_epoch_zero_then_pings_at_the_replicas_epoch() {
        use basalt_proto::auth::{Challenge, Nonce, Prover};
        use basalt_proto::frame::ReplicaIdentity;
        let (l, addr) = silent_listener().await;
        let volume = VolumeId::random();
        let peer = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = Framed::new(s, FrameCodec);
            let mut seen = Vec::new();
            let mut challenge = None;
            while let Some(Ok(frame)) = conn.next().await {
                seen.push((frame.epoch, frame.message.op().0));
                let answer = match frame.message {
                    Message::Hello { nonce, .. } => {
                        challenge = Some(Challenge {
                            volume,
                            client: nonce,
                            replica: Nonce::random(),
                        });
                        let challenge = challenge.expect("just set");
                        Message::HelloOk {
                            version: basalt_proto::frame::ProtocolVersion::CURRENT,
                            volume,
                            nonce: challenge.replica,
                            proof: challenge.prove(&secret(), Prover::Replica),
                        }
                    }
                    Message::Auth { proof } => {
                        let proven = challenge.is_some_and(|c| c.verify(&secret(), Prover::Client, &proof));
                        assert!(proven, "the probe proves the volume's secret");
                        Message::AuthOk {
                            replica: ReplicaIdentity {
                                volume,
                                size_bytes: 1 << 20,
                                epoch: Epoch(7),
                                revision: basalt_proto::Revision(3),
                            },
                            membership: None,
                        }
                    }
                    Message::Ping => Message::Pong,
                    _ => break,
                };
                conn.send(Frame::new(frame.id, Epoch(7), answer)).await.unwrap();
            }
            seen
        });
        let line = probe_replica(&addr, &secret(), Duration::from_secs(3))
            .await
            .unwrap();
        assert!(
            line.contains(&volume.to_string()) && line.contains("epoch 7"),
            "{line}"
        );
        let seen = peer.await.unwrap();
        use basalt_proto::frame::Op;
        assert_eq!(
            seen,
            vec![(Epoch(0), Op::Hello), (Epoch(0), Op::Auth), (Epoch(7), Op::Ping)],
            "Ping at the replica's own epoch"
        );
    }

    #[tokio::test]
    async fn replica_refusing_hello_is_unhealthy_with_its_reason() {
        let (l, addr) = silent_listener().await;
        let _peer = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = Framed::new(s, FrameCodec);
            if let Some(Ok(frame)) = conn.next().await {
                let failed = Message::failed(basalt_proto::frame::Op::Hello, ReplyError::ShuttingDown);
                conn.send(Frame::new(frame.id, Epoch(1), failed)).await.unwrap();
            }
        });
        let e = probe_replica(&addr, &secret(), Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("refused Hello") && e.to_string().contains("shutting down"),
            "{e}"
        );
    }

    /// `basalt health ARGS` as the binary parses it, with `env` as the container's environment.
    fn target(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Target> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = Cli::try_parse_from(std::iter::once("health").chain(args.iter().copied()))?;
        cli.args
            .target(|name| env.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()))
    }

    /// The controller container sets BASALT_HEALTH_API for its HEALTHCHECK; probing a replica from inside
    /// it must probe that replica (issue 6: this was a usage error, so the probe never succeeded).
    #[test]
    fn replica_flag_wins_over_the_controller_role_of_the_environment() {
        let t = target(&["--replica", "replica3:9700"], &[(ENV_API, "127.0.0.1:9600")]).unwrap();
        assert_eq!(
            t,
            Target::Replica {
                addr: "replica3:9700".into()
            }
        );
    }

    #[test]
    fn api_flag_wins_over_the_replica_role_of_the_environment() {
        let t = target(
            &["--api", "ctl:9600", "--ready"],
            &[(ENV_REPLICA, "127.0.0.1:9700")],
        )
        .unwrap();
        assert_eq!(
            t,
            Target::Controller {
                api: "ctl:9600".into(),
                ready: true
            }
        );
    }

    #[test]
    fn without_a_flag_the_environment_names_the_role() {
        let t = target(&[], &[(ENV_API, "127.0.0.1:9600")]).unwrap();
        assert_eq!(
            t,
            Target::Controller {
                api: "127.0.0.1:9600".into(),
                ready: false
            }
        );
        let t = target(&[], &[(ENV_REPLICA, "127.0.0.1:9700"), (ENV_API, "")]).unwrap();
        assert_eq!(
            t,
            Target::Replica {
                addr: "127.0.0.1:9700".into()
            }
        );
    }

    #[test]
    fn both_role_flags_are_refused() {
        let e = target(&["--api", "a:1", "--replica", "b:2"], &[]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
    }

    #[test]
    fn no_role_anywhere_or_two_in_the_environment_say_what_to_set() {
        let e = target(&[], &[]).unwrap_err().to_string();
        assert!(e.contains("--api") && e.contains(ENV_REPLICA), "{e}");
        let e = target(&[], &[(ENV_API, "a:1"), (ENV_REPLICA, "b:2")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("both") && e.contains("a:1") && e.contains("b:2"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn controller_probe_of_a_closed_port_says_unreachable() {
        let (l, addr) = silent_listener().await;
        drop(l);
        let e = probe_controller(&addr, &ApiToken::generate(), None, false, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("unreachable"), "{e}");
    }
}
