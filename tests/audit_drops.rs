//! Every audit event lost to a full buffer counts in `gatehouse_audit_dropped_total`, the
//! family people alert on: those the shared queue drops and those a slow sink's own buffer
//! drops alike.
mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP collector that takes `delay` per batch and counts the events it received.
async fn slow_collector(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ingest", listener.local_addr().unwrap());
    let received = Arc::new(AtomicUsize::new(0));
    let counted = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut piece = [0u8; 16 << 10];
                // One POST: a head with content-length, then a JSON array.
                while let Some(head) = read_http_head(&mut stream, &mut buf).await {
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    while buf.len() < length {
                        match stream.read(&mut piece).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&piece[..n]),
                            _ => return,
                        }
                    }
                    let body: Vec<serde_json::Value> =
                        serde_json::from_slice(&buf[..length]).unwrap();
                    buf.drain(..length);
                    tokio::time::sleep(delay).await;
                    counted.fetch_add(body.len(), Ordering::SeqCst);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, received)
}

fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.parse().expect("a numeric sample"))
}

#[tokio::test]
async fn a_slow_collector_and_a_tiny_queue_lose_only_counted_events() {
    let (url, received) = slow_collector(Duration::from_secs(2)).await;
    let admin = free_port();
    let up = Upstream::start().await;
    let gh = Gatehouse::start(
        &config(
            "",
            "",
            &format!(
                "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 [audit]\nqueue_capacity = 4\nbatch_size = 4\nflush_interval = \"10ms\"\n\
                 [[audit.sinks]]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"30s\"\n"
            ),
        ),
        &[("upstream", &up.url())],
    )
    .await;
    let total = 400;
    let port = gh.port;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            tokio::spawn(async move {
                let mut conn = H1::connect(port).await;
                for _ in (c..total).step_by(8) {
                    let resp = conn
                        .send(request("GET", "/echo").body(empty()).unwrap())
                        .await;
                    assert_eq!(resp.status, 200, "the request path never waits on a sink");
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    // Once the sink has delivered what it holds, every event was either received or
    // counted as dropped.
    let (dropped, sink_dropped) = within(Duration::from_secs(120), "the sink to catch up", async {
        loop {
            let metrics = get(admin, "/metrics").await.text();
            let dropped = sample(&metrics, "gatehouse_audit_dropped_total");
            let sink_dropped = sample(
                &metrics,
                "gatehouse_audit_events_total{sink=\"http\",outcome=\"dropped\"}",
            );
            if received.load(Ordering::SeqCst) as u64 + dropped == total as u64 {
                return (dropped, sink_dropped);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        sink_dropped > 0,
        "the sink's own buffer dropped some: {sink_dropped}"
    );
    assert!(dropped >= sink_dropped, "{dropped} < {sink_dropped}");
    // And it stays so: nothing more arrives, nothing more is counted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = get(admin, "/metrics").await.text();
    assert_eq!(sample(&metrics, "gatehouse_audit_dropped_total"), dropped);
    assert_eq!(
        received.load(Ordering::SeqCst) as u64 + dropped,
        total as u64
    );
}
