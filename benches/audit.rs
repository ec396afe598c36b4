//! The request-path cost of audit: writing one event as JSON and putting it on the queue
//! (what a request's last phase pays, on the worker), with a real dispatcher and file
//! sink draining the queue on their own thread, as in the server.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};

// The server's allocator: the event's bytes are freed on the sink's thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use gatehouse::audit::{Audit, Decision, Event};
use gatehouse::metrics::Metrics;
use gatehouse::Config;
use http::{HeaderValue, Request};

fn enqueue(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let source = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"http://127.0.0.1:2\"\n\
         [audit]\nrequest_headers = [\"user-agent\"]\n\
         [[audit.sinks]]\ntype = \"file\"\npath = \"{}\"\n",
        dir.path().join("events.jsonl").display()
    );
    let config = Config::parse(Path::new("bench.toml"), &source, &|_| None).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _enter = runtime.enter();
    let metrics = Arc::new(Metrics::new());
    let audit = Audit::start(
        config.audit.as_ref().unwrap(),
        &metrics,
        &Default::default(),
        2,
    )
    .unwrap();

    let (parts, ()) = Request::get("/v1/items?page=2")
        .header("host", "api.example")
        .header("user-agent", "curl/8.5.0")
        .body(())
        .unwrap()
        .into_parts();
    let host = parts.headers.get("host").cloned();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let request_id = HeaderValue::from_static("0b6f7d1e-4e4b-4c1a-9a57-7f0e9b1c2d3e");

    c.bench_function("audit: write one event and enqueue it", |b| {
        // Timed in chunks well below the queue's capacity, letting the dispatcher empty it
        // in between, so every event is enqueued (none measured on the drop path).
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                while audit.queued() > 0 {
                    std::thread::yield_now();
                }
                let chunk = left.min(4096);
                let began = Instant::now();
                for _ in 0..chunk {
                    let start = Instant::now();
                    let headers = audit.capture_headers(&parts.headers);
                    let duration = start.elapsed();
                    audit.record(&Event {
                        ts: SystemTime::now() - duration,
                        request_id: Some(&request_id),
                        method: &parts.method,
                        host: host.as_ref(),
                        uri: &parts.uri,
                        status: 200,
                        duration,
                        upstream: Some(duration),
                        client_ip: ip,
                        subject: None,
                        session: None,
                        decision: Decision::Allow,
                        denied_by: None,
                        deny_reason: None,
                        policy_rule: None,
                        fail_open: &[],
                        bytes_in: 0,
                        bytes_out: 734,
                        completed: true,
                        trace: None,
                        grpc_status: None,
                        headers: &headers,
                    });
                }
                timed += began.elapsed();
                left -= chunk;
            }
            timed
        })
    });
    assert_eq!(metrics.audit_dropped.get(), 0);
}

criterion_group!(benches, enqueue);
criterion_main!(benches);
