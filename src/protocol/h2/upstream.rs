//! Sending on the app's HTTP/2 connection (`upstream.protocol = "h2c"`, prior knowledge):
//! hyper's client driver, which runs in a task of its own and polls request bodies itself,
//! so both directions of a stream are open at once (bidirectional gRPC calls).

use bytes::Bytes;
use http_body::Body as HttpBody;
use hyper::client::conn::http2::{Builder, Connection, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

/// The connection's driver, for its task to poll.
pub type Driver<S, B> = Connection<TokioIo<S>, B, TokioExecutor>;

/// Opens HTTP/2 on `io`. No stream may be opened before the app's SETTINGS say how many it
/// takes (hyper would assume 100, and the app refuse those past its limit): the caller
/// waits for [`Driver::current_max_send_streams`] to turn non-zero.
pub async fn handshake<S, B>(io: S) -> hyper::Result<(SendRequest<B>, Driver<S, B>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Builder::new(TokioExecutor::new())
        .initial_max_send_streams(0)
        .handshake(TokioIo::new(io))
        .await
}
