//! The rebuild's own connections to its source and target ([`Pair`]): every request bounded in time
//! (a replica that stops answering fails the rebuild, which is retried, instead of hanging it), and
//! the write-intent and flush-numbering questions of steps 3, 5 and 9.

use std::time::Duration;

use basalt_proto::client::{ClientError, ReplicaClient};
use basalt_proto::frame::{Message, SyncPoint, WrittenAnswer};

use crate::volume::link::{LinkError, REQUEST_TIMEOUT};
use crate::volume::VolumeSpec;

use super::RebuildError;

/// Longest a rebuild waits to connect to a replica and finish its
/// handshake: a replica that cannot do that in 5 s is not one to copy to or
/// from now, and the supervisor probes it again later.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pipelined connection for the chain replay (many requests in flight,
/// replies matched by id), at the volume's epoch; with `writer` it takes the
/// replica's writer role.
pub(super) async fn client(
    addr: &str,
    spec: &VolumeSpec,
    writer: bool,
) -> Result<ReplicaClient, RebuildError> {
    let resolved = tokio::net::lookup_host(addr)
        .await
        .and_then(|mut a| {
            a.next()
                .ok_or_else(|| std::io::Error::other("the name resolves to no address"))
        })
        .map_err(|source| LinkError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let connect = ReplicaClient::connect_as(resolved, spec.volume, spec.epoch, writer, &spec.secret);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(source)) => Err(RebuildError::Replica {
            addr: addr.to_string(),
            what: "connecting for the rebuild".into(),
            source,
        }),
        Err(_) => Err(LinkError::Timeout {
            addr: addr.to_string(),
            timeout: CONNECT_TIMEOUT,
        }
        .into()),
    }
}

/// [`ReplicaClient::call`] bounded by [`REQUEST_TIMEOUT`], for every request
/// of a rebuild: a replica that stops answering (SIGSTOP, a hung disk) fails
/// the rebuild, which is retried, instead of hanging it. The connection is
/// dropped with the failed rebuild, so a late answer lands nowhere.
pub(super) async fn call_bounded(client: &ReplicaClient, message: Message) -> Result<Message, ClientError> {
    call_within(client, message, REQUEST_TIMEOUT).await
}

async fn call_within(
    client: &ReplicaClient,
    message: Message,
    limit: Duration,
) -> Result<Message, ClientError> {
    tokio::time::timeout(limit, client.call(message))
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Disconnected {
                reason: format!("no answer within {limit:?}"),
            })
        })
}

/// One request on a rebuild connection, bounded by [`REQUEST_TIMEOUT`]: a
/// replica that stops answering (SIGSTOP, a hung disk) fails the rebuild,
/// which is retried, instead of hanging it. `what` names the request in the
/// error.
pub(super) async fn ask(
    client: &ReplicaClient,
    addr: &str,
    what: &str,
    message: Message,
) -> Result<Message, RebuildError> {
    call_bounded(client, message)
        .await
        .map_err(|source| RebuildError::Replica {
            addr: addr.to_string(),
            what: what.to_string(),
            source,
        })
}

/// The source and the target of a rebuild, on their replay connections.
pub(super) struct Pair {
    pub(super) source: ReplicaClient,
    pub(super) target: ReplicaClient,
    pub(super) source_addr: String,
    pub(super) addr: String,
}

impl Pair {
    pub(super) fn on_source(&self, what: impl Into<String>) -> impl FnOnce(ClientError) -> RebuildError {
        let (addr, what) = (self.source_addr.clone(), what.into());
        move |source| RebuildError::Replica { addr, what, source }
    }

    pub(super) fn on_target(&self, what: impl Into<String>) -> impl FnOnce(ClientError) -> RebuildError {
        let (addr, what) = (self.addr.clone(), what.into());
        move |source| RebuildError::Replica { addr, what, source }
    }

    /// A replica's sync point and its write-intent answer since `since`
    /// (`None`: since its own last durable flush), every page of it. With
    /// `start` past the end, the position alone.
    pub(super) async fn written_since(
        &self,
        client: &ReplicaClient,
        addr: &str,
        since: Option<SyncPoint>,
        volume_blocks: u64,
    ) -> Result<(SyncPoint, WrittenAnswer), RebuildError> {
        let mut runs = Vec::new();
        let mut start = 0;
        loop {
            let reply = call_bounded(
                client,
                Message::WrittenSince {
                    since,
                    start_lba: start,
                },
            )
            .await
            .map_err(|source| RebuildError::Replica {
                addr: addr.to_string(),
                what: "asking its write-intent record".into(),
                source,
            })?;
            let Message::WrittenSinceOk {
                position,
                answer,
                end_lba,
            } = reply
            else {
                return Err(RebuildError::Volume(format!(
                    "replica {addr} answered a write-intent question with {:?}",
                    reply.op()
                )));
            };
            match answer {
                WrittenAnswer::Unknown(why) => return Ok((position, WrittenAnswer::Unknown(why))),
                WrittenAnswer::Regions(page) => runs.extend(page),
            }
            if end_lba >= volume_blocks {
                return Ok((position, WrittenAnswer::Regions(runs)));
            }
            if end_lba <= start {
                return Err(RebuildError::Volume(format!(
                    "replica {addr} listed its write-intent record from block {start} without progress"
                )));
            }
            start = end_lba;
        }
    }

    /// Step 3: the target leaves any shared flush numbering, durably, before
    /// anything is copied onto it: should the rebuild stop half-way, no
    /// record would take it for a replica in sync at its revision.
    pub(super) async fn leave_numbering(&self) -> Result<(), RebuildError> {
        call_bounded(
            &self.target,
            Message::AdoptSyncPoint {
                point: None,
                own_revision: basalt_proto::Revision(0),
            },
        )
        .await
        .map_err(self.on_target("leaving the shared flush numbering"))
        .map(drop)
    }

    /// Step 9: the target's flush `own` is the source's `point`.
    pub(super) async fn adopt(
        &self,
        point: SyncPoint,
        own: basalt_proto::Revision,
    ) -> Result<(), RebuildError> {
        match call_bounded(
            &self.target,
            Message::AdoptSyncPoint {
                point: Some(point),
                own_revision: own,
            },
        )
        .await
        .map_err(self.on_target("adopting the source's flush numbering"))?
        {
            Message::AdoptSyncPointOk { position } => {
                tracing::info!(replica = %self.addr, source = %self.source_addr, revision = position.revision.0,
                    was = own.0, "rebuild: the replica now numbers flushes like the source");
                Ok(())
            }
            other => Err(RebuildError::Volume(format!(
                "replica {} answered a renumbering with {:?}",
                self.addr,
                other.op()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A replica that says Hello and then never answers (SIGSTOP, a hung disk) fails the request
    /// within its bound instead of hanging the rebuild.
    #[tokio::test]
    async fn a_replica_that_stops_answering_fails_the_request_within_its_bound() {
        use basalt_proto::auth::{Challenge, Nonce, Prover, VolumeSecret};
        use basalt_proto::frame::{Frame, FrameCodec, ProtocolVersion, ReplicaIdentity};
        use futures::{SinkExt, StreamExt};
        let test_secret = || VolumeSecret::new("rebuild-test-secret-0123").unwrap();
        use tokio_util::codec::Framed;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut frames = Framed::new(stream, FrameCodec);
            let hello = frames.next().await.unwrap().unwrap();
            let Message::Hello { nonce, .. } = hello.message else {
                panic!("expected Hello");
            };
            let volume = basalt_proto::VolumeId::random();
            let challenge = Challenge {
                volume,
                client: nonce,
                replica: Nonce::random(),
            };
            let ok = Message::HelloOk {
                version: ProtocolVersion::CURRENT,
                volume,
                nonce: challenge.replica,
                proof: challenge.prove(&test_secret(), Prover::Replica),
            };
            frames.send(Frame::new(hello.id, hello.epoch, ok)).await.unwrap();
            let auth = frames.next().await.unwrap().unwrap();
            let ok = Message::AuthOk {
                replica: ReplicaIdentity {
                    volume,
                    size_bytes: 1 << 20,
                    epoch: auth.epoch,
                    revision: basalt_proto::Revision(0),
                },
                membership: None,
            };
            frames.send(Frame::new(auth.id, auth.epoch, ok)).await.unwrap();
            // Read what comes and never answer.
            while frames.next().await.is_some() {}
        });
        let client = ReplicaClient::connect_as(
            addr,
            basalt_proto::VolumeId(uuid::Uuid::nil()),
            basalt_proto::Epoch(1),
            false,
            &test_secret(),
        )
        .await
        .expect("the handshake is answered");
        let started = Instant::now();
        let limit = Duration::from_millis(200);
        let outcome = call_within(&client, Message::SnapshotList, limit).await;
        assert!(
            matches!(&outcome, Err(ClientError::Disconnected { reason }) if reason.contains("no answer")),
            "{outcome:?}"
        );
        assert!(started.elapsed() < limit * 10, "took {:?}", started.elapsed());
        drop(client);
        silent.abort();
    }
}
