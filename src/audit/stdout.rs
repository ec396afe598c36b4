//! The `stdout` sink: JSON lines on standard output, one write and flush per batch.

use std::io::Write;

/// Writes one batch (already JSON lines) to stdout and flushes it.
pub async fn write(lines: Vec<u8>) -> std::io::Result<()> {
    super::sink::blocking(move || {
        let mut out = std::io::stdout().lock();
        out.write_all(&lines)?;
        out.flush()
    })
    .await
}
