//! `request::parse` on any bytes, whole and in reads of two sizes, with the server's head
//! limit or a small one: the invariants of tests/http1_check.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../http1_check/mod.rs"]
mod http1_check;

fuzz_target!(|input: (u8, u8, bool, &[u8])| {
    let (a, b, small_limit, bytes) = input;
    let max_head = if small_limit {
        16 + usize::from(a) * 8
    } else {
        64 << 10
    };
    let cuts = [usize::from(a) + 1, usize::from(b) + 1];
    let _ = http1_check::request_head(bytes, max_head, &cuts);
});
