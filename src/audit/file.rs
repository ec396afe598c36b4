//! The `file` sink: JSON lines appended to a file, one write per batch. The file is
//! reopened at the first write after a SIGHUP, so logrotate can move it away.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

pub struct FileWriter {
    path: Arc<PathBuf>,
    file: Option<File>,
    /// Bumped on SIGHUP.
    reopen: Arc<AtomicU64>,
    /// The reopen generation the open file belongs to.
    generation: u64,
}

impl FileWriter {
    pub fn new(path: PathBuf, reopen: &Arc<AtomicU64>) -> FileWriter {
        FileWriter {
            path: Arc::new(path),
            file: None,
            reopen: reopen.clone(),
            generation: 0,
        }
    }

    /// Opens (creating it if need be) the file for appending and closes it again; without
    /// blocking, so a FIFO whose reader is not there yet (ENXIO) passes.
    pub fn check(path: &std::path::Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        match Self::options().custom_flags(libc::O_NONBLOCK).open(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Appending, creating the file if need be.
    fn options() -> OpenOptions {
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        options
    }

    /// Appends one batch (already JSON lines). After a failure the file is reopened next time.
    pub async fn write(&mut self, lines: Vec<u8>) -> std::io::Result<()> {
        let generation = self.reopen.load(Relaxed);
        let file = self.file.take().filter(|_| generation == self.generation);
        self.generation = generation;
        let path = self.path.clone();
        let file = super::sink::blocking(move || {
            let mut file = match file {
                Some(file) => file,
                None => Self::options().open(&*path)?,
            };
            file.write_all(&lines)?;
            Ok(file)
        })
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        self.file = Some(file);
        Ok(())
    }
}
