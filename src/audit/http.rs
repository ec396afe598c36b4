//! The `http` sink: each batch POSTed as one JSON array to a collector (gatehouse's one
//! outbound client, with its retries).

use bytes::Bytes;

use crate::config::audit::HttpSettings;
use crate::pool::collector::{Collector, Retries};

pub struct HttpWriter {
    collector: Collector,
}

impl HttpWriter {
    pub fn new(s: &HttpSettings, shards: usize) -> HttpWriter {
        HttpWriter {
            collector: collector(s, "application/json", shards),
        }
    }

    /// POSTs the batch, retrying as configured; the error is the last attempt's.
    pub async fn write(&self, batch: &[Bytes]) -> Result<(), String> {
        self.collector.post(json_array(batch)).await.map(drop)
    }
}

/// The collector of an `http`-like sink's settings (`url`, `headers`, `timeout`, `retries`,
/// `backoff`).
pub(super) fn collector(s: &HttpSettings, content_type: &'static str, shards: usize) -> Collector {
    Collector::new(
        s.url.parse().expect("validated at load"),
        content_type,
        &s.headers.0,
        s.timeout.0,
        Retries {
            retries: s.retries,
            backoff: s.backoff.0,
        },
        shards,
    )
}

/// The batch as one JSON array.
fn json_array(batch: &[Bytes]) -> Bytes {
    let mut out = Vec::with_capacity(batch.iter().map(|b| b.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (i, event) in batch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(event);
    }
    out.push(b']');
    out.into()
}
