//! Bodies in both directions, streamed frame by frame: hyper polls them only as fast as
//! the other side reads, which is the backpressure. Nothing here buffers a body.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::upstream::UpstreamBody;

/// The request body as the server received it: `None` for a request without one (the
/// server's own HTTP/1.1 path only reads bodiless requests; hyper reads the rest).
pub type ClientBody = Option<Incoming>;

/// The client's request body on its way upstream, counted against the chain's body limit.
pub struct RequestBody {
    inner: ClientBody,
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
    pub fn new(inner: ClientBody, limit: Option<u64>) -> Self {
        RequestBody {
            inner,
            limit: limit.unwrap_or(u64::MAX),
            seen: 0,
        }
    }
}

impl RequestBody {
    /// Body bytes taken from the client so far (for the audit event's `bytes_in`).
    pub fn bytes_read(&self) -> u64 {
        self.seen
    }

    /// The client's body, for [`linger`].
    pub fn into_inner(self) -> ClientBody {
        self.inner
    }
}

/// How long the rest of a request body is drained after gatehouse has answered.
const LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards what is left of a request body once the answer is out, as nginx's
/// lingering close does: closing a socket with unread bytes makes the kernel send a reset,
/// and a client still uploading would lose the answer (a 401, a 413) that was sent to it.
pub fn linger(body: ClientBody) {
    let Some(mut body) = body.filter(|b| !b.is_end_stream()) else {
        return;
    };
    tokio::spawn(async move {
        let drain = async {
            while let Some(Ok(_)) =
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            {}
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    });
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match ready!(Pin::new(inner).poll_frame(cx)) {
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
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// A response body to the client: the upstream's, streamed, or one gatehouse made.
pub enum Body {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

impl Body {
    pub fn full(bytes: Bytes) -> Self {
        Body::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Upstream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(body) => body.size_hint(),
        }
    }
}
