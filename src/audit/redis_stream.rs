//! The `redis_stream` sink: one `XADD <stream> MAXLEN ~ <maxlen> * event <json>` per event,
//! a batch sent as one pipeline through [`crate::redis_link`] (which follows a Sentinel or
//! Cluster failover). A batch that fails is delivered again (the journal keeps it): a
//! primary that dies mid-batch may leave some of its events twice, never none.

use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::audit::RedisSettings;
use crate::config::redis::RedisConnection;
use crate::metrics::Metrics;
use crate::redis_link::{Link, Links};

/// The sink runs on the control thread: one connection.
const SLOT: usize = 0;

pub struct RedisWriter {
    name: String,
    /// The connection settings, replaced by a reload ([`crate::audit::Audit::reconnect`]).
    settings: Arc<ArcSwap<RedisConnection>>,
    /// Made from `built`; made anew (its files read again) when a reload has stored new
    /// `settings`.
    link: Link,
    built: Arc<RedisConnection>,
    metrics: Arc<Metrics>,
    links: Links,
    stream: String,
    maxlen: u64,
    timeout: Duration,
}

impl RedisWriter {
    pub fn new(
        name: &str,
        s: &RedisSettings,
        settings: Arc<ArcSwap<RedisConnection>>,
        metrics: Arc<Metrics>,
        links: &Links,
    ) -> RedisWriter {
        let built = settings.load_full();
        let client = format!("audit:{name}");
        RedisWriter {
            link: Link::new(&client, &built, &metrics, links, 1, s.timeout.0),
            links: links.clone(),
            name: name.to_owned(),
            settings,
            built,
            metrics,
            stream: s.stream.clone(),
            maxlen: s.maxlen,
            timeout: s.timeout.0,
        }
    }

    /// Appends the batch to the stream, within `timeout` (connecting included).
    pub async fn write(&mut self, batch: &[Bytes]) -> Result<(), String> {
        if !Arc::ptr_eq(&self.built, &self.settings.load()) {
            self.built = self.settings.load_full();
            let client = format!("audit:{}", self.name);
            self.link = Link::new(
                &client,
                &self.built,
                &self.metrics,
                &self.links,
                1,
                self.timeout,
            );
        }
        let mut pipe = redis::pipe();
        for event in batch {
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.maxlen)
                .arg("*")
                .arg("event")
                .arg(event.as_ref());
        }
        let exchange = async {
            let mut conn = self.link.connection(SLOT).await.map_err(Err)?;
            // Each XADD's own answer is looked at: a `READONLY` from a primary demoted
            // meanwhile fails the batch (and drops the connection), it is not delivered.
            pipe.query_async::<redis::Value>(&mut conn)
                .await
                .and_then(redis::Value::extract_error)
                .map_err(Ok)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(_)) => {
                self.link.answered(SLOT);
                Ok(())
            }
            Ok(Err(Ok(e))) => {
                self.link.failed(SLOT, &e);
                Err(format!("redis: {e}"))
            }
            Ok(Err(Err(e))) => Err(e.to_string()),
            Err(_) => {
                self.link.timed_out(SLOT);
                Err(format!("redis: no answer within {:?}", self.timeout))
            }
        }
    }
}
