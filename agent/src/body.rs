//! Reading a request body with a size limit, for the agent's HTTP endpoints (the API and the Docker
//! volume plugin).
//!
//! Refusing an oversized body must not cost the client its answer. A server that answers 413 and
//! closes the connection while the client is still sending makes the client's next write fail with
//! EPIPE or ECONNRESET, and most clients (hyper's among them) then report a broken connection instead
//! of the 413. So a refused body is read and thrown away first, as nginx's "lingering close" does, up
//! to [`DRAIN_BYTES`] or for [`DRAIN_TIME`], whichever comes first: enough for any honest mistake,
//! bounded for an attacker, who merely gets the connection closed.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::header::{CONTENT_LENGTH, EXPECT};
use hyper::HeaderMap;

/// The most a refused body is read for before the connection is closed.
pub const DRAIN_BYTES: u64 = 16 << 20;

/// The longest a refused body is read for before the connection is closed.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Why a body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// The body is over the limit; what the client sent of it was read and discarded.
    TooLarge,
    /// The body could not be read (the client went away, bad chunked encoding, ...).
    Read(String),
}

/// The body's `Content-Length`, when the client declared one that parses.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The whole body when it holds at most `limit` bytes; [`BodyError::TooLarge`] otherwise, after
/// draining what the client sends (see the module's comment).
pub async fn read_limited<B>(headers: &HeaderMap, mut body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if declared_length(headers).is_some_and(|n| n > limit as u64) {
        // A client that waits for `100 Continue` before sending has nothing in flight: reading would
        // only invite the upload.
        if !headers.contains_key(EXPECT) {
            drain(&mut body, 0).await;
        }
        return Err(BodyError::TooLarge);
    }
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                drain(&mut body, (out.len() + data.len()) as u64).await;
                return Err(BodyError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Reads and discards the rest of `body` (`already` bytes of it were read), within [`DRAIN_BYTES`]
/// and [`DRAIN_TIME`]; errors end it quietly, as the answer is a refusal either way.
async fn drain<B>(body: &mut B, already: u64)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut read = already;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while read < DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len() as u64),
                Some(Err(_)) | None => return,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;
    use hyper::header::HeaderValue;

    fn chunks(
        n: usize,
        size: usize,
    ) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin> {
        StreamBody::new(futures::stream::iter(
            (0..n).map(move |_| Ok(Frame::data(Bytes::from(vec![b'x'; size])))),
        ))
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let body = read_limited(&HeaderMap::new(), chunks(4, 10), 40).await.unwrap();
        assert_eq!(body.len(), 40);
        let body = read_limited(&HeaderMap::new(), Full::new(Bytes::new()), 40)
            .await
            .unwrap();
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_and_drained() {
        let mut body = chunks(5, 10);
        assert!(matches!(
            read_limited(&HeaderMap::new(), &mut body, 40).await,
            Err(BodyError::TooLarge)
        ));
        assert!(body.frame().await.is_none(), "the rest of the body was read");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading_and_drained() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("41"));
        let mut body = chunks(1, 10);
        assert!(matches!(
            read_limited(&headers, &mut body, 40).await,
            Err(BodyError::TooLarge)
        ));
        assert!(body.frame().await.is_none(), "the body was read and discarded");
        headers.insert(EXPECT, HeaderValue::from_static("100-continue"));
        let mut body = chunks(1, 10);
        assert!(matches!(
            read_limited(&headers, &mut body, 40).await,
            Err(BodyError::TooLarge)
        ));
        assert!(
            body.frame().await.is_some(),
            "a client waiting for 100 Continue is not asked to send"
        );
    }

    #[tokio::test]
    async fn draining_stops_after_its_byte_bound() {
        let frames = (DRAIN_BYTES / 1024 + 10) as usize;
        let mut body = chunks(frames, 1024);
        assert!(matches!(
            read_limited(&HeaderMap::new(), &mut body, 1).await,
            Err(BodyError::TooLarge)
        ));
        assert!(
            body.frame().await.is_some(),
            "an endless body is not read forever"
        );
    }
}
