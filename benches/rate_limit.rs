//! CPU cost of one local `rate_limit` decision, through the public middleware interface as
//! the chain calls it: key from the context, sharded-table lookup, GCRA, quota into the
//! context; and with the response phase writing the three `ratelimit-*` headers.
//!
//! Time advances by a fixed step per request (through `Context::start`, the clock the
//! limiter reads), so every request is allowed (asserted) and the measurement is
//! deterministic.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use gatehouse::chain::{Context, Flow, Middleware};
use gatehouse::config::Entries;
use gatehouse::middleware::{Build, Handles, Spec};
use http::{Request, Response};

fn limiter() -> Box<dyn Middleware> {
    let settings = toml::from_str("rate = \"1000000/s\"\nburst = 1000\nmax_keys = 100000").unwrap();
    Spec::parse("rate_limit", settings).unwrap().build(&Build {
        name: "bench",
        handles: &Handles::offline(),
        response_headers: &[],
    })
}

fn bench(c: &mut Criterion) {
    let limiter = limiter();
    let (mut req, ()) = Request::get("/").body(()).unwrap().into_parts();
    let (mut resp, _) = Response::new(Bytes::new()).into_parts();
    let epoch = Instant::now();
    let ips: Vec<IpAddr> = (0..10_000u32)
        .map(|i| IpAddr::from((10 << 24 | i).to_be_bytes()))
        .collect();

    // One clock for every case, so no key is ever ahead of it.
    let mut i = 0u64;
    let mut group = c.benchmark_group("rate_limit_local");
    for (name, keys) in [("one_key", 1), ("10k_keys", ips.len())] {
        group.bench_function(format!("decide/{name}"), |b| {
            b.iter(|| {
                i += 1;
                let ip = ips[i as usize % keys];
                let mut ctx = Context::new(ip, ip, false, epoch + Duration::from_micros(i), 0);
                assert!(matches!(
                    limiter.on_request(&mut req, &mut ctx),
                    Flow::Continue
                ));
                black_box(ctx.state)
            })
        });
    }
    let ip = ips[0];
    group.bench_function("decide_and_headers/one_key", |b| {
        b.iter(|| {
            i += 1;
            let mut ctx = Context::new(ip, ip, false, epoch + Duration::from_micros(i), 0);
            assert!(matches!(
                limiter.on_request(&mut req, &mut ctx),
                Flow::Continue
            ));
            limiter.on_response(&mut resp, &mut ctx);
            black_box(resp.headers.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
