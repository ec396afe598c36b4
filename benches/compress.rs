//! What `compress` costs per response: CPU per KiB of body compressed, the ratio, and the
//! memory one stream holds, for each codec at each level, on a ~20 KiB JSON body, through
//! the public middleware interface as the chain calls it (request phase, response-body
//! phase, the filter over the body in 4 KiB pieces, then its end).
//! `cargo bench --bench compress` prints one table.
//!
//! CPU is the thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`), so other load on the
//! machine changes it little. Memory is what one stream holds between pieces, the most of
//! it over the stream, above what the process held before, as glibc's allocator counts it
//! (`mallinfo2`: it sees the C library zstd allocates from too): with the body's
//! `Content-Length` given (Brotli and zstd size their windows to it) and without (a
//! streamed body of 4 MiB fills the window).

use std::time::Instant;

use bytes::Bytes;
use gatehouse::chain::{BodyPhase, Boundary, Context, Flow, Middleware};
use gatehouse::config::Entries;
use gatehouse::middleware::{Build, Handles, Spec};
use http::{Request, Response};

/// Bytes the process's allocator holds now.
fn held() -> usize {
    // SAFETY: a plain query of glibc's allocator statistics.
    let info = unsafe { libc::mallinfo2() };
    // Small blocks, and the large ones glibc maps on their own.
    info.uordblks + info.hblkhd
}

/// A JSON array of objects, `n` bytes or a little more, of the kind an API returns.
fn json(n: usize) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(20);
    let mut out = String::from("[");
    let mut i = 0;
    while out.len() < n {
        out.push_str(&format!(
            "{{\"id\":{i},\"sku\":\"SKU-{:06}\",\"name\":\"Item {i} {}\",\"price\":{}.{:02},\"in_stock\":{},\"tags\":[\"{}\",\"{}\"]}},",
            rng.u32(..1_000_000),
            ["red", "blue", "large", "small", "eco"][rng.usize(..5)],
            rng.u32(1..500),
            rng.u32(..100),
            rng.bool(),
            ["new", "sale", "popular", "limited"][rng.usize(..4)],
            ["home", "garden", "office", "outdoor"][rng.usize(..4)],
        ));
        i += 1;
    }
    out.push(']');
    out.into()
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn compressor(level: &str) -> Box<dyn Middleware> {
    let settings = format!("min_size = \"0B\"\nlevel = \"{level}\"");
    Spec::parse("compress", toml::from_str(&settings).unwrap())
        .unwrap()
        .build(&Build {
            name: "bench",
            handles: &Handles::offline(),
            response_headers: &[],
        })
}

/// One response through the middleware; returns the compressed size, and calls `sample`
/// after each piece.
fn one(
    compress: &dyn Middleware,
    coding: &str,
    body: &Bytes,
    length: bool,
    mut sample: impl FnMut(),
) -> usize {
    let (mut req, ()) = Request::get("/items")
        .header("accept-encoding", coding)
        .body(())
        .unwrap()
        .into_parts();
    let mut ctx = Context::new(
        [127, 0, 0, 1].into(),
        [127, 0, 0, 1].into(),
        false,
        Instant::now(),
        0,
    );
    assert!(matches!(
        compress.on_request(&mut req, &mut ctx),
        Flow::Continue
    ));
    let mut resp = Response::builder().header("content-type", "application/json");
    if length {
        resp = resp.header("content-length", body.len());
    }
    let (mut head, ()) = resp.body(()).unwrap().into_parts();
    let BodyPhase::Filter(mut filter) = compress.on_response_body(&mut head, &mut ctx) else {
        panic!("{coding}: not compressed");
    };
    let mut out = 0;
    for piece in body.chunks(4096) {
        out += filter
            .filter(body.slice_ref(piece), Boundary::More)
            .unwrap()
            .len();
        sample();
    }
    out + filter.filter(Bytes::new(), Boundary::End).unwrap().len()
}

/// The most memory one stream of `body` held between pieces, in KiB.
fn peak_kib(compress: &dyn Middleware, coding: &str, body: &Bytes, length: bool) -> usize {
    let before = held();
    let mut peak = before;
    one(compress, coding, body, length, || peak = peak.max(held()));
    (peak - before) / 1024
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let body = json(20 << 10);
    let streamed = json(4 << 20);
    println!(
        "body: {} bytes of JSON; CPU is the median of 15 runs of 20 responses each\n",
        body.len()
    );
    println!(
        "{:<6} {:<8} {:>9} {:>10} {:>7} {:>12} {:>12}",
        "codec", "level", "µs/body", "µs/KiB in", "ratio", "KiB (length)", "KiB (4 MiB)"
    );
    for coding in ["gzip", "br", "zstd"] {
        for level in ["fastest", "default", "best"] {
            let compress = compressor(level);
            let size = one(&*compress, coding, &body, true, || {});
            let mut runs: Vec<u64> = (0..15)
                .map(|_| {
                    let start = thread_cpu_ns();
                    for _ in 0..20 {
                        std::hint::black_box(one(&*compress, coding, &body, true, || {}));
                    }
                    (thread_cpu_ns() - start) / 20
                })
                .collect();
            runs.sort_unstable();
            let ns = runs[runs.len() / 2];
            println!(
                "{:<6} {:<8} {:>9.1} {:>10.2} {:>7.2} {:>12} {:>12}",
                coding,
                level,
                ns as f64 / 1000.0,
                ns as f64 / 1000.0 / (body.len() as f64 / 1024.0),
                body.len() as f64 / size as f64,
                peak_kib(&*compress, coding, &body, true),
                peak_kib(&*compress, coding, &streamed, false),
            );
        }
    }
}
