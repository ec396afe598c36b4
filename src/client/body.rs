//! A response body read from its connection as the caller takes it, and a connection
//! handed over after `101 Switching Protocols`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Conn, Pool, Stream, READ_CHUNK};
use crate::http1::chunked::{Chunked, Decoded};
use crate::http1::response::Head;
use crate::http1::Framing;

/// The response body. The connection goes back to the pool once the body has been read
/// to its end; dropping the body earlier closes it.
pub struct Body {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    pool: Arc<Pool>,
    shard: usize,
    /// When the head arrived: the connection's idle time counts from here.
    answered: Instant,
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

impl Body {
    pub(super) fn new(
        conn: Conn,
        head: &Head,
        pool: &Arc<Pool>,
        shard: usize,
        answered: Instant,
    ) -> Self {
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
            pool: pool.clone(),
            shard,
            answered,
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The body is complete: pool the connection if it can carry another request.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take() {
            // Bytes after the end of the response mean the peer and gatehouse disagree
            // about framing: never reuse such a connection.
            if self.keep_alive && conn.read.is_empty() {
                self.pool.checkin(self.shard, conn, self.answered);
            }
        }
    }
}

impl HttpBody for Body {
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
pub struct Upgraded {
    io: Stream,
    read: BytesMut,
}

impl Upgraded {
    pub(super) fn new(io: Stream, read: BytesMut) -> Upgraded {
        Upgraded { io, read }
    }
}

impl AsyncRead for Upgraded {
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

impl AsyncWrite for Upgraded {
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
