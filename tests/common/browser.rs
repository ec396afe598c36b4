//! Headless Chromium for the browser tests (`tests/cors_browser.rs`, `tests/compress.rs`):
//! the page itself is the observer, so nothing but the browser is needed. It comes from
//! Debian (`apt-get install chromium`, which `.ci/run` does); build.rs compiles the tests
//! that need it ignored where there is none, except under CI.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The browser on `PATH`; its absence fails the test (build.rs ignores it where there is
/// none, except under CI).
pub fn find_chromium() -> PathBuf {
    super::find_program("chromium", "Debian: apt-get install chromium")
}

/// Headless Chromium showing one URL, with a fresh profile; killed (with every process it
/// started) on drop.
pub struct Browser {
    child: Child,
    dir: tempfile::TempDir,
}

impl Browser {
    pub fn open(binary: &Path, url: &str) -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("chromium.log")).unwrap();
        let child = Command::new(binary)
            // As root (CI) Chromium needs --no-sandbox; the rest keeps it from reaching
            // out to the network (updates, sync, QUIC probes).
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                // Console messages (a CORS refusal's reason) go to the log.
                "--enable-logging=stderr",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        Browser { child, dir }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default()
    }

    /// The log once `done` holds for it, or as it is after 10 s (the caller's assertion
    /// then says what is missing).
    pub async fn log_once(&self, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if done(&log) || tokio::time::Instant::now() >= deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The browser's own process group: its renderer and helper processes too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}
