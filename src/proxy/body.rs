//! Bodies in both directions, streamed frame by frame: each side polls them only as fast
//! as the other side reads, which is the backpressure. Nothing here buffers a body.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderName};
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::chain::{BodyFilter, Boundary, Chain, Filters, Piece, Reject};
use crate::config::Underscores;
use crate::pool::{self, H2Body, Upgraded};
use crate::protocol::h1::hop;

/// The client's request body on its way upstream, through the chain's body phases. What it
/// learns on the way (bytes received, a refusal) is kept by `T`: in the body itself while an
/// HTTP/1 exchange borrows it ([`Local`]), or shared with the request when an HTTP/2
/// connection's task owns it ([`Shared`]).
pub struct RequestBody<B, T> {
    inner: B,
    tally: T,
    /// The middlewares whose body phase runs (see [`Chain::body_phases`]).
    phases: u64,
    /// `server.underscores_in_headers`, which trailer fields obey too.
    underscores: Underscores,
    /// What the request phases left for the body phases ([`Context::body`]).
    ///
    /// [`Context::body`]: crate::chain::Context::body
    state: Extensions,
    /// The body phases were told it ended.
    ended: bool,
}

impl<B, T: Tally> RequestBody<B, T> {
    pub fn new(
        inner: B,
        tally: T,
        phases: u64,
        underscores: Underscores,
        state: Extensions,
    ) -> Self {
        RequestBody {
            inner,
            tally,
            phases,
            underscores,
            state,
            ended: false,
        }
    }

    pub fn tally(&mut self) -> &mut T {
        &mut self.tally
    }
}

/// Where a request body's progress is kept.
pub trait Tally {
    fn chain(&self) -> &Chain;
    /// Counts `n` more bytes taken from the client; returns the total.
    fn add(&mut self, n: u64) -> u64;
    /// The body stopped short: refused by the body phase `refused` names, or broken off.
    fn fail(&mut self, refused: Option<(usize, Reject)>);
}

/// Progress kept in the body, for an exchange that borrows it.
pub struct Local<'a> {
    chain: &'a Chain,
    /// Body bytes taken from the client so far (the audit event's `bytes_in`).
    pub received: u64,
    /// The body phase that refused the body, and why: the upstream request fails with
    /// [`pool::Error::Body`], and this is the client's answer.
    pub refused: Option<(usize, Reject)>,
}

impl<'a> Local<'a> {
    pub fn new(chain: &'a Chain) -> Self {
        Local {
            chain,
            received: 0,
            refused: None,
        }
    }
}

impl Tally for Local<'_> {
    fn chain(&self) -> &Chain {
        self.chain
    }
    fn add(&mut self, n: u64) -> u64 {
        self.received += n;
        self.received
    }
    fn fail(&mut self, refused: Option<(usize, Reject)>) {
        if refused.is_some() {
            self.refused = refused;
        }
    }
}

/// Progress shared between a body that an HTTP/2 connection's task owns and its request,
/// which reads it when the answer comes and when it ends.
pub struct Shared {
    chain: Arc<Chain>,
    progress: Arc<Progress>,
}

impl Shared {
    pub fn new(chain: Arc<Chain>, progress: Arc<Progress>) -> Self {
        Shared { chain, progress }
    }
}

/// What a shared body has done so far.
#[derive(Default)]
pub struct Progress {
    received: AtomicU64,
    failed: AtomicBool,
    refused: Mutex<Option<(usize, Reject)>>,
}

impl Progress {
    /// Body bytes taken from the client so far.
    pub fn received(&self) -> u64 {
        self.received.load(Relaxed)
    }

    /// Whether the body stopped short (the upstream request then failed because of it).
    pub fn failed(&self) -> bool {
        self.failed.load(Relaxed)
    }

    /// The refusal of a body phase, once.
    pub fn take_refused(&self) -> Option<(usize, Reject)> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Tally for Shared {
    fn chain(&self) -> &Chain {
        &self.chain
    }
    fn add(&mut self, n: u64) -> u64 {
        self.progress.received.fetch_add(n, Relaxed) + n
    }
    fn fail(&mut self, refused: Option<(usize, Reject)>) {
        if refused.is_some() {
            *self
                .progress
                .refused
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = refused;
        }
        self.progress.failed.store(true, Relaxed);
    }
}

/// Why a request body stopped short.
#[derive(Debug)]
pub enum BodyError {
    /// A body phase refused it (see [`Tally::fail`]).
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

impl<B, T: Tally> RequestBody<B, T> {
    /// What the app's side of the body gets: the frame (`None`: the end), or, when a body
    /// phase refused the request, an error, the refusal kept for the client's response.
    fn answer(
        &mut self,
        checked: Result<Option<Frame<Bytes>>, (usize, Reject)>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Poll::Ready(match checked {
            Ok(frame) => frame.map(Ok),
            Err(refused) => {
                self.tally.fail(Some(refused));
                Some(Err(BodyError::Refused))
            }
        })
    }
}

impl<B, T> HttpBody for RequestBody<B, T>
where
    B: HttpBody<Data = Bytes> + Unpin,
    T: Tally + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let mut frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(_)) => {
                this.tally.fail(None);
                return Poll::Ready(Some(Err(BodyError::Client)));
            }
            None => {
                // A body that had any bytes tells its phases it ended, once.
                let received = this.tally.add(0);
                if this.phases == 0 || received == 0 || std::mem::replace(&mut this.ended, true) {
                    return Poll::Ready(None);
                }
                let end = Piece {
                    data: &Bytes::new(),
                    received,
                    end: true,
                };
                let checked =
                    this.tally
                        .chain()
                        .on_request_body(this.phases, &end, &mut this.state);
                return this.answer(checked.map(|()| None));
            }
        };
        let checked = if let Some(data) = frame.data_ref() {
            let received = this.tally.add(data.len() as u64);
            let piece = Piece {
                data,
                received,
                end: false,
            };
            match this.phases {
                0 => Ok(()),
                phases => this
                    .tally
                    .chain()
                    .on_request_body(phases, &piece, &mut this.state),
            }
        } else if let Some(fields) = frame.trailers_mut() {
            let chain = this.tally.chain();
            let checked = match this.phases {
                0 => Ok(()),
                phases => chain.on_request_trailers(phases, fields, &mut this.state),
            };
            if checked.is_ok() {
                admit_trailers(fields, chain, this.underscores);
            }
            checked
        } else {
            Ok(())
        };
        this.answer(checked.map(|()| Some(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Removes the request trailer fields the app must not get: those that may not be
/// trailers at all, those the chain sets or removes on the head (a trailer could undo
/// it), and names with an `_` unless `underscores` allows them, as on the head.
fn admit_trailers(fields: &mut HeaderMap, chain: &Chain, underscores: Underscores) {
    let refused: Vec<HeaderName> = fields
        .keys()
        .filter(|name| {
            !hop::may_be_trailer(name)
                || chain.sets_request_field(name)
                || underscores != Underscores::Allow && name.as_str().contains('_')
        })
        .cloned()
        .collect();
    for name in refused {
        fields.remove(name);
    }
}

/// A response body to the client: the upstream's, streamed (over HTTP/1.1 or HTTP/2); one
/// gatehouse made; either of them through the filters of response-body phases; or, after a
/// `101`, the upstream connection the server splices to the client's.
pub enum Body {
    Full(Option<Bytes>),
    Upstream(pool::Body),
    UpstreamH2(H2Body),
    Filtered(Box<Filtered>),
    Upgrade(Option<Upgraded>),
}

impl Body {
    pub fn full(bytes: Bytes) -> Self {
        Body::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// This body through `filters` (from the response phases); itself when there are none.
    pub fn filtered(self, filters: Filters) -> Self {
        if filters.is_empty() {
            return self;
        }
        Body::Filtered(Box::new(Filtered {
            inner: self,
            filters,
            held: false,
            ended: false,
            trailers: None,
        }))
    }
}

/// A body through filters: each piece of the inner body goes through them in order, a
/// pause of the inner body (its poll is pending) flushes what they hold, and its end (its
/// `None`, or its trailers) finishes them before the trailers go on unchanged.
pub struct Filtered {
    inner: Body,
    filters: Filters,
    /// The filters have been given data since they last flushed.
    held: bool,
    /// The inner body has ended and the filters have finished.
    ended: bool,
    /// The inner body's trailers, sent after the filters' last output.
    trailers: Option<HeaderMap>,
}

impl Filtered {
    /// `data` through every filter, each told `at`.
    fn run(&mut self, data: Bytes, at: Boundary) -> std::io::Result<Bytes> {
        self.filters
            .iter_mut()
            .try_fold(data, |data, filter: &mut Box<dyn BodyFilter>| {
                filter.filter(data, at)
            })
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Frame<Bytes>>>> {
        let data = |out: Bytes| Poll::Ready(Some(Ok(Frame::data(out))));
        loop {
            if self.ended {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let (piece, at) = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending if self.held => {
                    self.held = false;
                    (Bytes::new(), Boundary::Pause)
                }
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(piece) => {
                        self.held = true;
                        (piece, Boundary::More)
                    }
                    Err(frame) => {
                        let mut trailers = frame.into_trailers().ok();
                        if let Some(fields) = trailers.as_mut() {
                            for filter in &mut self.filters {
                                filter.trailers(fields)?;
                            }
                        }
                        self.trailers = trailers;
                        self.ended = true;
                        (Bytes::new(), Boundary::End)
                    }
                },
                Poll::Ready(None) => {
                    self.ended = true;
                    (Bytes::new(), Boundary::End)
                }
            };
            let out = self.run(piece, at)?;
            if !out.is_empty() {
                return data(out);
            }
            if at == Boundary::Pause {
                // The inner body's waker is registered: it wakes us when there is more.
                return Poll::Pending;
            }
        }
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
            Body::UpstreamH2(body) => Pin::new(body).poll_frame(cx),
            Body::Filtered(body) => body.poll_frame(cx),
            Body::Upgrade(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(bytes) => bytes.is_none(),
            Body::Upstream(body) => body.is_end_stream(),
            Body::UpstreamH2(body) => body.is_end_stream(),
            Body::Filtered(body) => body.ended && body.trailers.is_none(),
            Body::Upgrade(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Upstream(body) => body.size_hint(),
            Body::UpstreamH2(body) => body.size_hint(),
            // A filter changes the length: it is known once the body has ended.
            Body::Filtered(body) if body.ended && body.trailers.is_none() => {
                SizeHint::with_exact(0)
            }
            Body::Filtered(_) => SizeHint::default(),
            Body::Upgrade(_) => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;
    use crate::middleware::{self, Handles};

    /// A chain that sets `x-env`, removes `x-debug` and strips the `x-api-key` it reads.
    fn chain() -> Chain {
        let source = "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n\
             [[middleware]]\ntype = \"headers\"\nrequest = { set = { \"x-env\" = \"prod\" }, remove = [\"x-debug\"] }\n\
             [[middleware]]\ntype = \"api_key\"\nkeys = [{ id = \"a\", key = \"k\" }]\n";
        let config = crate::Config::parse(std::path::Path::new("proxy.toml"), source, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        middleware::chain(&config.middleware, &Handles::offline())
    }

    /// Names a trailer section may carry: fields that may not be trailers, the chain's
    /// own, underscored ones, and ordinary ones.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            select(
                &[
                    "host",
                    "authorization",
                    "content-length",
                    "cookie",
                    "transfer-encoding",
                    "te",
                    "if-match",
                    "range",
                    "x-forwarded-for",
                    "traceparent",
                    "x-env",
                    "x-debug",
                    "x-api-key",
                    "x_auth_subject",
                    "x-checksum",
                    "grpc-status",
                ][..]
            )
            .prop_map(str::to_owned),
            "[a-z][a-z_-]{0,12}",
        ]
    }

    proptest! {
        /// Whatever a client puts in a request's trailers, what reaches the app is exactly
        /// the fields that may be trailers, that the chain does not own, and (unless
        /// allowed) have no underscore, with their values in order.
        #[test]
        fn trailers_keep_exactly_the_admissible_fields(
            fields in vec((name(), "[ -~]{0,8}"), 0..12),
            allow in any::<bool>(),
        ) {
            let chain = chain();
            let underscores = if allow { Underscores::Allow } else { Underscores::Drop };
            let mut trailers = HeaderMap::new();
            for (name, value) in &fields {
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                trailers.append(name, value.parse().unwrap());
            }
            let sent = trailers.clone();
            admit_trailers(&mut trailers, &chain, underscores);
            for (name, _) in &sent {
                let admissible = hop::may_be_trailer(name)
                    && !chain.sets_request_field(name)
                    && (allow || !name.as_str().contains('_'));
                let kept: Vec<_> = trailers.get_all(name).iter().collect();
                if admissible {
                    prop_assert_eq!(kept, sent.get_all(name).iter().collect::<Vec<_>>());
                } else {
                    prop_assert!(kept.is_empty(), "{} reached the app", name);
                }
            }
            prop_assert!(trailers.keys().all(|n| sent.contains_key(n)));
        }
    }
}
