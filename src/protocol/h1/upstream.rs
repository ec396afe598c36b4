//! gatehouse's HTTP/1.1 client side: one exchange on one connection to the app (or a side
//! service), a thin driver over the codec.
//!
//! An exchange has no task of its own: the request that holds the connection writes the
//! request and reads the response head, and the response [`Body`] reads the rest as the
//! caller takes it, so an exchange runs in the caller's task with no channel hop. Which
//! connection to use, and where it goes once its response has been read to the end, is the
//! pool's business: the body hands it to its [`Recycle`].

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::chunked::{self, Chunked, Decoded};
use super::response::{self, Head};
use super::Framing;

/// Read-buffer growth step: small heads stay in one allocation, bodies read in big steps.
const READ_CHUNK: usize = 16 << 10;

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// Nothing the peer could have acted on: the request may go on another connection.
    Stale(io::Error),
    /// The request body's source failed (it knows why).
    Body,
    /// The peer reset or closed the connection before a response head.
    Reset(io::Error),
    /// The peer sent something that is not an HTTP/1.1 response.
    Invalid(&'static str),
}

/// One connection and its buffers, reused request after request.
pub struct Conn<S> {
    io: S,
    /// Bytes read from the peer and not yet consumed.
    read: BytesMut,
    /// The encoded request head (and chunk framing) on its way out.
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S) -> Conn<S> {
        Conn {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
        }
    }

    pub fn io(&self) -> &S {
        &self.io
    }

    /// The emptied buffer the next request head is encoded into.
    pub fn head(&mut self) -> &mut Vec<u8> {
        self.out.clear();
        &mut self.out
    }

    /// Writes the encoded head (see [`Conn::head`]) and the body, then reads the response
    /// head. `upgrade`: the request asks to switch protocols, so a `101` is its answer; to
    /// any other request a `101` is invalid, or the app could open a tunnel past the chain.
    pub async fn exchange<B>(
        &mut self,
        method: &Method,
        upgrade: bool,
        framing: Framing,
        body: &mut B,
    ) -> Result<Head, Failure>
    where
        B: HttpBody<Data = Bytes> + Unpin,
    {
        if let Err(e) = self.io.write_all(&self.out).await {
            return Err(Failure::Stale(e));
        }
        if framing != Framing::Empty {
            match self.write_body(framing, body).await {
                Ok(()) => {}
                // The peer may have answered early (e.g. 401 to an upload it will not
                // read) and closed: its response, if complete, is still the right answer.
                Err(Failure::Reset(e)) => {
                    return match self.read_head(method, upgrade).await {
                        Ok(head) => Ok(head),
                        Err(_) => Err(Failure::Reset(e)),
                    };
                }
                Err(e) => return Err(e),
            }
        }
        let replayable = framing == Framing::Empty && is_idempotent(method);
        match self.read_head(method, upgrade).await {
            Err(Failure::Stale(e)) if !replayable => Err(Failure::Reset(e)),
            other => other,
        }
    }

    /// Streams the request body; `Reset` means the peer stopped taking it.
    async fn write_body<B>(&mut self, framing: Framing, body: &mut B) -> Result<(), Failure>
    where
        B: HttpBody<Data = Bytes> + Unpin,
    {
        let chunked = framing == Framing::Chunked;
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            match frame.map_err(|_| Failure::Body)?.into_data() {
                Ok(data) if chunked => {
                    self.out.clear();
                    chunked::encode(&data, &mut self.out);
                    self.io.write_all(&self.out).await.map_err(Failure::Reset)?;
                }
                Ok(data) => self.io.write_all(&data).await.map_err(Failure::Reset)?,
                // Trailers travel only in the chunked coding; a body of known length drops them.
                Err(frame) => {
                    if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                        self.out.clear();
                        chunked::encode_last(&trailers, &mut self.out);
                        return self.io.write_all(&self.out).await.map_err(Failure::Reset);
                    }
                }
            }
        }
        if chunked {
            self.io
                .write_all(chunked::LAST_CHUNK)
                .await
                .map_err(Failure::Reset)?;
        }
        Ok(())
    }

    /// Reads until a final response head (1xx other than 101 are skipped); a `101` is one
    /// only when the request asked to `upgrade`.
    async fn read_head(&mut self, method: &Method, upgrade: bool) -> Result<Head, Failure> {
        let mut received = !self.read.is_empty();
        loop {
            match response::parse(&mut self.read, method) {
                Ok(Some(head)) if head.parts.status == StatusCode::SWITCHING_PROTOCOLS => {
                    return match upgrade {
                        true => Ok(head),
                        false => Err(Failure::Invalid(
                            "101 Switching Protocols to a request that asked for no upgrade",
                        )),
                    };
                }
                Ok(Some(head)) if head.parts.status.is_informational() => continue,
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(Failure::Invalid(e.0)),
            }
            self.read.reserve(READ_CHUNK);
            match poll_fn(|cx| {
                tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
            })
            .await
            {
                Ok(0) if !received => {
                    return Err(Failure::Stale(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(0) => return Err(Failure::Invalid("the response head was cut short")),
                Ok(_) => received = true,
                Err(e) if !received => return Err(Failure::Stale(e)),
                Err(e) => return Err(Failure::Reset(e)),
            }
        }
    }

    /// The connection after a `101`, for the caller to tunnel over.
    pub fn upgraded(self) -> Upgraded<S> {
        Upgraded {
            io: self.io,
            read: self.read,
        }
    }
}

/// Methods whose request may be sent twice (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Where a connection goes once its response has been read to the end and it can carry
/// another request (the pool that lent it).
pub trait Recycle<S>: Send + 'static {
    fn recycle(self, conn: Conn<S>);
}

/// The response body. The connection goes to its [`Recycle`] once the body has been read
/// to its end; dropping the body earlier closes it.
pub struct Body<S, R> {
    conn: Option<Conn<S>>,
    state: State,
    keep_alive: bool,
    home: Option<R>,
}

enum State {
    Length(u64),
    Chunked(Chunked, Option<HeaderMap>),
    UntilClose,
    /// The peer broke off; reported on the next poll, once what came before it has been
    /// flushed (hyper drops unflushed bytes when a body fails).
    Failed(io::ErrorKind),
    Done,
}

impl<S: AsyncRead + Unpin, R: Recycle<S>> Body<S, R> {
    /// The body that follows `head` on `conn`.
    pub fn new(conn: Conn<S>, head: &Head, home: R) -> Self {
        let state = match head.framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::Size, None),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = Body {
            conn: Some(conn),
            state,
            keep_alive: head.keep_alive,
            home: Some(home),
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The body is complete: recycle the connection if it can carry another request.
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take()) {
            // Bytes after the end of the response mean the peer and gatehouse disagree
            // about framing: never reuse such a connection.
            if self.keep_alive && conn.read.is_empty() {
                home.recycle(conn);
            }
        }
    }
}

impl<S: AsyncRead + Unpin, R: Recycle<S> + Unpin> HttpBody for Body<S, R> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match &mut this.state {
                State::Done => None,
                State::Failed(kind) => {
                    let kind = *kind;
                    this.conn = None;
                    return Poll::Ready(Some(Err(kind.into())));
                }
                State::Length(left) if !conn.read.is_empty() => {
                    let take = (*left).min(conn.read.len() as u64);
                    *left -= take;
                    Some(Frame::data(conn.read.split_to(take as usize).freeze()))
                }
                State::Chunked(decoder, trailers) => match decoder.decode(&mut conn.read, trailers)
                {
                    Ok(Decoded::Data(data)) => Some(Frame::data(data)),
                    Ok(Decoded::Trailers(fields)) => Some(Frame::trailers(fields)),
                    Ok(Decoded::End) => {
                        this.state = State::Done;
                        None
                    }
                    Ok(Decoded::NeedMore) => None,
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            e,
                        ))));
                    }
                },
                State::UntilClose if !conn.read.is_empty() => {
                    Some(Frame::data(conn.read.split().freeze()))
                }
                State::Length(_) | State::UntilClose => None,
            };
            if let Some(frame) = frame {
                if matches!(this.state, State::Length(0)) {
                    this.finish();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            if matches!(this.state, State::Done) {
                this.finish();
                return Poll::Ready(None);
            }
            conn.read.reserve(READ_CHUNK);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.read
            )) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    // Cut short: the reader must see an error, never a truncated success.
                    this.state = State::Failed(io::ErrorKind::UnexpectedEof);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Ok(_) => {}
                Err(e) => {
                    this.state = State::Failed(e.kind());
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A connection after `101 Switching Protocols`: the bytes the peer sent right after its
/// head are read first.
pub struct Upgraded<S> {
    io: S,
    read: BytesMut,
}

impl<S: AsyncRead + Unpin> AsyncRead for Upgraded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Upgraded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
