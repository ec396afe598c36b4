//! gatehouse's HTTP/1.x server: a thin driver over [`crate::protocol::h1`] that reads request
//! heads and bodies from a connection, hands each request to the service, and writes the
//! answer back, one request after another (pipelined requests wait in the buffer).
//!
//! Heads are parsed straight from the connection's buffer (header values share it), and a
//! response head with a small body leaves in one write, with no connection task or
//! channel between the socket and the request. A request body is read only as the service
//! asks for it ([`Body`], which shares the connection's buffer with this driver), so an
//! upload streams with backpressure; `Expect: 100-continue` is answered when the body is
//! first asked for. An upgrade the app accepts becomes a tunnel, counted both ways. A
//! plaintext connection that opens with the HTTP/2 preface is handed to the HTTP/2 server.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::chunked::{self, Chunked, Decoded, InvalidChunk};
use super::response::{self, Writing};
use super::{request, Framing};
use crate::protocol::h2::{PREFACE, PREFACE_REFUSED};

/// Free room asked of the buffer before each read.
const READ_ROOM: usize = 4 << 10;
/// Response bytes gathered before a write: a head and a small body go out together.
const WRITE_BATCH: usize = 16 << 10;
/// The most of its write buffer a connection keeps between responses, so idle keep-alive
/// connections hold little after a large response.
const WRITE_KEEP: usize = 4 << 10;
/// How long, and how much of, an unread request body is read and thrown away after the
/// answer, before the connection closes: closing with unread bytes makes the kernel send a
/// reset, and the client would lose the answer (a 401, a 413) sent to it.
const LINGER: Duration = Duration::from_secs(10);
const LINGER_BYTES: u64 = 64 << 20;

/// How the driver left the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done with: the client left, asked to close, broke off, or the server drains.
    Closed,
    /// The connection opened with the HTTP/2 preface: the buffer holds what was read.
    Http2,
}

/// What the driver needs from the connection it serves.
pub struct Settings {
    /// `server.max_header_bytes`.
    pub max_head: usize,
    /// Plaintext connections may open with the HTTP/2 preface (h2c prior knowledge); under
    /// TLS, ALPN decided already.
    pub h2c: bool,
}

/// What a response body offers the driver besides its bytes: the upstream connection of a
/// `101 Switching Protocols`, and a place to record the tunnel's traffic.
pub trait Served: HttpBody<Data = Bytes, Error = io::Error> + Unpin {
    type Upgraded: AsyncRead + AsyncWrite + Unpin;
    fn take_upgrade(&mut self) -> Option<Self::Upgraded>;
    fn tunnel_closed(&mut self, from_client: u64, to_client: u64);
}

/// Where the connection is, for the watchdog (see `conn.rs`), and what never became a
/// request, for the record.
pub trait Phases {
    /// Waiting for a request, no byte of it received.
    fn idle(&self);
    /// Some bytes of a request head are here.
    fn head(&self);
    /// A request is being served; `reading_body` while its body waits for the client.
    fn busy(&self, reading_body: bool);
    /// The answer to a request head the parser refused: the driver writes it and closes,
    /// but what gatehouse answers (its one JSON shape) is the server's to say.
    fn refusal(&self, invalid: request::Invalid) -> Response<Bytes>;
    /// That answer went out (`sent`: its body bytes, if it was written whole); `line` is
    /// the refused head's first line.
    fn refused(&self, _line: &[u8], _invalid: request::Invalid, _sent: Option<u64>) {}
}

/// Serves requests from `io` until the connection closes or turns out to be HTTP/2.
/// `call` answers one request (the protocol an `Upgrade` asked for, if any, rides along);
/// `draining` says whether the server is shutting down, so a response can announce the
/// close.
pub async fn serve<S, F, Fut, R>(
    io: &mut S,
    buf: &mut BytesMut,
    settings: &Settings,
    phases: &impl Phases,
    mut call: F,
    draining: impl Fn() -> bool,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<Body>, Option<HeaderValue>) -> Fut,
    Fut: Future<Output = Response<R>>,
    R: Served,
{
    let mut out = Vec::new();
    let mut date = DateCache::default();
    let mut first = true;
    loop {
        phases.idle();
        let head = match read_head(io, buf, settings, first, phases).await {
            Ok(head) => head,
            Err(Stop::Closed) => return Outcome::Closed,
            Err(Stop::Http2) => return Outcome::Http2,
            Err(Stop::BadPreface) => {
                let _ = io.write_all(PREFACE_REFUSED).await;
                let _ = io.shutdown().await;
                return Outcome::Closed;
            }
            Err(Stop::Invalid(invalid)) => {
                let answer = phases.refusal(invalid);
                let size = answer.body().len() as u64;
                let sent = write_error(io, &mut out, answer, &mut date).await;
                phases.refused(first_line(buf), invalid, sent.ok().map(|()| size));
                return Outcome::Closed;
            }
        };
        first = false;
        let request::Head {
            parts,
            framing,
            keep_alive,
            upgrade,
            expect_continue,
            trailers,
        } = head;
        let head_only = parts.method == Method::HEAD;
        let http10 = parts.version == Version::HTTP_10;
        let inbound = (framing != Framing::Empty).then(|| {
            Arc::new(Mutex::new(Inbound {
                buf: std::mem::take(buf),
                decode: match framing {
                    Framing::Length(n) => Decode::Length(n),
                    _ => Decode::Chunked(Chunked::Size, None),
                },
                want: false,
                eof: false,
                continue_due: expect_continue,
                body: None,
                driver: None,
            }))
        });
        let body = Body(inbound.clone());
        phases.busy(false);
        // Pinned where it is made: the request's future is large, and moving it costs.
        let mut answer = pin!(call(Request::from_parts(parts, body), upgrade));
        let mut pending_continue: &[u8] = &[];
        let Some(mut resp) = poll_fn(|cx| loop {
            if let Poll::Ready(resp) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            match &inbound {
                Some(inbound) => match poll_inbound(io, inbound, &mut pending_continue, phases, cx)
                {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(())) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                },
                None if client_gone(io, buf, cx) => return Poll::Ready(None),
                None => return Poll::Pending,
            }
        })
        .await
        else {
            return Outcome::Closed;
        };
        // The request's body is over, or will never be read: take the buffer back.
        let unread = match inbound {
            Some(inbound) => {
                let mut inbound = lock(&inbound);
                *buf = std::mem::take(&mut inbound.buf);
                let unread = !matches!(inbound.decode, Decode::Done);
                // A body still held elsewhere (an HTTP/2 upstream's task sends it) gets no
                // more bytes: it fails rather than waits.
                inbound.eof |= unread;
                if let Some(body) = inbound.body.take().filter(|_| unread) {
                    body.wake();
                }
                unread
            }
            None => false,
        };
        phases.busy(false);
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(upstream) = resp.body_mut().take_upgrade().filter(|_| !unread) {
                let writing = Writing {
                    head_request: false,
                    http10: false,
                    close: false,
                    exact: Some(0),
                };
                tunnel(io, buf, &mut out, resp, upstream, writing, &mut date).await;
                return Outcome::Closed;
            }
        }
        // A body left unread means the next request's start is unknown: close after it.
        let close = !keep_alive || unread || draining();
        let writing = Writing {
            head_request: head_only,
            http10,
            close,
            exact: resp.body().size_hint().exact(),
        };
        let watch = if unread { Watch::Discard } else { Watch::Gone };
        let written =
            write_response(io, buf, &mut out, resp, writing, trailers, watch, &mut date).await;
        if written.is_err() || close {
            if unread {
                linger(io).await;
            }
            return Outcome::Closed;
        }
        if out.capacity() > WRITE_KEEP {
            out = Vec::new();
        }
    }
}

/// Why no request head came.
enum Stop {
    Closed,
    Http2,
    /// Not HTTP/1 at all where HTTP/2 may open the connection: an invalid preface.
    BadPreface,
    Invalid(request::Invalid),
}

/// Reads until a complete request head is in `buf` and parses it (removing it from
/// `buf`). On a connection's first bytes, the HTTP/2 preface hands it over.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    settings: &Settings,
    first: bool,
    phases: &impl Phases,
) -> Result<request::Head, Stop> {
    loop {
        if !buf.is_empty() {
            phases.head();
            if first && settings.h2c && starts_like_preface(buf) {
                if buf.len() >= PREFACE.len() {
                    return Err(Stop::Http2);
                }
            } else {
                match parse(buf, settings.max_head) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    // On a port that speaks both, a first line of text that is no HTTP/1.x
                    // request line (such as a mangled preface) is taken for HTTP/2, which
                    // answers it in frames.
                    Err(_) if first && settings.h2c && not_http1_text(buf) => {
                        return Err(Stop::BadPreface)
                    }
                    Err(invalid) => return Err(Stop::Invalid(invalid)),
                }
            }
        }
        // Room is reclaimed in place: the previous request's head is gone by now.
        buf.reserve(READ_ROOM);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(Stop::Closed),
            Ok(_) => {}
        }
    }
}

/// The first line of `buf` (all of it, if no line has ended).
fn first_line(buf: &[u8]) -> &[u8] {
    buf.split(|&b| b == b'\n').next().unwrap_or(buf)
}

/// Whether `buf` opens with a whole line of printable text that names no HTTP/1 version.
fn not_http1_text(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    let line = &buf[..end];
    line.iter().all(|b| (b' '..0x7f).contains(b)) && !line.windows(7).any(|w| w == b"HTTP/1.")
}

/// Whether `buf` holds the HTTP/2 preface, or the start of it.
fn starts_like_preface(buf: &[u8]) -> bool {
    let n = buf.len().min(PREFACE.len());
    buf[..n] == PREFACE[..n]
}

/// Parses the request head at the start of `buf`, removing it on success. The header
/// values and the target share the head's bytes instead of a copy each.
fn parse(buf: &mut BytesMut, max_head: usize) -> Result<Option<request::Head>, request::Invalid> {
    let all = buf.split().freeze();
    match request::parse(&all, max_head) {
        Ok(Some((head, len))) => {
            // A pipelined request behind this one waits in the buffer (a rare copy).
            buf.extend_from_slice(&all[len..]);
            Ok(Some(head))
        }
        other => {
            // Put the bytes back in front of the buffer's free room.
            let mut whole = BytesMut::from(all);
            whole.unsplit(std::mem::take(buf));
            *buf = whole;
            other.map(|_| None)
        }
    }
}

/// Whether the otherwise idle client socket says the client left (end of stream or an
/// error). Bytes that arrive meanwhile (a pipelined request) stay in `buf`, and the watch
/// stops there, as hyper's does.
fn client_gone<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut, cx: &mut Context) -> bool {
    if !buf.is_empty() {
        return false;
    }
    matches!(
        tokio_util::io::poll_read_buf(Pin::new(io), cx, buf),
        Poll::Ready(Ok(0) | Err(_))
    )
}

/// A request body as it arrives, shared between the driver (which reads the socket) and
/// the [`Body`] (which decodes): both run in the connection's task when the upstream is
/// HTTP/1, so the lock is never contended, and each side wakes the other when needed.
struct Inbound {
    /// The connection's read buffer, lent to the body while it is read.
    buf: BytesMut,
    decode: Decode,
    /// The body waits for bytes: the driver should read.
    want: bool,
    /// The client closed (or the socket failed) before the body's end.
    eof: bool,
    /// `Expect: 100-continue` not yet answered: answered when the body is first asked for.
    continue_due: bool,
    body: Option<Waker>,
    driver: Option<Waker>,
}

enum Decode {
    Length(u64),
    Chunked(Chunked, Option<HeaderMap>),
    Done,
}

fn lock(inbound: &Mutex<Inbound>) -> MutexGuard<'_, Inbound> {
    inbound.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wakes `waker` unless it is this task's own (it is being polled already).
fn wake_other(waker: Option<Waker>, cx: &Context) {
    if let Some(waker) = waker.filter(|w| !w.will_wake(cx.waker())) {
        waker.wake();
    }
}

/// Reads body bytes from the socket when the body asks for them (sending `100 Continue`
/// first when it is due). `Ready(Ok)`: progress, poll the service again. `Ready(Err)`: the
/// client went away while nothing needs its bytes.
fn poll_inbound<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    inbound: &Mutex<Inbound>,
    pending_continue: &mut &'static [u8],
    phases: &impl Phases,
    cx: &mut Context<'_>,
) -> Poll<Result<(), ()>> {
    let mut st = lock(inbound);
    if matches!(st.decode, Decode::Done) || st.eof || !st.want {
        // Nothing to read for the body: a client leaving meanwhile abandons the request.
        st.driver = Some(cx.waker().clone());
        if matches!(st.decode, Decode::Done) && st.buf.is_empty() {
            let Inbound { buf, .. } = &mut *st;
            if client_gone(io, buf, cx) {
                return Poll::Ready(Err(()));
            }
        }
        return Poll::Pending;
    }
    if st.continue_due {
        st.continue_due = false;
        *pending_continue = b"HTTP/1.1 100 Continue\r\n\r\n";
    }
    while !pending_continue.is_empty() {
        match Pin::new(&mut *io).poll_write(cx, pending_continue) {
            Poll::Ready(Ok(n)) if n > 0 => *pending_continue = &pending_continue[n..],
            Poll::Ready(_) => {
                st.eof = true;
                wake_other(st.body.take(), cx);
                return Poll::Ready(Ok(()));
            }
            Poll::Pending => return Poll::Pending,
        }
    }
    st.buf.reserve(READ_ROOM);
    let Inbound { buf, .. } = &mut *st;
    match tokio_util::io::poll_read_buf(Pin::new(io), cx, buf) {
        Poll::Ready(Ok(0) | Err(_)) => st.eof = true,
        Poll::Ready(Ok(_)) => st.want = false,
        Poll::Pending => {
            // Waiting on the client: `body_read_timeout` runs.
            phases.busy(true);
            return Poll::Pending;
        }
    }
    phases.busy(false);
    wake_other(st.body.take(), cx);
    Poll::Ready(Ok(()))
}

/// The request body handed to the service: it decodes what the driver reads, as it is
/// asked for. Empty for a request without one.
pub struct Body(Option<Arc<Mutex<Inbound>>>);

impl HttpBody for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let Some(inbound) = &self.0 else {
            return Poll::Ready(None);
        };
        let mut st = lock(inbound);
        let Inbound { buf, decode, .. } = &mut *st;
        let frame = match decode {
            Decode::Done => return Poll::Ready(None),
            Decode::Length(left) if !buf.is_empty() => {
                let take = (*left).min(buf.len() as u64);
                *left -= take;
                let data = buf.split_to(take as usize).freeze();
                if *left == 0 {
                    *decode = Decode::Done;
                }
                Some(Ok(Frame::data(data)))
            }
            Decode::Length(_) => None,
            Decode::Chunked(state, trailers) => match state.decode(buf, trailers) {
                Ok(Decoded::Data(data)) => Some(Ok(Frame::data(data))),
                Ok(Decoded::Trailers(fields)) => Some(Ok(Frame::trailers(fields))),
                Ok(Decoded::End) => {
                    *decode = Decode::Done;
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => None,
                Err(e) => Some(Err(invalid(e))),
            },
        };
        if let Some(frame) = frame {
            // A body that cannot be decoded leaves the connection unusable.
            st.eof |= frame.is_err();
            return Poll::Ready(Some(frame));
        }
        if st.eof {
            return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
        }
        st.want = true;
        st.body = Some(cx.waker().clone());
        wake_other(st.driver.take(), cx);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|inbound| matches!(lock(inbound).decode, Decode::Done))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            None => SizeHint::with_exact(0),
            Some(inbound) => match lock(inbound).decode {
                Decode::Length(n) => SizeHint::with_exact(n),
                Decode::Done => SizeHint::with_exact(0),
                Decode::Chunked(..) => SizeHint::default(),
            },
        }
    }
}

fn invalid(e: InvalidChunk) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What the driver does with the client socket while it writes a response.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Notice the client leaving (a pipelined request's bytes stay in the buffer).
    Gone,
    /// Read and throw away the rest of a request body nobody will read.
    Discard,
}

/// Writes the response, streaming its body. The body is dropped (ending the request for
/// its record) only after its last byte was handed to the socket.
#[allow(clippy::too_many_arguments)]
async fn write_response<S, R>(
    io: &mut S,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    resp: Response<R>,
    writing: Writing,
    trailers: bool,
    watch: Watch,
    date: &mut DateCache,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: HttpBody<Data = Bytes, Error = io::Error> + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    out.clear();
    let framing = response::encode(out, &parts, writing, date.now());
    // Its header values may pin the upstream's read buffer: let go before streaming.
    drop(parts);
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut discarded = 0u64;
    while framing != Framing::Empty && !body.is_end_stream() {
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Nothing more yet (a slow stream): what is gathered goes out meanwhile.
                flush(io, out).await?;
                let next = pin!(poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)));
                watching(io, buf, watch, &mut discarded, next).await?
            }
        };
        let Some(frame) = frame.transpose()? else {
            break;
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                // Trailers go out only in the chunked coding, to a client that said it
                // accepts them (`te: trailers`); otherwise they are dropped, as hyper does.
                if let (Framing::Chunked, true, Ok(fields)) =
                    (framing, trailers, frame.into_trailers())
                {
                    chunked::encode_last(&fields, out);
                    flush(io, out).await?;
                    io.flush().await?;
                    return Ok(());
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        left = left
            .checked_sub(data.len() as u64)
            .ok_or_else(|| io::Error::other("response body longer than its content-length"))?;
        if framing == Framing::Chunked {
            chunked::encode_size(data.len(), out);
        }
        if out.len() + data.len() <= WRITE_BATCH {
            out.extend_from_slice(&data);
        } else {
            flush(io, out).await?;
            io.write_all(&data).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_BATCH {
            flush(io, out).await?;
        }
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(chunked::LAST_CHUNK),
        // A body that ends short would leave the client waiting: the connection closes.
        Framing::Length(_) if left != 0 => {
            flush(io, out).await?;
            return Err(io::Error::other(
                "response body shorter than its content-length",
            ));
        }
        _ => {}
    }
    flush(io, out).await?;
    io.flush().await?;
    drop(body);
    Ok(())
}

/// Awaits `next` while watching the client socket as `watch` says; an error means the
/// client left.
async fn watching<S, F>(
    io: &mut S,
    buf: &mut BytesMut,
    watch: Watch,
    discarded: &mut u64,
    mut next: Pin<&mut F>,
) -> io::Result<F::Output>
where
    S: AsyncRead + Unpin,
    F: Future,
{
    // Uninitialised: zeroing it would write 64 cache lines for every response awaited,
    // while only a client that keeps sending (rare) is ever read into it.
    let mut scratch = [MaybeUninit::<u8>::uninit(); 4096];
    poll_fn(|cx| loop {
        if let Poll::Ready(out) = next.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match watch {
            Watch::Gone if client_gone(io, buf, cx) => {
                return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()))
            }
            Watch::Gone => return Poll::Pending,
            Watch::Discard => {
                let mut read = ReadBuf::uninit(&mut scratch);
                match Pin::new(&mut *io).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(()))
                        if !read.filled().is_empty() && *discarded < LINGER_BYTES =>
                    {
                        *discarded += read.filled().len() as u64;
                    }
                    // The client finished (or stopped) sending: the answer still goes out.
                    Poll::Ready(_) | Poll::Pending => return Poll::Pending,
                }
            }
        }
    })
    .await
}

/// Half-closes the connection and reads what the client still sends for a while, so the
/// answer written before is not lost to a reset.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.shutdown().await;
    let drain = async {
        let mut scratch = [0u8; 4096];
        let mut total = 0u64;
        while total < LINGER_BYTES {
            match io.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n as u64,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Answers a request that could not be read, and gives up on the connection.
async fn write_error<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    answer: Response<Bytes>,
    date: &mut DateCache,
) -> io::Result<()> {
    let (parts, body) = answer.into_parts();
    out.clear();
    let writing = Writing {
        head_request: false,
        http10: false,
        close: true,
        exact: Some(body.len() as u64),
    };
    response::encode(out, &parts, writing, date.now());
    out.extend_from_slice(&body);
    io.write_all(out).await?;
    io.shutdown().await
}

/// After a `101`: writes the head, then splices the client and the upstream connection
/// until either side closes, and records the bytes that crossed each way.
async fn tunnel<S, R>(
    io: &mut S,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    resp: Response<R>,
    mut upstream: R::Upgraded,
    writing: Writing,
    date: &mut DateCache,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    R: Served,
{
    let (parts, mut body) = resp.into_parts();
    out.clear();
    response::encode(out, &parts, writing, date.now());
    drop(parts);
    if io.write_all(out).await.is_err() || io.flush().await.is_err() {
        return;
    }
    // Bytes the client sent right after its request belong to the new protocol.
    let early = buf.len() as u64;
    if !buf.is_empty() && upstream.write_all(&std::mem::take(buf)).await.is_err() {
        body.tunnel_closed(early, 0);
        return;
    }
    let mut client = Counting {
        inner: io,
        read: 0,
        written: 0,
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
    body.tunnel_closed(early + client.read, client.written);
}

/// Counts the bytes read from and written to a stream.
struct Counting<'a, S> {
    inner: &'a mut S,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.written += n as u64;
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

async fn flush<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// An IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT").
const DATE_LEN: usize = 29;

/// The `date` header's value, formatted once per second per connection.
struct DateCache {
    second: u64,
    text: [u8; DATE_LEN],
}

impl Default for DateCache {
    fn default() -> Self {
        DateCache {
            second: u64::MAX,
            text: [0; DATE_LEN],
        }
    }
}

impl DateCache {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            self.text
                .copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
            self.second = second;
        }
        &self.text
    }
}
