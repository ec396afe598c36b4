//! `response::parse` on any bytes, for a GET, a HEAD or a POST, whole and in reads of two
//! sizes: the invariants of tests/http1_check.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../http1_check/mod.rs"]
mod http1_check;

fuzz_target!(|input: (u8, u8, u8, &[u8])| {
    let (a, b, method, bytes) = input;
    let method = [Method::GET, Method::HEAD, Method::POST][usize::from(method % 3)].clone();
    let cuts = [usize::from(a) + 1, usize::from(b) + 1];
    let _ = http1_check::response_head(bytes, &method, &cuts);
});
