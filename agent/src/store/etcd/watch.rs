//! A watch on etcd that survives the loss of the member serving it.
//!
//! One task per watch owns the gRPC stream and forwards events into a bounded channel (the
//! consumer's pace holds etcd's back through HTTP/2 flow control). It remembers the revision
//! after the last one it delivered; when the stream breaks (the member died, its link was cut and
//! the HTTP/2 pings went unanswered) it opens a new one on the next member from that revision, so
//! the consumer sees every change once and in order across the break. etcd sends all the events
//! of one revision (a transaction, a lease's end) in one response, so a break never falls inside
//! a revision. If the history from that revision was compacted meanwhile, the watch ends with
//! [`StoreError::Compacted`], and the consumer lists again.
//!
//! Dropping the [`Watch`] ends the task and the stream.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc as request_channel;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::Status;

use super::connection::{Connection, Retry, MAX_MESSAGE_BYTES};
use super::pb::etcdserverpb::{
    watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest, WatchResponse,
};
use super::pb::mvccpb;
use super::{key_range, kv_from, refused};
use crate::store::{Event, Result, Revision, StoreError, Watch};

/// Events buffered between the watch task and its consumer: enough for a burst of changes
/// (every service of a volume reporting at once) without holding etcd's stream back.
const BUFFER: usize = 256;
/// How long after a failed attempt to open the stream again: a member that just died is not
/// back sooner, and a watch retrying in a tight loop would flood the log and the network.
const RETRY: Duration = Duration::from_secs(1);

/// An open watch stream: the request side is kept open for as long as the responses are read
/// (etcd ends the watch when the client's side of the stream closes).
struct Attached {
    _requests: request_channel::Sender<WatchRequest>,
    responses: tonic::Streaming<WatchResponse>,
}

/// Watches `prefix` from revision `from` (0: from the oldest revision etcd still has).
pub(super) async fn open(connection: Arc<Connection>, prefix: String, from: Revision) -> Result<Watch> {
    // etcd's start revision 0 means "from now on"; ours means "everything": revision 1 is the
    // first etcd ever hands out.
    let next = from.max(1);
    let attached = attach(&connection, &prefix, next).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(run(connection, prefix, next, attached, tx));
    Ok(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }).boxed())
}

/// Opens a stream and waits for etcd to confirm the watch.
async fn attach(connection: &Connection, prefix: &str, next: Revision) -> Result<Attached> {
    let (key, range_end) = key_range(prefix);
    connection
        .call(
            Retry::Always,
            |channel| {
                let request = WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                        key: key.clone(),
                        range_end: range_end.clone(),
                        start_revision: i64::try_from(next).unwrap_or(i64::MAX),
                        progress_notify: false,
                    })),
                };
                async move {
                    let (mut requests, receiver) = request_channel::channel(1);
                    requests
                        .try_send(request)
                        .map_err(|_| Status::internal("the watch request could not be queued"))?;
                    let mut client = WatchClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
                    let mut responses = client.watch(receiver).await?.into_inner();
                    match responses.message().await? {
                        Some(r) if r.created && !r.canceled => Ok(Attached {
                            _requests: requests,
                            responses,
                        }),
                        Some(r) => Err(Status::failed_precondition(format!(
                            "etcd refused the watch: {}",
                            r.cancel_reason
                        ))),
                        None => Err(Status::unavailable(
                            "the watch stream ended before etcd confirmed it",
                        )),
                    }
                }
            },
            |status| refused(prefix, status),
        )
        .await
}

/// Forwards the events of `attached`, and of the streams that replace it, until the consumer
/// drops the watch or the watch cannot go on.
async fn run(
    connection: Arc<Connection>,
    prefix: String,
    mut next: Revision,
    mut attached: Attached,
    tx: mpsc::Sender<Result<Event>>,
) {
    loop {
        let outcome = forward(&mut attached, &mut next, &tx).await;
        drop(attached);
        match outcome {
            Forwarded::ConsumerGone => return,
            Forwarded::Ended(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Forwarded::Broken(reason) => {
                tracing::debug!(prefix = %prefix, next, reason = %reason, "etcd watch broken; resuming");
            }
        }
        attached = loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
            match attach(&connection, &prefix, next).await {
                Ok(a) => break a,
                Err(e @ StoreError::Unavailable(_)) => {
                    tracing::debug!(prefix = %prefix, error = %e, "etcd watch not resumed yet")
                }
                // etcd answered, and refused: trying again would get the same answer.
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        };
    }
}

enum Forwarded {
    ConsumerGone,
    /// The watch cannot go on: this error ends it.
    Ended(StoreError),
    /// The stream broke: resume from `next`.
    Broken(String),
}

async fn forward(
    attached: &mut Attached,
    next: &mut Revision,
    tx: &mpsc::Sender<Result<Event>>,
) -> Forwarded {
    loop {
        let message = tokio::select! {
            () = tx.closed() => return Forwarded::ConsumerGone,
            m = attached.responses.message() => m,
        };
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => return Forwarded::Broken("the member ended the stream".to_string()),
            Err(status) => return Forwarded::Broken(super::connection::describe(&status)),
        };
        if response.compact_revision > 0 {
            return Forwarded::Ended(StoreError::Compacted {
                requested: *next,
                compacted: response.compact_revision.unsigned_abs(),
            });
        }
        if response.canceled {
            return Forwarded::Ended(StoreError::Unavailable(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason
            )));
        }
        let mut last = None;
        for event in response.events {
            let event = match event_from(event) {
                Ok(e) => e,
                Err(e) => return Forwarded::Ended(e),
            };
            // A resumed stream starts at `next`; anything older was delivered already.
            if event.revision() < *next {
                continue;
            }
            last = Some(event.revision());
            if tx.send(Ok(event)).await.is_err() {
                return Forwarded::ConsumerGone;
            }
        }
        if let Some(last) = last {
            *next = last + 1;
        }
    }
}

fn event_from(event: mvccpb::Event) -> Result<Event> {
    let kv = event
        .kv
        .ok_or_else(|| StoreError::Unavailable("etcd sent a watch event without its key".to_string()))?;
    match mvccpb::event::EventType::try_from(event.r#type) {
        Ok(mvccpb::event::EventType::Put) => Ok(Event::Put(kv_from(kv)?)),
        Ok(mvccpb::event::EventType::Delete) => {
            let kv = kv_from(kv)?;
            Ok(Event::Delete {
                key: kv.key,
                mod_revision: kv.mod_revision,
            })
        }
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd sent a watch event of unknown type {}",
            event.r#type
        ))),
    }
}
