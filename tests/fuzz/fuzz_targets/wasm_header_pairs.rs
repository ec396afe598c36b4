//! The header maps a proxy-wasm plugin hands to gatehouse, on any bytes: read as pairs or as
//! malformed, never past the end, and what is read is what the bytes began with.
#![no_main]

use gatehouse::middleware::wasm::{deserialize_pairs, serialize_pairs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Some(pairs) = deserialize_pairs(bytes) {
        if !pairs.is_empty() {
            assert!(bytes.starts_with(&serialize_pairs(&pairs)));
        }
    }
});
