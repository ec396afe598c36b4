//! The admin listener (`[admin]`): `/healthz`, `/readyz` and `/metrics` on their own port.
//!
//! It runs on the control runtime, not on the workers: it answers probes while the workers
//! are saturated, and it stays up through the whole drain, until the process exits, so
//! Kubernetes sees `/readyz` turn 503 the moment SIGTERM arrives.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::chain::reject::json_error;
use crate::metrics::Metrics;
use crate::redis_link::Links;

type Body = Full<Bytes>;

/// What prometheus-client writes: OpenMetrics text (it ends in `# EOF`).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An admin client must send its request head within this (a probe sends it at once).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Readiness as the control thread knows it: set by the drain and the upstream probe,
/// read by `/readyz`.
#[derive(Default)]
pub struct Health {
    draining: AtomicBool,
    upstream_down: AtomicBool,
    /// `[admin] ready_requires = ["redis"]`: the links to wait for until all connected once.
    redis: Option<Links>,
    /// Set when they all had: from then on Redis no longer decides readiness.
    redis_ready: AtomicBool,
}

impl Health {
    /// Health that waits for `redis`'s links at start, when given.
    pub fn new(redis: Option<Links>) -> Health {
        Health {
            redis,
            ..Health::default()
        }
    }

    /// SIGTERM arrived: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Why the process is not ready, if it is not.
    fn not_ready(&self) -> Option<Cow<'static, str>> {
        if self.draining.load(Relaxed) {
            return Some("draining: gatehouse is shutting down".into());
        }
        if self.upstream_down.load(Relaxed) {
            return Some("the upstream is unreachable".into());
        }
        let links = self
            .redis
            .as_ref()
            .filter(|_| !self.redis_ready.load(Relaxed))?;
        let waiting = links.waiting();
        if waiting.is_empty() {
            self.redis_ready.store(true, Relaxed);
            return None;
        }
        Some(
            format!(
                "waiting for Redis to connect once (ready_requires): {}",
                waiting.join(", ")
            )
            .into(),
        )
    }
}

/// Serves admin connections from `listener` until the process exits.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>, metrics: Arc<Metrics>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        let service = service_fn(move |req: Request<Incoming>| {
            std::future::ready(Ok::<_, Infallible>(answer(&req, &health, &metrics)))
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn answer(req: &Request<Incoming>, health: &Health, metrics: &Metrics) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the admin endpoints answer GET and HEAD",
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" => match health.not_ready() {
            None => text(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "ready\n".into(),
            ),
            Some(why) => error(StatusCode::SERVICE_UNAVAILABLE, &why),
        },
        "/metrics" => text(
            StatusCode::OK,
            METRICS_CONTENT_TYPE,
            metrics.encode().into(),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "the admin endpoints are /healthz, /readyz and /metrics",
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Body::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// gatehouse's usual JSON error body.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_error(status, message, None).map(Body::new)
}

/// Probes the upstream every `every` (`[admin] upstream_check`) and records whether the
/// last probe failed. Runs on the control runtime for the life of the process.
pub async fn check_upstream<F, P>(health: Arc<Health>, every: Duration, probe: P)
where
    P: Fn() -> F,
    F: Future<Output = Result<(), String>>,
{
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = probe().await;
        let was_down = health.upstream_down.swap(result.is_err(), Relaxed);
        match result {
            Err(e) if !was_down => {
                tracing::warn!(error = %e, "upstream unreachable: /readyz answers 503")
            }
            Ok(()) if was_down => tracing::info!("upstream reachable again: /readyz answers 200"),
            _ => {}
        }
    }
}
