//! The chunked decoder on any bytes, whole and in reads of two sizes: the invariants of
//! tests/http1_check (same result, progress at every call, bounded memory).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../http1_check/mod.rs"]
mod http1_check;

fuzz_target!(|input: (u8, u8, &[u8])| {
    let (a, b, bytes) = input;
    let _ = http1_check::chunked_body(bytes, &[usize::from(a) + 1, usize::from(b) + 1]);
});
