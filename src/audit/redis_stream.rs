//! The `redis_stream` sink: one `XADD <stream> MAXLEN ~ <maxlen> * event <json>` per event,
//! a batch sent as one pipeline on a multiplexed connection. A failed batch drops the
//! connection; the next delivery connects anew.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;

use crate::config::audit::RedisSettings;

pub struct RedisWriter {
    client: redis::Client,
    connection: Option<MultiplexedConnection>,
    stream: String,
    maxlen: u64,
    timeout: Duration,
}

impl RedisWriter {
    pub fn new(s: &RedisSettings) -> RedisWriter {
        RedisWriter {
            client: redis::Client::open(s.url.as_str()).expect("validated at load"),
            connection: None,
            stream: s.stream.clone(),
            maxlen: s.maxlen,
            timeout: s.timeout.0,
        }
    }

    /// Appends the batch to the stream, within `timeout` (connecting included).
    pub async fn write(&mut self, batch: &[Bytes]) -> Result<(), String> {
        let mut pipe = redis::pipe();
        for event in batch {
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.maxlen)
                .arg("*")
                .arg("event")
                .arg(event.as_ref())
                .ignore();
        }
        let exchange = async {
            let connection = match &mut self.connection {
                Some(c) => c,
                None => self
                    .connection
                    .insert(self.client.get_multiplexed_async_connection().await?),
            };
            pipe.query_async::<()>(connection).await
        };
        let result = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("redis: {e}"),
            Err(_) => format!("redis: no answer within {:?}", self.timeout),
        };
        self.connection = None;
        Err(result)
    }
}
