//! Bodies in both directions, streamed frame by frame: each side polls them only as fast
//! as the other side reads, which is the backpressure. Nothing here buffers a body.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::chain::{Chain, Reject};
use crate::client::{self, Upgraded};

/// The client's request body on its way upstream, through the chain's body phases.
pub struct RequestBody<'a, B> {
    inner: B,
    chain: &'a Chain,
    /// The middlewares whose body phase runs (see [`Chain::body_phases`]).
    phases: u64,
    /// Body bytes taken from the client so far (the audit event's `bytes_in`).
    pub received: u64,
    /// The body phase that refused the body, and why: the upstream request fails with
    /// [`client::Error::Body`], and this is the client's answer.
    pub refused: Option<(usize, Reject)>,
}

impl<'a, B> RequestBody<'a, B> {
    pub fn new(inner: B, chain: &'a Chain, phases: u64) -> Self {
        RequestBody {
            inner,
            chain,
            phases,
            received: 0,
            refused: None,
        }
    }
}

/// Why a request body stopped short.
#[derive(Debug)]
pub enum BodyError {
    /// A body phase refused it (see [`RequestBody::refused`]).
    Refused,
    /// The client's stream broke off.
    Client,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BodyError::Refused => "the request body was refused",
            BodyError::Client => "the client's request body broke off",
        })
    }
}

impl std::error::Error for BodyError {}

impl<B> HttpBody for RequestBody<'_, B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(_)) => return Poll::Ready(Some(Err(BodyError::Client))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            this.received += data.len() as u64;
            if this.phases != 0 {
                if let Err(refused) = this.chain.on_request_body(this.phases, data, this.received) {
                    this.refused = Some(refused);
                    return Poll::Ready(Some(Err(BodyError::Refused)));
                }
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

/// A response body to the client: the upstream's, streamed; one gatehouse made; or, after
/// a `101`, the upstream connection the server splices to the client's.
pub enum Body {
    Full(Option<Bytes>),
    Upstream(client::Body),
    Upgrade(Option<Upgraded>),
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
            Body::Upgrade(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Upstream(body) => body.is_end_stream(),
            Body::Upgrade(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(body) => body.size_hint(),
            Body::Upgrade(_) => SizeHint::with_exact(0),
        }
    }
}
