//! Bodies in both directions, streamed frame by frame: hyper polls them only as fast as
//! the other side reads, which is the backpressure. Nothing here buffers a body.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::upstream::Pooled;

/// The client's request body on its way upstream, counted against the chain's body limit.
pub struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
}

/// Why a request body stopped short.
#[derive(Debug)]
pub enum BodyError {
    /// More bytes than the `body_limit` allows.
    TooLarge,
    /// The client's stream broke off.
    Client(hyper::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge => f.write_str("request body over the limit"),
            BodyError::Client(e) => write!(f, "client body: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

impl RequestBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> Self {
        RequestBody {
            inner,
            limit: limit.unwrap_or(u64::MAX),
            seen: 0,
        }
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(BodyError::Client(e)))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            self.seen += data.len() as u64;
            if self.seen > self.limit {
                return Poll::Ready(Some(Err(BodyError::TooLarge)));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body to the client: the upstream's, streamed, or one gatehouse made.
pub struct Body(Kind);

enum Kind {
    Full(Option<Bytes>),
    /// The upstream connection goes back to the pool when the body has been read to its end.
    Upstream(Incoming, Option<Pooled>),
}

impl Body {
    pub fn full(bytes: Bytes) -> Self {
        Body(Kind::Full((!bytes.is_empty()).then_some(bytes)))
    }

    pub fn upstream(incoming: Incoming, conn: Option<Pooled>) -> Self {
        let mut body = Body(Kind::Upstream(incoming, conn));
        // An empty body (204, HEAD, content-length: 0) is never polled: release now.
        if body.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Kind::Upstream(_, conn) = &mut self.0 {
            if let Some(conn) = conn.take() {
                conn.release();
            }
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // Ended but not seen to end (e.g. its trailers were never asked for): still reusable.
        if self.is_end_stream() {
            self.release();
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.0 {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(incoming, conn) => {
                let frame = ready!(Pin::new(&mut *incoming).poll_frame(cx));
                match &frame {
                    // A broken upstream body closes its connection instead of pooling it.
                    Some(Err(_)) => *conn = None,
                    // hyper stops polling once a body says it has ended, so the last frame,
                    // not a final `None`, is where the connection is done.
                    _ if incoming.is_end_stream() => self.release(),
                    _ => {}
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(incoming, _) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(incoming, _) => incoming.size_hint(),
        }
    }
}
