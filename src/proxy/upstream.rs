//! The upstream client: keep-alive HTTP/1.1 connections to the app over TCP or a Unix
//! socket, pooled per worker thread so a request never contends with another worker.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::body::{BodyError, RequestBody};
use crate::config::{UpstreamConfig, UpstreamUrl};

type Sender = http1::SendRequest<RequestBody>;

/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE_PER_WORKER: usize = 1024;

thread_local! {
    /// Which pool shard this thread uses: its worker index (see `set_worker_index`).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Pins the calling worker thread to pool shard `index`.
pub fn set_worker_index(index: usize) {
    SHARD.with(|s| s.set(index));
}

/// The upstream of one config generation.
pub struct Upstream {
    target: UpstreamUrl,
    /// `host:port` of the upstream, the `Host` header when `preserve_host = false`.
    authority: HeaderValue,
    connect_timeout: Duration,
    timeout: Duration,
    pool: Arc<Pool>,
}

/// Why the upstream gave no response head.
#[derive(Debug)]
pub enum UpstreamError {
    /// TCP or Unix connect failed (refused, unreachable).
    Connect(std::io::Error),
    /// `upstream.connect_timeout` passed while connecting.
    ConnectTimeout,
    /// `upstream.timeout` passed before the response head.
    Timeout,
    /// The request body went over a `body_limit` while streaming upstream.
    BodyTooLarge,
    /// The client's request body broke off.
    ClientBody,
    /// The upstream reset the connection or sent something that is not HTTP.
    Protocol(hyper::Error),
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Protocol(_) => StatusCode::BAD_GATEWAY,
            UpstreamError::ConnectTimeout | UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UpstreamError::ClientBody => StatusCode::BAD_REQUEST,
        }
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::ConnectTimeout => "connect_timeout",
            UpstreamError::Timeout => "timeout",
            UpstreamError::BodyTooLarge => "body_too_large",
            UpstreamError::ClientBody => "client_body",
            UpstreamError::Protocol(e) if e.is_parse() => "invalid_response",
            UpstreamError::Protocol(_) => "reset",
        }
    }

    /// What the client is told.
    pub fn message(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "the upstream refused the connection",
            UpstreamError::ConnectTimeout => "the upstream did not accept a connection in time",
            UpstreamError::Timeout => "the upstream did not answer in time",
            UpstreamError::BodyTooLarge => "the request body is too large",
            UpstreamError::ClientBody => "the request body could not be read",
            UpstreamError::Protocol(e) if e.is_parse() => "the upstream sent an invalid response",
            UpstreamError::Protocol(_) => "the upstream closed the connection",
        }
    }

    fn from_hyper(e: hyper::Error) -> Self {
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(b) = s.downcast_ref::<BodyError>() {
                return match b {
                    BodyError::TooLarge => UpstreamError::BodyTooLarge,
                    BodyError::Client(_) => UpstreamError::ClientBody,
                };
            }
            source = s.source();
        }
        UpstreamError::Protocol(e)
    }
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, workers: usize) -> Upstream {
        let authority = match &config.url {
            UpstreamUrl::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            UpstreamUrl::Tcp { host, port } => format!("{host}:{port}"),
            UpstreamUrl::Unix(_) => "localhost".to_owned(),
        };
        Upstream {
            target: config.url.clone(),
            authority: HeaderValue::from_str(&authority).expect("validated host"),
            connect_timeout: config.connect_timeout.0,
            timeout: config.timeout.0,
            pool: Arc::new(Pool {
                shards: (0..workers.max(1))
                    .map(|_| Mutex::new(VecDeque::new()))
                    .collect(),
                idle_timeout: config.idle_timeout.0,
            }),
        }
    }

    pub fn authority(&self) -> &HeaderValue {
        &self.authority
    }

    /// Sends `req` and waits for the response head. Returns the connection with it, to go
    /// back to the pool once the response body has been read to its end.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Option<Pooled>), UpstreamError> {
        loop {
            let (mut sender, reused) = match self.pool.checkout().await {
                Some(sender) => (sender, true),
                // Boxed: connecting is rare, and its large future would otherwise be
                // carried (and copied) by every request's future.
                None => (Box::pin(self.connect()).await?, false),
            };
            match tokio::time::timeout(self.timeout, sender.try_send_request(req)).await {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(resp)) => {
                    // An upgraded connection belongs to its tunnel, never to the pool.
                    let pooled = (!upgrade).then(|| Pooled {
                        sender: Some(sender),
                        pool: self.pool.clone(),
                    });
                    return Ok((resp, pooled));
                }
                Ok(Err(mut e)) => match e.take_message() {
                    // A pooled connection closed before the request was written: nothing
                    // reached the app, so another connection may carry it.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::from_hyper(e.into_error())),
                },
            }
        }
    }

    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let connect = async {
            match &self.target {
                UpstreamUrl::Tcp { host, port } => {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    stream.set_nodelay(true)?;
                    handshake(stream).await
                }
                UpstreamUrl::Unix(path) => {
                    handshake(tokio::net::UnixStream::connect(path).await?).await
                }
            }
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
            .map_err(UpstreamError::Connect)
    }
}

async fn handshake<S>(stream: S) -> std::io::Result<Sender>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// A worker's idle connections, oldest first, each with the time it went idle.
type Shard = Mutex<VecDeque<(Sender, Instant)>>;

/// Idle connections, one shard per worker thread.
struct Pool {
    shards: Box<[Shard]>,
    idle_timeout: Duration,
}

impl Pool {
    fn shard(&self) -> &Shard {
        &self.shards[SHARD.with(Cell::get) % self.shards.len()]
    }

    /// The most recently used live connection, ready for a request.
    async fn checkout(&self) -> Option<Sender> {
        loop {
            // The lock is released before any await.
            let (mut sender, since) = self
                .shard()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_back()?;
            if sender.is_closed() || since.elapsed() > self.idle_timeout {
                continue;
            }
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.shard().lock().unwrap_or_else(|e| e.into_inner());
        // The oldest connections sit at the front: drop those past their idle time.
        while idle
            .front()
            .is_some_and(|(s, since)| s.is_closed() || now - *since > self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE_PER_WORKER {
            idle.push_back((sender, now));
        }
    }
}

/// A connection lent to one response; `release` returns it to the pool, dropping it closes it.
pub struct Pooled {
    sender: Option<Sender>,
    pool: Arc<Pool>,
}

impl Pooled {
    /// The response was read to its end: the connection can carry another request.
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.checkin(sender);
        }
    }
}
