//! Serving the client's HTTP/2 connection: hyper's server driver, with gatehouse's settings,
//! and the preface check of a connection that ALPN made HTTP/2.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::server::conn::http2;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{PREFACE, PREFACE_REFUSED};

/// The HTTP/2 server settings every connection of a worker uses.
pub fn builder(max_header_bytes: usize) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    // A larger header list gets hyper's 431.
    b.max_header_list_size(max_header_bytes as u32);
    b
}

/// Reads the client's connection preface (within `timeout`) and returns it, for hyper to
/// read again; anything else is answered with GOAWAY (PROTOCOL_ERROR) and the connection
/// closed, which hyper would do without the GOAWAY. `None`: no preface.
pub async fn preface<S>(io: &mut S, timeout: Duration) -> Option<Bytes>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut got = BytesMut::with_capacity(PREFACE.len());
    let read = async {
        while got.len() < PREFACE.len() && PREFACE.starts_with(&got) {
            if io.read_buf(&mut got).await.map_or(true, |n| n == 0) {
                return false;
            }
        }
        true
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(true) if got.starts_with(PREFACE) => Some(got.freeze()),
        Ok(true) => {
            let _ = io.write_all(PREFACE_REFUSED).await;
            let _ = io.shutdown().await;
            None
        }
        _ => None,
    }
}
