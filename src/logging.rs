//! Process logs through `tracing`: JSON or text per `[log]`, `RUST_LOG` overriding the level.
//! Requests are not logged one by one; that is what audit events are for, and a failure
//! that every request meets is logged through a [`Throttle`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber, writing to stderr.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Lets a warning through at most once per 10 seconds, and counts the ones it holds back
/// meanwhile, for the next line to say how many there were: a failure repeated by every
/// request must not flood the log.
#[derive(Default)]
pub struct Throttle {
    /// When a line last went through, in seconds since the epoch (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    /// `Some(n)` when a line may be logged now, `n` lines having been held back since the
    /// last one; `None` (and one more held back) when not.
    pub fn ready(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Relaxed);
        if (last == 0 || now >= last + 10)
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let throttle = Throttle::default();
        assert_eq!(throttle.ready(), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.ready(), None);
        }
        // As if the last line went out an interval ago.
        throttle.last.fetch_sub(10, Relaxed);
        assert_eq!(
            throttle.ready(),
            Some(5),
            "the next line counts the held-back ones"
        );
        assert_eq!(throttle.ready(), None);
    }
}
