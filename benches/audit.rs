//! The request-path cost of audit: capturing one event, finishing it and putting it on the
//! queue (what a request pays), and serializing it (what the dispatcher pays, off the
//! request path). The queue is drained by a real dispatcher writing to a file sink.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

// The server's allocator: the event's box is freed on the dispatcher's thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use gatehouse::audit;
use gatehouse::config::Config;
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
    // The dispatcher and the sink drain the queue on their own thread, as in the server.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _enter = runtime.enter();
    audit::start(config.audit.as_ref().unwrap()).unwrap();
    let audit = audit::get().unwrap();

    let (parts, ()) = Request::get("/v1/items?page=2")
        .header("host", "api.example")
        .header("user-agent", "curl/8.5.0")
        .body(())
        .unwrap()
        .into_parts();
    let host = parts.headers.get("host").cloned();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let request_id = HeaderValue::from_static("0b6f7d1e-4e4b-4c1a-9a57-7f0e9b1c2d3e");

    c.bench_function("audit: capture, finish and enqueue one event", |b| {
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
                    let mut event = audit.capture(&parts, &parts.uri, host.clone(), ip, start);
                    event.status = 200;
                    event.request_id = Some(request_id.clone());
                    event.bytes_out = 734;
                    event.completed = true;
                    event.finish(Instant::now());
                    audit.record(event);
                }
                timed += began.elapsed();
                left -= chunk;
            }
            timed
        })
    });
    assert_eq!(gatehouse::metrics::global().audit_dropped.get(), 0);

    let mut event = audit.capture(&parts, &parts.uri, host.clone(), ip, Instant::now());
    event.request_id = Some(request_id.clone());
    event.finish(Instant::now());
    let fields = vec!["user_agent".to_owned()];
    c.bench_function("audit: serialize one event (dispatcher side)", |b| {
        let mut clock = gatehouse::audit::WallClock::now();
        b.iter(|| event.to_json(&fields, &mut clock))
    });
}

criterion_group!(benches, enqueue);
criterion_main!(benches);
